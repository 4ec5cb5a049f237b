"""Hook names, entry points, and configs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import stallguard as sg
from stallguard import registry


@sg.register("test_counter")
class Counter(sg.Hook):
    def __init__(self, limit: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit


def test_register_and_create():
    hook = sg.create("test_counter", limit=5, every=2)
    assert isinstance(hook, Counter) and hook.limit == 5 and hook.every == 2
    assert hook.registry_name == "test_counter"
    assert "test_counter" in sg.available()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown hook 'nope'; known hooks: .*test_counter"):
        sg.create("nope")


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered to Counter"):

        @sg.register("test_counter")
        class Other(sg.Hook):
            pass


def test_register_only_decorates_hooks():
    with pytest.raises(TypeError, match="decorates Hook subclasses"):
        sg.register("bad")(int)
    with pytest.raises(ValueError, match="default must be None, 'monitor' or 'repair'"):
        sg.register("bad", default="sometimes")


def test_third_party_hooks_are_found_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_hooks.py").write_text(
        textwrap.dedent(
            """
            import stallguard as sg
            class Spiky(sg.Hook):
                pass
            """
        )
    )
    dist = tmp_path / "thirdparty-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[stallguard.hooks]\nspiky = thirdparty_hooks:Spiky\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    hook = sg.create("spiky")
    assert type(hook).__name__ == "Spiky" and hook.registry_name == "spiky"
    registry._REGISTRY.pop("spiky")
    sys.modules.pop("thirdparty_hooks", None)


def test_guard_from_a_json_config_and_back():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = json.loads(
        '{"check_every": 5, "sinks": [], "hooks": ["test_counter", {"hook": "test_counter", "limit": 9},'
        ' {"name": "test_counter", "every": 4}, {"hook": "test_counter", "name": "third"}]}'
    )
    guard = sg.Guard.from_config(model, opt, cfg)
    assert [h.name for h in guard.hooks] == ["Counter", "Counter#2", "Counter#3", "third"]
    assert [(h.limit, h.every) for h in guard.hooks] == [(3, 1), (9, 1), (3, 4), (3, 1)]
    assert guard.check_every == 5
    out = guard.to_config()
    guard.close()
    assert out["hooks"][1] == {"hook": "test_counter", "limit": 9, "every": 1, "start_step": 0}
    assert out["hooks"][3]["name"] == "third"
    again = sg.Guard.from_config(model, opt, {**json.loads(json.dumps(out)), "sinks": []})
    assert [(h.name, h.limit, h.every) for h in again.hooks] == [(h.name, h.limit, h.every) for h in guard.hooks]
    again.close()


@pytest.mark.parametrize(
    ("cfg", "error", "match"),
    [
        (
            {"hooks": ["test_counter"], "chek_every": 3},
            ValueError,
            r"unknown key\(s\) \['chek_every'\]; allowed: check_every",
        ),
        ({"hooks": "test_counter"}, TypeError, "hooks must be a list, got str"),
        ({"hooks": [{"limit": 3}]}, ValueError, r"hooks\[0\] must be a hook name or a dict with a 'hook' name"),
        ({"hooks": ["missing_hook"]}, ValueError, "unknown hook 'missing_hook'"),
        ([1, 2], TypeError, "config must be a dict, got list"),
    ],
)
def test_bad_configs_are_named(cfg, error, match):
    with pytest.raises(error, match=match):
        sg.Guard.from_config(None, None, cfg)
