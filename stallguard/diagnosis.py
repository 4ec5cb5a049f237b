"""From events to causes: a ranked list of what is most likely wrong, with evidence and advice.

Hooks report symptoms (a plateau, tiny updates, dead units, inputs on a 0-255 scale). A symptom is not a
cause: a plateau can come from a learning rate that is too low, labels without signal, or a model that
is too small; dead units can be the damage left by a learning rate that is too high. The diagnosis
combines symptoms into causes with a small set of explicit rules, one per cause, each documented in
``docs/diagnosis.md``:

* Loop bugs and broken numerics (no ``zero_grad``, parameters outside the optimizer, NaN) are named
  whenever their evidence is there: they are bugs whatever the loss does.
* Data and model-construction findings (unnormalized inputs, imbalanced labels, bad initialization,
  heavy regularization, overfitting) are named when their check reports them.
* Symptoms that healthy runs can show for a while (vanishing or exploding gradients, dead units,
  saturation, small updates) count only once the loss has also stalled or diverged: AutoTrainer's lesson.
* Where one cause explains another's symptom, the root cause ranks first (an early loss spike with huge
  updates before the dead units: ``lr_too_high`` before ``dying_relu``).
* A stall the loss has recovered from, or a loss at chance the run has since left behind, is history,
  not evidence.

A healthy run gives an empty list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .causes import CAUSES, check_cause
from .events import Event, Severity

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["Diagnosis", "diagnose", "format_report"]


@dataclass(frozen=True)
class Diagnosis:
    """One likely cause of a stalled run.

    Attributes:
        cause: An id from ``stallguard.CAUSES``.
        confidence: How sure, in [0, 1].
        evidence: Sentences citing the events read (kinds, steps, numbers).
        advice: What to change, concretely.
        events: The events this diagnosis rests on.

    Example:
        >>> import stallguard as sg
        >>> d = sg.Diagnosis("lr_too_low", 0.8, ("step 150: update_ratio_low",), "raise the LR 10x")
        >>> d.description
        'The learning rate is too low: updates are tiny next to the weights and the loss barely moves.'
    """

    cause: str
    confidence: float
    evidence: tuple[str, ...]
    advice: str
    events: tuple[Event, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        check_cause(self.cause)
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Diagnosis.confidence must lie in [0, 1], got {self.confidence!r}")

    @property
    def description(self) -> str:
        """The cause's one-line description."""
        return CAUSES[self.cause]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (without the events themselves)."""
        return {
            "cause": self.cause,
            "confidence": self.confidence,
            "evidence": list(self.evidence),
            "advice": self.advice,
        }


# ---------------------------------------------------------------------------------------------- facts
class _Facts:
    """The event history, indexed for the rules."""

    def __init__(self, events: Sequence[Event], guard: Guard | None) -> None:
        self.events = list(events)
        self.guard = guard
        self.by_kind: dict[str, list[Event]] = {}
        for e in self.events:
            self.by_kind.setdefault(e.kind, []).append(e)
        self._drop_left_chance()

    def _recent_loss(self) -> float:
        """The median of the last 50 observed losses, when the Guard is at hand (NaN otherwise)."""
        if self.guard is None or not self.guard.has_series("loss"):
            return math.nan
        recent = [v for v in self.guard.series("loss").last(50) if math.isfinite(v)]
        return float(sorted(recent)[len(recent) // 2]) if recent else math.nan

    def _drop_left_chance(self) -> None:
        """Forget ``loss_at_chance`` reports that the run has since left behind.

        A model that sat at the chance level for a while and then learned (a slow start) is not stuck:
        when the recent losses lie clearly below the chance level the event quoted (twice its margin)
        and the loss got there steeply, the report is history, not evidence. A model that memorizes
        labels carrying no information about the inputs also leaves chance, but only as fast as revisits
        of each sample fit it one by one: a few percent of chance per 100 steps, where a model that has
        found the rule drops by tens of percent within 100 steps.
        """
        reports = self.by_kind.get("loss_at_chance")
        recent = self._recent_loss()
        if not reports or math.isnan(recent) or self.guard is None:
            return
        series = self.guard.series("loss")
        steps, values = series.steps, series.values
        kept = []
        for e in reports:
            chance, margin = _num(e.data.get("chance")), _num(e.data.get("margin"), 0.05)
            left = math.isfinite(chance) and recent < (1.0 - 2.0 * margin) * chance
            if not (left and _steepest_fall(steps, values, e.step - 100) >= 4.0 * margin * chance):
                kept.append(e)
        self.by_kind["loss_at_chance"] = kept

    def all(self, *kinds: str) -> list[Event]:
        """Every event of these kinds, in time order."""
        found = [e for k in kinds for e in self.by_kind.get(k, ())]
        return sorted(found, key=lambda e: e.step)

    def first(self, *kinds: str) -> Event | None:
        found = self.all(*kinds)
        return found[0] if found else None

    def has(self, *kinds: str) -> bool:
        return any(self.by_kind.get(k) for k in kinds)

    @property
    def stall(self) -> Event | None:
        """The first sign that the loss stopped improving or went wrong and has not recovered since, if any.

        NaN always counts. A plateau or divergence counts unless PlateauDetector reported ``recovered``
        after it and nothing stalled again after that: a run whose loss improves again is not stalled.
        """
        nonfinite = self.first("nonfinite")
        recovered = self.all("recovered")
        since = recovered[-1].step if recovered else -1
        current = [e for e in self.all("plateau", "divergence", "loss_at_chance") if e.step >= since]
        if recovered and not current:
            return nonfinite
        found = [e for e in (self.first("plateau", "divergence", "loss_at_chance"), nonfinite) if e is not None]
        return min(found, key=lambda e: e.step) if found else None

    @property
    def stalled(self) -> bool:
        return self.stall is not None

    @property
    def calm_explosion(self) -> Event | None:
        """The first ``exploding_gradients`` that grew out of a calm stretch, if the gradients exploded so.

        GradNormMonitor's growth rule compares an interval with a baseline of earlier, normal gradient
        norms; when no divergence or oscillation came before it, the loss was fine until the gradients
        blew up, and the loss trouble that follows is the explosion's doing, not the learning rate's.

        Its ``surge`` and ``spikes`` forms read the loss of every step and find the loss blowing up
        *with* the gradients, so a divergence or oscillation reported before them is the same blow-up,
        seen first by the loss. Only large updates reported at or before such an explosion
        (``update_ratio_high``: the typical step is too large) leave it to the learning rate.
        """
        explode = next((e for e in self.all("exploding_gradients") if _explosion_rules(e)), None)
        if explode is None:
            return None
        rules = _explosion_rules(explode)
        if "growth" in rules and not any(e.step < explode.step for e in self.all("divergence", "oscillation")):
            return explode
        high = [e for e in self.all("update_ratio_high") if _finite_ratio(e) and e.step <= explode.step]
        if rules & {"surge", "spikes"} and not high:
            return explode
        return None

    def learning_rates(self) -> list[float]:
        """The current learning rate of every param group of the Guard's optimizers."""
        if self.guard is None:
            return []
        out = []
        for opt in self.guard.optimizers:
            for group in opt.param_groups:
                lr = group.get("lr")
                try:
                    out.append(float(lr))
                except (TypeError, ValueError):
                    continue
        return out


@dataclass
class _Finding:
    cause: str
    confidence: float
    events: list[Event]
    advice: str
    notes: list[str] = field(default_factory=list)
    after_blowup: bool = False  # non_finite: the NaN followed diverging loss, updates or gradients
    onset: int | None = None  # the first step of the finding's own evidence, where the rule knows it


def _cite(e: Event) -> str:
    return f"step {e.step}: {e.kind} ({e.source}) - {e.message}"


def _num(value: Any, default: float = math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def _lr_text(facts: _Facts) -> str:
    lrs = facts.learning_rates()
    if not lrs:
        return ""
    uniq = sorted(set(lrs))
    shown = ", ".join(f"{lr:.3g}" for lr in uniq[:4])
    return f" (now {shown})"


def _combine(*confidences: float) -> float:
    """Independent pieces of evidence: 1 - prod(1 - c)."""
    miss = 1.0
    for c in confidences:
        miss *= 1.0 - max(0.0, min(1.0, c))
    return 1.0 - miss


def _conf(e: Event, default: float) -> float:
    return e.confidence if e.confidence is not None else default


def _onset(e: Event) -> int:
    """The first step an event's evidence covers: its ``first_step``, its first sampled step, or its step."""
    first = e.data.get("first_step")
    if isinstance(first, int) and not isinstance(first, bool):
        return first
    steps = e.data.get("steps")
    if isinstance(steps, (tuple, list)) and steps and all(isinstance(s, int) for s in steps):
        return min(steps)
    return e.step


def _frozen_by_underflow(e: Event) -> bool:
    """A ``weights_frozen`` whose updates round away in low precision: a step size problem, not a loop bug."""
    return e.data.get("reason") == "update_underflow" or (
        "lr_too_low" in e.causes and "params_not_updated" not in e.causes
    )


def _scalar_bottleneck(e: Event) -> bool:
    """A ``capacity_limited`` bottleneck of one unit before three or more outputs."""
    widths = e.data.get("widths") or ()
    return (
        e.data.get("reason") == "bottleneck"
        and min((_num(w) for w in widths), default=math.inf) <= 1
        and _num(e.data.get("outputs"), 0.0) >= 3
    )


def _bottleneck_activations(f: _Facts) -> set[str]:
    """The activation layers right after a bottleneck that CapacityCheck reported."""
    return {
        str(a)
        for e in f.all("capacity_limited")
        if e.data.get("reason") == "bottleneck"
        for a in e.data.get("activations") or ()
    }


def _explosion_rules(e: Event) -> set[str]:
    """The forms of an ``exploding_gradients`` that compare the gradients with the run's own history."""
    return set(e.data.get("rules") or ()) & {"growth", "surge", "spikes"}


def _finite_ratio(e: Event) -> bool:
    """False for an update-ratio event whose ratio is NaN/Inf: it measures NaN weights, not the step size."""
    ratio = _num(e.data.get("median_ratio", e.data.get("ratio", 0.0)), 0.0)
    return math.isfinite(ratio)


def _steepest_fall(steps: np.ndarray, values: np.ndarray, since: int, block: int = 50) -> float:
    """The largest fall of the mean loss over at most 100 steps (``block``-step means, two blocks apart)."""
    v = values[(steps >= since) & np.isfinite(values)]
    means = [float(np.mean(v[i : i + block])) for i in range(0, len(v), block) if len(v[i : i + block]) >= 10]
    falls = [means[i] - means[j] for i in range(len(means)) for j in range(i + 1, min(i + 3, len(means)))]
    return max(falls, default=0.0)


# ---------------------------------------------------------------------------------------------- rules
# Each rule looks at the facts and returns at most one finding for its cause.
Rule = Callable[[_Facts], "_Finding | None"]
_RULES: list[Rule] = []


def _rule(fn: Rule) -> Rule:
    _RULES.append(fn)
    return fn


@_rule
def _missing_zero_grad(f: _Facts) -> _Finding | None:
    evs = f.all("grads_not_cleared")
    if not evs:
        return None
    return _Finding(
        "missing_zero_grad",
        _combine(*(_conf(e, 0.9) for e in evs), 0.5 if f.stalled else 0.0),
        evs,
        "Call optimizer.zero_grad() once per optimizer step (before backward, or right after the step): "
        "the gradients of every earlier step are still being added in.",
    )


@_rule
def _params_not_updated(f: _Facts) -> _Finding | None:
    kinds = ("optimizer_params_not_in_model", "params_not_in_optimizer", "grads_missing", "weights_frozen")
    evs = [e for e in f.all(*kinds) if e.severity >= Severity.WARNING]
    # Frozen weights that the emitter puts down to updates below the float resolution are lr_too_low's.
    evs = [e for e in evs if not (e.kind == "weights_frozen" and _frozen_by_underflow(e))]
    # Weights that stop moving once the loss has converged are done, not stuck: weights measured not to
    # move count only while the loss stalls or goes wrong. Direct findings (a group with lr=0, the
    # construction bugs) count whatever the loss does.
    if not f.stalled:
        evs = [e for e in evs if e.kind != "weights_frozen" or e.data.get("reason") == "lr_zero"]
    if not evs:
        return None
    advice = {
        "optimizer_params_not_in_model": "Build the optimizer from the parameters of the model you train "
        "(optimizer = Opt(model.parameters())); it holds parameters of another instance.",
        "params_not_in_optimizer": "Add the listed parameters to an optimizer param group, or set "
        "requires_grad=False on them if they are meant to stay frozen.",
        "grads_missing": "The loss does not reach these parameters: look for .detach(), .item(), .numpy(), "
        "torch.no_grad() or a tensor rebuilt from data inside the forward pass.",
        "weights_frozen": "These weights do not move: check their param group's learning rate (0?) and "
        "that the optimizer steps the parameters the model uses.",
    }
    first = evs[0]
    return _Finding(
        "params_not_updated",
        _combine(*(_conf(e, 0.8) for e in evs), 0.3 if f.stalled else 0.0),
        evs,
        advice.get(first.kind, advice["weights_frozen"]),
    )


@_rule
def _non_finite(f: _Facts) -> _Finding | None:
    evs = f.all("nonfinite", "nonfinite_inputs", "nonfinite_gradients", "nonfinite_skipped", "nonfinite_zeroed")
    evs += [e for e in f.all("divergence") if e.data.get("reason") == "non_finite"]
    evs.sort(key=lambda e: e.step)
    if not evs:
        return None
    first = evs[0]
    # NonFinite names where the first NaN/Inf appeared; InputStats reports NaN in the inputs directly.
    located = next((e for e in evs if e.kind == "nonfinite"), None)
    where = str(located.data.get("where", "")) if located is not None else ""
    if not where and f.has("nonfinite_inputs"):
        where = "inputs"
    nan_onset = min(_onset(e) for e in evs)
    # NaN after the loss or the updates had already blown up is the end of another story. The check
    # point that first reports the NaN counts: its exploding norms and loss values are the finite ones,
    # and weights that turned NaN stay NaN, so they came before it.
    # (PlateauDetector reports one divergence per check point, so a loss explosion in the NaN's own
    # interval is reported as the NaN: only an earlier check point's explosion shows.)
    earlier = [e for e in f.all("exploding_gradients", "oscillation") if e.step <= first.step]
    earlier += [d for d in f.all("divergence") if d.data.get("reason") in ("explosion", "rise") and d.step < first.step]
    earlier += [e for e in f.all("update_ratio_high") if _finite_ratio(e) and _onset(e) < nan_onset]
    earlier.sort(key=lambda e: e.step)
    if where == "inputs":
        advice = (
            "The inputs hold NaN/Inf: clean or impute them in the data pipeline "
            "(check the files, the scaling, any division)."
        )
        confidence = 0.95
        earlier = []  # NaN in the data is a data bug whatever the updates did
    else:
        advice = (
            "Find the operation that makes NaN/Inf: use F.cross_entropy / log_softmax instead of log(softmax), "
            "add an eps to divisions and logs, clamp exponents; run with repair=True to skip such steps meanwhile."
        )
        confidence = 0.9 if not earlier else 0.45
    finding = _Finding("non_finite", confidence, evs, advice)
    finding.after_blowup = bool(earlier)
    finding.onset = nan_onset
    if earlier:
        finding.notes.append(f"the loss or the updates were already blowing up before (step {earlier[0].step})")
    return finding


@_rule
def _lr_too_high(f: _Facts) -> _Finding | None:
    high = [e for e in f.all("update_ratio_high") if _finite_ratio(e)]
    div = [e for e in f.all("divergence") if e.data.get("reason") in ("explosion", "rise")]
    osc = f.all("oscillation")
    nonfinite_div = [e for e in f.all("divergence") if e.data.get("reason") == "non_finite"]
    calm = f.calm_explosion
    if calm is not None:
        # The loss was fine until the gradients exploded: what went wrong from then on is the explosion's.
        div, osc, nonfinite_div = [], [], []
    evs = high + div + osc
    if not evs:
        return None
    explode = f.first("exploding_gradients")
    confidences = [_conf(e, 0.6) for e in high] + [0.7 for _ in div[:1]] + [0.6 for _ in osc[:1]]
    if high and (div or osc or nonfinite_div):
        confidences.append(0.5)
    confidence = _combine(*confidences)
    # Exploding gradients that come first (before any sign of big updates) point to the gradients, not the LR.
    if explode is not None and high and explode.step < high[0].step:
        confidence *= 0.6
    if not high and not f.stalled and not div:
        confidence *= 0.5
    return _Finding(
        "lr_too_high",
        min(confidence, 0.97),
        sorted(evs, key=lambda e: e.step),
        f"Lower the learning rate 3-10x{_lr_text(f)}, add a warm-up, or run with repair=True to cut it "
        "automatically when the loss diverges or stalls.",
    )


@_rule
def _lr_too_low(f: _Facts) -> _Finding | None:
    low = [e for e in f.all("update_ratio_low") if _finite_ratio(e)]
    low += [e for e in f.all("weights_frozen") if _frozen_by_underflow(e)]
    low.sort(key=lambda e: e.step)
    if not low:
        return None
    # Small updates on a loss that has reached its floor (``converged``) are healthy: annealed schedules
    # end that way. Only updates that round away entirely count then.
    if f.has("converged") and not f.stalled and not any(e.kind == "weights_frozen" for e in low):
        return None
    stall = f.first("plateau", "loss_at_chance")
    confidence = _combine(*(_conf(e, 0.5) for e in low))
    if stall is not None:
        confidence = _combine(confidence, 0.6)
    else:
        confidence *= 0.6
    ratio = _num(low[-1].data.get("median_ratio", low[-1].data.get("ratio")))
    detail = (
        f"; updates are ~{_fmt(ratio)} of the weights per step, where ~1e-3 is typical" if not math.isnan(ratio) else ""
    )
    evs = low + ([stall] if stall is not None else [])
    return _Finding(
        "lr_too_low",
        confidence,
        sorted(evs, key=lambda e: e.step),
        f"Raise the learning rate 10x or more{_lr_text(f)}{detail}; an LR range test finds a good value fast.",
    )


@_rule
def _bad_init(f: _Facts) -> _Finding | None:
    evs = f.all("bad_init")
    if not evs:
        return None
    problems = set()
    for e in evs:
        for key in ("problems", "problem", "kinds"):
            v = e.data.get(key)
            if isinstance(v, str):
                problems.add(v)
            elif isinstance(v, (tuple, list)):
                problems.update(str(x) for x in v)
    confidence = _combine(*(_conf(e, 0.7) for e in evs), 0.4 if f.stalled else 0.0)
    if problems & {"all_zero", "constant", "symmetric"}:
        advice = (
            "Initialize weights randomly (torch's default, or nn.init.kaiming_uniform_ / xavier_uniform_), never "
            "to zeros or a constant: identical units get identical gradients and never become different."
        )
    else:
        advice = (
            "Use fan-in scaled initialization (Kaiming for ReLU, Xavier for tanh/sigmoid, or torch's defaults): "
            "weights far larger or smaller than 1/sqrt(fan_in) make activations and gradients explode or vanish."
        )
    return _Finding("bad_init", confidence, evs, advice)


@_rule
def _over_regularization(f: _Facts) -> _Finding | None:
    evs = f.all("over_regularization")
    if not evs:
        return None
    return _Finding(
        "over_regularization",
        _combine(*(_conf(e, 0.7) for e in evs), 0.3 if f.stalled else 0.0),
        evs,
        "Lower the weight decay / L2 coefficient 10-100x: the decay term outweighs the loss gradient and holds "
        "the weights near zero. Typical values: AdamW 0.01-0.1, SGD 1e-4-5e-4, an explicit L2 term 1e-5-1e-3.",
    )


@_rule
def _unnormalized_inputs(f: _Facts) -> _Finding | None:
    evs = f.all("inputs_unnormalized")
    if not evs:
        return None
    e = evs[0]
    lo, hi = _num(e.data.get("min")), _num(e.data.get("max"))
    mean, std = _num(e.data.get("mean")), _num(e.data.get("std"))
    scale = (
        f"inputs range over [{_fmt(lo)}, {_fmt(hi)}] (mean {_fmt(mean)}, std {_fmt(std)}): "
        if not math.isnan(hi)
        else ""
    )
    knock_on = f.has("saturated_activations", "dead_units", "exploding_gradients", "divergence")
    return _Finding(
        "unnormalized_inputs",
        _combine(*(_conf(e, 0.7) for e in evs), 0.4 if (f.stalled or knock_on) else 0.0),
        evs,
        f"{scale}scale them (e.g. pixels to [0, 1]) and standardize per feature or channel with the training "
        "set's mean and std (torchvision's Normalize, or (x - mean) / std).",
    )


@_rule
def _class_imbalance(f: _Facts) -> _Finding | None:
    imb = f.all("class_imbalance")
    if not imb:
        return None
    # TargetStats names class_imbalance as the cause of a collapse or a loss at chance on imbalanced labels,
    # and of minority classes predicted far below their label share while the loss falls.
    kinds = ("predictions_collapsed", "loss_at_chance", "minority_underpredicted")
    collapsed = [e for e in f.all(*kinds) if "no_signal" not in e.causes]
    if not collapsed and not f.stalled:
        return None  # imbalanced data that is being learned fine is not a failure
    return _Finding(
        "class_imbalance",
        _combine(*(_conf(e, 0.6) for e in imb), *(_conf(e, 0.6) for e in collapsed[:2])),
        sorted(imb + collapsed, key=lambda e: e.step),
        "Reweight the loss (CrossEntropyLoss(weight=...) with inverse class frequencies) or resample with a "
        "WeightedRandomSampler, and judge the model by per-class recall or F1 rather than accuracy.",
    )


# Symptom rules below are gated on a stall: healthy runs can show them for a while.
@_rule
def _dying_relu(f: _Facts) -> _Finding | None:
    evs = f.all("dead_units")
    if not evs or not f.stalled:
        return None
    first = evs[0]
    confidence = _combine(_conf(first, 0.6), 0.4)
    frac = _num(first.data.get("max_fraction"))
    layers = first.data.get("layers") or ()
    where = f" ({_fmt(100 * frac)}% of the units of {', '.join(map(str, layers[:3]))} never fire)" if layers else ""
    return _Finding(
        "dying_relu",
        confidence,
        evs,
        f"Dead ReLUs{where}: lower the learning rate, initialize with Kaiming (He) init and small positive biases, "
        "add BatchNorm/LayerNorm, or use LeakyReLU/GELU, whose units cannot die.",
    )


@_rule
def _saturated(f: _Facts) -> _Finding | None:
    evs = f.all("saturated_activations")
    if not evs or not f.stalled:
        return None
    return _Finding(
        "saturated_activations",
        _combine(*(_conf(e, 0.6) for e in evs[:2]), 0.3),
        evs,
        "Sigmoid/tanh units sit in their flat regions: normalize the inputs, use Xavier/Glorot init, add "
        "normalization layers, or switch hidden layers to ReLU-family activations.",
    )


@_rule
def _vanishing(f: _Facts) -> _Finding | None:
    evs = f.all("vanishing_gradients")
    if not evs or not f.stalled:
        return None
    ratio = _num(evs[0].data.get("ratio"))
    detail = f" (first-layer gradients are {_fmt(ratio)} of the last layer's)" if not math.isnan(ratio) else ""
    return _Finding(
        "vanishing_gradients",
        _combine(*(_conf(e, 0.7) for e in evs[:2]), 0.4),
        evs,
        f"Gradients vanish towards the input{detail}: use ReLU-family activations instead of sigmoid/tanh in deep "
        "stacks, residual connections, BatchNorm/LayerNorm, or a shallower network.",
    )


@_rule
def _exploding(f: _Facts) -> _Finding | None:
    evs = f.all("exploding_gradients")
    if not evs:
        return None
    blew_up = f.first("divergence", "nonfinite", "nonfinite_gradients", "plateau", "oscillation")
    if blew_up is None:
        return None
    confidence = _combine(*(_conf(e, 0.7) for e in evs[:2]), 0.4)
    high = next((e for e in f.all("update_ratio_high") if _finite_ratio(e)), None)
    if high is not None and high.step <= evs[0].step and f.calm_explosion is None:
        # Big updates came first (or in the same interval) and trouble followed: the learning rate explains more.
        confidence *= 0.7
    return _Finding(
        "exploding_gradients",
        confidence,
        evs,
        "Clip the gradients (torch.nn.utils.clip_grad_norm_ with max_norm around 1, or run with repair=True), "
        "lower the learning rate, and for recurrent nets use LSTM/GRU cells or an orthogonal init of the "
        "recurrent weights.",
    )


@_rule
def _no_signal(f: _Facts) -> _Finding | None:
    # A loss at chance that its emitter puts down to imbalanced labels is class_imbalance's evidence.
    chance = [e for e in f.all("loss_at_chance") if "class_imbalance" not in e.causes]
    # A held-out loss that never beat chance while the training loss fell: memorized labels.
    chance += [e for e in f.all("val_loss_at_chance") if "class_imbalance" not in e.causes]
    chance.sort(key=lambda ev: ev.step)
    constant = [e for e in f.all("constant_features") if "no_signal" in e.causes]
    collapsed = [e for e in f.all("predictions_collapsed") if "no_signal" in e.causes]
    # Targets that cannot line up with the outputs carry no learnable relation, whatever the loss does.
    mismatched = f.all("shape_mismatch", "labels_out_of_range")
    if not chance and not constant and not mismatched:
        return None
    if mismatched and not chance and not constant:
        first = mismatched[0]
        return _Finding("no_signal", _combine(*(_conf(e, 0.9) for e in mismatched[:2])), mismatched, first.message)
    confidence = _combine(*(_conf(e, 0.6) for e in chance[:2] + constant), *(0.3 for _ in collapsed[:1]))
    # The same flat loss with tiny updates or a model that cannot fit is explained by those instead.
    if f.has("update_ratio_low"):
        confidence *= 0.5
    if f.has("capacity_limited"):
        confidence *= 0.6
    if f.has("bad_init", "grads_missing", "optimizer_params_not_in_model", "weights_frozen"):
        confidence *= 0.5
    e = (chance or constant)[0]
    loss, level = _num(e.data.get("loss", e.data.get("val_best"))), _num(e.data.get("chance"))
    detail = f" (loss {_fmt(loss)} vs chance {_fmt(level)})" if not math.isnan(level) else ""
    return _Finding(
        "no_signal",
        confidence,
        sorted(chance + constant + collapsed + mismatched, key=lambda ev: ev.step),
        f"The loss stays at chance level{detail} while the model trains: check that labels match their inputs "
        "(shuffle inputs and labels with one index), are not random or constant, and that the inputs reaching "
        "the model carry the information (no all-constant features, no wrong tensor fed in).",
    )


@_rule
def _capacity(f: _Facts) -> _Finding | None:
    struct = f.all("capacity_limited")
    if not struct:
        return None
    stall = f.first("plateau", "loss_at_chance", "predictions_collapsed")
    # A one-unit layer before three or more outputs is a defect on its own: the loss may creep down, but
    # every output stays an affine function of one number. Other structural limits need a stall.
    scalar = [e for e in struct if _scalar_bottleneck(e)]
    if stall is None and not scalar:
        return None
    return _Finding(
        "insufficient_capacity",
        _combine(*(_conf(e, 0.3) for e in struct), 0.5 if stall is not None else 0.0, 0.4 if scalar else 0.0),
        sorted([*struct, *([stall] if stall is not None else [])], key=lambda e: e.step),
        "The model cannot represent the task: add non-linear hidden layers, widen the narrow layers (at least "
        "as wide as the outputs), or use an architecture suited to the data (convolutions for images).",
    )


@_rule
def _overfitting(f: _Facts) -> _Finding | None:
    evs = f.all("overfitting")
    if not evs:
        return None
    best = evs[0].data.get("best_step")
    stop = f" at step {best}" if best is not None else ""
    monitor = str(evs[0].data.get("monitor", "val_loss"))
    worse = "falls" if evs[0].data.get("mode") == "max" else "rises"
    return _Finding(
        "overfitting",
        _combine(*(_conf(e, 0.75) for e in evs[:2])),
        evs,
        f"{monitor} {worse} while the training loss falls: stop early{stop} (keep the best checkpoint), add weight "
        "decay, dropout or data augmentation, or get more training data.",
    )


def _first_step(finding: _Finding | None) -> int | None:
    if finding is None or not finding.events:
        return None
    # The check point that first reported the finding; non_finite knows the exact step of the first NaN.
    return finding.onset if finding.onset is not None else min(e.step for e in finding.events)


# Causes read from symptoms that many causes can produce: however strong the symptom, the finding stays
# below certainty, so that a bug with direct evidence (a detached graph, a missing zero_grad) outranks it.
_SYMPTOMS = ("dying_relu", "saturated_activations", "vanishing_gradients", "exploding_gradients")
_SYMPTOM_CAP = 0.95

# Causes whose symptoms stop a model from learning: a loss stuck at chance next to any of them is their
# effect, not evidence that the labels carry no signal.
_STALLERS = (
    "lr_too_high",
    "lr_too_low",
    "bad_init",
    "over_regularization",
    "unnormalized_inputs",
    "dying_relu",
    "saturated_activations",
    "vanishing_gradients",
    "exploding_gradients",
    "missing_zero_grad",
    "params_not_updated",
    "non_finite",
)


def _explain(findings: dict[str, _Finding], f: _Facts) -> None:
    """Rank root causes above the symptoms they explain.

    Each rule moves a symptom's finding just below its root cause's (never above it); the order of the
    rules matters where chains form (a high LR kills units, dead units starve the first layers of
    gradient), so roots are settled before the symptoms that hang on them.
    """

    def below(symptom: str, root: str, why: str, when: bool = True) -> None:
        s, r = findings.get(symptom), findings.get(root)
        if not when or s is None or r is None:
            return
        if s.confidence >= r.confidence:
            s.confidence = max(0.05, r.confidence - 0.05)
        if why not in s.notes:
            s.notes.append(why)

    def starts_before(root: str, symptom: str) -> bool:
        r, s = _first_step(findings.get(root)), _first_step(findings.get(symptom))
        return r is not None and s is not None and r <= s

    nonfinite = findings.get("non_finite")
    below("lr_too_high", "missing_zero_grad", "piled-up gradients make the updates grow step after step")
    below("exploding_gradients", "missing_zero_grad", "piled-up gradients grow step after step")
    below(
        "non_finite",
        "lr_too_high",
        "the NaN followed diverging updates",
        when=nonfinite is not None and nonfinite.after_blowup,
    )
    below(
        "non_finite",
        "exploding_gradients",
        "the NaN followed exploding gradients",
        when=nonfinite is not None and nonfinite.after_blowup,
    )
    below(
        "dying_relu",
        "lr_too_high",
        "the updates were too large before the units died",
        when=starts_before("lr_too_high", "dying_relu"),
    )
    below(
        "dying_relu",
        "non_finite",
        "NaN weights make every unit look dead",
        when=starts_before("non_finite", "dying_relu"),
    )
    dead = {str(n) for e in f.all("dead_units") for n in e.data.get("layers") or ()}
    below(
        "dying_relu",
        "insufficient_capacity",
        "the dead units are the few of a bottleneck, where one dead unit cuts the signal",
        when=bool(dead) and dead <= _bottleneck_activations(f),
    )
    for root in ("unnormalized_inputs", "bad_init"):
        below("saturated_activations", root, f"{root} drives the units into saturation")
        below("dying_relu", root, f"{root} can push units into the dead region")
        below("exploding_gradients", root, f"{root} inflates the gradients")
        below("vanishing_gradients", root, f"{root} shrinks the gradients")
    below(
        "over_regularization",
        "insufficient_capacity",
        "a model that cannot fit the task settles where the loss gradient itself points along the weights",
    )
    below("vanishing_gradients", "over_regularization", "weights held near zero pass almost no gradient back")
    below("vanishing_gradients", "saturated_activations", "saturated units pass almost no gradient back")
    below("vanishing_gradients", "dying_relu", "dead units pass no gradient back to the layers before them")
    below(
        "vanishing_gradients",
        "exploding_gradients",
        "the last layers' gradients exploded, which makes the first layers' look small",
        when=starts_before("exploding_gradients", "vanishing_gradients"),
    )
    stale = findings.get("params_not_updated")
    only_frozen = stale is not None and all(e.kind == "weights_frozen" for e in stale.events)
    below(
        "params_not_updated",
        "vanishing_gradients",
        "updates from vanishing gradients fall below the weights' float resolution",
        when=only_frozen,
    )
    below(
        "lr_too_low",
        "dying_relu",
        "dead units pass no gradient, so the weights before them stop moving",
        when=starts_before("dying_relu", "lr_too_low"),
    )
    below(
        "lr_too_low",
        "lr_too_high",
        "updates look small next to weights that a too-high learning rate blew up",
        when=starts_before("lr_too_high", "lr_too_low"),
    )
    below(
        "lr_too_low",
        "exploding_gradients",
        "updates look small next to weights that exploding gradients blew up",
        when=starts_before("exploding_gradients", "lr_too_low"),
    )
    below("lr_too_low", "vanishing_gradients", "vanishing gradients make the updates of the first layers tiny")
    below("lr_too_low", "saturated_activations", "saturated units pass almost no gradient, so updates are tiny")
    below("lr_too_low", "params_not_updated", "parameters that are never updated look like tiny updates")
    below("lr_too_low", "missing_zero_grad", "piled-up gradients distort the updates")
    below("no_signal", "insufficient_capacity", "the model cannot represent the task")
    stallers = [c for c in _STALLERS if c in findings]
    signal = findings.get("no_signal")
    if signal is not None and any(e.kind == "constant_features" for e in signal.events):
        # Constant inputs: the first layers' gradients (input x upstream gradient) carry no information,
        # and what looks like vanishing gradients is the empty input, not the depth of the network.
        if "vanishing_gradients" in stallers:
            stallers.remove("vanishing_gradients")
        below("vanishing_gradients", "no_signal", "constant inputs give the first layers nothing to learn from")
    for root in sorted(stallers, key=lambda c: -findings[c].confidence):
        below(
            "no_signal", root, f"{', '.join(stallers)} keep(s) the model from learning, which leaves the loss at chance"
        )
    below("class_imbalance", "no_signal", "a stuck model predicts the majority class")
    below(
        "overfitting",
        "no_signal",
        "the validation loss never beat chance: there was no fit to held-out data to lose",
        when=any("no_signal" in e.causes for e in f.all("val_loss_at_chance")),
    )


def diagnose(events: Sequence[Event], guard: Guard | None = None) -> list[Diagnosis]:
    """Rank the causes the events give evidence of, most likely first.

    Args:
        events: The run's events, oldest first (``guard.events``, or ``read_jsonl(path)``).
        guard: The Guard, when available, for context such as the current learning rates.

    Returns:
        A list of :class:`Diagnosis`, most likely first; empty for a healthy run.

    Example:
        >>> import stallguard as sg
        >>> events = [
        ...     sg.Event(kind="plateau", severity="warning", message="loss flat since step 40", step=150),
        ...     sg.Event(kind="update_ratio_low", severity="warning", message="median |dw|/|w| 2e-07", step=150,
        ...              causes=("lr_too_low",), confidence=0.8, data={"median_ratio": 2e-07}),
        ... ]
        >>> [d.cause for d in sg.diagnose(events)]
        ['lr_too_low']
        >>> sg.diagnose([])
        []
    """
    facts = _Facts(events, guard)
    findings: dict[str, _Finding] = {}
    for rule in _RULES:
        found = rule(facts)
        if found is not None and found.confidence > 0:
            if found.cause in _SYMPTOMS:
                found.confidence = min(found.confidence, _SYMPTOM_CAP)
            findings[found.cause] = found
    _explain(findings, facts)
    ranked = sorted(findings.values(), key=lambda x: (-x.confidence, x.cause))
    out = []
    for fnd in ranked:
        cited = [_cite(e) for e in fnd.events[:4]]
        if len(fnd.events) > 4:
            cited.append(f"... and {len(fnd.events) - 4} more event(s) of the same kinds")
        stall = facts.stall
        if stall is not None and stall not in fnd.events:
            cited.append(f"the loss stalled or went wrong: {_cite(stall)}")
        cited += [f"ranked lower: {n}" for n in fnd.notes]
        out.append(
            Diagnosis(
                cause=fnd.cause,
                confidence=round(min(max(fnd.confidence, 0.0), 1.0), 3),
                evidence=tuple(cited),
                advice=fnd.advice,
                events=tuple(fnd.events),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def _timeline(events: Sequence[Event], limit: int) -> list[str]:
    """Key events, with repeats of one kind from one source folded into a single line."""
    key = [e for e in events if e.severity >= Severity.WARNING]
    folded: list[tuple[Event, Event, int]] = []
    for e in key:
        if folded and folded[-1][0].kind == e.kind and folded[-1][0].source == e.source:
            first, _, n = folded[-1]
            folded[-1] = (first, e, n + 1)
        else:
            folded.append((e, e, 1))
    lines = []
    shown = folded[-limit:]
    if len(folded) > len(shown):
        lines.append(f"  ... {len(folded) - len(shown)} earlier entries not shown")
    for first, last, n in shown:
        repeat = f" (x{n}, until step {last.step})" if n > 1 else ""
        lines.append(f"  step {first.step:>7}  {first.severity!s:8}  {first.kind:24} {first.message}{repeat}")
    return lines


def format_report(guard: Guard, *, max_timeline: int = 30) -> str:
    """The text of ``Guard.report()``: run summary, timeline of key events, diagnosis table."""
    lines = [f"stallguard report: {guard.step} optimizer steps, {len(guard.hooks)} hooks"]
    if guard.has_series("loss"):
        v = guard.series("loss").values
        finite = v[[math.isfinite(x) for x in v]]
        best = f"{min(finite):.4g}" if len(finite) else "n/a"
        lines.append(f"loss: first {v[0]:.4g}, last {v[-1]:.4g}, best {best} ({len(v)} steps observed)")
    lines.append("")
    timeline = _timeline(guard.events, max_timeline)
    if timeline:
        lines.append("timeline (warnings and worse):")
        lines += timeline
    else:
        lines.append("timeline: no warnings.")
    lines.append("")
    found = guard.diagnose()
    if not found:
        lines.append("diagnosis: no cause found; the run looks healthy so far.")
    else:
        lines.append("diagnosis (most likely first):")
        rows = [[str(i + 1), d.cause, f"{d.confidence:.2f}", d.description] for i, d in enumerate(found)]
        lines.append(_fmt_table(rows, ["#", "cause", "conf", "what it means"]))
        for i, d in enumerate(found, 1):
            lines.append("")
            lines.append(f"{i}. {d.cause}: {d.advice}")
            lines += [f"   - {ev}" for ev in d.evidence]
    failures = sum(guard.sink_failures.values())
    if failures:
        lines.append("")
        lines.append(f"note: {failures} sink write(s) failed; every event is in guard.events")
    return "\n".join(lines)
