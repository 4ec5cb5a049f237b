"""SaturationCheck: how many sigmoid/tanh pre-activations sit in the flat regions, per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._modules import activation_modules
from .._validate import check_float
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["SaturationCheck"]

# A reported layer is reported again only after its fraction fell below this share of the threshold.
_HYSTERESIS = 0.8


@register("saturation", default="monitor")
class SaturationCheck(Hook):
    """Measure the fraction of saturated inputs of every ``nn.Sigmoid`` and ``nn.Tanh`` module.

    An input ``x`` is saturated where the derivative is below ~3% of its maximum: ``|x| > 5``
    for the sigmoid (derivative 0.0066 at 5, against 0.25 at 0) and ``|x| > 2.5`` for tanh
    (``tanh'(2.5) = 0.027`` against 1). The two are the same point, since
    ``sigmoid(x) = (1 + tanh(x/2)) / 2``; ``|x| >= 5`` is DeepDiagnosis's threshold for the sigmoid.

    On each sampled step (every ``every`` optimizer steps) forward hooks are put on the modules
    before the forward passes and taken off when the gradients are final, so other steps pay
    nothing. Each hook counts, on the device, the inputs beyond the threshold; the host reads the
    counts at check points (one transfer for all hooks). A layer whose saturated fraction over the
    check interval is above ``threshold`` (DeepDiagnosis: 0.5) is reported in
    ``saturated_activations``, once when it passes the threshold, again only after it recovered
    (fell below 0.8 times the threshold).

    A sigmoid whose output is the model's output (a final sigmoid feeding ``BCELoss``) is left
    out: one that is confidently right saturates on purpose. Forward passes in evaluation mode
    are not counted. Functional calls (``torch.sigmoid``) and the gates inside ``nn.LSTM`` /
    ``nn.GRU`` are not modules and are not seen.

    Args:
        threshold: Report a layer whose saturated fraction is above this, in (0, 1).
        sigmoid_limit: ``|x|`` beyond which a sigmoid input is saturated.
        tanh_limit: ``|x|`` beyond which a tanh input is saturated.
        every: Sample one optimizer step in this many.
        start_step: Sample no step before this one.
        name: Name used as the event source.

    Example:
        >>> import torch, stallguard as sg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(50.0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        >>> guard = sg.Guard(model, opt, hooks=[sg.SaturationCheck(every=1)], sinks=[], check_every=4)
        >>> for _ in range(4):
        ...     loss = model(torch.randn(32, 8)).pow(2).mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> [(e.kind, e.data["layers"]) for e in guard.events if e.kind == "saturated_activations"]
        [('saturated_activations', ('1',))]
        >>> guard.close()
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        sigmoid_limit: float = 5.0,
        tanh_limit: float = 2.5,
        every: int = 10,
        start_step: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(every=every, start_step=start_step, name=name)
        owner = type(self).__name__
        self.threshold = check_float(owner, "threshold", threshold, min=0.0, max=1.0, min_open=True, max_open=True)
        self.sigmoid_limit = check_float(owner, "sigmoid_limit", sigmoid_limit, min=0.0, min_open=True)
        self.tanh_limit = check_float(owner, "tanh_limit", tanh_limit, min=0.0, min_open=True)
        self.add_state("layers", [])
        self.add_state("outputs", [])  # layers seen producing the model's output: not counted
        self.add_state("over", [])
        self.add_state("fractions", {})
        self._targets: list[tuple[str, nn.Module]] = []
        self._limits: dict[str, float] = {}
        self._counting = False
        self._last: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        self._targets = activation_modules(guard.module, (nn.Sigmoid, nn.Tanh))
        self._limits = {
            n: self.sigmoid_limit if isinstance(m, nn.Sigmoid) else self.tanh_limit for n, m in self._targets
        }
        if not self.layers:
            self.layers = [n for n, _ in self._targets]
        elif self.layers != [n for n, _ in self._targets]:
            raise ValueError(f"{type(self).__name__}: the restored layers {self.layers} are not this model's")
        # Per layer: saturated inputs and all inputs counted since the last check, summed across ranks.
        self.add_state("saturated", torch.zeros(len(self.layers), dtype=torch.float64), reduce="sum", reset=True)
        self.add_state("counted", torch.zeros(len(self.layers), dtype=torch.float64), reduce="sum", reset=True)

    def on_step_begin(self, step: int) -> None:
        if self._targets and self.is_due(step) and not self._counting:
            guard = self._require_guard("count")
            for i, (module_name, module) in enumerate(self._targets):
                self.register_handle(module.register_forward_hook(self._make_hook(i, module_name)))
            if guard.model is not None:
                self.register_handle(guard.model.register_forward_hook(self._on_model_forward))
            self._counting = True

    def on_before_step(self, ctx: StepContext) -> None:
        if ctx.is_clock and self._counting:
            self._counting = False
            self._last.clear()
            self.remove_handles()

    def on_check(self, check: CheckContext) -> None:
        counted = check.values.get("counted")
        saturated = check.values.get("saturated")
        if counted is None or saturated is None:
            return
        fractions = {
            n: float(s / c)
            for n, s, c in zip(self.layers, saturated.reshape(-1), counted.reshape(-1))
            if c > 0 and n not in self.outputs
        }
        if not fractions:
            return
        self.fractions = fractions
        # A reported layer stays reported until it falls clearly below the threshold (no flapping).
        over = [
            n
            for n, f in fractions.items()
            if f > self.threshold or (n in self.over and f > _HYSTERESIS * self.threshold)
        ]
        new = [n for n in over if n not in self.over]
        self.over = over
        if not new:
            return
        worst = max(over, key=fractions.__getitem__)
        detail = ", ".join(f"{n} {fractions[n]:.0%}" for n in over[:4])
        self.emit(
            "saturated_activations",
            "warning",
            f"{len(over)} sigmoid/tanh layers have more than {self.threshold:.0%} of their inputs in the flat "
            f"region: {detail}",
            causes=("saturated_activations",),
            layers=over,
            fractions={n: fractions[n] for n in over},
            max_fraction=fractions[worst],
            threshold=self.threshold,
            all_fractions=fractions,
        )

    def on_close(self) -> None:
        self._counting = False
        self._last.clear()

    # ----------------------------------------------------------------- internals
    def _make_hook(self, index: int, module_name: str) -> Any:
        limit = self._limits[module_name]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training or not args or not isinstance(args[0], Tensor):
                return None
            x = args[0].detach()
            if not x.is_floating_point() or x.numel() == 0:
                return None
            # A model split over devices: bring the count to the counters (a no-op on one device).
            self.saturated[index] += (x.abs() > limit).sum().to(self.saturated.device, non_blocking=True)
            self.counted[index] += x.numel()
            self._last[module_name] = output
            return None  # a value returned here would replace the module's output

        return hook

    def _on_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        # An activation whose output is the model's output is the output layer: not a hidden unit.
        outs = output if isinstance(output, (tuple, list)) else (output,)
        for name, value in self._last.items():
            if any(value is o for o in outs) and name not in self.outputs:
                self.outputs = [*self.outputs, name]
        self._last.clear()
        return None
