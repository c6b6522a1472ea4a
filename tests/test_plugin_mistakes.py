"""Mistakes a plug-in author makes that the harness let through as wrong numbers or as a traceback (exit 1) naming
nothing: each is refused with exit 2, naming the plug-in, what it did and what would be right."""

from __future__ import annotations

import pytest

from harness.errors import PluginContractError
from harness.latency import figures
from harness.latency.measure import Measurement, Workload


def _measurement() -> Measurement:
    return Measurement("t", Workload(8, 3, 1), "perf_counter_ns", ttft_ms=[2.0], handoff_ms=[0.1], itl_ms=[1.0, 1.2],
                       tpot_ms=[1.1], kv_bytes=4096, kv_bytes_paged=8192)


def test_a_plugin_figure_cannot_replace_a_value_of_the_packages_figures(monkeypatch):
    """`tpot` is a prefix of `tpot_ms_p50`, so its value passed the prefix rule and overwrote the measured TPOT."""
    def mine(x):
        return {"tpot_ms_p50": 0.001}

    monkeypatch.setitem(figures.FIGURES, "tpot", mine)
    values, failed = figures.compute_each(_measurement())
    assert values["tpot_ms"]["tpot_ms_p50"] == pytest.approx(1.1) and "tpot" not in values
    assert isinstance(failed["tpot"], PluginContractError)
    assert ("latency figure 'tpot' returned ['tpot_ms_p50'], which latency figure 'tpot_ms' "
            "(harness.latency.figures.tpot) returns already") in str(failed["tpot"])
    assert f"{__name__}.test_a_plugin_figure_cannot_replace_a_value_of_the_packages_figures.<locals>.mine" in str(failed["tpot"])


def test_a_latency_run_with_a_figure_that_takes_a_packaged_value_exits_2_before_measuring(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(figures.FIGURES, "ttft", lambda x: {"ttft_ms_p50": 0.0})
    r = cli("latency", "--model", "random:tiny", "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens", "2",
            "--batch-size", "1", "--out", tmp_path / "lat", "-q")
    assert r.returncode == 2 and "latency figure 'ttft' returned ['ttft_ms_p50']" in r.stderr, r.stderr
    assert not (tmp_path / "lat").exists()


GOOD = {"scores": {"x": {"value": 1.0, "stderr": None}}, "n_samples": 1, "kv_by": {}, "details": {}}


@pytest.mark.parametrize("returned, says", [
    (None, "returned a NoneType"),
    ({k: v for k, v in GOOD.items() if k != "scores"}, "returned a dict without scores as a dict"),
    ({k: v for k, v in GOOD.items() if k != "kv_by"}, "returned a dict without kv_by as a dict"),
    ({**GOOD, "n_samples": None}, "returned n_samples=None"),
    ({**GOOD, "scores": {"x": 0.5}}, "returned scores {'x': 0.5}"),
    ({**GOOD, "scores": {"x": {"value": "high", "stderr": None}}}, "returned scores {'x': {'value': 'high'"),
    ({**GOOD, "scores": {"y": {"value": 1.0, "stderr": None}}}, "returned no score 'x', its presentation's primary_metric"),
])
def test_a_long_task_result_in_another_layout_fails_naming_the_task_and_the_layout(returned, says):
    """A KeyError, a TypeError or JSON's error failed the cell (exit 1, "rerun to retry"), naming neither the task nor
    what it should return; a result without the primary metric was stored."""
    import dataclasses

    from harness.quality import long_tasks
    from harness.store.task_names import TaskPresentation

    @dataclasses.dataclass(frozen=True)
    class Options:
        n: int = 1

    class Odd(long_tasks.LongTask):
        name, Config = "pd_test_odd_result", Options
        presentation = TaskPresentation(title="X", setting_prefix="x_N", primary_metric="x", metric_format="decimal")

        def evaluate(self, *args, **kwargs):
            return returned

    long_tasks.register_task(Odd)
    try:
        with pytest.raises(PluginContractError) as e:
            long_tasks.evaluate("pd_test_odd_result", None, None, None, Options(), None)
        assert f"long-context task 'pd_test_odd_result' ({__name__}): evaluate() {says}" in str(e.value)
        assert '"n_samples": int, "kv_by": {setting: KV bytes (kv_delta)}' in str(e.value)
        Odd.evaluate = lambda self, *a, **k: GOOD
        assert long_tasks.evaluate("pd_test_odd_result", None, None, None, Options(), None)["scores"] == GOOD["scores"]
    finally:
        long_tasks.unregister_task("pd_test_odd_result")



@pytest.mark.parametrize("score, says", [({"value": float("nan"), "stderr": None}, "x.value=nan"),
                                         ({"value": 1.0, "stderr": float("inf")}, "x.stderr=inf")])
def test_a_long_task_result_that_is_not_finite_is_kept_and_said(score, says):
    """A NaN or infinite score was stored silently and surfaced only when `check` refused it. Kept (a diverged model
    gives them through the package's own pd_ppl, an infinite perplexity: a result, not a broken contract), but said
    at once, naming the task."""
    import dataclasses

    from harness.errors import HarnessWarning
    from harness.quality import long_tasks
    from harness.store.task_names import TaskPresentation

    class Diverged(long_tasks.LongTask):
        name, Config = "pd_test_nan_result", dataclasses.make_dataclass("O", [("n", int, 1)], frozen=True)
        presentation = TaskPresentation(title="X", setting_prefix="x_N", primary_metric="x")

        def evaluate(self, *args, **kwargs):
            return {**GOOD, "scores": {"x": score}}

    long_tasks.register_task(Diverged)
    try:
        with pytest.warns(HarnessWarning, match=f"long-context task 'pd_test_nan_result' \\({__name__}\\): evaluate\\(\\) "
                                                f"returned {says}, not finite numbers; the record keeps them, `check` "
                                                "refuses them as references"):
            assert long_tasks.evaluate("pd_test_nan_result", None, None, None, Diverged.Config(), None)["scores"]["x"] is score
    finally:
        long_tasks.unregister_task("pd_test_nan_result")

SIGNATURES = {  # a plug-in of each kind whose called function takes other arguments than the harness gives
    "method": ("from dataclasses import dataclass\nfrom methods.base import Method, Options\nfrom methods.registry import "
               "register\n\n\n@register\nclass M(Method):\n    name = 'pd_sig_method'\n\n    @dataclass(frozen=True)\n"
               "    class Config(Options):\n        pass\n\n    def plan(self, model, mode):\n        pass\n",
               "method 'pd_sig_method' (pd_harness_sig_method.M): plan(self, model, mode) cannot be called as "
               "plan(self, model, calib, mode)"),
    "policy": ("from dataclasses import dataclass\nfrom harness.pd.kv import register_policy\nfrom harness.pd.kv.base "
               "import TokenSelection\n\n\n@register_policy\n@dataclass(frozen=True)\nclass P(TokenSelection):\n"
               "    name = 'pd_sig_policy'\n\n    def keep(self, positions, lengths, k):\n        pass\n",
               "KV policy 'pd_sig_policy' (pd_harness_sig_policy.P): keep(self, positions, lengths, k) cannot be called as "
               "keep(self, layer, positions, lengths, k, observed)"),
    "task": ("from dataclasses import dataclass\nfrom harness.quality.long_tasks import register_task\nfrom "
             "harness.quality.long_tasks.base import LongTask\nfrom harness.store.task_names import TaskPresentation\n\n\n"
             "@dataclass(frozen=True)\nclass C:\n    n: int = 1\n\n\n@register_task\nclass T(LongTask):\n"
             "    name, Config = 'pd_sig_task', C\n    presentation = TaskPresentation(title='X', setting_prefix='x_N', "
             "primary_metric='x')\n\n    def evaluate(self, scorer, tokenizer, options, limit):\n        pass\n",
             "long-context task 'pd_sig_task' (pd_harness_sig_task.T): evaluate(self, scorer, tokenizer, options, limit) "
             "cannot be called as evaluate(self, scorer, tokenizer, data_dir, options, limit, progress)"),
    "local": ("from harness.quality.local_tasks import register_task\nfrom harness.quality.local_tasks.base import "
              "LocalTask\n\n\n@register_task\nclass L(LocalTask):\n    name, files, splits = 'pd_sig_local', ('x.jsonl',), "
              "('test',)\n    upstream = 'sciq/sciq.yaml'\n\n    @classmethod\n    def load(cls, data_dir):\n        pass\n",
              "lm-eval task on local data 'pd_sig_local' (pd_harness_sig_local.L): load(data_dir) cannot be called as "
              "load(cls, data_dir, subtask)"),
    "figure": ("from harness.latency.figures import figure\n\n\n@figure('pd_sig_ms')\ndef probe():\n    return {}\n",
               "latency figure 'pd_sig_ms' (pd_harness_sig_figure.probe): probe() cannot be called as probe(inputs)"),
}


@pytest.fixture
def registries(tmp_path, monkeypatch):
    """`tmp_path` on sys.path; afterwards every plug-in registry and the module cache are as they were."""
    import sys

    from harness.pd import kv
    from harness.quality import local_tasks, long_tasks
    from methods import registry

    monkeypatch.syspath_prepend(str(tmp_path))
    live = (registry._METHODS, kv._POLICIES, long_tasks._REGISTRY, local_tasks._REGISTRY, figures.FIGURES)
    saved = [dict(r) for r in live]
    loaded = set(sys.modules)
    yield tmp_path
    for r, old in zip(live, saved):
        r.clear()
        r.update(old)
    for name in set(sys.modules) - loaded:  # the plug-in modules the test imported from tmp_path
        if name.startswith("pd_harness_"):
            sys.modules.pop(name)


@pytest.mark.parametrize("kind", sorted(SIGNATURES))
def test_a_plugin_whose_function_takes_other_arguments_is_refused_when_it_loads(registries, kind):
    """`plan(self, model, mode)` was registered, then failed every cell after the model loaded with "takes 3 positional
    arguments but 4 were given" (exit 1, "rerun to retry"), naming neither the plug-in nor the signature it needs."""
    import methods
    from harness.errors import UsageError

    text, says = SIGNATURES[kind]
    (registries / f"pd_harness_sig_{kind}.py").write_text(text)
    with pytest.raises(UsageError) as e:
        methods.load_plugins(f"pd_harness_sig_{kind}")
    assert says in str(e.value) and "give it that signature" in str(e.value), str(e.value)
    fixed = text.replace("(self, model, mode)", "(self, model, calib, mode)").replace(
        "keep(self, positions", "keep(self, layer, positions").replace("lengths, k)", "lengths, k, observed)").replace(
        "tokenizer, options", "tokenizer, data_dir, options").replace("limit):", "limit, progress=False):").replace(
        "load(cls, data_dir)", "load(cls, data_dir, subtask=None)").replace("def probe()", "def probe(x)")
    (registries / f"pd_harness_sig_{kind}.py").write_text(fixed.replace("pd_sig_", "pd_sig2_"))
    import sys
    sys.modules.pop(f"pd_harness_sig_{kind}", None)
    methods.load_plugins(f"pd_harness_sig_{kind}")  # the signature the harness calls: loads


ROW = {"support": "s", "question": "q", "distractor1": "a", "distractor2": "b", "distractor3": "c", "correct_answer": "d"}


@pytest.mark.parametrize("returned, says", [
    ([ROW], "load returned a list;"),
    (None, "load returned a NoneType;"),
    ({"validation": [ROW]}, "load returned splits ['validation'], without ['test'] (its `splits`);"),
    ({"test": ROW}, "load returned split 'test' as a dict not of row dicts;"),
])
def test_a_local_task_loader_returning_another_layout_is_refused_before_the_model_loads(registries, cli, returned, says):
    """lm-eval failed in every cell, after the model loaded, with an AttributeError or a KeyError naming neither the
    task nor its loader (exit 1, "rerun to retry")."""
    from harness.quality import local_tasks, tasks
    from harness.quality.local_tasks.base import LocalTask

    (registries / "rows.jsonl").write_text("{}\n")

    class Odd(LocalTask):
        name, files, splits, upstream = "pd_odd_rows", (str(registries / "rows.jsonl"),), ("test",), "sciq/sciq.yaml"

        @classmethod
        def load(cls, data_dir, subtask=None):
            return returned

    local_tasks.register_task(Odd)
    with pytest.raises(PluginContractError) as e:
        tasks.local_rows("pd_odd_rows", registries)
    assert f"task pd_odd_rows: {__name__}.{Odd.__qualname__}.{says} it must return {{split: [row dict, ...]}} with " \
           "each of its splits ['test']" in str(e.value), str(e.value)
    r = cli("--model", "random:tiny", "--methods", "unpruned", "--tasks", "pd_odd_rows", "--limit", "2", "--data-dir",
            registries, "--out", registries / "out", "-q")
    assert r.returncode == 2 and says in r.stderr and "unpruned/disaggregated" not in r.stderr, r.stderr
    Odd.load = classmethod(lambda cls, data_dir, subtask=None: {"test": [ROW]})
    assert tasks.local_rows("pd_odd_rows", registries) == {"test": [ROW]}



def test_a_local_task_loader_that_raises_fails_once_naming_it_before_the_model_loads(registries, cli):
    """The loader's own error (exit 1: the plug-in's failure, as an evaluate() that raises) failed every cell after
    the model loaded, naming neither the task nor its loader; the same rows each time, so no cell could pass."""
    from harness.quality import local_tasks
    from harness.quality.local_tasks.base import LocalTask

    (registries / "rows.jsonl").write_text("{}\n")

    class Boom(LocalTask):
        name, files, splits, upstream = "pd_boom_rows", (str(registries / "rows.jsonl"),), ("test",), "sciq/sciq.yaml"

        @classmethod
        def load(cls, data_dir, subtask=None):
            raise RuntimeError("loader exploded")

    local_tasks.register_task(Boom)
    r = cli("--model", "random:tiny", "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks", "pd_boom_rows",
            "--limit", "2", "--data-dir", registries, "--out", registries / "out", "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (f"error: task pd_boom_rows: its loader failed: RuntimeError: loader exploded (in plug-in {__name__}."
            f"{Boom.__qualname__}.load, {__file__}:") in r.stderr, r.stderr
    assert "/disaggregated" not in r.stderr + r.stdout and not list((registries / "out").glob("*.failed.json"))

ODD_PLAN = ("from harness.pd.plan import PruningPlan\nfrom methods.base import Method\nfrom methods.registry import register"
            "\n\n\n@register\nclass Odd(Method):\n    name = 'pd_odd_plan'\n\n    def plan(self, model, calib, mode):\n"
            "        return RETURNS\n")
RETURNS = {  # what plan() returns -> what the line says after "pd_odd_plan.plan(...) (pd_harness_odd_plan) "
    "None": "returned None; it must return a PruningPlan (PruningPlan(self.name, arch.n_layers(model), ",
    "{'prefill': [0, 1]}": "returned a dict ({'prefill': [0, 1]}); it must return a PruningPlan",
    "PruningPlan('tail', 4, (0, 1, 2, 3), (0, 1, 2))": "returned a plan named 'tail'; name it 'pd_odd_plan'",
    "PruningPlan(self.name, 4, (0, 1, 2, 3), (0, 1, 2), info={'at': object()})": "returned a plan that cannot be "
    "stored as JSON (Object of type object is not JSON serializable); it must keep numbers, strings, lists and dicts",
}


@pytest.mark.parametrize("returns", sorted(RETURNS))
def test_a_plan_that_is_not_a_pruning_plan_is_refused_naming_the_module(registries, cli, data_dir, returns):
    """A TypeError failed the quality cell and the latency method (exit 1, "rerun to retry"), and the quality line
    named no module: a plan() that returns the wrong thing broke its contract, as one that makes an invalid plan."""
    import methods

    (registries / "pd_harness_odd_plan.py").write_text(ODD_PLAN.replace("RETURNS", returns))
    methods.load_plugins("pd_harness_odd_plan")
    tiny = ("--model", "random:tiny", "--device", "cpu", "--methods", "pd_odd_plan", "-q")
    run = cli(*tiny, "--tasks", "arc_easy", "--limit", "2", "--mode", "disaggregated", "--out", registries / "q",
              data_dir=data_dir)
    lat = cli("latency", *tiny, "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1",
              "--out", registries / "lat")
    for r in (run, lat):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert f"pd_odd_plan.plan(...) (pd_harness_odd_plan) {RETURNS[returns]}" in r.stderr, r.stderr[-1500:]


def test_a_plan_with_two_layer_sets_for_unified_mode_is_refused_naming_the_module(registries, cli, data_dir):
    """It failed the cell with a ValueError naming the method alone (exit 1, "rerun to retry")."""
    import methods

    (registries / "pd_harness_odd_plan.py").write_text(ODD_PLAN.replace("RETURNS", "PruningPlan(self.name, 4, (0, 1, 2, 3), (0, 1, 2))"))
    methods.load_plugins("pd_harness_odd_plan")
    r = cli("--model", "random:tiny", "--device", "cpu", "--methods", "pd_odd_plan", "-q", "--tasks", "arc_easy",
            "--limit", "2", "--mode", "unified", "--out", registries / "q", data_dir=data_dir)
    assert r.returncode == 2 and ("pd_odd_plan.plan(...) (pd_harness_odd_plan) returned a plan with two layer sets or "
                                  "KV pruning for mode 'unified'; it must return one layer set") in r.stderr, r.stderr[-1500:]


def test_a_kv_baseline_over_a_plugin_base_whose_plan_returns_none_names_the_base(registries, cli, data_dir):
    """A KV baseline called its base's plan() unchecked: a plug-in base returning None failed with an AttributeError in
    the baseline's own code (exit 1), naming no plug-in."""
    import methods

    (registries / "pd_harness_odd_plan.py").write_text(ODD_PLAN.replace("RETURNS", "None"))
    methods.load_plugins("pd_harness_odd_plan")
    r = cli("latency", "--model", "random:tiny", "--device", "cpu", "--methods", "streamingllm", "--set",
            "streamingllm.base=pd_odd_plan", "-q", "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1",
            "--repeats", "1", "--out", registries / "lat")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert f"pd_odd_plan.plan(...) (pd_harness_odd_plan) {RETURNS['None']}" in r.stderr, r.stderr[-1500:]


RAISING = """
from dataclasses import dataclass

from harness.pd.kv import register_policy
from harness.pd.kv.base import TokenSelection
from harness.quality.long_tasks import register_task
from harness.quality.long_tasks.base import LongTask
from harness.store.task_names import TaskPresentation
from methods.base import Method
from methods.registry import register


@register
class Planless(Method):
    name = "pd_raising_plan"

    def plan(self, model, calib, mode):
        raise RuntimeError("plan exploded")


@register_policy
@dataclass(frozen=True)
class Keepless(TokenSelection):
    \"\"\"Test policy.\"\"\"

    name, method_name, method_summary = "pd_raising_keep", "pd_raising_keep_kv", "test"

    def keep(self, layer, positions, lengths, k, observed):
        raise RuntimeError("keep exploded")


@dataclass(frozen=True)
class C:
    n: int = 1


@register_task
class Exploding(LongTask):
    name, Config = "pd_raising_task", C
    presentation = TaskPresentation(title="X", setting_prefix="x_N", primary_metric="x")

    def evaluate(self, scorer, tokenizer, data_dir, options, limit, progress=False):
        raise RuntimeError("task exploded")
"""


def test_a_quality_cell_failing_in_plugin_code_names_the_plugin(registries, cli, data_dir):
    """"error: unpruned/disaggregated: RuntimeError: task exploded" named neither the task nor its module, where
    `latency` names the plug-in code (`plugin_faults.blame`); so did the report's note of the cell."""
    import methods
    from reports.collect import failure_notes

    (registries / "pd_harness_raising.py").write_text(RAISING)
    methods.load_plugins("pd_harness_raising")
    out = registries / "q"
    r = cli("--model", "random:tiny", "--device", "cpu", "--methods", "pd_raising_plan,pd_raising_keep_kv,unpruned",
            "--set", "pd_raising_keep_kv.base=tail", "--set", "pd_raising_keep_kv.base_options=k=1", "--set",
            "pd_raising_keep_kv.keep_tokens=3", "--tasks", "arc_easy,pd_raising_task", "--limit", "2", "--mode",
            "disaggregated", "--out", out, "-q", data_dir=data_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    for cell, says in [("pd_raising_plan", "plan exploded (in plug-in pd_harness_raising.Planless.plan"),
                       ("pd_raising_keep_kv", "keep exploded (in plug-in pd_harness_raising.Keepless.keep"),
                       ("unpruned", "task exploded (in plug-in pd_harness_raising.Exploding.evaluate")]:
        assert f"error: {cell}/disaggregated: RuntimeError: {says})\n" in r.stderr, r.stderr[-1500:]
        assert f"{cell}/disaggregated: RuntimeError: {says}; details: {out / cell}__disaggregated.failed.json)" in r.stdout
        assert any(f"RuntimeError: {says}; details: " in line for line in failure_notes([out])), failure_notes([out])
