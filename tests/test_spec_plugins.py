"""A spec names its plug-in modules (top-level `plugins`): loaded before its methods are resolved, after
HARNESS_PLUGINS's (each module once), handed to every sweep cell, and kept in the records' environment; a bad value
exits 2 naming the key. Without the key a spec needed HARNESS_PLUGINS in the environment to run at all."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from conftest import ROOT

from harness.pd import kv
from harness.quality import long_tasks
from harness.store import records
from methods import registry

PLUGIN = textwrap.dedent('''
    from methods.depth.tail import Tail
    from methods.registry import register


    @register
    class {cls}(Tail):
        name = "{name}"
''')
LATENCY = {"model": "random:tiny", "device": "cpu", "prompt_tokens": [16], "decode_tokens": [2], "batch_size": [1],
           "warmup": 0, "repeats": 1}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """`tmp_path` on sys.path (and PYTHONPATH, for the processes a sweep starts) holding plug-in modules
    `pd_harness_sp_a` and `pd_harness_sp_b` (methods `sp_a`, `sp_b`); afterwards the registries and the module
    cache are as they were."""
    for x in ("a", "b"):
        (tmp_path / f"pd_harness_sp_{x}.py").write_text(PLUGIN.format(cls=f"Sp{x.upper()}", name=f"sp_{x}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    saved = dict(registry._METHODS), dict(kv._POLICIES), dict(long_tasks._REGISTRY)
    yield tmp_path
    for live, old in zip((registry._METHODS, kv._POLICIES, long_tasks._REGISTRY), saved):
        live.clear()
        live.update(old)
    for x in ("a", "b"):
        sys.modules.pop(f"pd_harness_sp_{x}", None)


def write_spec(path, top: str = "", **sections: dict):
    """A spec file: `top` (raw TOML above the sections), then `sections` (JSON spells their values as TOML does)."""
    path.write_text(top + "\n" + "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items())
                                         for name, body in sections.items()))
    return path


def test_a_spec_names_its_plugins_and_the_record_keeps_them(plugin_dir, cli):
    spec = write_spec(plugin_dir / "s.toml", 'plugins = ["pd_harness_sp_a"]',
                      latency={**LATENCY, "methods": ["sp_a"], "set": ["sp_a.k=1"], "out": str(plugin_dir / "lat")})
    r = cli("--config", spec, "-q")
    assert r.returncode == 0, r.stderr
    record = records.load(plugin_dir / "lat" / "sp_a__disaggregated.json")
    assert record.environment["plugins"] == ["pd_harness_sp_a"]  # what to name again to reproduce the run
    assert list(record.extra["plugin_code"]) == ["pd_harness_sp_a"]


def test_spec_plugins_follow_harness_plugins_each_once_and_reach_every_sweep_cell(plugin_dir, monkeypatch, data_dir):
    from harness.cli.sweep import cell_env
    from harness.cli.sweep_plan import expand

    monkeypatch.setenv("HARNESS_PLUGINS", "pd_harness_sp_b")
    run = {"model": "random:tiny", "device": "cpu", "methods": ["sp_a", "sp_b"], "tasks": ["arc_easy"], "limit": 2,
           "set": ["sp_a.k=1", "sp_b.k=1"], "data_dir": str(data_dir), "out": str(plugin_dir / "q")}
    plan = expand(write_spec(plugin_dir / "s.toml", 'plugins = ["pd_harness_sp_a", "pd_harness_sp_b"]', run=run), None)
    assert plan.plugins == ("pd_harness_sp_a", "pd_harness_sp_b")
    assert [c.name for c in plan.cells] == ["sp_a/disaggregated", "sp_b/disaggregated"]  # both methods resolved
    assert cell_env(1, plan.plugins)["HARNESS_PLUGINS"] == "pd_harness_sp_b,pd_harness_sp_a"  # the variable's first


def test_a_sweep_of_a_spec_that_names_its_plugins_runs_them_in_its_cells(plugin_dir, cli, data_dir):
    """The cells are `run` processes that never read the spec: they get its plug-ins through HARNESS_PLUGINS."""
    run = {"model": "random:tiny", "device": "cpu", "methods": ["sp_a"], "tasks": ["arc_easy"], "limit": 2,
           "set": ["sp_a.k=1"], "data_dir": str(data_dir), "out": str(plugin_dir / "q")}
    spec = write_spec(plugin_dir / "s.toml", 'plugins = "pd_harness_sp_a"', run=run)
    r = cli("sweep", spec, "--backend", "local", "--workers", "1", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = json.loads((plugin_dir / "q" / "sweep.json").read_text())
    assert sweep["plugins"] == ["pd_harness_sp_a"] and [c["status"] for c in sweep["cells"]] == ["ok"]
    assert records.load(plugin_dir / "q" / "sp_a__disaggregated.json").environment["plugins"] == ["pd_harness_sp_a"]


@pytest.mark.parametrize("top, says", [
    ('plugins = ["pd_harness_sp_a/x.py"]', "plugins: 'pd_harness_sp_a/x.py' is a file path; give module names"),
    ('plugins = "plug.py"', "plugins: 'plug.py' is a file path"),
    ("plugins = 5", "plugins: expected a list of module names in quotes, e.g. plugins = [\"my_plugins.kv\"], got 5"),
    ('plugins = ["pd_harness_sp_a", 3]', "plugins: expected a list of module names in quotes"),
    ('plugins = ["my-plugins"]', "plugins: 'my-plugins' is not a module name"),
    ('plugin = ["pd_harness_sp_a"]', "unknown key(s) plugin (did you mean plugins?)"),
    ('plugins = ["pd_harness_sp_nosuch"]', "plugins names 'pd_harness_sp_nosuch', which cannot be imported"),
])
def test_a_bad_plugins_value_exits_2_naming_the_key(plugin_dir, cli, top, says):
    spec = write_spec(plugin_dir / "s.toml", top, latency={**LATENCY, "methods": ["unpruned"], "out": str(plugin_dir / "l")})
    r = cli("--config", spec, "-q")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (plugin_dir / "l").exists()


def test_plugins_written_inside_a_section_says_where_it_goes(plugin_dir, cli):
    """TOML puts a key written below `[latency]` into that section."""
    spec = write_spec(plugin_dir / "s.toml", latency={**LATENCY, "methods": ["sp_a"], "plugins": ["pd_harness_sp_a"],
                                                      "out": str(plugin_dir / "l")})
    r = cli("--config", spec, "-q")
    assert r.returncode == 2, r.stderr
    assert "[latency]: unknown key 'plugins' (it is a top-level key: put plugins = [\"my_plugins.kv\"] above the first " \
           "[section])" in r.stderr
