"""DeadReLUCounter: find ReLU units that output nothing for any input, layer by layer.

A ReLU unit whose pre-activation is negative for every input outputs zero and passes no gradient,
so neither it nor the weights feeding it learn again. The counter keeps, per activation layer, a
device mask of the units that produced a positive output at least once during a window of sampled
steps, and reads the masks at check points to report each layer's dead fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import check_float, check_int, check_type
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["ActivationProbe", "DeadReLUCounter", "can_die"]

# Activations whose gradient is never exactly zero for negative inputs: their units cannot die.
_NEVER_DEAD: tuple[type[nn.Module], ...] = (
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
)

# Dynamo treats this call as the constant True while it traces, so the traced hook keeps one path.
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class ActivationProbe(nn.Module):
    """An identity module that shows a functional activation's output to :class:`DeadReLUCounter`.

    Module hooks cannot see ``F.relu(x)`` or ``x.clamp(min=0)`` inside a ``forward``: there is no
    module to hook. Pass such an output through a probe (``h = self.probe(F.relu(x))``) and the
    counter watches it like an ``nn.ReLU``. The probe returns its input unchanged; with no hooks on
    it, it costs one Python call, and nothing under ``torch.compile``.

    Example:
        >>> import torch, torch.nn.functional as F, stallguard as sg
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(4, 8)
        ...         self.probe = sg.ActivationProbe()
        ...     def forward(self, x):
        ...         return self.probe(F.relu(self.fc(x)))
        >>> counter = sg.DeadReLUCounter()
        >>> guard = sg.Guard(Net(), None, hooks=[counter], sinks=[])
        >>> counter.layers
        ['probe']
        >>> guard.close()
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


def can_die(module: nn.Module) -> bool:
    """Whether ``module`` is an activation whose units can die (the counter's default selection).

    True for ``nn.ReLU``, ``nn.ReLU6`` and any ``nn.Hardtanh`` clamping at zero from below,
    ``nn.Hardswish`` (zero for inputs at or below -3), ``nn.Threshold`` with ``threshold >= 0`` and
    ``value <= 0``, and :class:`ActivationProbe`. False for everything else, in particular for
    LeakyReLU, PReLU, RReLU, ELU, CELU, SELU, GELU, SiLU, Mish and Softplus, whose gradient is
    never exactly zero.
    """
    if isinstance(module, (nn.ReLU, nn.Hardswish, ActivationProbe)):
        return True
    if isinstance(module, nn.Hardtanh):
        return module.min_val == 0
    if isinstance(module, nn.Threshold):
        return module.threshold >= 0 and module.value <= 0
    return False


def _compiled(model: nn.Module | None) -> bool:
    """Whether torch.compile wraps ``model`` (``torch.compile(m)``) or compiled it in place (``m.compile()``)."""
    m = model
    for _ in range(8):
        if m is None:
            return False
        if getattr(m, "_compiled_call_impl", None) is not None:
            return True
        inner = getattr(m, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            return True
        inner = getattr(m, "module", None)
        if not isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return False
        m = inner
    return False


@dataclass
class _Site:
    """One place an activation module is called: its ``call``-th call within a forward pass."""

    index: int
    module: str
    call: int
    units: int

    @property
    def name(self) -> str:
        label = self.module or "(model)"
        return label if self.call == 0 else f"{label}#{self.call + 1}"


@register("dead_relu", default="monitor")
class DeadReLUCounter(Hook):
    """Count dead ReLU units per layer and warn when a layer's dead fraction passes a threshold.

    A unit is **dead** when it outputs ``<= 0`` for every sample of every sampled batch in a
    window. A unit is one feature: dim 1 of ``(N, F)`` and ``(N, C, H, W)`` / ``(N, C, D, H, W)``
    outputs (a conv channel counts as one unit over all positions), the last dim of ``(N, L, D)``
    sequence outputs (set ``unit_dim`` for other layouts, e.g. ``unit_dim=1`` for Conv1d's
    ``(N, C, L)``).

    On each sampled step (every ``every`` optimizer steps) the counter puts forward hooks on the
    activation modules before the forward passes and removes them when the gradients are final
    (``on_before_step``), so all micro-batches of a gradient-accumulation step are counted and
    other steps pay nothing. The hook reduces each output on the device to one bit per unit
    (``amax`` over the non-unit dims ``> 0``) and ORs it into that layer's mask; no value is read
    on the host. After ``window`` sampled steps the window is complete and no more hooks are
    added until the next check point reads the masks (one transfer with all hooks' states), reports
    each layer's dead fraction in :attr:`dead_fractions` and a ``dead_fraction`` debug event, and
    emits ``dead_units`` when a layer newly has more than ``threshold`` of its units dead. Then a
    new window starts. Under torch.distributed the masks are OR-ed across ranks, so a unit is dead
    only if it is dead on every rank.

    Forward passes in evaluation mode (``module.training`` is False) are not counted. An
    activation module called at several places in one forward pass (``self.relu`` reused) is
    watched as one layer per call place, named ``name``, ``name#2``, ... in call order.

    Module hooks cannot see functional activations (``F.relu``, ``torch.relu``, ``x.clamp(min=0)``):
    use ``nn.ReLU`` modules or pass such outputs through an :class:`ActivationProbe`.

    Under ``torch.compile``, hooks added to a module after its first compiled call are silently
    ignored. With ``persistent=True`` the hooks are registered once at attach and a Python flag turns
    counting on for sampled steps; Dynamo guards on the flag, so the compiled model has two graphs
    (counting and not) and no graph break. This mode is chosen automatically when the Guard's model
    is compiled; build the Guard on the compiled model (``Guard(torch.compile(model), opt)``), or
    build it before compiling with ``persistent=True``.

    Args:
        modules: The activation modules to watch: modules or their names in the Guard's model
            (``"features.2"``). None watches every module for which :func:`can_die` is true.
        threshold: Warn when a layer's dead fraction is above this, in [0, 1).
        window: Sampled steps a unit must stay silent over to count as dead.
        unit_dim: The output dim that indexes units, or None for the layout rule above.
        persistent: Keep the hooks registered for the whole run (needed under torch.compile);
            None chooses it when the Guard's model is compiled.
        every: Sample one optimizer step in this many.
        start_step: Sample no step before this one.
        name: Name used as the event source.

    Example:
        A layer whose biases are very negative is all dead; the layer before it is healthy.

        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        >>> with torch.no_grad():
        ...     _ = model[2].bias.fill_(-100.0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> counter = sg.DeadReLUCounter(every=1, window=4)
        >>> guard = sg.Guard(model, opt, hooks=[counter], sinks=[], check_every=4)
        >>> for _ in range(4):
        ...     x, y = torch.randn(32, 8), torch.randn(32, 1)
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> counter.dead_fractions
        {'1': 0.0, '3': 1.0}
        >>> [(e.kind, e.data["layers"]) for e in guard.events if e.kind == "dead_units"]
        [('dead_units', ('3',))]
        >>> guard.close()
    """

    def __init__(
        self,
        modules: Iterable[nn.Module | str] | None = None,
        *,
        threshold: float = 0.7,
        window: int = 5,
        unit_dim: int | None = None,
        persistent: bool | None = None,
        every: int = 10,
        start_step: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(every=every, start_step=start_step, name=name)
        owner = type(self).__name__
        self.modules = _check_modules(owner, modules)
        self.threshold = check_float(owner, "threshold", threshold, min=0.0, max=1.0, max_open=True)
        self.window = check_int(owner, "window", window, min=1)
        if unit_dim is not None:
            check_int(owner, "unit_dim", unit_dim)
        self.unit_dim = unit_dim
        if persistent is not None:
            check_type(owner, "persistent", persistent, bool, "a bool or None")
        self.persistent = persistent

        # Host state, saved by state_dict: the window in progress, the sites seen, the last report.
        self.add_state("window_batches", 0)
        self.add_state("window_steps", [])
        self.add_state("sites", [])
        self.add_state("windows", 0)
        self.add_state("dead_fractions", {})
        self.add_state("over", [])
        self.add_state("unseen_reported", False)

        self._sites: list[_Site] = []
        self._site_of: dict[tuple[str, int], _Site] = {}
        self._targets: list[tuple[str, nn.Module]] = []
        self._hook_fns: dict[str, Callable[[nn.Module, Any, Any], None]] = {}
        self._pending: list[tuple[str, Tensor, int]] = []
        self._skipped: dict[str, str] = {}
        self._counting = False
        self._persistent = False
        self._failure: BaseException | None = None

    # ----------------------------------------------------------------- public properties
    @property
    def layers(self) -> list[str]:
        """Names of the activation modules watched (known once the Guard attached)."""
        return [n for n, _ in self._targets]

    @property
    def is_persistent(self) -> bool:
        """Whether the hooks stay registered for the whole run (the torch.compile mode)."""
        return self._persistent

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        self._targets = self._resolve(guard.module)
        self._hook_fns = {n: self._make_hook(n) for n, _ in self._targets}
        self._persistent = self.persistent if self.persistent is not None else _compiled(guard.model)
        if not self._targets:
            if guard.module is not None:
                self._report_unseen("no_modules")
            return
        if self._persistent:
            self._register_hooks()

    def on_step_begin(self, step: int) -> None:
        want = bool(self._targets) and self.is_due(step) and self.window_batches < self.window
        if self._persistent:
            self._counting = want
        elif want and not self._counting:
            self._register_hooks()
            self._counting = True

    def on_before_step(self, ctx: StepContext) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if not ctx.is_clock or not self._counting:
            return
        self._counting = False
        if not self._persistent:
            self.remove_handles()
        # Outputs not folded after a forward pass of the model (submodules called directly, or the
        # model compiled in place) are folded here.
        if self._pending:
            entries = list(self._pending)
            self._pending.clear()
            for forward in _split_forwards(entries):
                self._fold(forward)
        if not self.window_steps:
            self.window_steps = [ctx.step, ctx.step]
        self.window_steps[1] = ctx.step
        self.window_batches += 1

    def on_check(self, check: CheckContext) -> None:
        if self.window_batches < self.window:
            return  # decide on complete windows only: fewer batches would overstate the dead
        steps = list(self.window_steps)
        fractions: dict[str, float] = {}
        dead: dict[str, int] = {}
        units: dict[str, int] = {}
        samples: dict[str, int] = {}
        for site in self._sites:
            seen = check.values.get(f"samples_{site.index}", 0.0)
            if seen <= 0:
                continue  # not called in a training forward during this window
            alive = np.asarray(check.values[f"alive_{site.index}"]).reshape(-1) != 0
            n_dead = int(site.units - np.count_nonzero(alive))
            fractions[site.name] = n_dead / site.units
            dead[site.name] = n_dead
            units[site.name] = site.units
            samples[site.name] = int(seen)
        self._reset_window()
        self.windows += 1
        if not fractions:
            self._report_unseen("no_outputs")
            return
        self.dead_fractions = fractions
        worst = max(fractions, key=fractions.__getitem__)
        common = {
            "fractions": fractions,
            "dead": dead,
            "units": units,
            "samples": samples,
            "window": self.window,
            "steps": steps,
            "threshold": self.threshold,
        }
        if self._skipped:
            common["skipped"] = dict(self._skipped)
        self.emit(
            "dead_fraction",
            "debug",
            f"dead ReLU units over steps {steps[0]}-{steps[1]}: most in {worst} ({fractions[worst]:.0%})",
            max_fraction=fractions[worst],
            **common,
        )
        over = [n for n, f in fractions.items() if f > self.threshold]
        new = [n for n in over if n not in self.over]
        self.over = over
        if not new:
            return
        detail = ", ".join(f"{n} {fractions[n]:.0%} ({dead[n]}/{units[n]})" for n in over[:4])
        more = f" and {len(over) - 4} more" if len(over) > 4 else ""
        self.emit(
            "dead_units",
            "warning",
            f"{len(over)} of {len(fractions)} activation layers have more than {self.threshold:.0%} of their units "
            f"dead over {self.window} sampled batches: {detail}{more}",
            causes=("dying_relu",),
            layers=over,
            new_layers=new,
            max_fraction=max(fractions[n] for n in over),
            **common,
        )

    def on_close(self) -> None:
        self._counting = False
        self._pending.clear()

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, declaring the per-layer masks it holds.

        Raises:
            KeyError: naming a state that ``state`` lacks.
            ValueError: when ``state`` describes other layers than this counter already saw.
        """
        owner = type(self).__name__
        if "sites" not in state:
            raise KeyError(f"{owner}.load_state_dict: missing state 'sites'")
        saved = [tuple(s) for s in state["sites"]]
        mine = [(s.module, s.call, s.units) for s in self._sites]
        if saved[: len(mine)] != mine:
            raise ValueError(
                f"{owner}.load_state_dict: the saved layers {saved} do not match the layers seen here {mine}"
            )
        for module, call, n_units in saved[len(mine) :]:
            self._declare_site(str(module), int(call), int(n_units))
        super().load_state_dict(state)
        self.sites = [[s.module, s.call, s.units] for s in self._sites]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        if self.modules is not None:
            names = {id(m): n for n, m in self._targets}
            config["modules"] = [m if isinstance(m, str) else names.get(id(m), repr(m)) for m in self.modules]
        return config

    # ----------------------------------------------------------------- internals
    def _resolve(self, root: nn.Module | None) -> list[tuple[str, nn.Module]]:
        owner = type(self).__name__
        if root is None:
            if self.modules is not None:
                raise ValueError(f"{owner}: modules= needs a Guard with a model, but the Guard has none")
            return []
        named = list(root.named_modules())
        if self.modules is None:
            return [(n, m) for n, m in named if can_die(m)]
        by_id = {id(m): n for n, m in named}
        by_name = dict(named)
        out: list[tuple[str, nn.Module]] = []
        for entry in self.modules:
            if isinstance(entry, str):
                key = entry
                for prefix in ("module.", "_orig_mod."):  # names as seen through DDP or compile wrappers
                    while key not in by_name and key.startswith(prefix):
                        key = key[len(prefix) :]
                if key not in by_name:
                    close = [n for n in by_name if n and (entry in n or n in entry)][:5]
                    hint = f"; similar names: {close}" if close else ""
                    raise ValueError(f"{owner}: modules has {entry!r}, which is not a submodule of the model{hint}")
                module_name, module = key, by_name[key]
            else:
                if id(entry) not in by_id:
                    raise ValueError(
                        f"{owner}: modules has {type(entry).__name__} {entry!r}, not a submodule of the model"
                    )
                module_name, module = by_id[id(entry)], entry
            if isinstance(module, _NEVER_DEAD):
                raise ValueError(
                    f"{owner}: modules has {module_name!r} ({type(module).__name__}), whose gradient is never "
                    f"exactly zero, so its units cannot die; watch ReLU-like modules only"
                )
            if all(m is not module for _, m in out):
                out.append((module_name, module))
        return out

    def _register_hooks(self) -> None:
        guard = self._require_guard("register hooks")
        for module_name, module in self._targets:
            self.register_handle(module.register_forward_hook(self._hook_fns[module_name]))
        if guard.model is not None:
            # Folding once per forward pass of the model tells call places apart and, under a compiled
            # wrapper (whose own hooks run outside the graph), keeps the list the graph appends to empty
            # on entry, so Dynamo does not recompile for its length.
            self.register_handle(guard.model.register_forward_hook(self._on_model_forward))

    def _make_hook(self, module_name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (self._counting and module.training):
                return None
            if _is_compiling():
                self._record(module_name, output)
            else:
                try:
                    self._record(module_name, output)
                except Exception as exc:
                    self._fail(exc)
            return None  # a value returned here would replace the module's output

        return hook

    def _record(self, module_name: str, output: Any) -> None:
        if not isinstance(output, Tensor) or output.layout != torch.strided or not output.is_floating_point():
            self._skipped[module_name] = "output is not a dense floating-point tensor"
            return
        ndim = output.ndim
        if ndim == 0:
            self._skipped[module_name] = "output is a scalar"
            return
        if self.unit_dim is None:
            d = 0 if ndim == 1 else (2 if ndim == 3 else 1)
        elif -ndim <= self.unit_dim < ndim:
            d = self.unit_dim % ndim
        else:
            self._skipped[module_name] = f"unit_dim={self.unit_dim} does not fit an output with {ndim} dims"
            return
        units = output.shape[d]
        if units == 0:
            return
        out = output.detach()
        # amax then compare reads the activation once; on CPU it is 10-24x cheaper than any(out > 0).
        # The dims after the unit dim are reduced first (contiguous, e.g. H and W of NCHW), then the
        # ones before it: on CPU 3-7x faster than one amax over (0, 2, 3), and the same maxima.
        red = out
        if d < ndim - 1:
            red = red.amax(dim=tuple(range(d + 1, ndim)))
        if d > 0:
            red = red.amax(dim=tuple(range(d)))
        alive = red > 0
        self._pending.append((module_name, alive, output.numel() // units))

    def _on_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if _is_compiling() or not self._pending:
            return None
        entries = list(self._pending)
        self._pending.clear()
        try:
            self._fold(entries)
        except Exception as exc:
            self._fail(exc)
        return None

    def _fold(self, entries: list[tuple[str, Tensor, int]]) -> None:
        """OR one forward pass's per-unit bits into the masks of their call places."""
        calls: dict[str, int] = {}
        for module_name, alive, positions in entries:
            call = calls.get(module_name, 0)
            calls[module_name] = call + 1
            site = self._site_of.get((module_name, call))
            if site is None:
                site = self._declare_site(module_name, call, alive.numel())
            elif site.units != alive.numel():
                self._skipped[site.name] = f"output width changed from {site.units} to {alive.numel()} units"
                continue
            mask: Tensor = getattr(self, f"alive_{site.index}")
            if alive.device != mask.device:
                alive = alive.to(mask.device, non_blocking=True)
            mask.logical_or_(alive)
            getattr(self, f"samples_{site.index}").add_(positions)

    def _declare_site(self, module_name: str, call: int, n_units: int) -> _Site:
        site = _Site(index=len(self._sites), module=module_name, call=call, units=n_units)
        # Per-unit "fired at least once" bits, OR-ed across ranks: dead only if dead on every rank.
        self.add_state(f"alive_{site.index}", torch.zeros(n_units, dtype=torch.bool), reduce="any")
        self.add_state(f"samples_{site.index}", torch.zeros((), dtype=torch.float64), reduce="sum")
        self._sites.append(site)
        self._site_of[(module_name, call)] = site
        self.sites = [*self.sites, [module_name, call, n_units]]
        return site

    def _reset_window(self) -> None:
        states = [getattr(self, f"{kind}_{site.index}") for site in self._sites for kind in ("alive", "samples")]
        if states:
            torch._foreach_zero_(states)  # one op for all sites
        self.window_batches = 0
        self.window_steps = []

    def _fail(self, exc: BaseException) -> None:
        # Never raise inside the user's forward pass: stop counting and let the Guard see the error
        # at the next lifecycle call, where it disables this hook (or re-raises when strict).
        self._failure = exc
        self._counting = False
        self._pending.clear()
        self.remove_handles()

    def _report_unseen(self, reason: str) -> None:
        if self.unseen_reported:
            return
        self.unseen_reported = True
        if reason == "no_modules":
            message = (
                "no ReLU-like activation modules to watch; functional activations (F.relu) are invisible "
                "to module hooks: use nn.ReLU modules or stallguard.ActivationProbe"
            )
        else:
            message = (
                f"no activation output was seen during {self.window} sampled steps; torch.compile ignores hooks "
                "added after a model's first compiled call: build the Guard before that call, on the compiled "
                "model or with persistent=True"
            )
        self.emit("activations_unseen", "info", message, reason=reason, watched=self.layers)


def _check_modules(owner: str, modules: Any) -> list[nn.Module | str] | None:
    if modules is None:
        return None
    if isinstance(modules, (nn.Module, str)):
        raise TypeError(
            f"{owner}: modules must be an iterable of modules or module names (wrap a single one in a list), "
            f"got {type(modules).__name__} {modules!r}"
        )
    try:
        entries = list(modules)
    except TypeError:
        raise TypeError(
            f"{owner}: modules must be an iterable of modules or module names, got {type(modules).__name__}"
        ) from None
    if not entries:
        raise ValueError(f"{owner}: modules must not be empty (pass None to watch every ReLU-like module)")
    for i, entry in enumerate(entries):
        if not isinstance(entry, (nn.Module, str)):
            raise TypeError(f"{owner}: modules[{i}] must be an nn.Module or a module name, got {type(entry).__name__}")
        if isinstance(entry, _NEVER_DEAD):
            raise ValueError(
                f"{owner}: modules[{i}] is {type(entry).__name__}, whose gradient is never exactly zero, "
                f"so its units cannot die; watch ReLU-like modules only"
            )
    return entries


def _split_forwards(entries: list[tuple[str, Tensor, int]]) -> list[list[tuple[str, Tensor, int]]]:
    """Cut a step's outputs into forward passes: the shortest repeating pattern of (module, width)."""
    keys = [(name, alive.numel()) for name, alive, _ in entries]
    n = len(keys)
    for period in range(1, n):
        if n % period == 0 and all(keys[i] == keys[i % period] for i in range(period, n)):
            return [entries[i : i + period] for i in range(0, n, period)]
    return [entries]
