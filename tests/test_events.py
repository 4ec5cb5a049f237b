"""Events: immutable, versioned, JSON-safe records that round-trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import stallguard as sg


def test_round_trip_through_dict_and_json():
    e = sg.Event(
        kind="plateau",
        severity="warning",
        message="loss flat for 200 steps",
        step=1200,
        source="PlateauDetector",
        data={"level": np.float32(0.5), "window": [1, 2, 3], "nested": {"a": (1.5, np.int64(2))}},
        causes=("lr_too_low",),
        confidence=0.8,
        epoch=3,
        rank=None,
        world_size=4,
    )
    assert e.data["level"] == 0.5 and e.data["nested"]["a"] == (1.5, 2)
    assert sg.Event.from_dict(e.to_dict()) == e
    assert sg.Event.from_json(e.to_json()) == e
    assert json.loads(e.to_json())["severity"] == "warning"


def test_events_are_immutable_all_the_way_down():
    e = sg.Event(kind="k", severity="info", message="m", data={"xs": [1, 2], "d": {"a": 1}})
    with pytest.raises(AttributeError):
        e.step = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        e.data["xs"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        e.data["d"]["a"] = 2  # type: ignore[index]


def test_non_finite_numbers_become_strings_so_every_line_is_strict_json():
    e = sg.Event(kind="k", severity="error", message="m", data={"loss": math.nan, "norm": math.inf, "neg": -math.inf})
    line = e.to_json()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert dict(e.data) == {"loss": "nan", "norm": "inf", "neg": "-inf"}
    assert sg.Event.from_json(line) == e


def test_cpu_tensors_are_converted_and_device_tensors_refused():
    e = sg.Event(kind="k", severity="info", message="m", data={"t": torch.tensor([1.0, 2.0])})
    assert e.data["t"] == (1.0, 2.0)
    meta = torch.empty(2, device="meta")
    with pytest.raises(TypeError, match="device tensors must be read at a check point"):
        sg.Event(kind="k", severity="info", message="m", data={"t": meta})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": ""}, ValueError, "Event.kind must be a non-empty str"),
        ({"severity": "loud"}, ValueError, "severity must be one of 'debug', 'info', 'warning', 'error', 'critical'"),
        ({"confidence": 1.5}, ValueError, r"confidence must lie in \[0, 1\], got 1.5"),
        ({"data": {"obj": object()}}, TypeError, "data.obj: object is not JSON-safe"),
        ({"data": {1: 2}}, TypeError, "keys must be str"),
        ({"message": 3}, TypeError, "Event.message must be a str"),
    ],
)
def test_bad_fields_are_named(kwargs, error, match):
    base = {"kind": "k", "severity": "info", "message": "m"}
    with pytest.raises(error, match=match):
        sg.Event(**{**base, **kwargs})


def test_from_dict_refuses_newer_schemas_and_missing_fields():
    with pytest.raises(ValueError, match="newer than this stallguard"):
        sg.Event.from_dict({"schema": 99, "kind": "k", "severity": "info", "message": "m"})
    with pytest.raises(ValueError, match=r"lacks required field\(s\) \['message'\]"):
        sg.Event.from_dict({"kind": "k", "severity": "info"})


def test_severity_parsing():
    assert sg.Severity.parse("WARNING") is sg.Severity.WARNING
    assert sg.Severity.parse(40) is sg.Severity.ERROR
    assert str(sg.Severity.CRITICAL) == "critical"
    with pytest.raises(ValueError, match="got True"):
        sg.Severity.parse(True)


def test_event_bus_routes_by_kind_and_wildcard():
    bus = sg.EventBus()
    plateaus, everything = [], []
    bus.subscribe("plateau", plateaus.append)
    bus.subscribe("*", everything.append)
    bus.publish(sg.Event(kind="plateau", severity="warning", message="flat"))
    bus.publish(sg.Event(kind="divergence", severity="error", message="up"))
    assert [e.kind for e in plateaus] == ["plateau"]
    assert [e.kind for e in everything] == ["plateau", "divergence"]
    bus.unsubscribe(everything.append)
    bus.publish(sg.Event(kind="plateau", severity="warning", message="flat"))
    assert len(everything) == 2 and len(plateaus) == 2


def test_hooks_emit_with_guard_context():
    class Emitter(sg.Hook):
        def on_check(self, check):
            self.emit("tick", "info", "tick", causes=("lr_too_low",), confidence=0.25, value=check.step)

    guard = sg.Guard(None, None, hooks=[Emitter()], sinks=[], check_every=2)
    guard.epoch = 7
    for _ in range(2):
        guard.after_step()
    (e,) = guard.events
    assert (e.kind, e.step, e.epoch, e.source, e.causes, e.confidence) == (
        "tick",
        2,
        7,
        "Emitter",
        ("lr_too_low",),
        0.25,
    )
    assert e.world_size == 1 and e.rank is None
    guard.close()
