"""Walking a model's modules: the layers whose weights the model checks read, and activation modules."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "WeightLayer",
    "activation_modules",
    "fans",
    "flat_sequential",
    "has_uninitialized",
    "is_excluded",
    "weight_layers",
    "weight_names",
]

# Layers whose weights are not fan-in scaled matrices: embeddings are lookup tables (N(0, 1) by
# default), norm layers hold per-feature gains (ones) and shifts (zeros).
_EXCLUDED: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

# Layers whose dim >= 2 weights are fan-in scaled matrices or filters.
_WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.MultiheadAttention,
)


class WeightLayer:
    """One weight tensor of a layer: ``module`` (its name), ``param`` (the parameter's full name)."""

    __slots__ = ("fan_in", "fan_out", "kind", "module", "param", "weight")

    def __init__(self, module: str, param: str, weight: Tensor, kind: nn.Module) -> None:
        self.module = module
        self.param = param
        self.weight = weight
        self.kind = kind
        self.fan_in, self.fan_out = fans(weight, kind)


def fans(weight: Tensor, module: nn.Module) -> tuple[int, int]:
    """Fan-in and fan-out as torch's own initializers compute them.

    Recurrent layers scale every weight by ``1/sqrt(hidden_size)``, so that is their fan-in.
    """
    if isinstance(module, nn.RNNBase):
        return module.hidden_size, weight.shape[0]
    if weight.ndim < 2:
        return max(1, weight.numel()), max(1, weight.numel())
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return max(1, int(fan_in)), max(1, int(fan_out))


def is_excluded(module: nn.Module) -> bool:
    """Whether ``module`` is an embedding or a normalization layer (not fan-in scaled)."""
    return isinstance(module, _EXCLUDED)


def weight_names(root: nn.Module | None) -> list[str]:
    """Names of the weights :func:`weight_layers` reads, including lazy modules' not yet initialized ones."""
    if root is None:
        return []
    out: list[str] = []
    for module_name, module in root.named_modules():
        if not isinstance(module, _WEIGHTED) or is_excluded(module):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            lazy = isinstance(p, nn.parameter.UninitializedParameter)
            if (lazy and param_name.startswith("weight")) or (not lazy and p.ndim >= 2 and p.is_floating_point()):
                out.append(f"{module_name}.{param_name}" if module_name else param_name)
    return list(dict.fromkeys(out))


def weight_layers(root: nn.Module | None) -> list[WeightLayer]:
    """The dim >= 2 weights of Linear, Bilinear, Conv, RNN and attention layers, in module order.

    Biases, embeddings and normalization layers are left out: their usual initial values (zeros,
    ones, N(0, 1)) are not fan-in scaled. Lazy modules' uninitialized weights are left out when
    always.
    """
    if root is None:
        return []
    out: list[WeightLayer] = []
    seen: set[int] = set()
    for module_name, module in root.named_modules():
        if not isinstance(module, _WEIGHTED) or is_excluded(module):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):
                continue
            if p.ndim < 2 or not p.is_floating_point() or p.numel() == 0:
                continue
            seen.add(id(p))
            full = f"{module_name}.{param_name}" if module_name else param_name
            out.append(WeightLayer(module_name, full, p, module))
    return out


def has_uninitialized(root: nn.Module | None) -> bool:
    """Whether any parameter of ``root`` is a lazy module's uninitialized parameter."""
    if root is None:
        return False
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in root.parameters())


def activation_modules(root: nn.Module | None, types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """Every submodule of ``root`` that is an instance of ``types``, with its name, in module order."""
    if root is None:
        return []
    return [(n, m) for n, m in root.named_modules() if isinstance(m, types)]


def flat_sequential(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """The leaf modules of ``root`` in call order, if that order is known; None otherwise.

    The order is known for a layer on its own and for ``nn.Sequential`` containers (nested ones are
    flattened): their forward calls the children in registration order and does nothing else.
    """
    if isinstance(root, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in root.named_children():
            inner = flat_sequential(child, f"{prefix}{name}.")
            if inner is None:
                return None
            out.extend(inner)
        return out
    if len(list(root.children())) == 0:
        return [(prefix[:-1], root)]
    return None
