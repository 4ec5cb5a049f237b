"""The data checks inside the default hook set: quiet on healthy runs, and ranked first by the diagnosis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.data_models import TokenLSTM, images, linear_labels, mlp, small_cnn, tokens, train, warnings

DATA_HOOKS = ("InputStats", "TargetStats")


def test_the_data_checks_are_in_the_default_set() -> None:
    names = [type(h).__name__ for h in sg.default_hooks()]
    assert "InputStats" in names and "TargetStats" in names


@pytest.mark.parametrize(
    ("model", "batch", "lr", "steps"),
    [
        (mlp, linear_labels(), 0.05, 260),
        (small_cnn, images(), 0.1, 150),
        (TokenLSTM, tokens(), 0.1, 120),
    ],
    ids=["mlp", "cnn", "token-lstm"],
)
def test_healthy_runs_are_quiet(model: type[nn.Module], batch: object, lr: float, steps: int) -> None:
    guard = train(model(), batch, hooks=None, steps=steps, lr=lr, check_every=20)
    losses = guard.series("loss").values
    assert losses[-20:].mean() < 0.6 * losses[:5].mean()  # it does learn
    assert warnings(guard, *DATA_HOOKS) == []
    assert [e for e in guard.events if e.source in DATA_HOOKS and e.severity >= sg.Severity.INFO] == []


def test_healthy_binary_and_regression_runs_are_quiet() -> None:
    def binary(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, (x[:, 0] - x[:, 1] > 0).float().unsqueeze(1)

    def regression(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 8, generator=g)
        return x, x[:, :2].sum(1, keepdim=True)

    for batch, loss_fn in (
        (binary, nn.functional.binary_cross_entropy_with_logits),
        (regression, nn.functional.mse_loss),
    ):
        guard = train(mlp(8, 1), batch, hooks=None, steps=120, loss_fn=loss_fn, check_every=20)
        assert warnings(guard, *DATA_HOOKS) == []


def test_diagnosis_names_unnormalized_inputs_first_on_raw_pixels() -> None:
    guard = train(small_cnn(), images("raw"), hooks=None, steps=60, lr=0.01)
    assert "inputs_unnormalized" in warnings(guard)
    assert guard.diagnose()[0].cause == "unnormalized_inputs"
    # ... and the same images standardized give no diagnosis at all.
    healthy = train(small_cnn(), images(), hooks=None, steps=60, lr=0.01)
    assert healthy.diagnose() == []


def test_diagnosis_names_no_signal_first_on_random_labels() -> None:
    guard = train(mlp(), linear_labels(random=True), hooks=None, steps=260, check_every=20)
    assert "loss_at_chance" in warnings(guard)
    found = guard.diagnose()
    assert found[0].cause == "no_signal"
    assert any("chance" in line for line in found[0].evidence)


def _count_syncs(hooks: list[sg.Hook]) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=1000, strict=True)
    g = torch.Generator().manual_seed(0)
    batch = images("raw")

    def step(i: int) -> None:
        x, y = batch(g)
        if i == 5:
            x[0, 0, 0, 0] = float("nan")
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss, inputs=x, outputs=out, targets=y)
        opt.step()

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, 9):
            step(i)
    guard.close()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


def test_no_host_sync_on_steps_between_check_points() -> None:
    # Every observation sampled, a NaN in the inputs: still no host read of a device value.
    hooks = [sg.InputStats(warmup=100, every=1), sg.TargetStats(every=1)]
    assert _count_syncs(hooks) == _count_syncs([])
