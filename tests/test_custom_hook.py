"""The custom hook shown in docs/custom_hooks.md runs as written and detects what it claims."""

from __future__ import annotations

import pathlib
import re

import torch
import torch.nn.functional as F

import stallguard as sg

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom_hooks.md"


def doc_namespace() -> dict:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_the_documented_loss_spike_hook_finds_spikes_and_only_spikes():
    ns = doc_namespace()
    ns["guard"].close()
    LossSpike = ns["LossSpike"]

    def run(spike_at):
        torch.manual_seed(0)
        x, y = torch.randn(256, 8), torch.randn(256, 1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = sg.Guard(model, opt, hooks=[LossSpike()], sinks=[], check_every=10, strict=True)
        for step in range(40):
            idx = torch.randint(0, 256, (32,))
            xb, yb = x[idx], y[idx]
            if step in spike_at:
                yb = yb * 30  # a batch of corrupt targets
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            guard.observe(loss)
            opt.step()
        guard.close()
        return [e for e in guard.events if e.kind == "loss_spike"]

    assert run(spike_at=()) == []
    spikes = run(spike_at=(25,))
    assert [(e.step, e.data["count"], e.causes) for e in spikes] == [(30, 1, ("lr_too_high",))]
    assert sg.create("loss_spike").factor == 3.0  # registered by name, as the page says
