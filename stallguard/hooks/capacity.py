"""CapacityCheck: structural signs that the model cannot represent the task."""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .._modules import flat_sequential
from .._validate import check_float
from ..hook import Hook
from ..registry import register
from ..stats import StepContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["CapacityCheck"]

# Modules that keep a map affine: a chain of these between two linear layers adds no non-linearity.
# Norm layers that divide by a batch or feature statistic are counted as non-linear, to stay quiet.
_AFFINE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_LINEAR: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


@register("capacity", default="monitor")
class CapacityCheck(Hook):
    """Look once at the model's structure for reasons it cannot fit the task.

    At the first optimizer step (the first forward pass has shown the output width) it reports,
    each as one ``capacity_limited`` info event:

    * ``linear_model``: the whole model is an affine map (Linear/Conv layers with only dropout,
      flattening, padding or average pooling between them). It cannot fit any non-linear relation
      (XOR, circles), however long it trains.
    * ``stacked_linear``: two or more Linear/Conv layers follow each other with no non-linearity
      between them, inside a model that has non-linearities elsewhere; together they are one
      linear map (a missing activation).
    * ``bottleneck``: a hidden Linear layer is narrower than both its own input and the model's
      output (2 units between 64 and 10 classes): the logits live in a subspace of that width.
    * ``few_parameters``: fewer than ``min_params_per_output`` trainable parameters per output unit.

    The layer order is known only inside ``nn.Sequential`` containers (nested ones included) and
    single layers: inside a custom ``forward`` the activations may be functional calls no module
    hook sees. So ``linear_model`` is checked only when the whole model is such a chain, and
    ``stacked_linear`` and ``bottleneck`` in that chain or, for a custom model, in the
    ``nn.Sequential`` submodules whose output is the model's output (a head), from their last
    layer that is not itself a custom module. ``few_parameters`` is checked for any model.

    None of these is a fault on its own (a linear model is right for a linear task): the events
    are ``info`` and the diagnosis names ``insufficient_capacity`` only when the loss has also
    stalled. One exception is a warning: a one-unit bottleneck before three or more outputs, which
    leaves every output an affine function of one number (and, after a ReLU, a unit that can die
    and cut every gradient). The check costs forward hooks on the first step, nothing later.

    Args:
        min_params_per_output: Report ``few_parameters`` below this many trainable parameters per
            output unit; >= 0 (0 turns that check off).
        name: Name used as the event source.

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = sg.Guard(model, opt, hooks=[sg.CapacityCheck()], sinks=[])
        >>> model(torch.randn(4, 2)).sum().backward(); opt.step()
        >>> [(e.kind, e.data["reason"], e.data["layers"]) for e in guard.events]
        [('capacity_limited', 'linear_model', ('0', '1'))]
        >>> guard.close()
    """

    def __init__(self, *, min_params_per_output: float = 10.0, name: str | None = None) -> None:
        super().__init__(name=name)
        owner = type(self).__name__
        self.min_params_per_output = check_float(owner, "min_params_per_output", min_params_per_output, min=0.0)
        self.add_state("checked", False)
        self.add_state("outputs", None)  # the output width seen in the first training forward pass
        self.add_state("reasons", [])
        self._heads: list[str] | None = None  # the Sequential submodules whose output is the model's output
        self._seen: list[tuple[str, Tensor]] = []  # Sequential outputs of the forward pass under way

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        self._heads, self._seen = None, []
        if not self.checked and guard.model is not None:
            self.register_handle(guard.model.register_forward_hook(self._on_model_forward))
            if guard.module is not None and flat_sequential(guard.module) is None:
                for name, module in guard.module.named_modules():
                    if name and isinstance(module, nn.Sequential):
                        self.register_handle(module.register_forward_hook(partial(self._on_sequential_forward, name)))

    def is_due(self, step: int) -> bool:
        return not self.checked  # one look, at the first step

    def next_due(self, step: int) -> int | None:
        return None if self.checked else step

    def on_before_step(self, ctx: StepContext) -> None:
        if self.checked:
            return
        self.checked = True
        self.remove_handles()
        guard = self._require_guard("check")
        if guard.module is not None:
            for reason, message, data in self._findings(guard.module):
                self.reasons = [*self.reasons, reason]
                severity = "warning" if _scalar_bottleneck(reason, data) else "info"
                self.emit(
                    "capacity_limited", severity, message, causes=("insufficient_capacity",), reason=reason, **data
                )

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        # Only this hook's own arguments: it takes no cadence arguments from the base class.
        config = super().get_config()
        return {k: v for k, v in config.items() if k not in ("every", "start_step")}

    # ----------------------------------------------------------------- internals
    def _on_sequential_forward(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._heads is None and module.training and isinstance(output, Tensor):
            self._seen.append((name, output))
        return None

    def _on_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        seen, self._seen = self._seen, []  # drop the references to this pass's tensors
        if self._heads is None and module.training and isinstance(output, Tensor) and output.ndim >= 1:
            self._heads = _heads(seen, output)
            # Shape metadata, no device read. A 1-D output is a batch of scalars (a squeezed regression
            # or binary head): its last dim is the batch, not the output width.
            self.outputs = int(output.shape[-1]) if output.ndim >= 2 else 1
        return None

    def _findings(self, root: nn.Module) -> list[tuple[str, str, dict[str, Any]]]:
        out: list[tuple[str, str, dict[str, Any]]] = []
        leaves = flat_sequential(root)
        n_out = self.outputs
        linear_model = False
        if leaves is not None:
            linear = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _LINEAR)]
            if n_out is None and linear and isinstance(leaves[linear[-1]][1], nn.Linear):
                n_out = leaves[linear[-1]][1].out_features
            if linear and all(isinstance(m, _AFFINE) for _, m in leaves):
                linear_model = True
                layers = [_label(leaves[i][0]) for i in linear]
                out.append(
                    (
                        "linear_model",
                        f"the model is linear ({len(layers)} linear layers, no activation between them): it cannot "
                        "fit a non-linear relation",
                        {"layers": layers},
                    )
                )
            chains = [leaves]
        else:
            chains = self._head_chains(root)
        runs = [[_label(leaves_[i][0]) for i in run] for leaves_ in chains for run in _linear_runs(leaves_)]
        if runs and not linear_model:
            layers = [n for run in runs for n in run]
            out.append(
                (
                    "stacked_linear",
                    f"linear layers follow each other with no activation between them ({', '.join(layers)}): "
                    "they add up to one linear map",
                    {"layers": layers, "runs": runs},
                )
            )
        if n_out is not None:
            narrow = [found for leaves_ in chains for found in _narrow(leaves_, n_out)]
            if narrow:
                out.append(
                    (
                        "bottleneck",
                        f"hidden layers narrower than their input and the {n_out} outputs: "
                        + ", ".join(f"{n} ({w} units)" for n, w, _ in narrow),
                        {
                            "layers": [n for n, _, _ in narrow],
                            "widths": [w for _, w, _ in narrow],
                            "outputs": n_out,
                            "activations": [a for _, _, acts in narrow for a in acts],
                        },
                    )
                )
        if n_out is not None and self.min_params_per_output > 0:
            params = sum(p.numel() for p in root.parameters() if p.requires_grad and not _lazy(p))
            if params < self.min_params_per_output * n_out:
                out.append(
                    (
                        "few_parameters",
                        f"the model has {params} trainable parameters for {n_out} outputs "
                        f"(fewer than {self.min_params_per_output:g} per output)",
                        {"layers": [], "parameters": params, "outputs": n_out},
                    )
                )
        return out

    def _head_chains(self, root: nn.Module) -> list[list[tuple[str, nn.Module]]]:
        """The known-order tails of the Sequential containers whose output is the model's output."""
        modules = dict(root.named_modules())
        chains = [_known_tail(modules[name], f"{name}.") for name in self._heads or () if name in modules]
        if isinstance(root, nn.Sequential):  # a Sequential with custom blocks: its output is the model's
            chains.insert(0, _known_tail(root, ""))
        kept: list[list[tuple[str, nn.Module]]] = []
        for chain in chains:
            names = {n for n, _ in chain}
            if names and not any(names <= {n for n, _ in other} for other in kept):
                kept.append(chain)
        return kept


def _lazy(p: nn.Parameter) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _label(name: str) -> str:
    return name or "(model)"


def _scalar_bottleneck(reason: str, data: dict[str, Any]) -> bool:
    """A one-unit hidden layer before three or more outputs.

    With two outputs one number is all a softmax needs (the difference of the two logits); with
    three or more, every output is an affine function of that one number.
    """
    return reason == "bottleneck" and min(data["widths"], default=2) <= 1 and data["outputs"] >= 3


def _heads(seen: list[tuple[str, Tensor]], output: Tensor) -> list[str]:
    """The outermost Sequential submodules whose output is the model's output.

    The same tensor object is the sure sign; failing that (the model reshapes it, or a wrapper
    copies it), the last Sequential to finish whose output has as many elements.
    """
    names = [n for n, t in seen if t is output]
    if not names:
        same = [n for n, t in seen if t.numel() == output.numel()]
        names = same[-1:]
    return [n for n in names if not any(n.startswith(f"{m}.") for m in names)]


def _known_tail(seq: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The leaves of a Sequential from the last child whose order is unknown to its end, in call order."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in reversed(list(seq.named_children())):
        inner = flat_sequential(child, f"{prefix}{name}.")
        if inner is None:
            break
        out[:0] = inner
    return out


def _narrow(leaves: list[tuple[str, nn.Module]], n_out: int) -> list[tuple[str, int, list[str]]]:
    """Hidden Linear layers narrower than both their input and the output, with the non-affine modules
    after each, up to the next linear layer (the activations that all of its signal passes through)."""
    linear = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _LINEAR)]
    out = []
    for i, j in pairwise(linear):
        m = leaves[i][1]
        if isinstance(m, nn.Linear) and m.out_features < min(n_out, m.in_features):
            acts = [_label(n) for n, a in leaves[i + 1 : j] if not isinstance(a, _AFFINE)]
            out.append((_label(leaves[i][0]), m.out_features, acts))
    return out


def _linear_runs(leaves: list[tuple[str, nn.Module]]) -> list[list[int]]:
    """Groups of two or more linear layers with only affine modules between them."""
    linear = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _LINEAR)]
    runs: list[list[int]] = []
    current: list[int] = []
    for i in linear:
        if current and all(isinstance(m, _AFFINE) for _, m in leaves[current[-1] + 1 : i]):
            current.append(i)
        else:
            if len(current) > 1:
                runs.append(current)
            current = [i]
    if len(current) > 1:
        runs.append(current)
    return runs
