"""Hook names: ``@register("name")``, ``create("name", **params)`` and third-party entry points.

Third-party packages make their hooks available by name through the ``stallguard.hooks``
entry-point group, for example in their ``pyproject.toml``::

    [project.entry-points."stallguard.hooks"]
    my_check = "my_package.checks:MyCheck"
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from .hook import Hook

__all__ = ["ENTRY_POINT_GROUP", "available", "create", "default_hooks", "get", "register"]

ENTRY_POINT_GROUP = "stallguard.hooks"

H = TypeVar("H", bound=type[Hook])

_REGISTRY: dict[str, type[Hook]] = {}
_entry_points_loaded = False

# The default set, by name. Monitors only watch; repair hooks change training and join with repair=True.
_DEFAULT_MONITORS: list[tuple[str, dict[str, Any]]] = []
_DEFAULT_REPAIRS: list[tuple[str, dict[str, Any]]] = []


def register(name: str, *, default: str | None = None, **default_params: Any) -> Callable[[H], H]:
    """Class decorator that makes a Hook subclass available by ``name``.

    Args:
        name: The registry name (used by :func:`create` and in configs).
        default: ``"monitor"`` or ``"repair"`` to add the hook to the default set of ``Guard``
            (built-in hooks only; leave None for your own).
        **default_params: Parameters for the default instance.

    Raises:
        ValueError: when ``name`` is taken by another class.

    Example:
        >>> import stallguard as sg
        >>> @sg.register("always_quiet")
        ... class AlwaysQuiet(sg.Hook):
        ...     pass
        >>> type(sg.create("always_quiet")).__name__
        'AlwaysQuiet'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty str, got {name!r}")
    if default not in (None, "monitor", "repair"):
        raise ValueError(f"register: default must be None, 'monitor' or 'repair', got {default!r}")

    def decorate(cls: H) -> H:
        if not (isinstance(cls, type) and issubclass(cls, Hook)):
            raise TypeError(f"register({name!r}) decorates Hook subclasses, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"hook name {name!r} is already registered to {existing.__qualname__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        if default == "monitor":
            _DEFAULT_MONITORS.append((name, default_params))
        elif default == "repair":
            _DEFAULT_REPAIRS.append((name, default_params))
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Hook)):
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) in {ENTRY_POINT_GROUP!r} is not a Hook subclass")
        _REGISTRY[ep.name] = cls
        if cls.registry_name is None:
            cls.registry_name = ep.name


def get(name: str) -> type[Hook]:
    """The Hook class registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown hook {name!r}; known hooks: {', '.join(sorted(_REGISTRY))}") from None


def create(name: str, /, **params: Any) -> Hook:
    """Instantiate the hook registered as ``name`` with ``params`` (which may include the instance ``name``).

    Example:
        >>> import stallguard as sg
        >>> sg.create("plateau", patience=100).patience
        100
    """
    return get(name)(**params)


def available() -> list[str]:
    """Names of every registered hook, entry points included."""
    _load_entry_points()
    return sorted(_REGISTRY)


def default_hooks(repair: bool = False) -> list[Hook]:
    """Fresh instances of the hooks ``Guard(model, optimizer)`` uses.

    Args:
        repair: Also include the hooks that change training (LR reduction, gradient clipping).

    Example:
        >>> import stallguard as sg
        >>> names = [type(h).__name__ for h in sg.default_hooks()]
        >>> "PlateauDetector" in names
        True
    """
    specs = _DEFAULT_MONITORS + (_DEFAULT_REPAIRS if repair else [])
    return [create(name, **params) for name, params in specs]
