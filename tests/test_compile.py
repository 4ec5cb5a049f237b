"""A Guard on a ``torch.compile``d model: it still detects, and it adds no graph break.

The models are compiled with ``backend="eager"``: Dynamo traces the forward (and the hooks inside it)
exactly as with Inductor, which is where graph breaks come from, without Inductor's code generation,
which takes tens of seconds on a small CPU.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import stallguard as sg


def _dead_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second ReLU layer never fires
    return model


def _train(model: nn.Module, guard: sg.Guard | None, steps: int, lr: float = 0.01) -> list[float]:
    opt = guard.optimizers[0] if guard is not None else torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            guard.observe(loss, inputs=x, outputs=out.detach(), targets=y)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def test_guard_on_a_compiled_model_detects_dead_relus() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_dead_mlp(), backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    guard = sg.Guard(compiled, opt, sinks=[], check_every=10, strict=True)  # the default hooks
    _train(compiled, guard, 50)
    guard.close()
    dead = [e for e in guard.events if e.kind == "dead_units"]
    assert dead and dead[0].data["layers"] == ("3",)
    assert all(not m._forward_hooks for m in compiled.modules())  # close() removed what it added


def test_guard_adds_no_graph_break_to_the_compiled_forward() -> None:
    breaks = {}
    for label in ("plain", "default", "repair"):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(_dead_mlp(), backend="eager")
        opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
        guard = None
        if label != "plain":
            guard = sg.Guard(compiled, opt, sinks=[], check_every=10, repair=label == "repair", strict=True)
            for h in guard.hooks:
                h.every = 1  # sample every step: the counting path is traced too
        _train(compiled, guard, 12)
        if guard is not None:
            guard.close()
            # The hooks inside the forward really ran in the compiled graph.
            assert any(e.kind == "dead_units" for e in guard.events), label
        breaks[label] = _graph_breaks()
    assert breaks == {"plain": 0, "default": 0, "repair": 0}


def test_fullgraph_compile_accepts_the_guard_hooks() -> None:
    # fullgraph=True raises on any graph break, so running at all proves there is none.
    torch._dynamo.reset()
    compiled = torch.compile(_dead_mlp(), backend="eager", fullgraph=True)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    guard = sg.Guard(compiled, opt, hooks=[sg.DeadReLUCounter(every=1, window=4)], sinks=[], check_every=4)
    _train(compiled, guard, 8)
    guard.close()
    assert [e.data["layers"] for e in guard.events if e.kind == "dead_units"] == [("3",)]


def test_graph_break_counter_sees_a_breaking_hook() -> None:
    # The check above can fail: a forward hook that reads a value to the host breaks the graph.
    torch._dynamo.reset()
    counters.clear()
    model = _dead_mlp()
    seen: list[float] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.sum().item()) and None)
    compiled = torch.compile(model, backend="eager")
    _train(compiled, None, 2)
    assert _graph_breaks() > 0
