"""The prior tools' rules, as small observers fed the same per-step numbers as stallguard.

None of these tools runs on a plain PyTorch loop today (smdebug's built-in rules are closed and run only
on SageMaker; DeepDiagnosis and AutoTrainer are Keras callbacks), so each is re-implemented here from
its published rules and defaults (see ``/work/shared/prior-art``: smdebug.md §1a, research_tools.md
§B and §C, callback_apis.md §6). A :class:`Tracer` records, on an unguarded run of the scenario, the
numbers each rule reads: the loss, per-tensor gradient and weight statistics, the update, ReLU outputs,
sigmoid/tanh inputs, layer outputs, the batch's inputs, labels and predictions, validation losses.

Each baseline maps its alarms to the closest stallguard cause id; the mapping is in :data:`MAPPING`
and in benchmarks/RESULTS.md. A baseline's ranked causes are its alarms' causes in the order they first
fired (DeepDiagnosis and AutoTrainer stop at their first report and rank only what that report names).

Generous choices, to give each tool its best showing on small runs: smdebug rules see every step
(``save_interval=1``, which its docs ask for WeightUpdateRatio and PoorWeightInitialization);
DeepDiagnosis and AutoTrainer's "epoch" is one pass over the scenario's training set; DeepDiagnosis'
"Poor Weight" check uses the variance of each weight tensor (the released code's per-layer means make it
never fire).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BASELINES", "MAPPING", "Tracer", "run_baselines"]

#: Baseline name -> (alarm -> cause id). Where a rule's own name has no single cause, the choice is noted.
MAPPING: dict[str, dict[str, str]] = {
    "smdebug": {
        "LossNotDecreasing": "lr_too_low",  # a flat loss; raising the LR is the stock advice
        "VanishingGradient": "vanishing_gradients",
        "ExplodingTensor": "non_finite",  # the rule tests for NaN/Inf
        "DeadRelu": "dying_relu",
        "SaturatedActivation": "saturated_activations",
        "PoorWeightInitialization": "bad_init",
        "WeightUpdateRatio(large)": "lr_too_high",
        "WeightUpdateRatio(small)": "lr_too_low",
        "TensorVariance": "bad_init",  # weights, with the docs' example bounds 1e-5 / 10
        "UnchangedTensor": "params_not_updated",
        "AllZero": "bad_init",  # weights
        "ClassImbalance": "class_imbalance",
        "CheckInputImages": "unnormalized_inputs",
        "Overfit": "overfitting",
    },
    "DeepDiagnosis": {
        "change initialization": "bad_init",
        "normalize the data": "unnormalized_inputs",
        "learning rate (high)": "lr_too_high",
        "learning rate (low)": "lr_too_low",
        "numerical error": "non_finite",
        "unchanged weight": "params_not_updated",
        "saturated activation": "saturated_activations",
        "dead node": "dying_relu",
        "vanishing gradient": "vanishing_gradients",
        "invalid loss": "non_finite",
        "loss not decreasing": "lr_too_low",  # "change optimizer"
        "accuracy not increasing": "lr_too_low",
    },
    "AutoTrainer": {
        "vanish": "vanishing_gradients",
        "explode": "exploding_gradients",  # includes NaN/Inf, as AutoTrainer does
        "relu": "dying_relu",
        "unstable": "lr_too_high",  # oscillating accuracy; its first repairs lower the LR
        "not_converge": "lr_too_low",  # slow convergence; its repairs change the optimizer or raise the LR
    },
    "ReduceLROnPlateau": {
        "reduce": "lr_too_high",  # its action, lowering the LR, treats the plateau as a too-high LR
    },
}

BASELINES = list(MAPPING)


# ============================================================================================ tracer
class Tracer:
    """Records, per optimizer step, the numbers the baselines' rules read."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: str) -> None:
        self.model = model
        self.optimizer = optimizer
        self.task = task
        self.records: list[dict[str, Any]] = []
        self._obs: dict[str, Any] = {}
        self._losses: list[float] = []
        self._acts: dict[str, dict[str, float]] = {}
        self._seen: set[str] = set()
        self._prev: dict[str, Tensor] = {}
        self._handles = []
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = names
        kernels = [n for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and n != "pos"]
        self.meta: dict[str, Any] = {
            "task": task,
            "first_kernel": kernels[0] if kernels else None,
            "last_kernel": kernels[-1] if kernels else None,
        }
        for mname, m in model.named_modules():
            if isinstance(m, nn.ReLU):
                self._handles.append(m.register_forward_hook(self._relu_hook(mname)))
            elif isinstance(m, (nn.Sigmoid, nn.Tanh)):
                self._handles.append(m.register_forward_hook(self._sat_hook(mname, isinstance(m, nn.Tanh))))
            elif any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_hook(self._fw_hook(mname)))
        for n, p in model.named_parameters():
            self._prev[n] = p.detach().clone()
        self.meta["params"] = [n for n, _ in model.named_parameters()]

    # ------------------------------------------------------------------ forward hooks (first forward per step)
    def _first(self, name: str) -> bool:
        if name in self._seen:
            return False
        self._seen.add(name)
        return True

    def _relu_hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
            if not self._first(name):
                return
            with torch.no_grad():
                o = out.detach().float().flatten(1)
                x = inp[0].detach().float()
                active = (o > 0).float().mean(0)
                self._acts[name] = {
                    "type": "relu",
                    "dead_pct": float((active < 0.01).float().mean()) * 100,  # smdebug: active in < 1% of samples
                    "le0": float((o <= 0).float().mean()),  # DeepDiagnosis: share of outputs <= 0
                    "in_var": float(x.var()) if x.numel() > 1 else 0.0,
                    "out_mean": float(o.mean()),
                }

        return hook

    def _sat_hook(self, name: str, tanh: bool) -> Callable[..., None]:
        lo, hi = (-9.4999, 9.4999) if tanh else (-23.0, 16.99999)

        def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
            if not self._first(name):
                return
            with torch.no_grad():
                x = inp[0].detach().float().flatten(1)
                outside = ((x < lo) | (x > hi)).float().mean(0)
                self._acts[name] = {
                    "type": "tanh" if tanh else "sigmoid",
                    "sat_pct": float((outside >= 0.99).float().mean()) * 100,  # smdebug
                    "ge5": float((x.abs() >= 5).float().mean()),  # DeepDiagnosis
                    "out_mean": float(out.detach().float().mean()),
                }

        return hook

    def _fw_hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if not self._first(name):
                return
            o = out[0] if isinstance(out, tuple) else out
            if isinstance(o, Tensor):
                self._acts[name] = {"type": "layer", "out_mean": float(o.detach().float().mean())}

        return hook

    # ------------------------------------------------------------------ loop calls
    def observe(
        self, loss: Any = None, *, inputs: Any = None, outputs: Any = None, targets: Any = None, **metrics: Any
    ) -> None:
        if loss is not None:
            self._losses.append(float(loss.detach().float()) if isinstance(loss, Tensor) else float(loss))
        if inputs is not None and "inputs" not in self._obs and inputs.is_floating_point():
            x = inputs.detach().float()
            self._obs["inputs"] = {
                "min": float(x.min()),
                "max": float(x.max()),
                "mean": float(x.mean()),
                "ndim": x.dim(),
                "n": x.shape[0],
            }
        if outputs is not None and targets is not None and "acc" not in self._obs:
            o, t = outputs.detach().float(), targets.detach()
            if self.task == "classification" and o.dim() == 2:
                pred = o.argmax(1)
                self._obs["acc"] = float((pred == t).float().mean())
                self._obs["labels"] = t.tolist()
                self._obs["preds"] = pred.tolist()
            else:
                var = float(t.float().var()) if t.numel() > 1 else 1.0
                mse = float(((o - t.float()) ** 2).mean())
                self._obs["acc"] = max(0.0, 1.0 - mse / max(var, 1e-12)) if math.isfinite(mse) else 0.0
        if "val_loss" in metrics:
            v = metrics["val_loss"]
            self._obs["val_loss"] = float(v.detach().float()) if isinstance(v, Tensor) else float(v)

    def after_step(self, step: int) -> None:
        grads: dict[str, dict[str, float]] = {}
        weights: dict[str, dict[str, float]] = {}
        for n, p in self.model.named_parameters():
            w = p.detach().float()
            prev = self._prev[n]
            delta = float((w - prev).norm())
            weights[n] = {
                "mean": float(w.mean()),
                "var": float(w.var()) if w.numel() > 1 else 0.0,
                "norm": float(w.norm()),
                "finite": bool(torch.isfinite(w).all()),
                "delta": delta,
                "unchanged": bool(torch.allclose(w, prev, rtol=1e-5, atol=1e-8)),
                "all_zero": bool((w == 0).all()),
            }
            self._prev[n] = w.clone()
            if p.grad is not None:
                gr = p.grad.detach().float()
                rec = {
                    "mean_abs": float(gr.abs().mean()),
                    "mean": float(gr.mean()),
                    "norm": float(gr.norm()),
                    "zero": float((gr == 0).sum()),
                    "numel": float(gr.numel()),
                    "finite": bool(torch.isfinite(gr).all()),
                }
                if step < 10:
                    flat = gr.flatten()
                    if flat.numel() > 1 and bool(torch.isfinite(flat).all()):
                        q = torch.quantile(flat[:100_000], torch.tensor([0.05, 0.95]))
                        rec["p95_p5"] = float(q[1] - q[0])
                grads[n] = rec
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss = sum(self._losses) / len(self._losses) if self._losses else math.nan
        self.records.append(
            {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grads": grads,
                "weights": weights,
                "acts": dict(self._acts),
                **self._obs,
            }
        )
        self._obs = {}
        self._losses = []
        self._acts = {}
        self._seen = set()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ============================================================================================ helpers
class _Alarms:
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self.list: list[tuple[int, str]] = []

    def fire(self, step: int, rule: str) -> None:
        self.list.append((step, rule))

    def ranked(self) -> tuple[list[str], int | None]:
        out: list[str] = []
        for _, rule in sorted(self.list, key=lambda sr: sr[0]):
            cause = self.mapping[rule]
            if cause not in out:
                out.append(cause)
        return out, (min(s for s, _ in self.list) if self.list else None)


def _nonfinite_record(r: dict[str, Any]) -> bool:
    if not math.isfinite(r["loss"]):
        return True
    return any(not g["finite"] for g in r["grads"].values()) or any(not w["finite"] for w in r["weights"].values())


def _is_weight(name: str) -> bool:
    return name.endswith("weight") or "weight_" in name


# ============================================================================================ smdebug
def smdebug(records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], int | None]:
    """smdebug's built-in rules with their documented defaults, evaluated at every step."""
    a = _Alarms(MAPPING["smdebug"])
    labels: list[int] = []
    preds: list[int] = []
    input_means: list[tuple[float, int]] = []
    losses = [r["loss"] for r in records]
    for i, r in enumerate(records):
        s = r["step"]
        # LossNotDecreasing(num_steps=10, diff_percent=0.1): loss(s) vs loss(s - 10), every 10 steps.
        if s >= 10 and s % 10 == 0 and losses[i] > losses[i - 10] * (1 - 0.001):
            a.fire(s, "LossNotDecreasing")
        # VanishingGradient(threshold=1e-7): mean |g| of any gradient tensor.
        if any(g["mean_abs"] < 1e-7 for g in r["grads"].values() if g["finite"]):
            a.fire(s, "VanishingGradient")
        # ExplodingTensor: any NaN/Inf.
        if _nonfinite_record(r):
            a.fire(s, "ExplodingTensor")
        for act in r["acts"].values():
            # DeadRelu(threshold_inactivity=1%, threshold_layer=50%).
            if act["type"] == "relu" and act["dead_pct"] > 50.0:
                a.fire(s, "DeadRelu")
            # SaturatedActivation(tanh +-9.4999, sigmoid -23/17, inactivity 1%, layer 50%).
            if act["type"] in ("tanh", "sigmoid") and act["sat_pct"] > 50.0:
                a.fire(s, "SaturatedActivation")
        # PoorWeightInitialization(threshold=10, distribution_range=0.001, patience=5, steps=10).
        if s < 10:
            variances = [act["in_var"] for act in r["acts"].values() if act["type"] == "relu"]
            if len(variances) >= 2 and min(variances) > 0 and max(variances) / min(variances) > 10.0:
                a.fire(s, "PoorWeightInitialization")
            spreads = [g["p95_p5"] for g in r["grads"].values() if "p95_p5" in g]
            if spreads and min(spreads) < 0.001:
                a.fire(s, "PoorWeightInitialization")
            if s >= 5 and not losses[i] < losses[i - 5]:
                a.fire(s, "PoorWeightInitialization")
        for n, w in r["weights"].items():
            if not _is_weight(n):
                continue
            # WeightUpdateRatio(large_threshold=10, small_threshold=1e-8, epsilon=1e-9), step over step.
            ratio = w["delta"] / (w["norm"] + 1e-9)
            if ratio > 10.0:
                a.fire(s, "WeightUpdateRatio(large)")
            elif ratio < 1e-8 and s > 0:
                a.fire(s, "WeightUpdateRatio(small)")
            # TensorVariance on weights (the docs' example: max 10, min 1e-5).
            if w["var"] > 10.0 or w["var"] < 1e-5:
                a.fire(s, "TensorVariance")
            if w["all_zero"]:
                a.fire(s, "AllZero")
        # UnchangedTensor(num_steps=3, rtol=1e-5, atol=1e-8) on weights: allclose over the last 3 steps.
        if i >= 2:
            for n in r["weights"]:
                if _is_weight(n) and r["weights"][n]["unchanged"] and records[i - 1]["weights"][n]["unchanged"]:
                    a.fire(s, "UnchangedTensor")
                    break
        # ClassImbalance(threshold_imbalance=10, threshold_misprediction=0.7, samples=500), last 500 labels.
        if "labels" in r:
            labels = (labels + r["labels"])[-500:]
            preds = (preds + r["preds"])[-500:]
            if len(labels) >= 500:
                classes = sorted(set(labels))
                counts = [labels.count(c) for c in classes]
                if len(counts) >= 2 and max(counts) > 10 * min(counts):
                    a.fire(s, "ClassImbalance")
                for c in classes:
                    idx = [k for k, lab in enumerate(labels) if lab == c]
                    wrong = sum(1 for k in idx if preds[k] != c)
                    if idx and wrong / len(idx) > 0.7:
                        a.fire(s, "ClassImbalance")
                        break
        # CheckInputImages(threshold_mean=0.2, threshold_samples=500) on image batches (NCHW).
        inp = r.get("inputs")
        if inp is not None and inp["ndim"] == 4:
            input_means.append((inp["mean"], inp["n"]))
            seen = sum(n for _, n in input_means)
            if seen >= 500 and abs(sum(m * n for m, n in input_means) / seen) > 0.2:
                a.fire(s, "CheckInputImages")
        # Overfit(ratio_threshold=0.1, patience=1): (val - train) / train.
        if "val_loss" in r:
            window = [x for x in losses[max(0, i - 9) : i + 1] if math.isfinite(x)]
            train = sum(window) / len(window) if window else math.nan
            if train > 0 and (r["val_loss"] - train) / train > 0.1:
                a.fire(s, "Overfit")
    return a.ranked()


# ============================================================================================ DeepDiagnosis
def _epochs(records: list[dict[str, Any]], epoch_steps: int) -> list[tuple[int, list[dict[str, Any]]]]:
    out = []
    for start in range(0, len(records) - epoch_steps + 1, epoch_steps):
        chunk = records[start : start + epoch_steps]
        out.append((chunk[-1]["step"], chunk))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def deepdiagnosis(records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], int | None]:
    """DeepDiagnosis' checks at each epoch end on the probe (last) batch; its decision tree names one fix."""
    epoch_steps = meta["epoch_steps"]
    epochs = _epochs(records, epoch_steps)
    ep_loss: list[float] = []
    ep_acc: list[float] = []
    wmeans: list[dict[str, float]] = []
    for e, (step, chunk) in enumerate(epochs):
        probe = chunk[-1]
        ep_loss.append(_mean([r["loss"] for r in chunk]))
        ep_acc.append(_mean([r["acc"] for r in chunk if "acc" in r]))
        wmeans.append({n: w["mean"] for n, w in probe["weights"].items() if _is_weight(n)})
        last_epoch = e == len(epochs) - 1
        symptom = _dd_symptom(probe, e, ep_loss, ep_acc, wmeans, last_epoch, meta)
        if symptom is None:
            continue
        fix = _dd_fix(symptom, probe)
        ranked = []
        for key in (fix, symptom):
            cause = MAPPING["DeepDiagnosis"].get(key)
            if cause is not None and cause not in ranked:
                ranked.append(cause)
        return ranked, step
    return [], None


def _dd_symptom(
    probe: dict[str, Any],
    e: int,
    ep_loss: list[float],
    ep_acc: list[float],
    wmeans: list[dict[str, float]],
    last_epoch: bool,
    meta: dict[str, Any],
) -> str | None:
    if not math.isfinite(ep_loss[-1]):
        return "invalid loss"
    outs = [a["out_mean"] for a in probe["acts"].values()]
    if any((not math.isfinite(v)) or v == 0.0 for v in outs):
        return "numerical error"
    for n, w in probe["weights"].items():
        if _is_weight(n) and ((not math.isfinite(w["mean"])) or w["mean"] == 0.0):
            return "numerical error"
    for n, g in probe["grads"].items():
        if _is_weight(n) and ((not math.isfinite(g["mean"])) or g["mean"] == 0.0):
            return "numerical error"
    if (e + 1) % 5 == 0 and len(wmeans) >= 5:
        for n in wmeans[-1]:
            window = [wm.get(n) for wm in wmeans[-5:]]
            if None not in window and len(set(window)) == 1:
                return "unchanged weight"
        for a in probe["acts"].values():
            if a["type"] in ("tanh", "sigmoid") and a["ge5"] > 0.5:
                return "saturated activation"
    for n, g in probe["grads"].items():
        if _is_weight(n) and g["mean_abs"] < 1e-7:
            return "vanishing gradient"
    if (e + 1) % 5 == 0 and len(ep_loss) >= 5 and len(set(ep_loss[-5:])) == 1:
        return "loss not decreasing"
    if (e + 1) % 20 == 0 and len(ep_acc) >= 20 and len(set(ep_acc[-20:])) == 1:
        return "accuracy not increasing"
    if last_epoch and any(a["type"] == "relu" and a["le0"] >= 0.7 for a in probe["acts"].values()):
        return "dead node"
    return None


def _dd_fix(symptom: str, probe: dict[str, Any]) -> str:
    poor_weight = any(
        _is_weight(n) and (w["var"] < 1e-5 or w["var"] > 10.0) for n, w in probe["weights"].items() if w["finite"]
    )
    inp = probe.get("inputs")
    unnormalized = inp is not None and (inp["min"] < -1.0 or inp["max"] > 1.0)
    gnorm = math.sqrt(sum(g["norm"] ** 2 for g in probe["grads"].values() if g["finite"]))
    wnorm = math.sqrt(sum(w["norm"] ** 2 for w in probe["weights"].values() if w["finite"]))
    proxy = probe["lr"] * gnorm / wnorm if wnorm > 0 else math.inf
    lr_fix = "learning rate (high)" if proxy > 0.1 else "learning rate (low)" if proxy < 1e-5 else None
    tree = {
        "numerical error": ["init", "norm", "lr"],
        "unchanged weight": ["init", "lr"],
        "saturated activation": ["norm", "init", "lr"],
        "dead node": ["norm", "init", "lr"],
        "vanishing gradient": ["lr"],
        "invalid loss": [],  # the last layer is linear: "change its activation"
        "loss not decreasing": ["init", "norm", "lr"],
        "accuracy not increasing": ["init", "norm", "lr"],
    }[symptom]
    for check in tree:
        if check == "init" and poor_weight:
            return "change initialization"
        if check == "norm" and unnormalized:
            return "normalize the data"
        if check == "lr" and lr_fix is not None:
            return lr_fix
    return symptom


# ============================================================================================ AutoTrainer
def autotrainer(records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], int | None]:
    """AutoTrainer's monitor (default_param) every checkgap=3 epochs; loss/accuracy rules after 30% of them."""
    epoch_steps = meta["epoch_steps"]
    epochs = _epochs(records, epoch_steps)
    total = len(epochs)
    judgment = int(0.3 * total)
    acc: list[float] = []
    first, last = meta.get("first_kernel"), meta.get("last_kernel")
    for e, (step, chunk) in enumerate(epochs):
        acc.append(_mean([r["acc"] for r in chunk if "acc" in r]))
        if (e + 1) % 3 != 0:
            continue
        probe = chunk[-1]
        found: list[str] = []
        nan = any(_nonfinite_record(r) for r in chunk) or max((r["loss"] for r in chunk), default=0) >= 1e3
        if nan:
            found.append("explode")
        if e >= judgment:
            finite_acc = [x for x in acc if math.isfinite(x)]
            gains = [b - a_ for a_, b in itertools.pairwise(finite_acc)]
            not_converge = (max(finite_acc) if finite_acc else 0.0) < 0.7
            slow = bool(gains) and max(gains) < 0.01
            stalled = not_converge or slow
            g = probe["grads"]
            if stalled and first in g and last in g and g[last]["norm"] > 0:
                r = g[first]["norm"] / g[last]["norm"]
                if r < 1e-3 and g[first]["norm"] < 1e-4:
                    found.append("vanish")
                if r > 70 and "explode" not in found:
                    found.append("explode")
            zeros = sum(x["zero"] for x in g.values())
            numel = sum(x["numel"] for x in g.values())
            if stalled and numel and zeros / numel >= 0.7:
                found.append("relu")
            if _oscillations(finite_acc, 0.03) >= 0.2 * len(finite_acc):
                found.append("unstable")
            if stalled:
                found.append("not_converge")
        if found:
            ranked = []
            for key in found:  # priority: vanish = explode = relu (2) > unstable = not_converge (1)
                cause = MAPPING["AutoTrainer"][key]
                if cause not in ranked:
                    ranked.append(cause)
            return ranked, step
    return [], None


def _oscillations(acc: list[float], zeta: float) -> int:
    """Pairs of successive local maxima and minima of the accuracy curve that differ by at least zeta."""
    extremes = []
    for i in range(1, len(acc) - 1):
        if (acc[i] > acc[i - 1] and acc[i] >= acc[i + 1]) or (acc[i] < acc[i - 1] and acc[i] <= acc[i + 1]):
            extremes.append(acc[i])
    return sum(1 for a_, b in itertools.pairwise(extremes) if abs(a_ - b) >= zeta)


# ============================================================================================ ReduceLROnPlateau
def reduce_lr_on_plateau(records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], int | None]:
    """torch's ReduceLROnPlateau with its defaults, stepped with each step's loss; an LR cut is an alarm."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    for r in records:
        before = opt.param_groups[0]["lr"]
        sched.step(r["loss"])
        if opt.param_groups[0]["lr"] < before:
            return [MAPPING["ReduceLROnPlateau"]["reduce"]], r["step"]
    return [], None


_RUNNERS = {
    "smdebug": smdebug,
    "DeepDiagnosis": deepdiagnosis,
    "AutoTrainer": autotrainer,
    "ReduceLROnPlateau": reduce_lr_on_plateau,
}


def run_baselines(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, tuple[list[str], int | None]]:
    """Every baseline's ranked causes and first alarm step on one traced run."""
    return {name: fn(records, meta) for name, fn in _RUNNERS.items()}
