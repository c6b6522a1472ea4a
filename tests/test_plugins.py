"""A method is a plug-in: a new ranked method defined in a temporary module, with no edit to any
harness file, is registered, gets a `stage:` variant, passes the method contract and the stage
wrapper's checks, and is listed by `python -m harness --help`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from method_contract import check_method_contract, check_stage_wrapper_nests

import methods
from harness.errors import UsageError
from harness.quality.calibration import CalibConfig, build_calibration
from methods import registry
from methods.depth import ranked

NAME = "reverse_index"
MODULE = "pd_harness_test_plugin_reverse_index"
PLUGIN = textwrap.dedent(f'''
    """`{NAME}`: removes the deepest eligible blocks first (a test plug-in)."""

    from dataclasses import dataclass

    from methods.base import DepthOptions
    from methods.depth.ranked import RankedDepthMethod, Ranking
    from methods.registry import register


    @register
    class ReverseIndex(RankedDepthMethod):
        name = "{NAME}"
        summary = "remove the k eligible blocks with the highest index (test plug-in)"
        needs_calibration = False

        @dataclass(frozen=True)
        class Config(DepthOptions):
            k: int = 8  # blocks removed
            keep_first: int = 1  # first blocks never removed
            keep_last: int = 1  # last blocks never removed

        def _rank(self, model, calib, k, eligible):
            return Ranking(sorted(eligible, reverse=True), {{"criterion": "layer index, highest first"}})
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module, written to `tmp_path` and imported; afterwards the registry, the module cache
    and the shared rankings are as they were."""
    (tmp_path / f"{MODULE}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = methods.names()
    module = importlib.import_module(MODULE)
    yield module
    registry.unregister(NAME)
    sys.modules.pop(MODULE, None)
    ranked._SHARED.clear()
    assert methods.names() == before


@pytest.fixture(scope="module")
def calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


def test_a_plugin_method_is_registered_with_its_stage_variant(plugin):
    assert NAME in methods.names() and f"stage:{NAME}" in methods.names()
    assert methods.get(NAME) is plugin.ReverseIndex and NAME in registry.stage_bases()
    stage = methods.get(f"stage:{NAME}")
    assert stage.base is plugin.ReverseIndex and stage.Config().k_decode == 8
    assert stage.config_for_layers(4) == stage.Config(k_prefill=1, k_decode=2, k_unified=2, keep_first=1, keep_last=1)


def test_a_plugin_method_honours_the_contract_and_nests_in_the_stage_wrapper(plugin, tiny, calib):
    check_method_contract(NAME, tiny.model, calib)
    check_method_contract(f"stage:{NAME}", tiny.model, calib)
    check_stage_wrapper_nests(NAME, tiny.model, calib)
    plan = methods.get(NAME)(methods.get(NAME).Config(k=2)).plan(tiny.model, None, "disaggregated")
    assert plan.info["removal_order"] == [2, 1]  # the plug-in's own criterion, not some default


def test_help_lists_a_plugin_method_and_its_stage_variant(plugin, tmp_path):
    from harness.cli.run import _methods_epilog

    text = _methods_epilog()
    bases = ", ".join(registry.stage_bases())  # in name order, whatever ranked methods another file adds
    assert f"\n  {NAME} " in text and NAME in registry.stage_bases() and f"BASE one of {bases}" in text
    # a fresh process finds it through HARNESS_PLUGINS, with no edit to any harness file
    env = {**os.environ, "HARNESS_PLUGINS": MODULE,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "harness", "--help"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse may wrap the epilog's long lines
    assert f" {NAME} remove the k eligible blocks with the highest index (test plug-in)" in text
    assert f"BASE one of {bases}" in text


def test_quiet_keeps_lm_evals_bars_off_with_a_plugin(plugin, tmp_path, data_dir):
    """`-q` with HARNESS_PLUGINS: the run's parser imports the plug-ins for its --help text, and tqdm with them, before
    `-q` sets TQDM_DISABLE, which tqdm reads once, at import; lm-eval's bar building each task's requests showed."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env.update(HARNESS_PLUGINS=MODULE, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "harness", "--model", "random:tiny", "--device", "cpu", "--methods", NAME,
                          "--set", f"{NAME}.k=1", "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data_dir),
                          "--out", str(tmp_path / "run"), "-q"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "time: " in out.stderr and "it/s]" not in out.stderr and "%|" not in out.stderr, out.stderr


def test_plugin_errors_say_what_is_wrong(plugin):
    with pytest.raises(ImportError, match="HARNESS_PLUGINS names 'pd_harness_no_such_plugin'"):
        methods.load_plugins("pd_harness_no_such_plugin")
    with pytest.raises(ValueError, match=f"method '{NAME}' defined twice"):
        registry.register(type("Again", (plugin.ReverseIndex,), {"__module__": "elsewhere"}))
    with pytest.raises(ValueError, match="names starting with a wrapper prefix"):
        registry.register(type("Prefixed", (plugin.ReverseIndex,), {"name": "stage:x"}))


def test_an_unregistered_method_is_gone_with_its_variant(plugin):
    registry.unregister(NAME)
    with pytest.raises(UsageError, match=f"unknown method 'stage:{NAME}'"):
        methods.get(f"stage:{NAME}")
    registry.register(plugin.ReverseIndex)  # the fixture unregisters it again


def test_instantiate_builds_a_wrappers_inner_method_and_names_the_wrapper():
    """The one way a wrapper builds its base (stage:, and the KV baselines' `base` option)."""
    cls = methods.get("sleb")
    assert registry.instantiate("w", "sleb", {"samples": 12}).config == cls.Config(samples=12)
    assert registry.instantiate("w", cls, cls.Config(k=3)).config.k == 3
    assert registry.instantiate("w", "stage:sleb").inner.config == cls.Config()
    with pytest.raises(UsageError, match=r"^w: sleb.samples=0: must be >= 1"):
        registry.instantiate("w", "sleb", {"samples": 0})


KV_NAME, KV_METHOD, KV_MODULE = "test_recent", "test_recent_kv", "pd_harness_test_plugin_recent"
KV_PLUGIN = textwrap.dedent(f'''
    """A KV policy plug-in outside the package: `@register_policy` is all it writes."""
    from dataclasses import dataclass

    from harness.pd.kv import register_policy
    from harness.pd.kv.base import TokenSelection


    @register_policy
    @dataclass(frozen=True)
    class Recent(TokenSelection):
        """Every decode layer keeps its k most recent prompt positions (test plug-in)."""

        name = "{KV_NAME}"
        method_name = "{KV_METHOD}"
        method_summary = "base plan's layers; the most recent positions (test plug-in)"

        def keep(self, layer, positions, lengths, k, observed):
            from harness.pd.kv_select import streaming_keep

            return streaming_keep(positions, lengths, k, 0)

        def how(self) -> str:
            return "most recent"
''')


@pytest.fixture
def kv_plugin(tmp_path, monkeypatch):
    """The KV policy plug-in written to `tmp_path`; afterwards policy, method and module are gone again."""
    from harness.pd import kv

    (tmp_path / f"{KV_MODULE}.py").write_text(KV_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(kv._POLICIES)
    yield KV_MODULE
    if registry.registered(KV_METHOD):
        registry.unregister(KV_METHOD)
    kv._POLICIES.clear()
    kv._POLICIES.update(before)
    sys.modules.pop(KV_MODULE, None)


def test_a_plugin_kv_policy_loaded_after_the_methods_gets_its_baseline_method(kv_plugin, tiny, calib):
    assert KV_METHOD not in methods.names()
    assert KV_MODULE in methods.load_plugins(KV_MODULE)  # as HARNESS_PLUGINS does, after the package's methods
    cls = methods.get(KV_METHOD)
    assert cls.policy_cls.name == KV_NAME and KV_METHOD in methods.names()
    assert KV_MODULE in methods.load_plugins(KV_MODULE)  # again: nothing registered twice
    check_method_contract(KV_METHOD, tiny.model, calib, {"base": "tail", "base_options": "k=1"})
    plan = cls(cls.Config(base="tail", base_options="k=1", keep_tokens=3)).plan(tiny.model, None, "disaggregated")
    assert plan.kv_policy.to_dict()["kind"] == KV_NAME and plan.info["kv"]["policy"].startswith(f"{KV_NAME} (most recent)")


def test_a_plugin_kv_policy_may_not_take_a_methods_name(kv_plugin):
    from harness.pd.kv import register_policy

    module = importlib.import_module(KV_MODULE)
    register_policy(type("Clash", (module.Recent,), {"name": "test_clash", "method_name": "tail", "__module__": "x"}))
    with pytest.raises(UsageError, match="method_name 'tail' is already a method"):
        methods.load_plugins("")


def test_a_plugins_import_error_is_bad_input():
    with pytest.raises(UsageError, match="cannot be imported.*a module name, not a file path"):
        methods.load_plugins("/tmp/my_plugin.py")


@pytest.mark.parametrize("path, module, folder", [("my_plugins/my_sciq.py", "my_sciq", "my_plugins"),
                                                  ("/abs/plug/x.py", "x", "/abs/plug"), ("y.py", "y", ".")])
def test_a_plugin_file_path_is_answered_with_the_module_name_and_folder_to_give(path, module, folder):
    """'a module name, not a file path' left the user to work out which: the error names both."""
    with pytest.raises(UsageError) as e:
        methods.load_plugins(path)
    assert f"not a file path: {module!r} with {folder!r} on PYTHONPATH" in str(e.value)
    assert "comma-separated" not in str(e.value)  # a spec's plugins key is a list


def test_an_unknown_method_points_to_both_ways_of_naming_a_plugin():
    with pytest.raises(UsageError, match="name its module in HARNESS_PLUGINS or a spec's top-level plugins key"):
        methods.get("no_such_method_here")


def test_reports_show_a_plugin_policy_they_cannot_load():
    from reports.plans import _policy_text

    kv = {"kind": "not_loaded", "budget": {"ratio": 0.5}, "stride": 2}
    assert _policy_text(kv, {"kv": {"policy": "not_loaded (every 2nd), budget = ratio 0.5"}}) == \
        "not_loaded (every 2nd), budget = ratio 0.5"  # the text the KV baseline stored
    # else its kind, options and budget (the budget is the harness's KVBudget: readable without the plug-in)
    assert _policy_text(kv, {}) == "not_loaded (stride=2), budget = ratio 0.5 per layer"
    assert _policy_text({**kv, "budget": {"tokens": 64}}, {}) == "not_loaded (stride=2), budget = 64 tokens per layer"
    match = {"match": {"kind": "first_last", "n_first": 16, "n_last": 48, "layers": [3]}}
    assert _policy_text({"kind": "not_loaded", "budget": match}, {}).startswith("not_loaded, budget = bytes of ")
    assert _policy_text({"kind": "not_loaded", "budget": {"tokens": 1, "ratio": 0.5}}, {}) == \
        "not_loaded, budget = {'tokens': 1, 'ratio': 0.5}"  # not a budget the harness reads: shown as stored
    assert _policy_text({"kind": "not_loaded", "stride": 2}, {}) == "not_loaded (stride=2)"  # no budget


@pytest.mark.parametrize("option", ["k", "keep_first", "keep_last"])
def test_a_ranked_plugin_refuses_negative_counts_without_a_check_of_its_own(plugin, option):
    """The documented example defines no validate_config: k=-1 removed one block, keep_last=-1 named block n."""
    cls = methods.get(NAME)
    with pytest.raises(UsageError, match=rf"{NAME}\.{option}=-1: must be >= 0"):
        cls(cls.Config(**{option: -1}))


def test_reloading_an_edited_plugin_replaces_its_method_policy_and_kv_baseline(plugin, kv_plugin, tmp_path):
    """A notebook's importlib.reload after editing a plug-in said "defined twice" (the task registry took it)."""
    from harness.pd import kv

    methods.load_plugins(KV_MODULE)
    old_method, old_policy = methods.get(NAME), kv.get_policy(KV_NAME)
    (tmp_path / f"{MODULE}.py").write_text(PLUGIN.replace("(test plug-in)", "(test plug-in, edited)"))
    (tmp_path / f"{KV_MODULE}.py").write_text(KV_PLUGIN.replace("most recent", "latest"))
    importlib.reload(plugin)
    importlib.reload(sys.modules[KV_MODULE])
    methods.load_plugins("")  # as the next command's start does: the baseline of the new policy class
    assert methods.get(NAME) is not old_method and "edited" in methods.get(NAME).summary
    assert kv.get_policy(KV_NAME) is not old_policy and methods.get(KV_METHOD).policy_cls is kv.get_policy(KV_NAME)
    with pytest.raises(ValueError, match="defined twice"):  # another class under a taken name is still refused
        registry.register(type("Impostor", (old_method,), {"name": NAME, "__module__": "elsewhere"}))


def test_a_kv_baseline_runs_the_policy_class_registered_now(kv_plugin, tmp_path):
    """After importlib.reload of an edited policy, harness.evaluate (which loads no plug-ins) ran the old class."""
    from harness.pd import kv
    from harness.pd.kv.base import KVBudget

    methods.load_plugins(KV_MODULE)
    method = methods.get(KV_METHOD)(methods.get(KV_METHOD).Config(base="tail", base_options="k=1", keep_tokens=3))
    edited = KV_PLUGIN.replace('return "most recent"', 'return "latest"')
    (tmp_path / f"{KV_MODULE}.py").write_text(edited.replace("    def keep(", "    spare: int = 0\n\n    def keep(", 1))
    importlib.reload(sys.modules[KV_MODULE])  # with an option the method's Config lacks: it keeps its default
    assert method.policy(KVBudget(tokens=3)).how() == "latest" and type(method.policy(KVBudget(tokens=3))) is \
        kv.get_policy(KV_NAME)


TASK_FIGURE_MODULE = "pd_harness_test_plugin_task_figure"
TASK_FIGURE_PLUGIN = textwrap.dedent('''
    """A long-context task and a latency figure of a plug-in (tests)."""

    from dataclasses import dataclass

    from harness.latency.figures import FigureInputs, figure
    from harness.quality.long_tasks import register_task
    from harness.quality.long_tasks.base import LongTask
    from harness.store.task_names import TaskPresentation


    @dataclass(frozen=True)
    class EchoOptions:
        n: int = 1


    @register_task
    class Echo(LongTask):
        name = "pd_test_plugin_echo"
        Config = EchoOptions
        presentation = TaskPresentation(title="E", setting_prefix="e_N", primary_metric="e")

        def evaluate(self, scorer, tokenizer, data_dir, options, limit, progress=False):
            return {"scores": {"e": {"value": 1.0, "stderr": None}}, "n_samples": 1, "kv_by": {}, "details": {}}


    @figure("pd_test_handoff_share_pct")
    def handoff_share(x: FigureInputs) -> dict[str, float]:
        h, t = sum(x.m.handoff_ms), sum(x.m.ttft_ms)
        return {"pd_test_handoff_share_pct": 100.0 * h / (h + t)}
''')


def test_a_plugins_task_and_figure_are_checked_by_the_contract_functions(tmp_path, monkeypatch):
    """The registry-wide contract tests never see an outside plug-in (the suite drops HARNESS_PLUGINS): its own test
    calls the same checks (tests/plugin_contract.py), as a method's calls `check_method_contract`."""
    from plugin_contract import check_latency_figure_contract, check_long_task_contract

    from harness.latency import figures
    from harness.quality import long_tasks

    (tmp_path / f"{TASK_FIGURE_MODULE}.py").write_text(TASK_FIGURE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(figures, "FIGURES", dict(figures.FIGURES))
    try:
        methods.load_plugins(TASK_FIGURE_MODULE)
        check_long_task_contract("pd_test_plugin_echo")
        check_latency_figure_contract("pd_test_handoff_share_pct")
    finally:
        long_tasks.unregister_task("pd_test_plugin_echo")
        sys.modules.pop(TASK_FIGURE_MODULE, None)


def test_a_stage_variant_of_a_base_with_a_smaller_default_k_keeps_its_defaults_on_real_models():
    """`config_for_layers` only shrinks what cannot fit (the registry-wide test checks it for every method of the
    package): the stage variant of a ranked method whose `k` defaults to 4 gave k_decode 4, k_prefill 2 at 32
    layers, so that test failed on a variant its author never wrote."""
    from dataclasses import dataclass

    from methods.base import DepthOptions
    from methods.depth.ranked import RankedDepthMethod, Ranking
    from methods.depth.stage import wrapper

    @dataclass(frozen=True)
    class FourConfig(DepthOptions):
        k: int = 4
        keep_first: int = 1
        keep_last: int = 1

    class FourBack(RankedDepthMethod):
        name, Config = "pd_test_four_back", FourConfig

        def _rank(self, model, calib, k, eligible):
            return Ranking(sorted(eligible, reverse=True), {})

    stage = wrapper(FourBack)
    assert stage.config_for_layers(64) == stage.config_for_layers(32) == stage.Config()
    assert stage.config_for_layers(4) == stage.Config(k_prefill=1, k_decode=2, k_unified=2)
    assert stage.config_for_layers(8) == stage.Config(k_prefill=2, k_decode=4, k_unified=4, keep_first=1, keep_last=1)
    stage(stage.config_for_layers(4))  # valid on the 4-block test model
