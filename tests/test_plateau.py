"""PlateauDetector on small real training runs, synthetic series (hypothesis) and its state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stallguard as sg
from stallguard.hooks.plateau import PlateauDetector

WARNINGS = ("plateau", "divergence", "oscillation")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run fastest on one thread, and the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- small real runs
def _teacher(seed: int):
    """An endless classification task a small MLP can learn: labels from a fixed random ReLU net."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, 32, generator=g) / 4
    w2 = torch.randn(32, 4, generator=g) / math.sqrt(32)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=g)
        return x, (torch.relu(x @ w1) @ w2).argmax(1)

    return batch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def train(
    steps: int,
    *,
    opt: str = "sgd",
    lr: float = 0.2,
    bs: int = 32,
    seed: int = 0,
    hooks: list[sg.Hook] | None = None,
    sched: str | None = None,
    random_labels: bool = False,
    lr_zero_at: int | None = None,
    lr_back_at: int | None = None,
    check_every: int = 50,
) -> tuple[sg.Guard, np.ndarray]:
    torch.manual_seed(seed)
    batch = _teacher(seed + 100)
    model = _mlp()
    if opt == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if opt == "sgdm" else 0.0)
    scheduler = None
    if sched == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    elif sched == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    elif sched == "warmup":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 200))
    elif sched == "cyclic":
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=0.05, max_lr=lr, step_size_up=20, cycle_momentum=False
        )
    guard = sg.Guard(
        model, optimizer, hooks=hooks or [PlateauDetector()], sinks=[], check_every=check_every, strict=True
    )
    losses = []
    for t in range(steps):
        if lr_zero_at is not None and t == lr_zero_at:
            for group in optimizer.param_groups:
                group["lr"] = 0.0  # training stops improving from here on
        if lr_back_at is not None and t == lr_back_at:
            for group in optimizer.param_groups:
                group["lr"] = lr
        x, y = batch(bs)
        if random_labels:
            y = torch.randint(0, 4, (bs,), generator=torch.Generator().manual_seed(seed * 100_000 + t))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        guard.observe(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    guard.close()
    return guard, np.asarray(losses)


def kinds(guard: sg.Guard) -> list[str]:
    return [e.kind for e in guard.events]


def first(guard: sg.Guard, kind: str) -> sg.Event:
    return next(e for e in guard.events if e.kind == kind)


# ----------------------------------------------------------------------------- stalls are flagged
def test_run_that_stops_improving_is_flagged_within_patience_plus_window():
    det = PlateauDetector(patience=100, patience_growth=0)
    stop = 300
    guard, losses = train(600, lr_zero_at=stop, hooks=[det])
    assert np.median(losses[250:300]) < 0.6 * np.median(losses[:50])  # it was learning before
    p = first(guard, "plateau")
    assert stop < p.step <= stop + det.patience + det.window + guard.check_every
    assert p.severity == sg.Severity.WARNING and p.causes == ()
    for key in ("level", "best", "best_step", "steps", "observations", "change", "start", "window", "repeat"):
        assert key in p.data
    assert p.data["patience"] == 100 and p.data["observations"] >= 100


def test_default_patience_grows_with_progress_made():
    stop = 300
    guard, _ = train(900, lr_zero_at=stop)
    det = guard.hook(PlateauDetector)
    p = first(guard, "plateau")
    assert p.step > stop
    # After losing most of its start level the run gets more patience: measured 250-500 steps.
    assert det.patience < p.data["patience"] <= det.patience * (1 + det.patience_growth)
    assert p.step - stop <= 600


@pytest.mark.parametrize(
    "fault",
    [dict(lr=1e-5), dict(random_labels=True)],
    ids=["lr_far_too_low", "labels_without_signal"],
)
def test_run_that_never_learns_is_flagged_early(fault):
    guard, _ = train(300, **fault)
    p = first(guard, "plateau")
    det = guard.hook(PlateauDetector)
    assert p.step <= det.window + det.patience + guard.check_every
    assert p.data["level"] > 0.9 * p.data["start"]  # stuck where it started
    assert "divergence" not in kinds(guard)


def test_persisting_plateau_is_reported_again_after_another_patience():
    guard, _ = train(400, lr=1e-5)
    plateaus = [e for e in guard.events if e.kind == "plateau"]
    assert len(plateaus) >= 3
    assert [e.data["repeat"] for e in plateaus[:3]] == [1, 2, 3]
    assert all(e.data["best_step"] == plateaus[0].data["best_step"] for e in plateaus)


# ----------------------------------------------------------------------------- healthy runs stay quiet
@pytest.mark.parametrize(
    "config",
    [
        dict(opt="sgd", lr=0.05, bs=8),
        dict(opt="adam", lr=1e-3, bs=16),
        dict(opt="sgdm", lr=0.05, bs=16, sched="cosine"),
        dict(opt="sgdm", lr=0.1, bs=16, sched="onecycle"),
        dict(opt="adam", lr=1e-3, bs=16, sched="warmup"),
    ],
    ids=["noisy_small_batch_sgd", "adam", "cosine", "onecycle", "linear_warmup"],
)
def test_healthy_runs_stay_quiet(config):
    guard, losses = train(400, **config)
    assert np.median(losses[-50:]) < 0.7 * np.median(losses[:50])  # the run does learn
    assert [k for k in kinds(guard) if k in WARNINGS] == []


def test_noisy_small_batch_sgd_still_improving_is_not_a_plateau():
    guard, losses = train(600, opt="sgd", lr=0.05, bs=8, seed=2)
    assert np.std(losses[-100:]) / np.median(losses[-100:]) > 0.25  # really noisy
    assert np.median(losses[-100:]) < np.median(losses[150:250])  # still improving
    assert "plateau" not in kinds(guard)


def test_converged_run_is_info_not_a_stall():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=g)
    model = nn.Linear(16, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[PlateauDetector()], sinks=[], strict=True)
    losses = []
    for _ in range(400):
        x = torch.randn(32, 16, generator=g)
        y = x @ w + 0.1 * torch.randn(32, 1, generator=g)  # noise floor 0.01
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        losses.append(loss.item())
    guard.close()
    assert np.median(losses[-100:]) < 0.01 * losses[0]  # reached its floor and stayed there
    c = first(guard, "converged")
    assert c.severity == sg.Severity.INFO and c.data["fraction"] < 0.01
    assert [k for k in kinds(guard) if k in WARNINGS] == []
    assert kinds(guard).count("converged") == 1


# ----------------------------------------------------------------------------- divergence, oscillation
def test_divergence_at_lr_10():
    guard, losses = train(100, lr=10.0)
    d = first(guard, "divergence")
    assert d.step <= 50  # the first check point
    assert d.severity == sg.Severity.ERROR
    assert "lr_too_high" in d.causes
    assert d.data["reason"] in ("non_finite", "explosion")
    assert not np.all(np.isfinite(losses)) or np.max(losses) > 100 * losses[0]


def test_loss_rising_far_above_its_best_is_divergence():
    det = PlateauDetector()
    values = [1.0 - 0.005 * t for t in range(100)] + [2.0] * 60
    found = det.update(values)
    div = [f for f in found if f.kind == "divergence"]
    assert len(div) == 1 and div[0].data["reason"] == "rise"
    assert div[0].data["level"] > det.divergence_factor * div[0].data["best"]
    assert div[0].data["since_step"] == 125  # when the window median crossed the bound


def test_cyclic_lr_far_too_high_oscillates():
    guard, losses = train(400, lr=8.0, sched="cyclic")
    assert np.all(np.isfinite(losses))
    o = first(guard, "oscillation")
    assert "lr_too_high" in o.causes
    assert o.data["ratio"] >= guard.hook(PlateauDetector).oscillation_ratio
    assert len(o.data["block_medians"]) == 10
    assert "plateau" in kinds(guard)  # oscillation is a kind of no progress


def test_pure_noise_does_not_oscillate_but_swings_do():
    rng = np.random.default_rng(0)
    noise = 1.0 + 0.3 * rng.standard_normal(600)
    assert "oscillation" not in {f.kind for f in PlateauDetector().update(noise)}
    swings = 1.0 + 0.5 * np.sign(np.sin(np.arange(600) * 2 * np.pi / 40)) + 0.1 * rng.standard_normal(600)
    assert "oscillation" in {f.kind for f in PlateauDetector().update(swings)}


def test_recovered_after_plateau():
    det = PlateauDetector(patience=50, patience_growth=0)
    rng = np.random.default_rng(1)
    flat = 1.0 + 0.05 * rng.standard_normal(200)
    falling = np.linspace(1.0, 0.5, 100) + 0.05 * rng.standard_normal(100)
    found = det.update(np.concatenate([flat, falling]))
    ks = [f.kind for f in found]
    assert "plateau" in ks and "recovered" in ks
    assert ks.index("recovered") > ks.index("plateau")
    rec = next(f for f in found if f.kind == "recovered")
    assert rec.data["after"] == "plateau" and rec.step > 200


# ----------------------------------------------------------------------------- a sparse validation metric
def test_val_loss_patience_counts_validation_observations():
    torch.manual_seed(0)
    batch = _teacher(100)
    xv, yv = batch(256)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # far too low: val loss barely moves
    det = PlateauDetector(monitor="val_loss")
    assert (det.window, det.patience) == (1, 5)
    guard = sg.Guard(model, opt, hooks=[det], sinks=[], check_every=50, strict=True)
    for t in range(1, 201):
        x, y = batch(32)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        if t % 10 == 0:
            with torch.no_grad():
                guard.observe(val_loss=nn.functional.cross_entropy(model(xv), yv))
    guard.close()
    p = first(guard, "plateau")
    assert p.data["monitor"] == "val_loss"
    assert p.data["observations"] == 5  # five validation observations without improvement
    assert p.data["steps"] == 50  # ... ten steps apart


# ----------------------------------------------------------------------------- properties (hypothesis)
@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(1e-3, 1e3),
    steps=st.lists(st.floats(1e-6, 0.2), min_size=1, max_size=400),
    window=st.sampled_from([1, 5, 10, 50]),
    patience_factor=st.integers(1, 3),
    threshold=st.sampled_from([0.0, 1e-4, 1e-2]),
    mode=st.sampled_from(["rel", "abs"]),
)
def test_series_that_keeps_falling_by_more_than_threshold_never_plateaus(
    start, steps, window, patience_factor, threshold, mode
):
    values = [start]
    for d in steps:
        prev = values[-1]
        # fall by more than the threshold at every observation
        values.append(prev * (1 - threshold) * (1 - d) if mode == "rel" else prev - threshold - d * start)
    det = PlateauDetector(window=window, patience=window * patience_factor, threshold=threshold, threshold_mode=mode)
    found = {f.kind for f in det.update(values)}
    assert not found & {"plateau", "converged", "divergence", "oscillation"}


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(0.0, 1e6),
    window=st.sampled_from([1, 5, 10, 50]),
    patience=st.integers(1, 120),
    extra=st.integers(0, 300),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
)
def test_constant_series_always_plateaus_after_patience(value, window, patience, extra, mode, threshold_mode):
    det = PlateauDetector(window=window, patience=patience, mode=mode, threshold_mode=threshold_mode)
    n = window + patience + extra
    found = [f for f in det.update([value] * n) if f.kind in ("plateau", "converged")]
    assert found, "a constant series must plateau"
    # the first full window sets the best; `patience` observations later it is a plateau
    assert found[0].step == window + patience
    assert len(found) == (1 if found[0].kind == "converged" else 1 + extra // patience)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=300))
def test_any_series_is_handled(values):
    det = PlateauDetector(window=10, patience=20)
    for f in det.update(values):
        assert f.kind in ("plateau", "converged", "divergence", "oscillation", "recovered")
        sg.Event(kind=f.kind, severity="info", message="", data=f.data)  # JSON-safe evidence


def _series(kind: str, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    y = {
        "falling": 2.0 * np.exp(-t / 150) + 0.1,
        "stall": np.where(t < n / 3, 2.0 - t / n, 1.6),
        "rise": np.where((t > n / 3) & (t < n / 2), 5.0, 1.0) * np.exp(-t / 400),
        "to_zero": 2.0 * np.exp(-t / 40),
        "swings": 1.0 + 0.5 * np.sign(np.sin(t / 7)),
        "ties": np.round(2.0 * np.exp(-t / 300), 1),
    }[kind]
    y = y * (1 + noise * rng.standard_normal(n))
    if seed % 3 == 0:
        y[rng.integers(0, n, 3)] = [np.nan, np.inf, 1e6]
    return y


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["falling", "stall", "rise", "to_zero", "swings", "ties"]),
    n=st.integers(20, 600),
    noise=st.sampled_from([0.0, 0.02, 0.2]),
    seed=st.integers(0, 1000),
    chunk=st.sampled_from([8, 13, 50, 1000]),
    window=st.sampled_from([1, 6, 7, 50]),
    patience=st.sampled_from([3, 20, 50]),
    mode=st.sampled_from(["min", "max"]),
    warmup=st.sampled_from([0, 60]),
    cooldown=st.sampled_from([0, 10]),
)
def test_batched_scan_decides_as_step_by_step(kind, n, noise, seed, chunk, window, patience, mode, warmup, cooldown):
    # update() skips the observations that change only counters in one vectorised pass; the same
    # values fed where that pass never runs (batches below its minimum) must give the same findings
    # and the same state.
    from stallguard.hooks import plateau

    values = _series(kind, n, noise, seed)
    kwargs = {"window": window, "patience": patience, "mode": mode, "warmup": warmup, "cooldown": cooldown}
    fast, slow = PlateauDetector(**kwargs), PlateauDetector(**kwargs)
    for i in range(0, n, chunk):
        part, steps = values[i : i + chunk], np.arange(i, i + chunk)[: len(values[i : i + chunk])] * 3
        got = fast.update(part, steps)
        minimum = plateau._SCAN_MIN
        plateau._SCAN_MIN = 10**9
        try:
            want = slow.update(part, steps)
        finally:
            plateau._SCAN_MIN = minimum
        assert repr(got) == repr(want)
        assert repr(fast.state_dict()) == repr(slow.state_dict())


# ----------------------------------------------------------------------------- state and resume
def test_resumed_guard_emits_the_same_events():
    # A real loss trace: learning, a stall (lr 0), learning again.
    _, losses = train(800, lr_zero_at=80, lr_back_at=400)

    def guard_for() -> sg.Guard:
        return sg.Guard(None, None, hooks=[PlateauDetector()], sinks=[], check_every=50, strict=True)

    def feed(guard: sg.Guard, values: np.ndarray) -> None:
        for v in values:
            guard.observe(float(v))
            guard.after_step()

    whole = guard_for()
    feed(whole, losses)
    whole.close()
    assert {"plateau", "recovered"} <= set(kinds(whole))

    n = 437  # mid check interval: values are pending in the Guard
    part = guard_for()
    feed(part, losses[:n])
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = guard_for()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    feed(resumed, losses[n:])
    resumed.close()

    def after(guard: sg.Guard) -> list[dict]:
        return [{k: v for k, v in e.to_dict().items() if k != "time"} for e in guard.events if e.step > n]

    assert after(resumed) == after(whole)
    assert after(whole)


def test_state_dict_round_trip():
    det = PlateauDetector(patience=20, window=10)
    det.update(np.linspace(1.0, 0.5, 60).tolist() + [0.5] * 40)
    state = det.state_dict()
    other = PlateauDetector(patience=20, window=10)
    other.load_state_dict(state)
    assert other.state_dict() == state
    tail = [0.5] * 30 + [float("nan")]
    assert [f.kind for f in other.update(tail)] == [f.kind for f in det.update(tail)]
    with pytest.raises(KeyError, match="best"):
        PlateauDetector().load_state_dict({k: v for k, v in state.items() if k != "best"})


# ----------------------------------------------------------------------------- API, defaults, validation
def test_defaults_and_registry():
    det = PlateauDetector()
    assert (det.window, det.patience, det.warmup, det.threshold, det.threshold_mode) == (50, 50, 0, 1e-4, "rel")
    assert isinstance(sg.create("plateau"), PlateauDetector)
    assert any(isinstance(h, PlateauDetector) for h in sg.default_hooks())
    model = nn.Linear(2, 1)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=[])
    assert guard.hook("plateau") is not None
    guard.close()


def test_min_delta_is_an_absolute_threshold():
    det = PlateauDetector(min_delta=0.01)
    assert (det.threshold, det.threshold_mode, det.min_delta) == (0.01, "abs", 0.01)
    assert PlateauDetector(**det.get_config()).threshold == 0.01  # the config round-trips
    with pytest.raises(ValueError, match="min_delta"):
        PlateauDetector(min_delta=0.01, threshold=0.05)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(mode="lowest"), ValueError, "mode"),
        (dict(patience=0), ValueError, "patience"),
        (dict(patience=2.5), TypeError, "patience"),
        (dict(window=0), ValueError, "window"),
        (dict(window=3), ValueError, "window=3 is too short"),
        (dict(threshold=-1), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(threshold_mode="pct"), ValueError, "threshold_mode"),
        (dict(cooldown=-1), ValueError, "cooldown"),
        (dict(warmup=-5), ValueError, "warmup"),
        (dict(noise_z=-1), ValueError, "noise_z"),
        (dict(converged_fraction=2), ValueError, "converged_fraction"),
        (dict(divergence_factor=1.0), ValueError, "divergence_factor"),
        (dict(explosion_factor=0.5), ValueError, "explosion_factor"),
        (dict(oscillation_ratio=-1), ValueError, "oscillation_ratio"),
        (dict(patience_growth=-1), ValueError, "patience_growth"),
        (dict(monitor=""), ValueError, "monitor"),
    ],
)
def test_parameter_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        PlateauDetector(**kwargs)


def test_missing_stream_is_ignored_until_observed():
    guard = sg.Guard(None, None, hooks=[PlateauDetector(monitor="val_loss")], sinks=[], check_every=5, strict=True)
    for _ in range(20):
        guard.observe(1.0)
        guard.after_step()
    guard.close()
    assert guard.events == []
