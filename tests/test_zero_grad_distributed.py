"""ZeroGradCheck under torch.distributed (two CPU processes on gloo, no DDP): every rank decides alike."""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import stallguard as sg

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def _worker(rank: int, port: int, out: Any) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = sg.Guard(model, opt, hooks=[sg.ZeroGradCheck(every=1)], sinks=[], check_every=7, strict=True)
        g = torch.Generator().manual_seed(rank)
        for _ in range(21):
            x = torch.randn(16, 8, generator=g)
            nn.functional.mse_loss(model(x), x[:, :1]).backward()
            opt.step()
            if rank == 0:
                opt.zero_grad()  # rank 1 never clears its gradients
        guard.close()
        found = [
            (e.step, str(e.severity), e.data["steps"], e.data["checked_steps"], e.data["first_step"], e.data["ratio"])
            for e in guard.events
            if e.kind == "grads_not_cleared"
        ]
        out.put((rank, found))
    except Exception as exc:  # reported to the parent, which fails the test
        out.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def test_a_rank_that_keeps_its_gradients_is_reported_alike_on_every_rank() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        found = dict(out.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
    assert found[0] == found[1], found
    # The ranks' sampled steps add up: 7 steps on each of 2 ranks; rank 1 flags every step but its first.
    assert [r[:5] for r in found[0]] == [
        (7, "warning", 6, 14, 2),
        (14, "warning", 7, 14, 8),
        (21, "warning", 7, 14, 15),
    ]
    assert all(r[5] > 0.1 for r in found[0])
