"""UpdateRatio's buffer rows: a column the sampled update leaves out holds no ratio, not an old one."""

from __future__ import annotations

import math

import torch
from torch import nn

import stallguard as sg


def test_a_weight_without_gradient_on_a_sampled_step_leaves_no_stale_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = sg.UpdateRatio(every=1, window=2, warmup=0)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=100)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for step in range(1, 4):
        # Step 3 writes the row that step 1 filled; the last layer gets no gradient then.
        model[2].weight.requires_grad_(step != 3)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows = hook.ratios.clone()
    guard.close()
    col = hook.layers.index("2.weight")
    assert hook.slot_steps == [3, 2]
    assert math.isnan(float(rows[0, col]))  # step 3: no gradient, no ratio
    assert 0 < float(rows[1, col]) < 1  # step 2 moved it
    assert all(0 < float(r) < 1 for r in rows[:, hook.layers.index("0.weight")])


def test_weights_of_dead_units_give_no_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second layer's units are dead: the last weight gets no gradient
        model[0].weight.zero_()  # a zero weight as well: |dw| / 0 is no ratio either way
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = sg.UpdateRatio(every=1, window=2, warmup=0)
    guard = sg.Guard(model, opt, hooks=[hook], sinks=[], check_every=100)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    row = hook.ratios[0].clone()
    guard.close()
    assert math.isnan(float(row[hook.layers.index("0.weight")]))
    assert math.isnan(float(row[hook.layers.index("4.weight")]))
    assert math.isnan(float(row[hook.layers.index("2.weight")]))  # dead units: zero gradient
