"""Broken or clashing plug-ins are bad input (exit 2 naming the module and what is wrong), never a
traceback in every command nor a built-in silently replaced; the package's own catalogue ignores
plug-ins; a KV policy must keep exactly its budget."""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

import methods
from harness.errors import PluginContractError, UsageError
from harness.pd import kv
from harness.quality import long_tasks
from methods import registry

TASK = '''
from dataclasses import dataclass
from harness.quality.long_tasks import register_task
from harness.quality.long_tasks.base import LongTask
from harness.store.task_names import TaskPresentation


@register_task
class {cls}(LongTask):
    name = "{name}"

    @dataclass(frozen=True)
    class Config:
        n: int = 1

    presentation = TaskPresentation(title="X", setting_prefix="x_L", primary_metric="x")

    def evaluate(self, *a, **k):
        return {{"scores": {{"x": {{"value": 42.0, "stderr": None}}}}, "n_samples": 1, "kv_by": {{}}, "details": {{}}}}
'''
KV_POLICY = '''
from dataclasses import dataclass

import torch

from harness.pd.kv import register_policy
from harness.pd.kv.base import TokenSelection


@register_policy
@dataclass(frozen=True)
class {cls}(TokenSelection):
    """Test policy."""

    name = "{name}"
    method_name = "{method}"
    method_summary = "test plug-in"

    def keep(self, layer, positions, lengths, k, observed):
        return {keep}
'''
PLUGINS = {
    "raises": 'raise RuntimeError("boom at import")\n',
    # found, but an import inside it fails: not "cannot be imported ... add their folder to PYTHONPATH"
    "needs_dep": '"""A plug-in needing a library that is not installed."""\nimport pd_harness_not_installed_xyz  # noqa\n',
    "misspelt_import": "from methods.base import Metod  # noqa\n",
    "syntax": "def (:\n",
    "takes_shortgpt": textwrap.dedent('''
        from methods.base import Method
        from methods.registry import register


        @register
        class Mine(Method):
            name = "shortgpt"

            def plan(self, model, calib, mode):
                raise NotImplementedError
    '''),
    "plain_config": textwrap.dedent('''
        from methods.base import Method
        from methods.registry import register


        @register
        class Plain(Method):
            name = "plain_config_method"

            class Config:
                k = 3

            def plan(self, model, calib, mode):
                raise NotImplementedError
    '''),
    "no_default": textwrap.dedent('''
        from dataclasses import dataclass

        from methods.base import Method
        from methods.registry import register


        @register
        class NoDefault(Method):
            name = "no_default_method"

            @dataclass(frozen=True)
            class Config:
                k: int

            def plan(self, model, calib, mode):
                raise NotImplementedError
    '''),
    "not_subset": textwrap.dedent('''
        from dataclasses import dataclass

        from harness.pd.plan import PruningPlan
        from methods.base import Method, Options
        from methods.registry import register


        @register
        class NotSubset(Method):
            name = "not_subset"
            summary = "decode runs a layer prefill skipped (test)"

            @dataclass(frozen=True)
            class Config(Options):
                n_layers: int = 4

            def plan(self, model, calib, mode):
                n = self.config.n_layers  # 4: decode runs layer 3, which prefill skips; else a valid plan of n layers
                return PruningPlan(self.name, n, (0, 1, 2), (0, 1, 3) if n == 4 else (0, 1))
    '''),
    # a required method left out: accepted, then "Can't instantiate abstract class" (or an empty error) in every cell
    "no_plan": textwrap.dedent('''
        from methods.base import Method
        from methods.registry import register


        @register
        class NoPlan(Method):
            name = "no_plan_method"
    '''),
    "no_keep": KV_POLICY.format(cls="NoKeep", name="no_keep", method="no_keep_kv", keep="None").replace(
        "    def keep(self, layer, positions, lengths, k, observed):\n        return None\n", ""),
    "no_evaluate": TASK.format(cls="NoEvaluate", name="no_evaluate").split("    def evaluate")[0],
    "bare_assert": TASK.format(cls="BareAssert", name="bare_assert").split("    def evaluate")[0]
    + "    def evaluate(self, *a, **k):\n        assert False\n",
    "same_class_name_task": TASK.format(cls="Passkey", name="passkey"),
    "lm_eval_task_name": TASK.format(cls="Echo", name="arc_easy"),
    "alias_task_name": TASK.format(cls="Echo", name="long"),
    "shadow_policy": KV_POLICY.format(cls="Streaming", name="shadow_recent", method="shadow_recent_kv",
                                      keep="(positions >= 0) & (positions >= (lengths - k)[:, None])"),
    "over_keep": KV_POLICY.format(cls="OverKeep", name="over_keep", method="over_keep_kv", keep="positions >= 0"),
    # the last k columns by index, not by position: a shorter request's end is padding (position -1)
    "by_column": KV_POLICY.format(cls="ByColumn", name="by_column", method="by_column_kv",
                                  keep="torch.arange(positions.shape[1]).expand_as(positions) >= positions.shape[1] - k[:, None]"),
    "int_mask": KV_POLICY.format(cls="IntMask", name="int_mask", method="int_mask_kv",
                                 keep="((positions >= 0) & (positions >= (lengths - k)[:, None])).long()"),
    # names that are file names, --methods/--tasks items and --set scopes: 'ab/cd' wrote its record into a sub-folder
    # ab/, 'a b,c' could not be selected by --methods at all
    "slash_method": textwrap.dedent('''
        from methods.base import Method
        from methods.registry import register


        @register
        class Slash(Method):
            name = "ab/cd"

            def plan(self, model, calib, mode):
                raise NotImplementedError
    '''),
    "comma_policy": KV_POLICY.format(cls="Comma", name="a b,c", method="comma_kv", keep="positions >= 0"),
    "spaced_task": TASK.format(cls="Spaced", name="my task"),
}
WHAT = {  # what each broken plug-in's message must name
    "slash_method": "pd_harness_fault_slash_method.Slash: method name 'ab/cd' is not usable; a name is 1-64 letters",
    "comma_policy": "pd_harness_fault_comma_policy.Comma: KV policy name 'a b,c' is not usable",
    "spaced_task": "pd_harness_fault_spaced_task.Spaced: long-context task name 'my task' is not usable",
    "raises": "RuntimeError: boom at import .at .*pd_harness_fault_raises.py:1.; fix the plug-in",
    "needs_dep": "ModuleNotFoundError: No module named 'pd_harness_not_installed_xyz' .at .*pd_harness_fault_needs_dep.py:2.; "
                 "install what it imports, or fix the import in the plug-in",
    "misspelt_import": "ImportError: cannot import name 'Metod' from 'methods.base' .*pd_harness_fault_misspelt_import.py:1",
    "syntax": "SyntaxError",
    "takes_shortgpt": "method 'shortgpt' defined twice",
    "plain_config": "its Config must be a dataclass",
    "no_default": "method 'no_default_method': every Config option needs a default; k has none",
    "same_class_name_task": "long-context task 'passkey' is already registered by harness.quality.long_tasks.passkey",
    "lm_eval_task_name": "'arc_easy': the name is an lm-eval task with local data or a --tasks alias",
    "alias_task_name": "'long': the name is an lm-eval task with local data or a --tasks alias",
    "no_plan": "method 'no_plan_method': does not define plan .a method's plan.model, calib, mode. returns its PruningPlan",
    "no_keep": "KV policy 'no_keep': does not define keep",
    "no_evaluate": "long-context task 'no_evaluate': does not define evaluate.scorer, tokenizer, data_dir, options, limit",
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The modules above in `tmp_path` (module names `pd_harness_fault_<key>`); afterwards every registry and
    the module cache are as they were."""
    for key, text in PLUGINS.items():
        (tmp_path / f"pd_harness_fault_{key}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = dict(registry._METHODS), dict(kv._POLICIES), dict(long_tasks._REGISTRY)
    yield tmp_path
    for live, old in zip((registry._METHODS, kv._POLICIES, long_tasks._REGISTRY), saved):
        live.clear()
        live.update(old)
    for key in PLUGINS:
        sys.modules.pop(f"pd_harness_fault_{key}", None)


@pytest.mark.parametrize("key", sorted(WHAT))
def test_a_broken_or_clashing_plugin_is_refused_naming_it(plugins, key):
    builtin_passkey = long_tasks.get("passkey")
    with pytest.raises(UsageError, match=f"HARNESS_PLUGINS names 'pd_harness_fault_{key}', which failed to load: .*"
                                         + WHAT[key].replace("(", r"\(")):
        methods.load_plugins(f"pd_harness_fault_{key}")
    assert long_tasks.get("passkey") is builtin_passkey and methods.get("shortgpt").__module__ == "methods.depth.shortgpt"


def test_the_cli_exits_2_with_one_line_for_a_plugin_that_raises_even_for_help(plugins):
    env = {**os.environ, "HARNESS_PLUGINS": "pd_harness_fault_raises", "PYTHONPATH": f"{plugins}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "harness", "--help"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "pd_harness_fault_raises', which failed to load: RuntimeError: boom" in out.stderr


def test_an_entry_point_that_cannot_be_imported_is_bad_input(tmp_path, monkeypatch):
    dist = tmp_path / "pd_harness_fault_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pd-harness-fault-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pd_harness.methods]\nmine = pd_harness_fault_ep.missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(UsageError, match=r"the entry point mine = 'pd_harness_fault_ep.missing' \(group pd_harness.methods\), "
                                         "which cannot be imported"):
        methods.load_plugins("")


def test_a_plugin_policy_named_like_a_builtin_one_leaves_both_baselines_picklable(plugins):
    methods.load_plugins("pd_harness_fault_shadow_policy")
    for name in ("streamingllm", "shadow_recent_kv"):
        cls = methods.get(name)
        assert type(pickle.loads(pickle.dumps(cls()))) is cls, name  # by name: the sweep's cells are pickled
    assert methods.get("shadow_recent_kv").__name__ != methods.get("streamingllm").__name__


def test_the_catalogue_of_the_packages_methods_leaves_plugins_out(plugins):
    from methods import catalog

    before = [c.name for c in catalog.builtin()], catalog.help_text(builtin_only=True)
    methods.load_plugins("pd_harness_fault_shadow_policy")
    long_tasks.register_task(type("Echo", (long_tasks.get("passkey"),), {"name": "pd_fault_echo", "__module__": "x"}))
    assert "shadow_recent_kv" in methods.names() and "pd_fault_echo" in long_tasks.names()
    assert ([c.name for c in catalog.builtin()], catalog.help_text(builtin_only=True)) == before
    assert "pd_fault_echo" in catalog.help_text() and "shadow_recent_kv" in catalog.help_text()


def test_a_head_shared_policy_must_keep_exactly_its_budget(plugins, tiny):
    from harness.pd.engine import make_handoff
    from harness.pd.kv.base import KVBudget
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    methods.load_plugins("pd_harness_fault_over_keep")
    policy = kv.get_policy("over_keep")(budget=KVBudget(tokens=3))
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3), policy)
    out = Scorer(tiny.model, plan, "disaggregated", max_length=4096)._prefill([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7]])
    with pytest.raises(RuntimeError, match=r"over_keep policy: keep\(\) selected \[6, 5\] positions per request in "
                                           r"layer 0; it must select exactly its budget k = \[3, 3\]"):
        make_handoff(out.cache, plan, out.lengths)
    assert torch.equal(out.lengths, torch.tensor([6, 5]))


def test_latency_names_a_policy_that_breaks_its_budget_in_one_line(plugins, cli, tmp_path):
    """The engine's check of `keep()` left a traceback (exit 1) under `latency`, where a quality run failed the cell
    with the same message; then it stopped the run (exit 2). Now the other methods are measured and recorded, and the
    run ends with exit 2 (bad input: fix the plug-in) and one line naming the method and the policy."""
    methods.load_plugins("pd_harness_fault_over_keep")
    r = cli("latency", "--model", "random:tiny", "--methods", "over_keep_kv,unpruned", "--set", "over_keep_kv.base=tail",
            "--set", "over_keep_kv.base_options=k=1", "--set", "over_keep_kv.keep_tokens=3", "--prompt-tokens", "16",
            "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--out", tmp_path / "lat", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ("error: over_keep_kv: PluginContractError: over_keep policy: keep() selected [16] positions per request in "
            "layer 0; it must select exactly its budget k = [3] (pd_harness_fault_over_keep.OverKeep) (traceback in "
            f"{tmp_path / 'lat' / 'over_keep_kv__disaggregated.failed.json'})") in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.json")) == ["over_keep_kv__disaggregated.failed.json",
                                                                          "unpruned__disaggregated.json"]


def test_a_per_head_policy_must_keep_its_budget_in_every_head():
    from types import SimpleNamespace

    from harness.errors import PluginContractError
    from harness.pd.engine import _check_budget

    keep = torch.tensor([[[True, True, False], [True, True, True]]])  # head 1 keeps one too many
    with pytest.raises(PluginContractError, match=r"p policy: keep\(\) selected \[\[2, 3\]\] positions per request and "
                                                  r"KV head in layer 0; it must select exactly its budget k = \[2\]"):
        _check_budget(SimpleNamespace(kind="p"), 0, keep, torch.tensor([2]))
    _check_budget(SimpleNamespace(kind="p"), 0, keep[:, :1], torch.tensor([2]))


@pytest.mark.parametrize("name, says", [
    ("by_column", r"by_column policy: keep\(\) selected padding columns \(position -1\) in layer 0"),
    ("int_mask", r"int_mask policy: keep\(\) returned a torch.int64 tensor of shape \(2, 6\) in layer 0; it must "
                 r"return a bool mask"),
])
def test_a_head_shared_policy_must_select_real_positions_with_a_bool_mask(plugins, tiny, name, says):
    """Padding columns hold no KV of the request, yet their bytes were counted as sent (equal-length prompts, as in
    the contract tests, never show it)."""
    from harness.pd.engine import make_handoff
    from harness.pd.kv.base import KVBudget
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    methods.load_plugins(f"pd_harness_fault_{name}")
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3), kv.get_policy(name)(budget=KVBudget(tokens=3)))
    out = Scorer(tiny.model, plan, "disaggregated", max_length=4096)._prefill([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7]])
    with pytest.raises(RuntimeError, match=says):
        make_handoff(out.cache, plan, out.lengths)


def test_a_plan_that_is_not_a_pruning_plan_fails_naming_the_method(tiny):
    from methods.base import Method

    class NoPlan(Method):
        name = "no_plan"

        def plan(self, model, calib, mode):
            return None

    # a contract error (exit 2, "fix the plug-in"), no longer a TypeError (exit 1, "rerun to retry")
    with pytest.raises(PluginContractError, match=rf"no_plan.plan\(...\) \({__name__}\) returned None; it must return a "
                                                  r"PruningPlan \(PruningPlan\(self.name, arch.n_layers\(model\)"):
        NoPlan().make_plan(tiny.model, None, "disaggregated")
    assert methods.get("unpruned")().make_plan(tiny.model, None, "unified").n_layers == 4


def test_a_plugin_method_that_makes_an_invalid_plan_is_bad_input_in_run_latency_and_export(plugins, cli, tmp_path,
                                                                                            data_dir):
    """A plan against its rules (decode ⊆ prefill, a plan for another depth) made by a plug-in method ended a quality
    run and `latency` with exit 1 as if the harness had crashed, and `export` with a traceback. docs/running.md calls it
    bad input: now exit 2, one line naming the method, its module and the rule."""
    methods.load_plugins("pd_harness_fault_not_subset")
    says = ("not_subset.plan(...) (pd_harness_fault_not_subset) made an invalid plan: decode_layers must be a subset of "
            "prefill_layers")
    tiny = ("--model", "random:tiny", "--device", "cpu", "--methods", "not_subset")
    run = cli(*tiny, "--tasks", "arc_easy", "--limit", "2", "--mode", "disaggregated", "--out", tmp_path / "q",
              data_dir=data_dir)
    lat = cli("latency", *tiny, "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1",
              "--out", tmp_path / "lat", "-q")
    exp = cli("export", *tiny[:4], "--method", "not_subset", "--mode", "disaggregated", "--out", tmp_path / "e")
    for r in (run, lat, exp):
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (r.args, r.stderr[-1500:])
    deeper = cli(*tiny, "--set", "not_subset.n_layers=8", "--tasks", "arc_easy", "--limit", "2", "--mode",
                 "disaggregated", "--out", tmp_path / "q8", data_dir=data_dir)
    assert deeper.returncode == 2 and ("not_subset.plan(...) (pd_harness_fault_not_subset) returned a plan for 8 layers; "
                                       "the model has 4") in deeper.stderr, deeper.stderr[-1500:]


def test_a_validate_config_raising_value_error_is_bad_input_naming_the_method():
    """docs/adding.md asks for UsageError; a plug-in's ValueError from `validate_config` left a traceback (exit 1)."""
    from dataclasses import dataclass

    from methods.base import Method, Options

    class Picky(Method):
        name = "picky"

        @dataclass(frozen=True)
        class Config(Options):
            k: int = 1

        def validate_config(self, config):
            if config.k > 2:
                raise ValueError(f"k={config.k}: at most 2")

        def plan(self, model, calib, mode):
            raise NotImplementedError

    assert Picky().config.k == 1
    with pytest.raises(UsageError, match=r"^--set picky: k=3: at most 2$"):
        Picky(Picky.Config(k=3))


def test_a_cell_failing_with_an_error_without_a_message_names_its_type(plugins, cli, tmp_path, data_dir):
    """A plug-in task's bare `assert` (or `raise NotImplementedError`) failed every cell with an empty error line:
    `error: unpruned/disaggregated: ` named neither the error nor what raised it."""
    methods.load_plugins("pd_harness_fault_bare_assert")
    r = cli("--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--tasks", "bare_assert", "--mode",
            "disaggregated", "--out", tmp_path / "q", data_dir=data_dir)
    where = "in plug-in pd_harness_fault_bare_assert.BareAssert.evaluate"  # the code that raised it, too
    assert r.returncode == 1 and f"error: unpruned/disaggregated: AssertionError ({where})\n" in r.stderr, r.stderr[-1500:]
    assert f"unpruned/disaggregated: AssertionError ({where}; details: " in r.stdout


@pytest.mark.parametrize("name, info, says", [
    ("other", {}, r"odd_plan.plan\(...\) \(MODULE\) returned a plan named 'other'; name it 'odd_plan'"),
    ("odd_plan", {"where": object()}, r"odd_plan.plan\(...\) \(MODULE\) returned a plan that cannot be stored as JSON"),
    ("odd_plan", {1: "a", "b": 2}, r"odd_plan.plan\(...\) \(MODULE\) returned a plan that cannot be stored as JSON"),  # sorted keys
])
def test_a_plan_the_record_could_not_keep_fails_before_the_evaluation(tiny, name, info, says):
    """A plan named after another method, or with a non-JSON info, failed only when the record was written."""
    from harness.pd.plan import PruningPlan
    from methods.base import Method

    class OddPlan(Method):
        name = "odd_plan"

        def plan(self, model, calib, mode):
            return PruningPlan(name, 4, (0, 1, 2, 3), (0, 1, 2), info=info)

    with pytest.raises(PluginContractError, match=says.replace("MODULE", __name__)):  # exit 2, no longer a TypeError
        OddPlan().make_plan(tiny.model, None, "disaggregated")


@pytest.mark.parametrize("returns, says", [
    (lambda x: {"probe_ms": None}, "each value must be a finite number"),
    (lambda x: "fast", "returned a str; expected a dict"),
    (lambda x: {"other_ms": 1.0}, "each value's name must start with 'probe_ms'"),
    (lambda x: 1 / 0, "failed: ZeroDivisionError"),
])
def test_a_latency_figure_that_fails_is_named_before_anything_is_measured(returns, says, cli, tmp_path, monkeypatch):
    from harness.latency import figures

    monkeypatch.setitem(figures.FIGURES, "probe_ms", returns)
    r = cli("latency", "--model", "random:tiny", "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens", "2",
            "--batch-size", "1", "--out", tmp_path / "lat", "-q")
    assert r.returncode == 2 and "latency figure 'probe_ms'" in r.stderr and says in r.stderr, r.stderr
    assert not (tmp_path / "lat").exists()  # refused before the model loads


def test_a_plugin_task_named_like_a_method_stops_every_command(tmp_path):
    """`--set tail.k=1` would reach the task, not the method (or the other way round)."""
    (tmp_path / "pd_harness_test_task_tail.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        from harness.quality.long_tasks import register_task
        from harness.quality.long_tasks.passkey import Passkey


        @register_task
        class Tail(Passkey):
            name = "tail"
    '''))
    env = {**os.environ, "HARNESS_PLUGINS": "pd_harness_test_task_tail", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "harness", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "'tail' is both a method and a long-context task" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("field, says", [
    ("where: Path | None = None", "the types of its Config options cannot be read (NameError"),
    ("span: tuple[int, int] = (0, 1)", None),  # types --set cannot give, or gives its own way, still register
    ("layers: list[int] | None = None", None),
])
def test_a_plugin_config_whose_option_types_cannot_be_read_stops_every_command_named(tmp_path, field, says):
    """--help read the types with typing.get_type_hints: a NameError traceback (exit 1) in every command."""
    (tmp_path / "pd_harness_test_hints.py").write_text(textwrap.dedent(f'''
        from __future__ import annotations

        from dataclasses import dataclass
        from typing import TYPE_CHECKING

        from methods.depth.tail import Tail
        from methods.registry import register

        if TYPE_CHECKING:
            from pathlib import Path


        @register
        class Hinted(Tail):
            name = "hinted"

            @dataclass(frozen=True)
            class Config(Tail.Config):
                {field}
    '''))
    env = {**os.environ, "HARNESS_PLUGINS": "pd_harness_test_hints", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "harness", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "Traceback" not in r.stderr
    if says is None:
        assert r.returncode == 0 and "hinted" in r.stdout, r.stderr
    else:
        assert r.returncode == 2 and "method 'hinted'" in r.stderr and says in r.stderr, r.stderr


def test_a_per_head_mask_must_have_the_caches_kv_heads():
    from types import SimpleNamespace

    from harness.pd.engine import _checked

    pos = torch.tensor([[0, 1, 2], [0, 1, -1]])
    good = torch.ones(2, 4, 3, dtype=torch.bool) & (pos >= 0)[:, None, :]
    assert _checked(SimpleNamespace(kind="p"), 0, good, pos, heads=4) is good
    with pytest.raises(RuntimeError, match=r"p policy: keep\(\) returned a torch.bool tensor of shape \(2, 1, 3\) in "
                                           r"layer 0; it must return a bool mask \(requests, kv heads, prompt columns\) "
                                           r"= \(2, 4, 3\)"):
        _checked(SimpleNamespace(kind="p"), 0, good[:, :1], pos, heads=4)
