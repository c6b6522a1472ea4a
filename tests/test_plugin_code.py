"""A plug-in's code is an input of its records: after its author edits it, a rerun refuses the records the old
code made (exit 2, naming the module) instead of reusing them silently; so does a long-context task whose
version was bumped. The package's own methods keep no code digest (their code is named by the git commit)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

import methods
from harness.quality import long_tasks
from methods import plugin_code, registry

NAME, MODULE = "code_probe", "pd_harness_test_plugin_code"
SOURCE = textwrap.dedent(f'''
    """`{NAME}`: the tail method under another name (a test plug-in)."""
    from methods.depth.tail import Tail
    from methods.registry import register


    @register
    class Probe(Tail):
        name = "{NAME}"
        summary = "tail, as a plug-in (test)"
''')


def _tail_plugin(name: str, imports: str, base: str = "Tail", body: str = "") -> str:
    """A plug-in module registering method `name`, a subclass of `base` (default: the package's tail method) after
    the statements `imports`, with `body` in its class."""
    return (f"{imports}\nfrom methods.depth.tail import Tail\nfrom methods.registry import register\n\n\n"
            f"@register\nclass Plugin({base}):\n    name = {name!r}\n" + textwrap.indent(body, "    ") + "\n")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Load the plug-in from `tmp_path`; `probe(source)` rewrites and reloads it, as a new process would."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(source: str = SOURCE) -> None:
        (tmp_path / f"{MODULE}.py").write_text(source)
        if registry.registered(NAME):
            registry.unregister(NAME)
        sys.modules.pop(MODULE, None)
        methods.load_plugins(MODULE)

    load()
    yield load
    registry.unregister(NAME)
    sys.modules.pop(MODULE, None)
    plugin_code._ROOTS.discard(MODULE)


def test_a_record_made_by_an_edited_plugin_is_refused_not_reused(probe, cli, data_dir, tmp_path):
    out = tmp_path / "runs"
    run = ("--model", "random:tiny", "--methods", f"{NAME},tail", "--set", f"{NAME}.k=1", "--set", "tail.k=1",
           "--tasks", "arc_easy", "--limit", "4", "--out", out)
    assert cli(*run, data_dir=data_dir).returncode == 0
    stored = json.loads((out / f"{NAME}__disaggregated.json").read_text())["extra"]["inputs"]["code"]
    assert list(stored["methods"]) == [NAME] and list(stored["methods"][NAME]) == [MODULE]  # tail: the package's own
    again = cli(*run, data_dir=data_dir)
    assert again.returncode == 0 and f"{NAME}/disaggregated: finished record found, reused" in again.stdout + again.stderr
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    edited = cli(*run, data_dir=data_dir)
    assert edited.returncode == 2, edited.stderr
    assert f"the code of plug-in method {NAME} ({MODULE}) changed" in edited.stderr and "tail__" not in edited.stderr


def test_a_long_task_whose_version_was_bumped_refuses_its_old_results(cli, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    run = ("--model", "random:tiny", "--methods", "unpruned", "--tasks", "passkey", "--limit", "2", "--mode",
           "disaggregated", "--set", "passkey.lengths=400", "--set", "passkey.depths=0.5", "--out", out)
    assert cli(*run, data_dir=data_dir).returncode == 0
    task = long_tasks.get("passkey")
    monkeypatch.setattr(task, "version", task.version + 1)
    bumped = cli(*run, data_dir=data_dir)
    assert bumped.returncode == 2 and f"made by version {task.version - 1} of the task" in bumped.stderr


def test_the_package_methods_and_tasks_run_no_plugin_code():
    assert all(plugin_code.plugin_code(methods.get(n)) == {} for n in methods.names())
    assert all(plugin_code.plugin_code(long_tasks.get(t)) == {} for t in long_tasks.names())


def test_a_latency_record_measured_by_an_edited_plugin_is_refused(probe, cli, tmp_path):
    out = tmp_path / "lat"
    run = ("latency", "--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--prompt-tokens", "16",
           "--decode-tokens", "2", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--out", out, "-q")
    assert cli(*run).returncode == 0
    assert json.loads((out / f"{NAME}__disaggregated.json").read_text())["extra"]["plugin_code"] == \
        plugin_code.plugin_code(methods.get(NAME))
    assert cli(*run).returncode == 0  # unchanged: reused
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    edited = cli(*run)
    assert edited.returncode == 2 and "measured with other code of a plug-in method" in edited.stderr  # before loading
    assert f"{NAME}__disaggregated.json ({MODULE} changed since)" in edited.stderr


def test_the_digest_covers_a_plugins_helper_modules_whichever_modules_are_named(tmp_path, monkeypatch):
    """A plug-in whose base class lives in a helper module of its own: naming the helper in HARNESS_PLUGINS too, or
    not, gave other digests (a false refusal), and edits to an unnamed helper went unseen."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pd_harness_test_helper_base.py").write_text(textwrap.dedent('''
        from methods.depth.tail import Tail


        class Base(Tail):
            summary = "a helper's base class (test)"
    '''))
    (tmp_path / "pd_harness_test_helper_user.py").write_text(
        _tail_plugin("helper_user", "from pd_harness_test_helper_base import Base", base="Base"))
    try:
        methods.load_plugins("pd_harness_test_helper_user")
        alone = plugin_code.plugin_code(methods.get("helper_user"))
        assert sorted(alone) == ["pd_harness_test_helper_base", "pd_harness_test_helper_user"]
        methods.load_plugins("pd_harness_test_helper_base,pd_harness_test_helper_user")
        assert plugin_code.plugin_code(methods.get("helper_user")) == alone
    finally:
        registry.unregister("helper_user")
        for m in ("pd_harness_test_helper_base", "pd_harness_test_helper_user"):
            sys.modules.pop(m, None)
            plugin_code._ROOTS.discard(m)


def _ranked_plugin(imports: str, name: str, order: str, in_rank: str = "") -> str:
    """A ranked plug-in module (or notebook cell): after the statements `imports`, method `name` removes blocks in the
    order the expression `order` gives (after the statement `in_rank`, e.g. a lazy import, inside `_rank`)."""
    return imports + textwrap.dedent(f'''
        from methods.depth.ranked import RankedDepthMethod, Ranking
        from methods.depth.tail import Tail
        from methods.registry import register


        @register
        class Ordered(RankedDepthMethod):
            name = "{name}"
            summary = "blocks in a helper's order (test)"
            needs_calibration = False
            Config = Tail.Config

            def _rank(self, model, calib, k, eligible):
                {in_rank}
                return Ranking({order}, {{}})
    ''')


def test_a_rankings_caches_follow_the_code_of_a_plugins_helper_module(tmp_path, monkeypatch, tiny):
    """The in-process and on-disk ranking caches were keyed by the method's own module only: after an edit of the
    helper module that orders the blocks, a new --out got the old ranking under the new code's digest."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    helper = tmp_path / "pd_harness_test_order.py"
    helper.write_text("def order(eligible):\n    return sorted(eligible, reverse=True)\n")
    (tmp_path / "pd_harness_test_ordered.py").write_text(
        _ranked_plugin("import pd_harness_test_order", "ordered_by_helper", "pd_harness_test_order.order(eligible)"))
    try:
        methods.load_plugins("pd_harness_test_ordered")
        cls = methods.get("ordered_by_helper")
        before = plugin_code.plugin_code(cls())
        assert sorted(before) == ["pd_harness_test_order", "pd_harness_test_ordered"]  # the helper is digested too
        assert cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated").decode_layers == (0, 1, 2)
        helper.write_text("def order(eligible):\n    return sorted(eligible)\n")
        importlib.reload(sys.modules["pd_harness_test_order"])
        assert plugin_code.changes(before, plugin_code.plugin_code(cls())) == ["pd_harness_test_order"]
        assert cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated").decode_layers == (1, 2, 3)
    finally:
        registry.unregister("ordered_by_helper")
        for m in ("pd_harness_test_order", "pd_harness_test_ordered"):
            sys.modules.pop(m, None)
            plugin_code._ROOTS.discard(m)


def test_a_resume_state_made_by_another_task_version_is_refused_too(cli, data_dir, tmp_path, monkeypatch):
    """An interrupted run resumed after the bump kept the old results, then the next rerun refused its record."""
    from harness.run import inputs
    from harness.store import records

    out = tmp_path / "runs"
    run = ("--model", "random:tiny", "--methods", "unpruned", "--tasks", "passkey", "--limit", "2", "--mode",
           "disaggregated", "--set", "passkey.lengths=400", "--set", "passkey.depths=0.5", "--out", out)
    assert cli(*run, data_dir=data_dir).returncode == 0
    record = json.loads((out / "unpruned__disaggregated.json").read_text())
    # the resume state an interruption after passkey leaves: the task's results as the record keeps them
    state = {"inputs": record["extra"]["inputs"], "tasks": {"passkey": {**record["lm_eval"]["tasks"]["passkey"],
             "items": record["extra"]["items"]["passkey"], "n_samples": record["n_samples"]["passkey"]}}}
    (out / "unpruned__disaggregated.json").unlink()
    (out / records.partial_filename("unpruned", "disaggregated")).write_text(json.dumps(state))
    task = long_tasks.get("passkey")
    monkeypatch.setattr(task, "version", task.version + 1)
    why = inputs.stale_results(state, False, type("Cfg", (), {"limit": 2})(), {"passkey": task.Config(lengths=(400,))})
    assert why == [f"passkey results made by version {task.version - 1} of the task, which is version {task.version} now"]


def test_plans_from_does_not_replay_a_plan_made_by_an_edited_plugin(probe, cli, data_dir, tmp_path):
    first = tmp_path / "first"
    run = ("--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--tasks", "arc_easy", "--limit", "2",
           "--mode", "disaggregated")
    assert cli(*run, "--out", first, data_dir=data_dir).returncode == 0
    same = cli(*run, "--plans-from", first, "--out", tmp_path / "same", data_dir=data_dir)
    assert same.returncode == 0 and f"{NAME}/disaggregated: plan reused from" in same.stdout + same.stderr
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    quality = cli(*run, "--plans-from", first, "--out", tmp_path / "edited", data_dir=data_dir)
    assert quality.returncode == 0 and "plan reused from" not in quality.stdout + quality.stderr  # planned afresh
    latency = cli("latency", "--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--plans-from", first,
                  "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1", "--out", tmp_path / "lat", "-q")
    assert latency.returncode == 2 and f"{NAME}'s plan was made by other code of its plug-in ({MODULE} changed" in \
        latency.stderr


def test_a_sweep_refuses_a_cells_resume_state_made_by_the_edited_plugin_before_any_cell(probe, cli, data_dir, tmp_path,
                                                                                         monkeypatch):
    """An interrupted sweep leaves its cells' work in <out>/.sweep/<cell>/: after an edit the cell failed (exit 1)
    once started, instead of the sweep refusing up front (exit 2) as it does for the run folder."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    run_out = tmp_path / "q"
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["{NAME}"]\ntasks = ["arc_easy"]\nlimit = 2\n'
                    f'mode = "disaggregated"\nset = ["{NAME}.k=1"]\nout = "{run_out}"\n')
    cell = run_out / ".sweep" / f"{NAME}__disaggregated"
    assert cli("--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--tasks", "arc_easy", "--limit", "2",
               "--mode", "disaggregated", "--out", cell, data_dir=data_dir).returncode == 0  # the cell's work
    expand(spec, None)  # unchanged: nothing refused
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    with pytest.raises(UsageError, match=rf"{cell} holds work made from other inputs.*the code of plug-in method {NAME}"):
        expand(spec, None)


def test_a_plugin_packages_other_modules_are_not_its_code_unless_it_names_them(tmp_path, monkeypatch):
    """`import pkg.helpers` binds `pkg`, whose attributes are every loaded submodule: loading an unrelated plug-in of
    the same package changed the digest (a false refusal)."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = tmp_path / "pd_harness_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def order(eligible):\n    return sorted(eligible)\n")
    (pkg / "other.py").write_text("X = 1\n")
    (pkg / "meth.py").write_text(_tail_plugin("pkg_probe", "import pd_harness_test_pkg.helpers",
                                              body="def order(self, eligible):\n"
                                                   "    return pd_harness_test_pkg.helpers.order(eligible)"))
    try:
        methods.load_plugins("pd_harness_test_pkg.meth")
        alone = plugin_code.plugin_code(methods.get("pkg_probe"))
        assert sorted(alone) == ["pd_harness_test_pkg.helpers", "pd_harness_test_pkg.meth"]
        importlib.import_module("pd_harness_test_pkg.other")
        assert plugin_code.plugin_code(methods.get("pkg_probe")) == alone
        assert not plugin_code.is_plugin("__main__")  # python -m harness runs harness/__main__.py as __main__
    finally:
        registry.unregister("pkg_probe")
        for m in [m for m in sys.modules if m.startswith("pd_harness_test_pkg")]:
            sys.modules.pop(m, None)
        plugin_code._ROOTS.discard("pd_harness_test_pkg")


def test_a_ranking_whose_plugin_imports_lazily_is_found_in_the_disk_cache(tmp_path, monkeypatch, tiny):
    """The disk key was computed before `_rank` and again after it, when a function-local import of a submodule of
    the plug-in's package had added it to the plug-in's code: the ranking was stored under a key no later run
    computes."""
    from methods.depth import ranked

    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = tmp_path / "pd_harness_test_lz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lazy.py").write_text("def order(eligible):\n    return sorted(eligible)\n")
    (pkg / "user.py").write_text(_ranked_plugin("import pd_harness_test_lz", "lazy_ranked",
                                                "pd_harness_test_lz.lazy.order(eligible)", "import pd_harness_test_lz.lazy"))
    try:
        methods.load_plugins("pd_harness_test_lz.user")
        cls = methods.get("lazy_ranked")
        first = cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated")
        ranked._SHARED.clear()  # as a new process, which has not imported the helper yet
        sys.modules.pop("pd_harness_test_lz.lazy", None)
        del sys.modules["pd_harness_test_lz"].lazy
        again = cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated")
        assert again.decode_layers == first.decode_layers and again.info["work"].get("reused_from_cache") is True
    finally:
        registry.unregister("lazy_ranked")
        ranked._SHARED.clear()
        for m in [m for m in sys.modules if m.startswith("pd_harness_test_lz")]:
            sys.modules.pop(m, None)
        plugin_code._ROOTS.discard("pd_harness_test_lz")


def test_an_export_names_its_plugin_code_and_refuses_a_plan_made_by_an_edited_plugin(probe, cli, data_dir, tmp_path):
    run = ("--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--tasks", "arc_easy", "--limit", "2",
           "--mode", "disaggregated", "--out", tmp_path / "q")
    assert cli(*run, data_dir=data_dir).returncode == 0
    record = tmp_path / "q" / f"{NAME}__disaggregated.json"
    assert cli("export", "--record", record, "--out", tmp_path / "first").returncode == 0
    assert json.loads((tmp_path / "first" / "harness_export.json").read_text())["plugin_code"] == \
        plugin_code.plugin_code(methods.get(NAME)) != {}  # the export names the plug-in code it ran
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    r = cli("export", "--record", record, "--out", tmp_path / "export")
    assert r.returncode == 2 and f"made by other code of plug-in method {NAME} ({MODULE} changed since)" in r.stderr
    assert not (tmp_path / "export").exists()


def test_the_digest_reads_the_import_statements_not_what_happens_to_be_loaded(tmp_path, monkeypatch):
    """A loaded `pkg.a` matched the text `pkg.ab`; `from pkg import sub` was not followed; a helper package beside the
    plug-in counted only when HARNESS_PLUGINS named it."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    pkg, helper = tmp_path / "pd_harness_test_p2", tmp_path / "pd_harness_test_hp"
    for folder in (pkg, helper):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    for name in ("a", "ab", "sub"):
        (pkg / f"{name}.py").write_text(f"X = {name!r}\n")
    (helper / "ranking.py").write_text("def rank(xs):\n    return sorted(xs)\n")
    (pkg / "method.py").write_text(_tail_plugin("p2_probe", "import pd_harness_test_p2.ab\n"
                                                "from pd_harness_test_hp.ranking import rank\n"
                                                "from pd_harness_test_p2 import sub"))
    try:
        methods.load_plugins("pd_harness_test_p2.method")
        first = plugin_code.plugin_code(methods.get("p2_probe"))
        assert sorted(first) == ["pd_harness_test_hp.ranking", "pd_harness_test_p2", "pd_harness_test_p2.ab",
                                 "pd_harness_test_p2.method", "pd_harness_test_p2.sub"]
        importlib.import_module("pd_harness_test_p2.a")  # loaded by someone else: not this plug-in's code
        plugin_code.note_plugin("pd_harness_test_hp")  # the helper named in HARNESS_PLUGINS too
        assert plugin_code.plugin_code(methods.get("p2_probe")) == first
    finally:
        registry.unregister("p2_probe")
        for m in [m for m in sys.modules if m.startswith(("pd_harness_test_p2", "pd_harness_test_hp"))]:
            sys.modules.pop(m, None)
        plugin_code._ROOTS.difference_update({"pd_harness_test_p2", "pd_harness_test_hp"})


def test_a_spec_refuses_its_latency_records_of_an_edited_plugin_before_the_quality_run(probe, cli, data_dir, tmp_path):
    lat, q = tmp_path / "lat", tmp_path / "q"
    latency = {"model": "random:tiny", "methods": [NAME], "set": [f"{NAME}.k=1"], "prompt_tokens": [16],
               "decode_tokens": 2, "batch_size": [1], "warmup": 0, "repeats": 1, "out": str(lat)}
    assert cli("latency", "--model", "random:tiny", "--methods", NAME, "--set", f"{NAME}.k=1", "--prompt-tokens", "16",
               "--decode-tokens", "2", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--out", lat,
               "-q").returncode == 0
    probe(SOURCE.replace("tail, as a plug-in", "tail, as an edited plug-in"))
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["{NAME}"]\ntasks = ["arc_easy"]\nlimit = 2\n'
                    f'mode = "disaggregated"\nset = ["{NAME}.k=1"]\nout = "{q}"\n\n[latency]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in latency.items()))
    r = cli("--config", spec, "-q", data_dir=data_dir)
    assert r.returncode == 2 and "latency records measured with other code of a plug-in method" in r.stderr, r.stderr
    assert not q.exists() or not list(q.glob("*.json"))  # refused before the quality run


def _notebook_cell(reverse: bool) -> str:
    """A notebook cell defining ranked method `in_cell`, whose order comes from a helper function of the cell reading a
    constant of the notebook (`REVERSE`)."""
    helper = f"\n\nREVERSE = {reverse}\n\n\ndef order(eligible):\n    return sorted(eligible, reverse=REVERSE)\n"
    return _ranked_plugin(helper, "in_cell", "order(eligible)")


def _run_cell(source: str, filename: str):
    """Run `source` as a notebook runs a cell: in `__main__`, whose module has no file in a notebook."""
    exec(compile(source, filename, "exec"), {"__name__": "__main__"})  # noqa: S102 - the test's own text
    return methods.get("in_cell")


def test_a_method_defined_in_a_notebook_has_its_code_digested(tiny, monkeypatch):
    """A method defined in `__main__` (a notebook) kept no code digest: after an edit of its cell, a rerun into the same
    out reused the old code's records; a ranked one crashed reading `__main__.__file__`, which a notebook lacks."""
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a notebook's: no __file__
    try:
        cls = _run_cell(_notebook_cell(True), "/tmp/ipykernel_1/1.py")
        before = plugin_code.plugin_code(cls())
        assert sorted(before) == ["__main__.Ordered", "__main__.order"]  # the helper in its cell too
        assert cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated").decode_layers == (0, 1, 2)
        # the same cell run again (a new file name, a line added above): the same digest
        cls = _run_cell("\n" + _notebook_cell(True), "/tmp/ipykernel_1/2.py")
        assert plugin_code.plugin_code(cls()) == before
        cls = _run_cell(_notebook_cell(False), "/tmp/ipykernel_1/3.py")  # the helper's constant edited
        assert plugin_code.changes(before, plugin_code.plugin_code(cls())) == ["__main__.order"]
        assert cls(cls.Config(k=1)).make_plan(tiny.model, None, "disaggregated").decode_layers == (1, 2, 3)
    finally:
        registry.unregister("in_cell")


def test_a_plugin_file_edited_but_not_reloaded_is_not_taken_for_the_code_that_runs(probe, tmp_path):
    """A notebook's plug-in edited on disk without a reload still runs its old code, but its records took the new
    file's digest: a fresh kernel running the new code then reused the old code's records as its own."""
    loaded = plugin_code.plugin_code(methods.get(NAME))
    (tmp_path / f"{MODULE}.py").write_text(SOURCE.replace("tail, as a plug-in", "tail, edited on disk"))
    assert plugin_code.plugin_code(methods.get(NAME)) == loaded  # the code that runs is still the loaded one
    probe(SOURCE.replace("tail, as a plug-in", "tail, edited on disk"))  # imported again: the edited code runs
    assert plugin_code.changes(loaded, plugin_code.plugin_code(methods.get(NAME))) == [MODULE]


ATTRIBUTE_CELL = '''
from methods.depth.tail import Tail
from methods.registry import register


@register
class InCell(Tail):
    name = "in_cell"
    summary = "a method defined in a notebook cell that reads its options as attributes (test)"

    def describe(self):
        return f"keeps all but {self.config.k} blocks"
'''


def test_a_notebook_global_named_as_an_attribute_the_code_reads_is_not_its_code(monkeypatch):
    """`self.config.k` names `config` and `k` as attributes, not as globals: a notebook's `k = 2` (a loop variable,
    `for k in (2, 4): evaluate(...)`) or `config = ...` changed the method's digest, so a rerun of an unchanged
    method refused its own records as made by other code."""
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))

    def digest(**notebook_globals):
        exec(compile(ATTRIBUTE_CELL, "/tmp/ipykernel_1/1.py", "exec"), {"__name__": "__main__", **notebook_globals})  # noqa: S102
        try:
            return plugin_code.plugin_code(methods.get("in_cell")())
        finally:
            registry.unregister("in_cell")

    assert digest() == digest(k=2) == digest(k=4, config="smollm2") != {}


def test_registering_a_plugin_does_not_import_what_its_functions_import_lazily(tmp_path, monkeypatch):
    """A method registering digests its module as loaded, reading the imports of its source: `from heavy import kernel`
    inside a function (an optional accelerator) made that lookup import `heavy` as the plug-in loaded, so every command
    paid for it, and one failing at import (no CUDA driver) failed the plug-in's load although its method never ran."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pd_harness_test_heavy.py").write_text("raise RuntimeError('no CUDA driver found')\n")
    body = "def _fast_path(self):\n    from pd_harness_test_heavy import kernel\n    return kernel\n"
    (tmp_path / "pd_harness_test_lazy_dep.py").write_text(_tail_plugin("lazy_dep", "", body=body))
    try:
        methods.load_plugins("pd_harness_test_lazy_dep")
        assert "pd_harness_test_heavy" not in sys.modules
        assert "pd_harness_test_heavy" in plugin_code.plugin_code(methods.get("lazy_dep"))  # its source still digested
    finally:
        if registry.registered("lazy_dep"):
            registry.unregister("lazy_dep")
        for m in ("pd_harness_test_lazy_dep", "pd_harness_test_heavy"):
            sys.modules.pop(m, None)
        plugin_code._ROOTS.discard("pd_harness_test_lazy_dep")


def test_a_notebook_class_digest_does_not_take_the_order_of_its_static_attributes(monkeypatch):
    """Python 3.13 adds `__static_attributes__` (the names its methods assign on self), a tuple whose order followed the
    string hash seed in 3.13.0 (CPython gh-124442): the same cell digested differently in each process. It is derived
    from the methods' code, which the digest covers; here the two orders are set by hand, as two 3.13.0 kernels did."""
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))

    def digest(order):
        cls = type("InCell", (), {"__module__": "__main__", "__static_attributes__": order, "k": 1})
        return plugin_code.main_code([cls])

    assert digest(("alpha", "beta")) == digest(("beta", "alpha"))


CONSTANTS_CELL = '''
from methods.depth.tail import Tail
from methods.registry import register

KEEP = {keep}
SKIP = {skip}


@register
class InCell(Tail):
    name = "in_cell"
    summary = "a method defined in a notebook cell that reads list and set constants of the notebook (test)"

    def describe(self):
        return [i for i in KEEP if i not in SKIP]
'''


def test_a_notebook_methods_list_and_set_constants_are_part_of_its_digest(monkeypatch, tmp_path):
    """Only str, number and tuple globals counted: a notebook's `KEEP = [0, 1]` edited to `[5, 6]` left the digest as
    it was, so the old code's records were reused; a set's digest must not follow the string hash seed."""
    import subprocess
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))

    def digest(keep, skip):
        exec(compile(CONSTANTS_CELL.format(keep=keep, skip=skip), "/tmp/ipykernel_1/1.py", "exec"),  # noqa: S102
             {"__name__": "__main__"})
        try:
            return plugin_code.plugin_code(methods.get("in_cell")())
        finally:
            registry.unregister("in_cell")

    assert digest("[0, 1]", "{'a'}") != digest("[5, 6]", "{'a'}") != digest("[5, 6]", "{'a', 'b'}")
    script = tmp_path / "nb.py"
    script.write_text(CONSTANTS_CELL.format(keep="[0, 1]", skip="{'alpha', 'beta', 'gamma', 'delta'}")
                      + "\nimport methods\nfrom methods import plugin_code\nprint(plugin_code.plugin_code(methods.get('in_cell')()))\n")
    seen = {subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(seen) == 1, seen


def test_a_notebook_class_holding_a_namedtuple_or_a_list_holding_itself_is_digested(monkeypatch):
    """The digest rebuilt every tuple as `type(value)(items)` to sort the sets inside: a namedtuple (a notebook's
    `DEFAULTS = Defaults(k=2, tau=0.5)` as a class attribute) raised TypeError, and a list holding itself recursed
    without end, where the digest before took their repr."""
    import collections
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    defaults = collections.namedtuple("Defaults", "k tau")
    loop: list = [1]
    loop.append(loop)

    def digest(k):
        return plugin_code.main_code([type("InCell", (), {"__module__": "__main__", "DEFAULTS": defaults(k, 0.5),
                                                           "LOOP": loop})])

    assert digest(2) == digest(2) != digest(3)


POLICY, POLICY_MODULE, USER, USER_MODULE = "code_probe_kv", "pd_harness_test_policy_code", "code_probe_user", \
    "pd_harness_test_policy_user"
POLICY_SOURCE = textwrap.dedent(f'''
    """`{POLICY}`: the most recent positions, as a plug-in KV policy (test)."""
    from dataclasses import dataclass

    from harness.pd.kv import register_policy
    from harness.pd.kv.base import TokenSelection
    from harness.pd.kv_select import streaming_keep


    @register_policy
    @dataclass(frozen=True)
    class Recent(TokenSelection):
        """Keeps the most recent positions.

        - `budget`: the `KVBudget`.
        """
        name = "{POLICY}"
        method_name = "{POLICY}_method"
        method_summary = "recent positions (test)"

        def keep(self, layer, positions, lengths, k, observed):
            return streaming_keep(positions, lengths, k, 0)
''')
USER_SOURCE = textwrap.dedent(f'''
    """`{USER}`: every block, the plug-in policy `{POLICY}` named by its kind (test); it does not import the policy."""
    from dataclasses import dataclass

    from harness.pd import arch
    from harness.pd.kv import KVBudget, KVPolicy
    from harness.pd.plan import PruningPlan
    from methods.base import Method, Options
    from methods.registry import register


    @register
    class User(Method):
        name = "{USER}"
        summary = "every block, {POLICY} at half the positions (test)"

        @dataclass(frozen=True)
        class Config(Options):
            ratio: float = 0.5

        def plan(self, model, calib, mode):
            n = arch.n_layers(model)
            if mode == "unified":
                return PruningPlan.dense(self.name, n)
            every = tuple(range(n))
            return PruningPlan(self.name, n, every, every,
                               kv_policy=KVPolicy(kind="{POLICY}", budget=KVBudget(ratio=self.config.ratio)))
''')


@pytest.fixture
def policy_probe(tmp_path, monkeypatch):
    """The plug-in policy and the plug-in method naming it by kind, loaded from `tmp_path`; `policy_probe(source)`
    rewrites and reloads the policy's module alone, as a new process would load the edited file."""
    from harness.pd import kv

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_SOURCE)

    def forget() -> None:
        for name in (f"{POLICY}_method", USER):
            if registry.registered(name):
                registry.unregister(name)
        kv._POLICIES.pop(POLICY, None)
        for module in (POLICY_MODULE, USER_MODULE):
            sys.modules.pop(module, None)

    def load(source: str = POLICY_SOURCE) -> None:
        (tmp_path / f"{POLICY_MODULE}.py").write_text(source)
        forget()
        methods.load_plugins(f"{POLICY_MODULE},{USER_MODULE}")

    load()
    yield load
    forget()
    plugin_code._ROOTS.difference_update({POLICY_MODULE, USER_MODULE})


def test_an_edited_plugin_kv_policy_that_a_plugin_method_names_by_kind_refuses_its_records(policy_probe, cli, data_dir,
                                                                                             tmp_path):
    """A plug-in method naming a plug-in policy by kind (`KVPolicy(kind=...)`, as docs/kv_policies.md shows) holds no
    reference to its class: the method's code digest missed the policy, and after an edit of the policy alone the
    quality run, latency and `export --record` all reused what its older code made. Each record now keeps the
    policy's code with the method's, and each of them refuses the old work (exit 2), naming the policy's module."""
    run = ("--model", "random:tiny", "--methods", USER, "--tasks", "arc_easy", "--limit", "2", "--mode", "disaggregated",
           "--out", tmp_path / "q")
    latency = ("latency", "--model", "random:tiny", "--methods", USER, "--prompt-tokens", "16", "--decode-tokens", "2",
               "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--out", tmp_path / "lat", "-q")
    assert cli(*run, data_dir=data_dir).returncode == 0 and cli(*latency).returncode == 0
    record = tmp_path / "q" / f"{USER}__disaggregated.json"
    assert list(json.loads(record.read_text())["extra"]["inputs"]["code"]["methods"][USER]) == [POLICY_MODULE, USER_MODULE]
    assert list(json.loads((tmp_path / "lat" / record.name).read_text())["extra"]["plugin_code"]) == \
        [POLICY_MODULE, USER_MODULE]
    again = cli(*run, data_dir=data_dir)
    assert again.returncode == 0 and f"{USER}/disaggregated: finished record found, reused" in again.stdout + again.stderr
    assert cli(*latency).returncode == 0  # unchanged: reused
    legacy = json.loads(record.read_text())  # as a record made before policies were digested: compared as it was
    del legacy["extra"]["inputs"]["code"]["methods"][USER][POLICY_MODULE]
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / record.name).write_text(json.dumps(legacy))

    policy_probe(POLICY_SOURCE.replace("recent positions (test)", "recent positions (edited test)"))
    edited = cli(*run, data_dir=data_dir)
    assert edited.returncode == 2 and f"the code of plug-in method {USER} ({POLICY_MODULE}) changed" in edited.stderr
    older = cli(*run[:-1], tmp_path / "legacy", data_dir=data_dir)
    assert older.returncode == 0 and "finished record found, reused" in older.stdout + older.stderr, older.stderr
    lat = cli(*latency)
    assert lat.returncode == 2 and f"{record.name} ({POLICY_MODULE} changed since)" in lat.stderr, lat.stderr
    exported = cli("export", "--record", record, "--out", tmp_path / "export")
    assert exported.returncode == 2 and f"({POLICY_MODULE} changed since)" in exported.stderr
