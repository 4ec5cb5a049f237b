"""Overfit on a small MLP memorizing a tiny noisy training set, and its semantics on exact streams."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import stallguard as sg


def noisy_data(n: int, seed: int, d: int = 8, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a fixed linear function of x plus noise as large as the signal."""
    w = torch.randn(d, 1, generator=torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x @ w / d**0.5 + noise * torch.randn(n, 1, generator=g)


def memorize(hooks: list[sg.Hook] | None = None, steps: int = 300, val_every: int = 10, stop: bool = False):
    """A wide MLP on 32 noisy training samples, validated on 256 held-out ones every ``val_every`` steps."""
    x_train, y_train = noisy_data(32, seed=1)
    x_val, y_val = noisy_data(256, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=50, strict=True)
    g = torch.Generator().manual_seed(3)
    val_losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (16,), generator=g)
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        if step % val_every == 0:
            with torch.no_grad():
                val = nn.functional.mse_loss(model(x_val), y_val)
            val_losses.append((guard.step, val.item()))
            guard.observe(val_loss=val)
        if stop and guard.should_stop:
            break
    guard.close()
    return guard, val_losses


def overfitting(guard: sg.Guard) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == "overfitting"]


def test_memorizing_a_tiny_noisy_training_set_is_overfitting_and_diagnosed_first() -> None:
    guard, val_losses = memorize()  # the default hooks, as a user gets them
    events = overfitting(guard)
    assert len(events) == 1, [(e.kind, e.message) for e in guard.events]
    e = events[0]
    assert e.severity == sg.Severity.WARNING and e.causes == ("overfitting",)
    best_step, best_val = min(val_losses, key=lambda sv: sv[1])
    assert (e.data["best_step"], e.data["best_val"]) == (best_step, pytest.approx(best_val, rel=1e-6))
    assert e.data["val_now"] > e.data["best_val"] and e.data["val_recent"] > e.data["best_level"]
    assert e.data["train_now"] < e.data["train_at_best"] and e.data["train_change"] < -0.3
    assert e.data["validations_since_best"] == 3 and e.data["monitor"] == "val_loss"
    found = guard.diagnose()
    assert found and found[0].cause == "overfitting", [(d.cause, d.confidence) for d in found]
    assert f"at step {best_step}" in found[0].advice


def test_stop_true_asks_the_loop_to_stop_at_the_finding() -> None:
    guard, _ = memorize(hooks=[sg.Overfit(stop=True)], stop=True)
    (e,) = overfitting(guard)
    assert guard.should_stop and guard.step == e.step < 300
    assert "Overfit" in guard.stop_reasons[0] and "val_loss" in guard.stop_reasons[0]


def test_stop_false_leaves_the_loop_alone() -> None:
    guard, _ = memorize(hooks=[sg.Overfit()], stop=True)
    assert overfitting(guard) and not guard.should_stop and guard.step == 300


# ----------------------------------------------------------------------------- exact streams, model-less Guard
def stream(val, train=None, hook: sg.Overfit | None = None, val_every: int = 10, check_every: int = 10):
    """Feed a per-step training loss and a validation value every ``val_every`` steps."""
    hook = hook or sg.Overfit()
    guard = sg.Guard(None, None, hooks=[hook], sinks=[], check_every=check_every, strict=True)
    n = len(val) * val_every
    for step in range(1, n + 1):
        if train is not False:
            guard.observe(train(step) if train else 1.0 / step)
        if step % val_every == 0:
            guard.observe(val_loss=val[step // val_every - 1])
        guard.after_step()
    guard.close()
    return guard, hook


def test_counts_patience_in_validations_keras_style() -> None:
    # Best at the 3rd validation; the 4th, 5th, 6th are worse: reported at the 6th (wait >= patience).
    guard, _ = stream([1.0, 0.8, 0.6, 0.7, 0.8, 0.9, 1.0], hook=sg.Overfit(patience=3))
    (e,) = overfitting(guard)
    assert e.data["best_step"] == 29 and e.data["val_step"] == 59 and e.data["validations_since_best"] == 3
    guard, _ = stream([1.0, 0.8, 0.6, 0.7, 0.8], hook=sg.Overfit(patience=3))
    assert not overfitting(guard)


def test_min_delta_decides_what_counts_as_better_and_as_a_rise() -> None:
    vals = [1.0, 0.8, 0.6, 0.62, 0.63, 0.64, 0.63, 0.64]
    guard, _ = stream(vals, hook=sg.Overfit(patience=3, noise_z=0))  # min_delta alone decides
    assert overfitting(guard)
    guard, _ = stream(vals, hook=sg.Overfit(patience=3, min_delta=0.1, noise_z=0))
    assert not overfitting(guard)
    guard, _ = stream(vals, hook=sg.Overfit(patience=3))  # a rise of 0.03 after steps of 0.2 is within the noise
    assert not overfitting(guard)


def test_noise_within_min_delta_is_not_a_rise() -> None:
    g = torch.Generator().manual_seed(0)
    noise = (0.02 * torch.randn(40, generator=g)).clamp(-0.05, 0.05).tolist()
    vals = [max(1.0 - 0.1 * i, 0.5) + noise[i] for i in range(40)]
    guard, _ = stream(vals, hook=sg.Overfit(patience=3, min_delta=0.05))
    assert not overfitting(guard)
    rising = [v + max(0, i - 20) * 0.05 for i, v in enumerate(vals)]  # the same noise on a real rise
    guard, _ = stream(rising, hook=sg.Overfit(patience=3, min_delta=0.05))
    assert overfitting(guard)


def test_flat_training_loss_is_not_overfitting() -> None:
    guard, _ = stream([1.0, 0.8, 0.6, 0.7, 0.8, 0.9, 1.0], train=lambda step: 0.5)
    assert not overfitting(guard)


def test_rising_training_loss_is_not_overfitting() -> None:
    vals = [1.0, 0.8, 0.6, 0.7, 0.8, 0.9, 1.0]
    guard, _ = stream(vals, train=lambda step: 0.1 + step / 100)
    assert not overfitting(guard)
    guard, _ = stream(vals, train=False)  # no training loss observed: nothing to compare with
    assert not overfitting(guard)


def test_mode_max_for_an_accuracy() -> None:
    acc = [0.5, 0.6, 0.7, 0.65, 0.6, 0.55, 0.5]
    guard = sg.Guard(None, None, hooks=[sg.Overfit("val_acc", mode="max")], sinks=[], check_every=10)
    for step in range(1, 71):
        guard.observe(1.0 / step)
        if step % 10 == 0:
            guard.observe(val_acc=acc[step // 10 - 1])
        guard.after_step()
    guard.close()
    (e,) = overfitting(guard)
    assert e.data["best_val"] == 0.7 and e.data["mode"] == "max" and e.data["monitor"] == "val_acc"


def test_reported_once_per_episode_and_again_after_a_new_best() -> None:
    vals = [1.0, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 0.5, 0.6, 0.7, 0.8]
    guard, hook = stream(vals, hook=sg.Overfit(patience=3))
    assert [e.data["best_val"] for e in overfitting(guard)] == [0.6, 0.5]
    assert hook.reports == 2


def test_warmup_validations_never_count() -> None:
    vals = [0.3, 1.0, 0.8, 0.6, 0.7, 0.8, 0.9]  # a lucky first validation
    guard, _ = stream(vals, hook=sg.Overfit(patience=3, warmup=1))
    (e,) = overfitting(guard)
    assert e.data["best_val"] == 0.6


def test_state_dict_round_trip_resumes_the_count() -> None:
    vals = [1.0, 0.8, 0.6, 0.7, 0.8, 0.9, 1.0]
    _, hook = stream(vals[:5], hook=sg.Overfit(patience=3))
    buf = io.BytesIO()
    torch.save(hook.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["wait"] == 2 and state["best"] == 0.6
    resumed = sg.Overfit(patience=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert resumed.best_step == 29 and resumed.wait == 2 and resumed.val_values == vals[:5]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"monitor": ""}, ValueError, "monitor must be a non-empty str"),
        ({"monitor": "loss"}, ValueError, "monitor and train_monitor must differ"),
        ({"mode": "auto"}, ValueError, "mode must be one of 'min', 'max'"),
        ({"patience": 0}, ValueError, "patience must be an int >= 1"),
        ({"patience": 2.5}, TypeError, "patience must be an int"),
        ({"min_delta": -0.1}, ValueError, "min_delta must be >= 0.0"),
        ({"train_min_delta": 1.0}, ValueError, "train_min_delta must be < 1.0"),
        ({"warmup": -1}, ValueError, "warmup must be an int >= 0"),
        ({"stop": "yes"}, TypeError, "stop must be a bool"),
        ({"noise_z": -1}, ValueError, "noise_z must be >= 0.0"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=text) as info:
        sg.Overfit(**kwargs)
    assert "Overfit" in str(info.value)


def test_registered_as_default_monitor() -> None:
    assert type(sg.create("overfit", patience=5)) is sg.Overfit
    assert any(isinstance(h, sg.Overfit) for h in sg.default_hooks())


def classify(random: bool) -> sg.Guard:
    """A wide MLP on 96 four-class samples (30% of them mislabelled, or all labels random), validated every 10 steps."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 0.5
    y = torch.randint(0, 4, (608,), generator=g)
    x = centers[y] + torch.randn(608, 32, generator=g)
    flip = torch.rand(96, generator=g) < 0.3
    yt = torch.where(flip, torch.randint(0, 4, (96,), generator=g), y[:96])
    if random:
        yt, y = torch.randint(0, 4, (96,), generator=g), torch.randint(0, 4, (608,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    guard = sg.Guard(model, opt, sinks=[], check_every=50, strict=True)
    for step in range(1, 301):
        idx = torch.randint(0, 96, (32,), generator=g)
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out, yt[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss, inputs=x[idx], outputs=out, targets=yt[idx])
        opt.step()
        if step % 10 == 0:
            with torch.no_grad():
                guard.observe(val_loss=nn.functional.cross_entropy(model(x[96:]), y[96:]))
    guard.close()
    return guard


def test_a_classifier_that_overfits_after_beating_chance_is_overfitting() -> None:
    guard = classify(random=False)
    assert overfitting(guard) and "val_loss_at_chance" not in [e.kind for e in guard.events]
    assert guard.diagnose()[0].cause == "overfitting"


def test_a_classifier_on_random_labels_is_no_signal_not_overfitting() -> None:
    # Its validation loss rises while the training loss falls, as in overfitting, but it never beat chance.
    guard = classify(random=True)
    assert overfitting(guard) and "val_loss_at_chance" in [e.kind for e in guard.events]
    ranked = [d.cause for d in guard.diagnose()]
    assert ranked[0] == "no_signal" and ranked.index("overfitting") > 0
