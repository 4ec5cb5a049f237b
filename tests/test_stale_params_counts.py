"""StaleParams' per-slot counts of sampled steps: every parameter in slot order, or only some of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stallguard as sg
from tests.helpers import regression_data


def _run(detach: bool, steps: int = 7) -> sg.Guard:
    """The second layer's param group has lr=0; with ``detach`` the first layer gets no gradient."""
    x, y = regression_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}], lr=0.01)
    guard = sg.Guard(model, opt, hooks=[sg.StaleParams(update_every=1)], sinks=[], check_every=1000, strict=True)
    for _ in range(steps):
        opt.zero_grad()
        hidden = model[1](model[0](x))
        nn.functional.mse_loss(model[2](hidden.detach() if detach else hidden), y).backward()
        opt.step()
    return guard


def test_counts_of_every_parameter_in_slot_order() -> None:
    guard = _run(detach=False)
    hook = guard.hook(sg.StaleParams)
    assert hook._rows_cache is not None and hook._rows_cache.target is not None  # the plain-add path
    sampled, moved, graded = hook.counts.tolist()
    # Slots: 0.weight, 0.bias, 2.weight, 2.bias and the one for parameters added later.
    assert sampled == [7, 7, 7, 7, 0]
    assert moved == [7, 7, 0, 0, 0]  # lr=0 never moves the second layer
    assert graded == [7, 7, 7, 7, 0]
    guard.close()
    frozen = [e for e in guard.events if e.kind == "weights_frozen"]
    assert [(e.data["reason"], list(e.data["params"])) for e in frozen] == [("lr_zero", ["2.weight", "2.bias"])]


def test_counts_of_the_parameters_that_have_a_gradient() -> None:
    guard = _run(detach=True)
    hook = guard.hook(sg.StaleParams)
    assert hook._rows_cache is not None and hook._rows_cache.target is None  # only some slots: index_add_
    assert hook.counts.tolist() == [[0, 0, 7, 7, 0], [0, 0, 0, 0, 0], [0, 0, 7, 7, 0]]
    guard.close()
    frozen = [e for e in guard.events if e.kind == "weights_frozen"]
    assert [(e.data["reason"], list(e.data["params"])) for e in frozen] == [("lr_zero", ["2.weight", "2.bias"])]


def test_counts_are_reset_at_each_check_point_and_survive_a_state_dict() -> None:
    guard = _run(detach=False, steps=3)
    hook = guard.hook(sg.StaleParams)
    state = hook.state_dict()
    assert state["counts"].tolist()[0] == [3, 3, 3, 3, 0]
    guard.check()
    assert hook.counts.tolist()[0] == [0, 0, 0, 0, 0]
    hook.load_state_dict(state)
    assert torch.equal(hook.counts, state["counts"])
    guard.close()


def test_state_dict_from_the_earlier_layout_is_refused_clearly() -> None:
    guard = _run(detach=False, steps=2)
    hook = guard.hook(sg.StaleParams)
    old = {k: v for k, v in hook.state_dict().items() if k != "counts"}
    old.update(sampled=torch.zeros(5), moved=torch.zeros(5), graded=torch.zeros(5))
    with pytest.raises(KeyError, match=r"StaleParams\.load_state_dict: missing state 'counts'"):
        hook.load_state_dict(old)
    guard.close()
