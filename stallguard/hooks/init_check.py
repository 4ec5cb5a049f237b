"""InitCheck: find weights that start badly (all zero, constant, symmetric, or far from fan-in scale)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._modules import WeightLayer, weight_layers
from .._validate import check_float
from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, StepContext

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["InitCheck"]

# A weight is symmetric when at most this fraction of its rows (units, filters) are distinct:
# random init makes every row distinct; a fraction, not "any duplicate", keeps low-precision
# weights with few inputs (where two random rows can round to the same values) quiet.
_DISTINCT_FRACTION = 0.5

_ORDER = ("all_zero", "constant", "symmetric", "scale_large", "scale_small")


@register("init_check", default="monitor")
class InitCheck(Hook):
    """Check the weights' initial values once, at attach, and again at the first step.

    Reads every dim >= 2 weight of Linear, Bilinear, Conv, RNN/LSTM/GRU and MultiheadAttention
    layers (biases, embeddings and normalization layers are left out: zeros, ones and N(0, 1) are
    their normal starts) and flags:

    * ``all_zero``: every element is 0. Every unit computes the same thing and gets the same
      gradient, and with ReLU no gradient at all reaches the layers below.
    * ``constant``: every element has one non-zero value (which makes the rows identical too,
      so ``symmetric`` is reported with it).
    * ``symmetric``: at most half of the rows (output units, conv filters) are distinct. Identical
      units get identical gradients and stay identical.
    * ``scale_large``: the weights' std is more than ``scale_high`` times He's ``sqrt(2/fan_in)``,
      the largest of the usual fan-in scaled inits: activations grow by about that factor per layer.
    * ``scale_small``: the std is less than ``scale_low`` times the smallest usual init
      (``min`` of torch's default ``1/sqrt(3 fan_in)``, Xavier's ``sqrt(2/(fan_in+fan_out))`` and an
      orthogonal init's ``1/sqrt(max(fan_in, fan_out))``): the signal shrinks by that factor per layer.

    The last weight in module order (usually the output layer) may start at zero or small on
    purpose (a zero-initialized head is common and harmless when the layers below are random), so
    ``all_zero`` and ``scale_small`` are not reported for it alone. Recurrent layers use their
    hidden size as fan-in, as torch's own init does.

    The check runs at attach, and at the first optimizer step for weights of lazy modules
    (initialized by the first forward pass) and for weights changed after attach; each
    (weight, problem) pair is reported once. The host reads one small tensor per check; nothing
    runs on later steps.

    Args:
        scale_high: Report ``scale_large`` above this multiple of ``sqrt(2/fan_in)``; > 1.
        scale_low: Report ``scale_small`` below this fraction of the smallest usual init; in (0, 1).
        name: Name used as the event source.

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> torch.nn.init.zeros_(model[0].weight)
        Parameter containing:...
        >>> guard = sg.Guard(model, None, hooks=[sg.InitCheck()], sinks=[])
        >>> [(e.kind, e.data["problems"], e.data["layers"]) for e in guard.events]
        [('bad_init', ('all_zero',), ('0.weight',))]
        >>> guard.close()
    """

    def __init__(self, *, scale_high: float = 10.0, scale_low: float = 0.1, name: str | None = None) -> None:
        super().__init__(name=name)
        owner = type(self).__name__
        self.scale_high = check_float(owner, "scale_high", scale_high, min=1.0, min_open=True)
        self.scale_low = check_float(owner, "scale_low", scale_low, min=0.0, max=1.0, min_open=True, max_open=True)
        self.add_state("reported", [])  # [weight name, problem] pairs already reported
        self.add_state("first_step_checked", False)
        self.add_state("findings", {})  # weight name -> its numbers, from the last check
        self._measured: tuple[list[WeightLayer], Tensor] | None = None  # first step's numbers, on the device

    # ----------------------------------------------------------------- lifecycle
    def on_attach(self, guard: Guard) -> None:
        self._check_weights("attach")

    def is_due(self, step: int) -> bool:
        return not self.first_step_checked  # one look, at the first step

    def next_due(self, step: int) -> int | None:
        return None if self.first_step_checked else step

    def on_before_step(self, ctx: StepContext) -> None:
        if self.first_step_checked:
            return
        self.first_step_checked = True
        # Once per run: lazy modules are initialized by now, and weights may have been re-initialized.
        # The numbers stay on the device until the next check point reads them.
        self._measured = self._measure()

    def on_check(self, check: CheckContext) -> None:
        measured, self._measured = self._measured, None
        if measured is not None:
            self._judge(*measured, stage="training")

    # ----------------------------------------------------------------- config
    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        # Only this hook's own arguments: it takes no cadence arguments from the base class.
        config = super().get_config()
        return {k: v for k, v in config.items() if k not in ("every", "start_step")}

    # ----------------------------------------------------------------- internals
    def _check_weights(self, stage: str) -> None:
        measured = self._measure()
        if measured is not None:
            self._judge(*measured, stage=stage)

    def _measure(self) -> tuple[list[WeightLayer], Tensor] | None:
        """Every weight layer's numbers, as one device tensor (no host read)."""
        guard = self._require_guard("check")
        layers = weight_layers(guard.module)
        if not layers:
            return None
        with torch.no_grad():
            return layers, torch.stack([_stats(layer.weight).to(guard.device) for layer in layers])

    def _judge(self, layers: list[WeightLayer], measured: Tensor, *, stage: str) -> None:
        stats = measured.cpu().tolist()
        per_layer: dict[str, list[str]] = {}
        details: dict[str, dict[str, Any]] = {}
        for layer, (max_abs, spread, std, distinct, rows) in zip(layers, stats):
            problems = self._problems(layer, max_abs, spread, std, distinct, rows)
            details[layer.param] = {
                "std": std,
                "fan_in": layer.fan_in,
                "scale": std * math.sqrt(layer.fan_in),
                "distinct_rows": int(distinct),
                "rows": int(rows),
            }
            if problems:
                per_layer[layer.param] = problems
        last = layers[-1].param
        if last in per_layer:
            # A zero or small output layer over random hidden layers is a deliberate, harmless choice.
            others_symmetric = any(
                p in ("all_zero", "constant", "symmetric") for n, ps in per_layer.items() if n != last for p in ps
            )
            keep = [p for p in per_layer[last] if p != "scale_small" and (p != "all_zero" or others_symmetric)]
            if keep:
                per_layer[last] = keep
            else:
                del per_layer[last]
        self.findings = {n: {**details[n], "problems": ps} for n, ps in per_layer.items()}
        done = {(n, p) for n, p in self.reported}
        new = {n: [p for p in ps if (n, p) not in done] for n, ps in per_layer.items()}
        new = {n: ps for n, ps in new.items() if ps}
        if not new:
            return
        self.reported = [*self.reported, *([n, p] for n, ps in new.items() for p in ps)]
        problems = [p for p in _ORDER if any(p in ps for ps in new.values())]
        names = list(new)
        shown = ", ".join(f"{n} ({'/'.join(ps)})" for n, ps in list(new.items())[:4])
        more = f" and {len(new) - 4} more" if len(new) > 4 else ""
        certain = any(p in ("all_zero", "constant", "symmetric") for p in problems)
        self.emit(
            "bad_init",
            "warning",
            f"badly initialized weights ({stage}): {shown}{more}",
            causes=("bad_init",),
            confidence=0.9 if certain else 0.6,
            problems=problems,
            layers=names,
            stage=stage,
            details={n: {**details[n], "problems": new[n]} for n in names},
            scale_high=self.scale_high,
            scale_low=self.scale_low,
        )

    def _problems(
        self, layer: WeightLayer, max_abs: float, spread: float, std: float, distinct: float, rows: float
    ) -> list[str]:
        if not math.isfinite(max_abs):
            return []  # non-finite weights are the non-finite checks' business
        if max_abs == 0.0:
            return ["all_zero"]
        out: list[str] = []
        if spread == 0.0 and layer.weight.numel() > 1:
            out.append("constant")
        if rows > 1 and distinct <= _DISTINCT_FRACTION * rows:
            out.append("symmetric")
        if out:
            return out
        fan_in, fan_out = layer.fan_in, layer.fan_out
        high = math.sqrt(2.0 / fan_in)
        low = min(
            1.0 / math.sqrt(3.0 * fan_in), math.sqrt(2.0 / (fan_in + fan_out)), 1.0 / math.sqrt(max(fan_in, fan_out))
        )
        if std > self.scale_high * high:
            out.append("scale_large")
        elif std < self.scale_low * low:
            out.append("scale_small")
        return out


def _stats(w: Tensor) -> Tensor:
    """[max |w|, max - min, std, distinct rows, rows] of one weight, on its device, in float64."""
    # One float64 copy of the weight and no temporaries of its size: the peak memory of the check.
    rows = w.detach().reshape(w.shape[0], -1).double()
    flat = rows.reshape(-1)
    # Identical rows have identical projections on a fixed random direction; distinct rows almost never do.
    g = torch.Generator().manual_seed(0)
    direction = torch.rand(rows.shape[1], generator=g, dtype=torch.float64).add_(0.5).to(rows.device)
    h = torch.mv(rows, direction).sort().values
    distinct = 1 + (h[1:] != h[:-1]).sum() if h.numel() > 1 else torch.ones((), dtype=torch.long, device=h.device)
    var, _ = torch.var_mean(flat, correction=0)  # Tensor.std reads a scalar to the host on CPU; var_mean does not
    lo, hi = torch.aminmax(flat)
    return torch.stack(
        [
            torch.maximum(hi, -lo),
            hi - lo,
            var.sqrt(),
            distinct.to(flat.dtype),
            flat.new_tensor(float(rows.shape[0])),
        ]
    )
