"""Sinks: logging, JSON Lines, memory, callables, TensorBoard; failures never lose events silently."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, regression_data

import stallguard as sg


class Ticker(sg.Hook):
    """Emits one event per check with the mean observed loss."""

    def on_check(self, check):
        losses = check.series().values
        self.emit("tick", "info", f"mean loss {losses.mean():.4f}", mean=float(losses.mean()), n=len(losses))


def run_with(sinks, steps=20, check_every=5):
    x, y = regression_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sg.Guard(model, opt, hooks=[Ticker()], sinks=sinks, check_every=check_every)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.observe(loss)
        opt.step()
        opt.zero_grad()
    guard.close()
    return guard


def test_jsonl_output_parses_back_into_equal_events(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    guard = run_with([sg.JSONLSink(path)])
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["kind"] == "tick" for line in lines)
    assert sg.read_jsonl(path) == guard.events


def test_jsonl_flushes_at_check_points(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = sg.JSONLSink(path)
    guard = sg.Guard(None, None, hooks=[Ticker()], sinks=[sink], check_every=3)
    for _ in range(3):
        guard.observe(1.0)
        guard.after_step()
    assert len(sg.read_jsonl(path)) == 1 and sink.pending == 0
    guard.close()


def test_jsonl_append_mode_keeps_earlier_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    run_with([sg.JSONLSink(path)], steps=5)
    run_with([sg.JSONLSink(path, append=True)], steps=5)
    assert len(sg.read_jsonl(path)) == 2


def test_a_process_killed_mid_run_leaves_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    script = textwrap.dedent(
        f"""
        import sys, torch, stallguard as sg
        class Chatty(sg.Hook):
            def on_check(self, check):
                for i in range(50):
                    self.emit("chatter", "info", "x" * 500, i=i, pad=list(range(50)))
        guard = sg.Guard(None, None, hooks=[Chatty()], sinks=[sg.JSONLSink({str(path)!r}, buffer_lines=7)],
                         check_every=1)
        print("ready", flush=True)
        while True:
            guard.observe(1.0)
            guard.after_step()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 2_000_000) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = path.read_bytes()
    assert len(data) > 100_000
    assert data.endswith(b"\n")
    events = sg.read_jsonl(path)  # raises on any incomplete or corrupt line
    assert len(events) == data.count(b"\n")


class Broken(sg.Sink):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def write(self, event):
        self.calls += 1
        raise OSError("No space left on device")


def test_a_failing_sink_is_reported_once_and_the_others_keep_working(caplog):
    broken, memory = Broken(), sg.MemorySink()
    with caplog.at_level(logging.WARNING, logger="stallguard"):
        guard = run_with([broken, memory])
    ticks = [e for e in guard.events if e.kind == "tick"]
    assert len(ticks) == 4 and broken.calls == 4
    # The first failure is reported to the other sinks right away, before the event that caused it.
    assert [e.kind for e in memory.events] == ["sink_error", "tick", "tick", "tick", "tick"]
    assert sum("failed to write" in r.message for r in caplog.records) == 1
    assert guard.sink_failures[id(broken)] == 4
    assert "4 sink write(s) failed; every event is in guard.events" in guard.report()


def test_an_unwritable_jsonl_sink_keeps_its_lines_for_the_next_flush(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = sg.JSONLSink(path)
    guard = sg.Guard(None, None, hooks=[Ticker()], sinks=[sink], check_every=2)
    os.close(sink._fd)  # simulate a file that cannot be written any more
    sink._fd = os.open(os.devnull, os.O_RDONLY)
    for _ in range(2):
        guard.observe(1.0)
        guard.after_step()
    assert sink.pending == 1 and [e.kind for e in guard.events] == ["tick", "sink_error"]
    os.close(sink._fd)
    sink._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    guard.close()
    assert [e.kind for e in sg.read_jsonl(path)] == ["tick"]


def test_strict_guard_reraises_sink_errors():
    guard = sg.Guard(None, None, hooks=[Ticker()], sinks=[Broken()], check_every=1, strict=True)
    guard.observe(1.0)
    with pytest.raises(OSError, match="No space left"):
        guard.after_step()


def test_logging_sink_uses_severity_levels(caplog):
    with caplog.at_level(logging.DEBUG, logger="stallguard"):
        run_with([sg.LoggingSink(min_severity="debug")], steps=5)
    (record,) = [r for r in caplog.records if "tick" in r.getMessage()]
    assert record.levelno == logging.INFO and record.name == "stallguard"
    assert "[info] tick (Ticker, step 5): mean loss" in record.getMessage()


def test_min_severity_filters():
    memory = sg.MemorySink(min_severity="warning")
    run_with([memory])
    assert memory.events == []


def test_callable_and_memory_sinks():
    got = []
    memory = sg.MemorySink(maxlen=2)
    run_with([sg.CallableSink(got.append), memory])
    assert [e.kind for e in got] == ["tick"] * 4
    assert [e.step for e in memory.events] == [15, 20]


def test_tensorboard_sink_writes_text_and_scalars():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_text(self, tag, text, global_step=None):
            self.calls.append(("text", tag, global_step))

        def add_scalar(self, tag, value, global_step=None):
            self.calls.append(("scalar", tag, global_step))

    w = Writer()
    run_with([sg.TensorBoardSink(w)], steps=5)
    assert w.calls == [
        ("text", "stallguard/tick", 5),
        ("scalar", "stallguard/tick/mean", 5),
        ("scalar", "stallguard/tick/n", 5),
    ]


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: sg.JSONLSink(3), TypeError, "path must be a str or os.PathLike, got int 3"),
        (lambda: sg.JSONLSink("x.jsonl", buffer_lines=0), ValueError, "buffer_lines must be an int >= 1, got 0"),
        (lambda: sg.MemorySink(maxlen=-1), ValueError, "maxlen must be an int >= 1, got -1"),
        (lambda: sg.CallableSink("print"), TypeError, "fn must be callable, got str"),
        (lambda: sg.LoggingSink(min_severity="chatty"), ValueError, "severity must be one of"),
        (lambda: sg.TensorBoardSink(object()), TypeError, "writer must have add_text"),
    ],
)
def test_bad_sink_arguments(factory, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        factory()


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = sg.Event(kind="k", severity="info", message="m").to_json()
    path.write_text(good + "\n" + '{"kind": "k"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not an event record"):
        sg.read_jsonl(path)
    path.write_text(good + "\n" + good[:10])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: incomplete last line"):
        sg.read_jsonl(path)
