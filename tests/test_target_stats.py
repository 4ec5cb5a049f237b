"""TargetStats on small real training runs: chance-level loss, imbalance, collapse, label range, shapes."""

from __future__ import annotations

import io
import math
import warnings as pywarnings

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.data_models import TokenLSTM, kinds, linear_labels, mlp, train, warnings


def events_of(guard: sg.Guard, kind: str) -> list[sg.Event]:
    return [e for e in guard.events if e.kind == kind]


def imbalanced(learnable: bool) -> object:
    """Two classes, 95/5: random minority labels (a model can only predict the majority) or a learnable cut."""

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 16, generator=g)
        if learnable:
            y = (x[:, 0] > 1.645).long()  # the top 5% of feature 0
        else:
            y = (torch.rand(64, generator=g) < 0.05).long()
        return x, y

    return batch


def fixed_set(random: bool, n: int, val: int = 0) -> tuple[torch.Tensor, ...]:
    """A fixed training set (and a held-out one) of Gaussian features; labels random or a linear argmax."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(n + val, 16, generator=g)
    y = torch.randint(0, 4, (n + val,), generator=g) if random else (x @ w).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def epochs(
    random: bool, *, n: int, hidden: int, lr: float, batch: int = 64, val: int = 0, steps: int = 400
) -> sg.Guard:
    """Adam on minibatches drawn from a fixed set (a model can memorize it), with the default hooks."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xt, yt, xv, yv = fixed_set(random, n, val)
    model = mlp(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    guard = sg.Guard(model, opt, sinks=[], check_every=50, strict=True)
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        out = model(xt[idx])
        loss = nn.functional.cross_entropy(out, yt[idx])
        opt.zero_grad()
        loss.backward()
        guard.observe(loss, inputs=xt[idx], outputs=out, targets=yt[idx])
        opt.step()
        if val and (i + 1) % 10 == 0:
            with torch.no_grad():
                guard.observe(val_loss=nn.functional.cross_entropy(model(xv), yv))
    guard.close()
    return guard


def rare_class(shift: float) -> object:
    """Two classes, ~4% class 1, whose feature 0 is shifted by ``shift``: 2 is too weak to beat the prior, 4 is not."""

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.rand(64, generator=g) < 0.04).long()
        x = torch.randn(64, 16, generator=g)
        x[:, 0] += shift * y
        return x, y

    return batch


# ----------------------------------------------------------------------------- loss at chance
def test_random_labels_leave_the_loss_at_chance() -> None:
    guard = train(mlp(), linear_labels(random=True), hooks=[sg.TargetStats()], steps=260, check_every=20)
    (e,) = events_of(guard, "loss_at_chance")
    assert e.step == 200  # the first check with `patience` losses observed
    assert e.severity == sg.Severity.WARNING and e.causes == ("no_signal",)
    assert e.data["chance"] == pytest.approx(math.log(4), rel=0.01)
    assert abs(e.data["loss"] - e.data["chance"]) < 0.05 * e.data["chance"]
    assert warnings(guard) == ["loss_at_chance"]  # reported once while the stall lasts


def test_the_same_run_with_learnable_labels_is_quiet() -> None:
    # It starts at chance too; it leaves the band long before `patience` steps.
    guard = train(mlp(), linear_labels(), hooks=[sg.TargetStats()], steps=260, check_every=20)
    assert kinds(guard) == []


def test_memorized_random_labels_leave_chance_only_slowly() -> None:
    # 768 samples with random labels: the MLP memorizes them, and the loss creeps below chance.
    guard = epochs(True, n=768, hidden=64, lr=2e-3)
    (e,) = events_of(guard, "loss_at_chance")
    assert e.step == 200 and e.causes == ("no_signal",)
    assert 0.05 < e.data["fall"] <= 0.1 and "slowly" in e.message  # beyond the margin, within the allowed fall
    # By the end it lies clearly below chance, but it got there a few percent per 100 steps, not in the
    # steep fall of a slow starter that finds the rule (tests/test_healthy_runs.py): the report stands.
    recent = float(torch.tensor(guard.series("loss").last(50)).median())
    assert recent < 0.9 * e.data["chance"]
    assert [d.cause for d in guard.diagnose()] == ["no_signal"]


def test_an_lstm_memorizing_labels_its_tokens_do_not_determine() -> None:
    # Meant as next-token data, but the recurrence is written in place, so the label is computed from a
    # column that no longer reaches the model: 4096 sequences whose labels are noise. The LSTM memorizes
    # them and the loss falls from ln 50 = 3.91 to about 3.35 in 500 steps, never steeply.
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (4096, 9), generator=g)
    tokens[:, 1:] = (tokens[:, :-1] * 7 + 3) % 50
    x, y = tokens[:, :-1], tokens[:, -1]
    model = TokenLSTM(classes=50, embed=32, hidden=64)  # the label is one of the 50 tokens
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with sg.Guard(model, opt, sinks=[], check_every=25) as guard:
        for _ in range(500):
            idx = torch.randint(0, len(x), (64,), generator=g)
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            guard.observe(loss, inputs=x[idx], outputs=out.detach(), targets=y[idx])
            opt.step()
    (e,) = events_of(guard, "loss_at_chance")
    assert e.step == 200 and e.causes == ("no_signal",)
    assert float(torch.tensor(guard.series("loss").last(50)).median()) < 0.9 * math.log(50)
    assert [d.cause for d in guard.diagnose()][:1] == ["no_signal"]


def test_the_same_set_with_learnable_labels_is_quiet() -> None:
    guard = epochs(False, n=768, hidden=64, lr=2e-3)
    assert warnings(guard) == [] and guard.diagnose() == []


def test_a_validation_loss_that_never_beats_chance() -> None:
    # 256 random labels memorized fast: the training loss leaves chance steeply, the held-out loss never does.
    guard = epochs(True, n=256, hidden=64, lr=3e-3, batch=32, val=256)
    assert events_of(guard, "loss_at_chance") == []
    (e,) = events_of(guard, "val_loss_at_chance")
    assert e.causes == ("no_signal",) and e.data["validations"] >= 3
    assert e.data["val_best"] >= 0.95 * e.data["chance"] > e.data["train_loss"]
    # Overfit sees the validation loss rise while the training loss falls; there was never a fit to lose.
    assert "overfitting" in kinds(guard)
    assert [d.cause for d in guard.diagnose()][:2] == ["no_signal", "overfitting"]


def test_a_validation_loss_below_chance_is_quiet() -> None:
    guard = epochs(False, n=256, hidden=64, lr=3e-3, batch=32, val=256)
    assert events_of(guard, "val_loss_at_chance") == []
    assert all(d.cause != "no_signal" for d in guard.diagnose())


# ----------------------------------------------------------------------------- imbalance and collapse
def test_imbalanced_labels_and_a_collapsed_model() -> None:
    hook = sg.TargetStats(every=1)
    guard = train(mlp(classes=2), imbalanced(learnable=False), hooks=[hook], steps=120, lr=0.1)
    (imb,) = events_of(guard, "class_imbalance")
    assert imb.step == 10 and imb.causes == ("class_imbalance",)
    assert imb.data["ratio"] > 10 and imb.data["majority"] == 0 and imb.data["minority"] == 1
    assert sum(imb.data["counts"]) == imb.data["samples"] == 640
    (col,) = events_of(guard, "predictions_collapsed")
    assert col.causes == ("class_imbalance",) and col.data["predicted_class"] == 0 and col.data["steps"] >= 100
    assert col.data["fraction"] >= 0.95 and col.data["label_fraction"] < col.data["fraction"]
    assert guard.diagnose()[0].cause == "class_imbalance"


def test_imbalanced_labels_that_are_learned_do_not_collapse() -> None:
    # It predicts the majority only for its first steps; meanwhile its loss falls below chance.
    guard = train(mlp(classes=2), imbalanced(learnable=True), hooks=[sg.TargetStats(every=1)], steps=120, lr=0.1)
    assert kinds(guard) == ["class_imbalance"]
    assert guard.diagnose() == []  # imbalanced data that is being learned fine is not a failure


def test_a_rare_class_missed_while_the_loss_falls() -> None:
    guard = train(mlp(classes=2), rare_class(2.0), hooks=[sg.TargetStats(every=1)], steps=200)
    assert kinds(guard) == ["class_imbalance", "minority_underpredicted"]
    (e,) = events_of(guard, "minority_underpredicted")
    assert e.causes == ("class_imbalance",) and tuple(e.data["classes"]) == (1,) and e.data["steps"] >= 100
    assert e.data["pred_fractions"][1] < 0.25 * e.data["label_fractions"][1]
    # Not a collapse at chance: the loss fell below the chance level (it fits the majority better).
    assert float(torch.tensor(guard.series("loss").last(50)).mean()) < 0.9 * _label_entropy(guard)
    assert guard.diagnose()[0].cause == "class_imbalance"


def test_a_rare_class_the_model_learns_is_quiet() -> None:
    guard = train(mlp(classes=2), rare_class(4.0), hooks=[sg.TargetStats(every=1)], steps=200)
    assert kinds(guard) == ["class_imbalance"]
    assert guard.diagnose() == []


def _label_entropy(guard: sg.Guard) -> float:
    hook = guard.hook(sg.TargetStats)
    assert isinstance(hook, sg.TargetStats)
    p = hook.labels / hook.labels.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def test_a_balanced_collapsed_model_points_to_no_signal() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))  # class 0 wins for every input
    guard = train(model, linear_labels(), hooks=[sg.TargetStats(every=1)], steps=120, lr=0.0)
    (col,) = events_of(guard, "predictions_collapsed")
    assert (
        col.step == 100 and col.data["since_step"] == 0 and col.causes == ("no_signal",) and col.data["fraction"] == 1.0
    )


# ----------------------------------------------------------------------------- label range and shapes
def test_one_based_labels_are_out_of_range() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = linear_labels()(g)
        return x, y + 1  # labels 1..4 for 4 outputs

    def clamped_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # A hand-written loss that clamps instead of failing, as custom losses do.
        return nn.functional.cross_entropy(out, y.clamp(max=out.shape[1] - 1))

    guard = train(mlp(), batch, hooks=[sg.TargetStats(every=1)], steps=20, loss_fn=clamped_ce)
    found = events_of(guard, "labels_out_of_range")
    assert [e.step for e in found] == [10, 20] and all(e.severity == sg.Severity.ERROR for e in found)
    assert found[0].data["min"] == 1 and found[0].data["max"] == 4 and found[0].data["num_classes"] == 4
    assert 0 < found[0].data["count"] < 640 and found[1].data["total"] > found[0].data["total"]


def test_ignore_index_is_not_out_of_range() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = linear_labels()(g)
        y[:8] = -100  # padding positions
        return x, y

    hook = sg.TargetStats(every=1)
    train(mlp(), batch, hooks=[hook], steps=10)
    assert "labels_out_of_range" not in [e.kind for e in hook.guard.events]  # type: ignore[union-attr]
    assert float(hook.labels.sum()) == 10 * 56


def test_mse_with_n1_outputs_against_n_targets_is_a_shape_mismatch() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, x.sum(1)  # targets (N,), the model outputs (N, 1)

    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore", UserWarning)  # torch's own broadcast warning, easy to miss in a log
        guard = train(mlp(8, 1), batch, hooks=[sg.TargetStats(every=1)], steps=10, loss_fn=nn.functional.mse_loss)
    (e,) = events_of(guard, "shape_mismatch")
    assert e.step == 0 and e.severity == sg.Severity.ERROR
    assert e.data["outputs_shape"] == (64, 1) and e.data["targets_shape"] == (64,)
    assert "(64, 64)" in e.data["reason"]


def test_integer_targets_that_fit_no_class_layout() -> None:
    model = nn.Linear(8, 4)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[sg.TargetStats()], sinks=[])
    guard.observe(outputs=torch.randn(8, 4), targets=torch.zeros(8, 3, dtype=torch.long))
    assert kinds(guard) == ["shape_mismatch"]
    guard.close()


def test_regression_runs_skip_the_class_checks() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, x[:, :1] * 2.0 + 0.3

    hook = sg.TargetStats(every=1)
    guard = train(mlp(8, 1), batch, hooks=[hook], steps=20, loss_fn=nn.functional.mse_loss)
    assert hook.task == "regression" and kinds(guard) == []


def test_binary_bce_with_float_targets_is_a_classification() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, (x[:, 0] + x[:, 1] > 0).float().unsqueeze(1)

    hook = sg.TargetStats(every=1, min_samples=100)
    guard = train(mlp(8, 1), batch, hooks=[hook], steps=20, loss_fn=nn.functional.binary_cross_entropy_with_logits)
    assert hook.task == "binary?" and hook.n_classes == 2 and float(hook.labels.sum()) == 20 * 64
    assert kinds(guard) == []


def test_soft_binary_targets_are_regression() -> None:
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, torch.sigmoid(x[:, :1])

    hook = sg.TargetStats(every=1)
    guard = train(mlp(8, 1), batch, hooks=[hook], steps=20, loss_fn=nn.functional.binary_cross_entropy_with_logits)
    assert hook.task == "regression" and kinds(guard) == []


@pytest.mark.parametrize(("out_shape", "tgt_shape", "classes"), [((4, 5, 3, 3), (4, 3, 3), 5), ((4, 7, 6), (4, 7), 6)])
def test_dense_prediction_layouts(out_shape: tuple, tgt_shape: tuple, classes: int) -> None:
    hook = sg.TargetStats(every=1)
    model = nn.Linear(2, 2)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[hook], sinks=[], strict=True)
    guard.observe(outputs=torch.randn(out_shape), targets=torch.randint(0, classes, tgt_shape))
    assert hook.task == "multiclass" and hook.n_classes == classes
    n = math.prod(tgt_shape)
    assert float(hook.labels.sum()) == n and float(hook.window_preds.sum()) == n
    guard.close()


def test_long_sequences_are_counted_on_a_rotating_subset_of_rows() -> None:
    # 2 x 256 token positions, labels alternating 0/1 by position: a fixed stride-2 subset would see
    # one class only; the rotating start sees both, 256 rows of 3 classes per call.
    hook = sg.TargetStats(every=1, max_logits=768)
    model = nn.Linear(2, 2)
    guard = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=[hook], sinks=[], strict=True)
    targets = (torch.arange(256) % 2).repeat(2, 1)
    outputs = nn.functional.one_hot(targets, 3).float()  # predicts every label right
    for _ in range(2):
        guard.observe(outputs=outputs, targets=targets)
    assert hook.labels.tolist() == [256.0, 256.0, 0.0]
    assert hook.window_preds.tolist() == [256.0, 256.0, 0.0]
    guard.close()


# ----------------------------------------------------------------------------- state and arguments
def test_state_dict_round_trip_through_torch_save() -> None:
    hook = sg.TargetStats(every=1)
    guard = train(mlp(classes=2), imbalanced(learnable=False), hooks=[hook], steps=25, lr=0.1)
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = sg.TargetStats(every=1)
    fresh.load_state_dict(state["hooks"]["TargetStats"])
    assert fresh.task == "multiclass" and fresh.n_classes == 2 and fresh.reported == hook.reported
    assert torch.equal(fresh.labels, hook.labels) and fresh.collapse_start == hook.collapse_start
    assert (fresh.under_start, fresh.under_reported) == (hook.under_start, hook.under_reported)
    assert (fresh.val_consumed, fresh.val_count, fresh.val_best) == (hook.val_consumed, hook.val_count, hook.val_best)
    model = mlp(classes=2)
    g2 = sg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), hooks=[fresh], sinks=[])
    g2.load_state_dict(state)
    assert torch.equal(fresh.labels, hook.labels)
    g2.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"every": 0}, ValueError, "every must be an int >= 1"),
        ({"imbalance_ratio": 1.0}, ValueError, "imbalance_ratio must be > 1.0"),
        ({"min_samples": 0}, ValueError, "min_samples must be an int >= 1"),
        ({"max_classes": 1}, ValueError, "max_classes must be an int >= 2"),
        ({"collapse_fraction": 0.4}, ValueError, "collapse_fraction must be > 0.5"),
        ({"collapse_patience": 0}, ValueError, "collapse_patience must be an int >= 1"),
        ({"margin": 0.0}, ValueError, "margin must be > 0.0"),
        ({"margin": "small"}, TypeError, "margin must be a number"),
        ({"fall": 0.01}, ValueError, r"fall must be at least margin \(0.05\), got 0.01"),
        ({"fall": 1.0}, ValueError, "fall must be < 1.0"),
        ({"underpredict_fraction": 0.0}, ValueError, "underpredict_fraction must be > 0.0"),
        ({"val_monitor": ""}, ValueError, "val_monitor must be a non-empty str"),
        ({"min_validations": 0}, ValueError, "min_validations must be an int >= 1"),
        ({"patience": 2}, ValueError, "patience must be an int >= 5"),
        ({"ignore_index": None}, TypeError, "ignore_index must be an int"),
        ({"max_logits": 0}, ValueError, "max_logits must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_hook_and_the_parameter(kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=f"TargetStats: {text}"):
        sg.TargetStats(**kwargs)


def test_registered_as_a_default_monitor() -> None:
    assert type(sg.create("target_stats")) is sg.TargetStats
    assert any(type(h) is sg.TargetStats for h in sg.default_hooks())
