"""CapacityCheck: structural signs that the model cannot represent the task."""

from __future__ import annotations

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
    * ``bottleneck``: a hidden Linear layer is narrower than the model's output (2 units feeding
      10 classes): the logits live in a subspace of that width.
    * ``few_parameters``: fewer than ``min_params_per_output`` trainable parameters per output unit.

    The layer order is known only for ``nn.Sequential`` models (nested ones included) and single
    layers, so ``linear_model``, ``stacked_linear`` and ``bottleneck`` are checked only there:
    inside a custom ``forward`` the activations may be functional calls no module hook sees.
    ``few_parameters`` is checked for any model. None of these is a fault on its own (a linear
    model is right for a linear task): the diagnosis names ``insufficient_capacity`` only when
    the loss has also stalled. The check costs one forward hook on the first step, nothing later.

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

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        if not self.checked and guard.model is not None:
            self.register_handle(guard.model.register_forward_hook(self._on_model_forward))

    def is_due(self, step: int) -> bool:
        return not self.checked  # one look, at the first step

    def on_before_step(self, ctx: StepContext) -> None:
        if self.checked:
            return
        self.checked = True
        self.remove_handles()
        guard = self._require_guard("check")
        if guard.module is not None:
            for reason, message, data in self._findings(guard.module):
                self.reasons = [*self.reasons, reason]
                self.emit("capacity_limited", "info", message, causes=("insufficient_capacity",), reason=reason, **data)

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        # Only this hook's own arguments: it takes no cadence arguments from the base class.
        config = super().get_config()
        return {k: v for k, v in config.items() if k not in ("every", "start_step")}

    # ----------------------------------------------------------------- internals
    def _on_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.outputs is None and module.training and isinstance(output, Tensor) and output.ndim >= 1:
            self.outputs = int(output.shape[-1])  # shape metadata: no device read
        return None

    def _findings(self, root: nn.Module) -> list[tuple[str, str, dict[str, Any]]]:
        out: list[tuple[str, str, dict[str, Any]]] = []
        leaves = flat_sequential(root)
        n_out = self.outputs
        if leaves is not None:
            names = [n or "(model)" for n, _ in leaves]
            linear = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _LINEAR)]
            if n_out is None and linear and isinstance(leaves[linear[-1]][1], nn.Linear):
                n_out = leaves[linear[-1]][1].out_features
            if linear and all(isinstance(m, _AFFINE) for _, m in leaves):
                layers = [names[i] for i in linear]
                out.append(
                    (
                        "linear_model",
                        f"the model is linear ({len(layers)} linear layers, no activation between them): it cannot "
                        "fit a non-linear relation",
                        {"layers": layers},
                    )
                )
            else:
                runs = _linear_runs(leaves, linear)
                if runs:
                    layers = [names[i] for run in runs for i in run]
                    out.append(
                        (
                            "stacked_linear",
                            f"linear layers follow each other with no activation between them ({', '.join(layers)}): "
                            "they add up to one linear map",
                            {"layers": layers, "runs": [[names[i] for i in run] for run in runs]},
                        )
                    )
            if n_out is not None:
                hidden = [
                    (names[i], leaves[i][1].out_features) for i in linear[:-1] if isinstance(leaves[i][1], nn.Linear)
                ]
                narrow = [(n, w) for n, w in hidden if w < n_out]
                if narrow:
                    out.append(
                        (
                            "bottleneck",
                            f"hidden layers narrower than the {n_out} outputs: "
                            + ", ".join(f"{n} ({w} units)" for n, w in narrow),
                            {"layers": [n for n, _ in narrow], "widths": [w for _, w in narrow], "outputs": n_out},
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


def _lazy(p: nn.Parameter) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _linear_runs(leaves: list[tuple[str, nn.Module]], linear: list[int]) -> list[list[int]]:
    """Groups of two or more linear layers with only affine modules between them."""
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
