"""stallguard under torch.distributed: two CPU processes on gloo, with DDP, FSDP1 and FSDP2.

Each scenario runs in both ranks; the parent compares what the ranks report. The scenarios that leave
the process group usable share one pair of processes (spawning costs a few seconds); the ones that
break agreement on purpose run in a pair of their own. Every wait is bounded, so a hang fails.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import socket
import tempfile
import time
import traceback
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import stallguard as sg
from stallguard.distributed import LayoutMismatchError
from stallguard.hooks import GradientClipper, LRAutoReducer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

WORLD = 2
DEVICE = "cpu"  # set in each rank by the harness: "cpu" or "cuda"


# ----------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenarios: list[str], out: Any, destroy: bool, backend: str, device: str) -> None:
    global DEVICE
    DEVICE = device
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    for name in scenarios:
        try:
            torch.manual_seed(0)
            out.put((name, rank, "ok", SCENARIOS[name](rank)))
        except Exception:
            out.put((name, rank, "error", traceback.format_exc()))
    if destroy:
        dist.destroy_process_group()


def _spawn(
    scenarios: list[str], timeout: float = 60.0, destroy: bool = True, backend: str = "gloo", device: str = "cpu"
) -> dict[str, list[Any]]:
    """Run ``scenarios`` in order on two ranks; {name: [result of rank 0, result of rank 1]}."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    args = [(r, port, scenarios, out, destroy, backend, device) for r in range(WORLD)]
    procs = [ctx.Process(target=_worker, args=a, daemon=True) for a in args]
    for p in procs:
        p.start()
    results: dict[str, list[Any]] = {name: [None] * WORLD for name in scenarios}
    errors = []
    try:
        for _ in range(len(scenarios) * WORLD):
            try:
                name, rank, status, value = out.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"distributed scenarios {scenarios} did not finish within {timeout} s (a hang)")
            if status == "error":
                errors.append(f"{name} on rank {rank}:\n{value}")
            results[name][rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors))
    return results


@pytest.fixture(scope="module")
def shared() -> dict[str, list[Any]]:
    return _spawn(
        [
            "lr_decisions",
            "ddp_norm",
            "nan_skip",
            "nan_raise",
            "fsdp2",
            "fsdp1",
            "custom_state",
            "sinks_once",
            "no_buffers",
            "dead_relu",
            "hook_fails_on_one_rank",
        ],
        timeout=90.0,
    )


# ----------------------------------------------------------------------------- scenarios (run in each rank)
def _mlp(d_in: int = 8, hidden: int = 16, d_out: int = 1) -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _batches(seed: int, steps: int, n: int = 16, d: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g)) for _ in range(steps)]


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _events(guard: sg.Guard) -> list[tuple[Any, ...]]:
    return [(e.kind, e.step, e.source, e.rank, e.world_size, repr(sorted(e.data.items()))) for e in guard.events]


def lr_decisions(rank: int) -> dict[str, Any]:
    """Ranks see different data (random targets: the loss plateaus); decisions must agree."""
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    hooks = [h for h in sg.default_hooks(repair=True) if not isinstance(h, LRAutoReducer)]
    hooks.append(LRAutoReducer(patience=2, factor=0.5))
    guard = sg.Guard(ddp, opt, hooks=hooks, sinks=[], check_every=5, strict=True)
    lrs, local = [], []
    for x, y in _batches(seed=100 + rank, steps=60):
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        local.append(loss.item())
    guard.close()
    return {
        "lrs": lrs,
        "local_losses": local,
        "series": guard.series("loss").values.tolist(),
        "events": _events(guard),
        "diagnosis": [(d.cause, round(d.confidence, 12)) for d in guard.diagnose()],
        "should_stop": guard.should_stop,
        "params": _flat(ddp),
    }


def _reference_step(batches: list[tuple[torch.Tensor, torch.Tensor]], max_norm: float) -> tuple[float, list[float]]:
    """One clipped SGD step of the unsharded model on the concatenated batch, in one process."""
    ref = _mlp()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.functional.mse_loss(ref(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    return norm.item(), _flat(ref)


def _dev(rank: int) -> torch.device:
    return torch.device(f"cuda:{rank % torch.cuda.device_count()}") if DEVICE == "cuda" else torch.device("cpu")


def _ddp(model: nn.Module, rank: int) -> nn.parallel.DistributedDataParallel:
    dev = _dev(rank)
    return nn.parallel.DistributedDataParallel(model.to(dev), device_ids=[dev] if dev.type == "cuda" else None)


def _clipped_step(model: nn.Module, rank: int, full_params: Any) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sg.Guard(model, opt, hooks=[GradientClipper(mode="norm", max_norm=0.05)], sinks=[], check_every=1)
    batches = [_batches(seed=200 + r, steps=1)[0] for r in range(WORLD)]
    x, y = (t.to(_dev(rank)) for t in batches[rank])
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    guard.close()
    clipped = [e for e in guard.events if e.kind == "grad_clipped"]
    ref_norm, ref_params = _reference_step(batches, max_norm=0.05)
    errors = [e.message for e in guard.events if e.kind == "hook_error"]
    return {
        "norm": clipped[0].data["pre_norm_max"] if clipped else None,
        "ref_norm": ref_norm,
        "params": full_params(),
        "ref_params": ref_params,
        "errors": errors,
    }


def ddp_norm(rank: int) -> dict[str, Any]:
    ddp = _ddp(_mlp(), rank)
    return _clipped_step(ddp, rank, lambda: _flat(ddp))


def fsdp2(rank: int) -> dict[str, Any]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return {"skip": "this torch has no torch.distributed.fsdp.fully_shard"}
    model = _mlp()
    fully_shard(model[0])
    fully_shard(model)

    def full() -> list[float]:
        return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()]).tolist()

    return _clipped_step(model, rank, full)


def fsdp1(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for orig in (False, True):
        try:
            model = FSDP(_mlp(), device_id=torch.device("cpu"), use_orig_params=orig)
        except Exception as exc:  # FSDP1 on CPU needs a recent torch
            return {"skip": f"FSDP1 does not run on CPU/gloo here: {exc}"}

        def full(model: Any = model) -> list[float]:
            with FSDP.summon_full_params(model):
                return _flat(model)

        out[f"use_orig_params={orig}"] = _clipped_step(model, rank, full)
    return out


def nan_skip(rank: int) -> dict[str, Any]:
    """Step 2: rank 1's gradients turn NaN after DDP synced them; step 6: rank 1's batch holds a NaN."""
    ddp = _ddp(_mlp(), rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    sink = sg.MemorySink()
    guard = sg.Guard(
        ddp, opt, hooks=[GradientClipper(mode="norm", max_norm=10.0)], sinks=[sink], check_every=4, strict=True
    )
    moved = []
    for step, (x, y) in enumerate(_batches(seed=300 + rank, steps=8), start=1):
        x, y = x.to(_dev(rank)), y.to(_dev(rank))
        if step == 6 and rank == 1:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 2 and rank == 1:
            ddp.module[0].weight.grad[0, 0] = math.nan
        guard.observe(loss)
        before = _flat(ddp)
        opt.step()
        moved.append(before != _flat(ddp))
    guard.close()
    return {
        "moved": moved,
        "params": _flat(ddp),
        "events": _events(guard),
        "sink": [(e.kind, e.rank, dict(e.data)) for e in sink.events],
    }


def nan_raise(rank: int) -> dict[str, Any]:
    """With nonfinite="raise", a NaN in rank 1's gradients stops every rank at the same step."""
    ddp = _ddp(_mlp(), rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    guard = sg.Guard(ddp, opt, hooks=[GradientClipper(mode="norm", max_norm=10.0, nonfinite="raise")], sinks=[])
    raised_at = None
    for step, (x, y) in enumerate(_batches(seed=500 + rank, steps=4), start=1):
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 3 and rank == 1:
            ddp.module[2].bias.grad[0] = math.inf
        try:
            opt.step()
        except sg.NonFiniteGradientError:
            raised_at = step
            break
    guard.close()
    return {"raised_at": raised_at, "params": _flat(ddp)}


class Tally(sg.Hook):
    """A user's hook: one state per reduction, each fed with rank-dependent values."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for how in ("sum", "mean", "max", "min"):
            self.add_state(f"v_{how}", torch.zeros(2), reduce=how, reset=True)
        self.add_state("v_any", torch.zeros(3, dtype=torch.bool), reduce="any", reset=True)
        self.add_state("v_all", torch.ones(3, dtype=torch.bool), reduce="all", reset=True)
        self.add_state("v_gather", torch.zeros(2), reduce="gather", reset=True)
        self.add_state("local", torch.zeros(()))  # not reduced: stays this rank's own
        self.seen: list[dict[str, Any]] = []

    def on_after_step(self, ctx: Any) -> None:
        r = float(self.guard.rank + 1)  # type: ignore[union-attr]
        for how in ("sum", "mean", "max", "min"):
            getattr(self, f"v_{how}").add_(torch.tensor([r, -r]))
        self.v_any[int(r)] = True  # rank 0 sets 1, rank 1 sets 2
        self.v_all[int(r)] = False
        self.v_gather.add_(torch.tensor([r, 10 * r]))
        self.local += r

    def on_check(self, check: Any) -> None:
        self.seen.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in check.values.items()})


def custom_state(rank: int) -> dict[str, Any]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Tally(), Tally(name="Second")], sinks=[], check_every=2, strict=True)
    calls = {"all_reduce": 0, "all_gather": 0}
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def counting_reduce(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return real_reduce(*args, **kwargs)

    def counting_gather(*args: Any, **kwargs: Any) -> Any:
        calls["all_gather"] += 1
        return real_gather(*args, **kwargs)

    per_step = []
    dist.all_reduce, dist.all_gather = counting_reduce, counting_gather
    try:
        for x, y in _batches(seed=0, steps=4):
            before = dict(calls)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            per_step.append({k: calls[k] - before[k] for k in calls})
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather
    guard.close()
    tally = guard.hook("Tally")
    return {"seen": tally.seen, "local": tally.local.item(), "per_step": per_step}  # type: ignore[union-attr]


class Shout(sg.Hook):
    def on_check(self, check: Any) -> None:
        self.emit("shout", "warning", "once per check point", n=check.step)


def sinks_once(rank: int) -> dict[str, Any]:
    out = {}
    for emit_rank in (0, 1, "all"):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sink = sg.MemorySink()
        guard = sg.Guard(model, opt, hooks=[Shout()], sinks=[sink], check_every=1, emit_rank=emit_rank)
        for x, y in _batches(seed=0, steps=2):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        guard.close()
        out[str(emit_rank)] = {
            "sink": [(e.kind, e.step, e.rank, e.world_size) for e in sink.events],
            "events": len(guard.events),
        }
    # A sink given as a config entry is built (its file opened) on the writing rank only.
    path = _jsonl_path(os.getppid())
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Shout()], sinks=[{"name": "jsonl", "path": path}], check_every=1)
    nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    opt.step()
    guard.close()
    out["jsonl_sinks"] = len(guard.sinks)
    dist.barrier()
    out["jsonl_kinds"] = [e.kind for e in sg.read_jsonl(path)]
    return out


def _jsonl_path(parent_pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"stallguard_test_distributed_{parent_pid}.jsonl")


def no_buffers(rank: int) -> dict[str, Any]:
    """Default hooks on a model with buffers (BatchNorm) under DDP: the Guard adds no module buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    before = sorted(n for n, _ in ddp.named_buffers())
    keys_before = sorted(ddp.state_dict())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    guard = sg.Guard(ddp, opt, repair=True, sinks=[], check_every=2, strict=True)
    buffer_ids = set()
    for x, y in _batches(seed=400 + rank, steps=4):
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        guard.observe(loss, inputs=x, outputs=ddp(x), targets=y)
        opt.step()
        buffer_ids |= {id(b) for b in ddp.buffers()}
    hook_tensor_ids = {
        id(getattr(h, n)) for h in guard.hooks for n in h._states if isinstance(getattr(h, n), torch.Tensor)
    }
    guard.close()
    return {
        "buffers": (before, sorted(n for n, _ in ddp.named_buffers())),
        "state_dict": (keys_before, sorted(ddp.state_dict())),
        "shared": len(buffer_ids & hook_tensor_ids),
        "n_states": len(hook_tensor_ids),
    }


def dead_relu(rank: int) -> dict[str, Any]:
    """Unit 0 fires on rank 0's data only; every unit is silent on rank 1's. Dead only if dead on every rank."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    counter = sg.DeadReLUCounter(every=1, window=2)
    guard = sg.Guard(ddp, opt, hooks=[counter], sinks=[], check_every=2, strict=True)
    for _ in range(2):
        x = -torch.rand(8, 4) - 0.1
        if rank == 0:
            x[:, 0] = -x[:, 0]
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    return {"dead": counter.dead_fractions}


class FailsOnRankOne(sg.Hook):
    def __init__(self) -> None:
        super().__init__()
        self.add_state("n", torch.zeros(()), reduce="sum")
        self.checks = 0

    def on_after_step(self, ctx: Any) -> None:
        if self.guard.rank == 1:  # type: ignore[union-attr]
            raise ValueError("a bug that shows on one rank only")
        self.n += 1

    def on_check(self, check: Any) -> None:
        self.checks += 1


def hook_fails_on_one_rank(rank: int) -> dict[str, Any]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    failing = FailsOnRankOne()
    sink = sg.MemorySink()
    guard = sg.Guard(model, opt, hooks=[failing, Tally()], sinks=[sink], check_every=1)
    for x, y in _batches(seed=0, steps=3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    errors = [(e.kind, e.rank) for e in guard.events if e.kind == "hook_error"]
    return {
        "enabled": failing.enabled,
        "checks": failing.checks,
        "errors": errors,
        "sink": [(e.kind, e.rank) for e in sink.events],
        "tally": len(guard.hooks[1].seen),  # type: ignore[attr-defined]
    }


def layout_mismatch(rank: int) -> dict[str, Any]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks: list[sg.Hook] = [Tally()] + ([Tally(name="OnlyOnRankOne")] if rank == 1 else [])
    guard = sg.Guard(model, opt, hooks=hooks, sinks=[], check_every=100)
    x, y = _batches(seed=0, steps=1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    try:
        guard.check()
        message = None
    except LayoutMismatchError as exc:
        message = str(exc)
    try:
        guard.close()
        closed_error = None
    except LayoutMismatchError as exc:
        closed_error = type(exc).__name__
    return {"message": message, "close": closed_error, "closed": guard.closed}


def close_disagreement(rank: int) -> dict[str, Any]:
    """Rank 0 observed a loss after the last check point and rank 1 did not: close() must not hang.

    Both ranks run the final check point (each skipping it would leave the other waiting) and both
    learn there that they disagree.
    """
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Tally()], sinks=[], check_every=1)
    x, y = _batches(seed=0, steps=1)[0]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    if rank == 0:
        guard.observe(loss)
    try:
        guard.close()
        message = None
    except LayoutMismatchError as exc:
        message = str(exc)
    return {"closed": guard.closed, "message": message}


def close_alone(rank: int) -> dict[str, Any]:
    """Rank 1 never closes its Guard: rank 0's close() gives up after close_timeout instead of hanging."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Tally()], sinks=[], check_every=100, close_timeout=1.0)
    if rank == 0:
        guard.close()
    else:
        time.sleep(3.0)  # still alive, just not closing
    return {"closed": guard.closed}


SCENARIOS = {
    f.__name__: f
    for f in (
        lr_decisions,
        ddp_norm,
        nan_skip,
        nan_raise,
        fsdp2,
        fsdp1,
        custom_state,
        sinks_once,
        no_buffers,
        dead_relu,
        hook_fails_on_one_rank,
        layout_mismatch,
        close_disagreement,
        close_alone,
    )
}


# ----------------------------------------------------------------------------- tests
def test_ranks_with_different_data_take_identical_lr_decisions(shared):
    r0, r1 = shared["lr_decisions"]
    assert r0["local_losses"] != r1["local_losses"]  # the ranks really saw different data
    assert r0["lrs"] == r1["lrs"]
    assert r0["lrs"][-1] < r0["lrs"][0]  # the reducer did act on the plateau
    assert r0["series"] == r1["series"]
    assert r0["events"] == r1["events"]
    assert any(e[0] == "lr_reduced" for e in r0["events"])
    assert all(e[4] == WORLD for e in r0["events"])
    assert r0["diagnosis"] == r1["diagnosis"]
    assert r0["should_stop"] == r1["should_stop"]
    assert r0["params"] == r1["params"]
    # The loss series is the mean over ranks of what each observed.
    first = (r0["local_losses"][0] + r1["local_losses"][0]) / 2
    assert r0["series"][0] == pytest.approx(first, rel=1e-6)


def test_ddp_gradient_norm_equals_the_single_process_norm(shared):
    for res in shared["ddp_norm"]:
        assert not res["errors"]
        assert res["norm"] == pytest.approx(res["ref_norm"], rel=1e-5)
        assert res["params"] == pytest.approx(res["ref_params"], rel=1e-5, abs=1e-7)


def test_a_nan_on_one_rank_makes_every_rank_skip(shared):
    r0, r1 = shared["nan_skip"]
    assert r0["params"] == r1["params"]
    # Steps 2 (rank 1's gradients) and 6 (rank 1's batch) are skipped on both ranks; the rest move.
    expected = [step not in (2, 6) for step in range(1, 9)]
    assert r0["moved"] == expected and r1["moved"] == expected
    assert r0["events"] == r1["events"]
    named = [e for e in r0["sink"] if e[0] == "rank_nonfinite"]
    assert [(e[1], e[2]["what"], e[2]["first_step"]) for e in named] == [(1, "gradients", 2), (1, "loss", 6)]
    skipped = [e for e in r0["sink"] if e[0] == "nonfinite_skipped"]
    assert len(skipped) == 2
    assert r1["sink"] == []  # rank 1 writes nothing: events reach the sinks once per job


def test_a_nan_on_one_rank_raises_on_every_rank(shared):
    r0, r1 = shared["nan_raise"]
    assert r0["raised_at"] == r1["raised_at"] == 3
    assert r0["params"] == r1["params"]


def test_fsdp2_gradient_norm_and_clipping_equal_the_unsharded_ones(shared):
    for res in shared["fsdp2"]:
        if "skip" in res:
            pytest.skip(res["skip"])
        assert not res["errors"]
        assert res["norm"] == pytest.approx(res["ref_norm"], rel=1e-5)
        assert res["params"] == pytest.approx(res["ref_params"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("orig", [False, True])
def test_fsdp1_gradient_norm_and_clipping_equal_the_unsharded_ones(shared, orig):
    for res in shared["fsdp1"]:
        if "skip" in res:
            pytest.skip(res["skip"])
        res = res[f"use_orig_params={orig}"]
        assert not res["errors"]
        assert res["norm"] == pytest.approx(res["ref_norm"], rel=1e-5)
        assert res["params"] == pytest.approx(res["ref_params"], rel=1e-5, abs=1e-7)


def test_a_custom_hooks_states_are_reduced_in_one_collective_per_kind(shared):
    r0, r1 = shared["custom_state"]
    assert r0["seen"] == r1["seen"]
    first = r0["seen"][0]
    # Two steps per check point, rank r adds (r + 1, -(r + 1)) per step.
    assert first["v_sum"] == [6.0, -6.0]
    assert first["v_mean"] == [3.0, -3.0]
    assert first["v_max"] == [4.0, -2.0]
    assert first["v_min"] == [2.0, -4.0]
    assert first["v_any"] == [False, True, True]
    assert first["v_all"] == [True, False, False]
    assert first["v_gather"] == [[2.0, 20.0], [4.0, 40.0]]  # one row per rank
    assert "local" not in first
    assert (r0["local"], r1["local"]) == (4.0, 8.0)  # undeclared reductions stay local
    # No collective on steps without a check point; at one: the layout check, one MAX, one SUM, and
    # one all_gather because a state asked for "gather".
    assert [s["all_reduce"] for s in r0["per_step"]] == [0, 3, 0, 3]
    assert [s["all_gather"] for s in r0["per_step"]] == [0, 1, 0, 1]


def test_events_reach_the_sinks_once_per_job(shared):
    r0, r1 = shared["sinks_once"]
    # Two check points (close finds nothing new after the second), one event each.
    assert len(r0["0"]["sink"]) == 2 and r1["0"]["sink"] == []
    assert r0["1"]["sink"] == [] and len(r1["1"]["sink"]) == 2
    assert len(r0["all"]["sink"]) == 2 and len(r1["all"]["sink"]) == 2
    assert all(world == WORLD and rank is None for _, _, rank, world in r0["0"]["sink"])
    assert r0["0"]["events"] == r1["0"]["events"] == 2  # every rank still keeps its guard.events
    assert (r0["jsonl_sinks"], r1["jsonl_sinks"]) == (1, 0)
    assert r0["jsonl_kinds"] == r1["jsonl_kinds"] == ["shout"]  # written once, by rank 0
    os.remove(_jsonl_path(os.getpid()))


def test_no_counter_is_a_module_buffer(shared):
    for res in shared["no_buffers"]:
        assert res["buffers"][0] == res["buffers"][1]
        assert res["state_dict"][0] == res["state_dict"][1]
        assert res["n_states"] > 0 and res["shared"] == 0


def test_a_unit_is_dead_only_if_dead_on_every_rank(shared):
    r0, r1 = shared["dead_relu"]
    assert r0["dead"] == r1["dead"] == {"1": 0.75}  # rank 1 alone would call all four dead


def test_a_hook_failing_on_one_rank_is_disabled_on_every_rank(shared):
    r0, r1 = shared["hook_fails_on_one_rank"]
    assert not r0["enabled"] and not r1["enabled"]
    assert r0["checks"] == 0  # the check point that learns of the failure no longer runs it
    # Rank 1 recorded its own failure; rank 0 learned of it at the check point and its sinks report it.
    assert r1["errors"] == [("hook_error", 1)] and r0["errors"] == [("hook_error", 1)]
    assert r0["sink"] == [("hook_error", 1)] and r1["sink"] == []
    assert r0["tally"] == r1["tally"] == 3  # the other hooks go on, at each of the three check points


def test_disagreeing_ranks_get_a_clear_error_and_close_does_not_hang():
    res = _spawn(["layout_mismatch", "close_disagreement", "close_alone"], timeout=40.0, destroy=False)
    for r in res["layout_mismatch"]:
        assert r["message"] is not None and "OnlyOnRankOne" in r["message"]
        assert r["close"] == "LayoutMismatchError" and r["closed"]
    for r in res["close_disagreement"]:
        assert r["closed"]
        assert "observed: rank 0 has [('loss', 1)], rank 1 has []" in r["message"]
    assert res["close_alone"][0]["closed"]


def test_single_process_is_unchanged():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sg.Guard(model, opt, hooks=[Tally()], sinks=[], check_every=2, emit_rank="all")
    for x, y in _batches(seed=0, steps=2):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    seen = guard.hook("Tally").seen  # type: ignore[union-attr]
    assert seen[0]["v_sum"] == [2.0, -2.0] and seen[0]["v_mean"] == [2.0, -2.0]
    assert seen[0]["v_any"] == [False, True, False] and seen[0]["v_all"] == [True, False, True]
    assert seen[0]["v_gather"] == [[2.0, 20.0]]


# ----------------------------------------------------------------------------- GPU variants
def _check_gpu_results(res: dict[str, list[Any]]) -> None:
    for r in res["ddp_norm"]:
        assert not r["errors"]
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-4)
        assert r["params"] == pytest.approx(r["ref_params"], rel=1e-4, abs=1e-6)
    r0, r1 = res["nan_skip"]
    assert r0["params"] == r1["params"]
    expected = [step not in (2, 6) for step in range(1, 9)]
    assert r0["moved"] == expected and r1["moved"] == expected
    named = [e for e in r0["sink"] if e[0] == "rank_nonfinite"]
    assert [(e[1], e[2]["what"]) for e in named] == [(1, "gradients"), (1, "loss")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_over_gloo():
    """Both ranks on the GPU(s), gloo carrying the collectives (the Guard moves its small vectors to the CPU)."""
    _check_gpu_results(_spawn(["ddp_norm", "nan_skip"], timeout=120.0, device="cuda"))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= WORLD and dist.is_nccl_available()),
    reason="needs two CUDA devices and NCCL",
)
def test_cuda_over_nccl():
    _check_gpu_results(_spawn(["ddp_norm", "nan_skip"], timeout=120.0, backend="nccl", device="cuda"))
