"""A plug-in that raises under `python -m harness latency` (a method's plan(), a KV policy's keep(), a latency figure
on one measurement) fails alone: the other plans are measured and recorded, a figure's record keeps its samples,
one line names the plug-in, the error and where its traceback is, and the exit is non-zero. Before, each ended the
whole run with a traceback (a figure: exit 2 after the measuring), and what had been measured was lost. An error of
the harness's own code still ends the run with its traceback."""

from __future__ import annotations

import sys
import textwrap

import pytest

from harness.latency import figures
from harness.pd import kv
from harness.quality import long_tasks
from harness.store import records
from methods import registry
from reports.collect import collect, failure_notes
from reports.latency_figures import figure_failure_notes, figures_table
from reports.tables import latency_groups

MODULE = "pd_harness_lat_fault"
PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from harness.latency.figures import figure
    from harness.pd.kv import register_policy
    from harness.pd.kv.base import TokenSelection
    from methods.depth.tail import Tail
    from methods.registry import register


    @register
    class Broken(Tail):
        name = "broken_plan"

        def plan(self, model, calib, mode):
            PLAN_BODY


    @register_policy
    @dataclass(frozen=True)
    class LateKeep(TokenSelection):
        """Keeps the last k positions, and raises from the prefill of its third measured run on."""

        name = "late_keep"
        method_name = "late_keep_kv"
        method_summary = "test plug-in"
        calls = [0]

        def keep(self, layer, positions, lengths, k, observed):
            if layer == 0:
                self.calls[0] += 1
            if self.calls[0] > 2:
                raise KeyError(f"no layer {layer}")
            return (positions >= 0) & (positions >= (lengths - k)[:, None])


    @figure("probe_ms")
    def probe(x):
        if x.m.workload.prompt_tokens == 16:  # not on figures.check's made-up measurement (8 tokens)
            raise ValueError("no probe at 16 tokens")
        return {"probe_ms": 1.0}
''')
# its figure fails at 16-token prompts only: the method tests measure 12
ARGS = ("--model", "random:tiny", "--decode-tokens", "2", "--batch-size", "1", "--warmup", "0", "-q")
LATE_KEEP = ("--set", "late_keep_kv.base=tail", "--set", "late_keep_kv.base_options=k=1", "--set",
             "late_keep_kv.keep_tokens=3")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A loader of the plug-in module above (with `plan_body` as `broken_plan`'s plan), in `tmp_path`; afterwards
    the registries and the module cache are as they were."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(figures, "FIGURES", dict(figures.FIGURES))
    saved = dict(registry._METHODS), dict(kv._POLICIES), dict(long_tasks._REGISTRY)

    def load(plan_body: str = 'raise ValueError("no plan for you")'):
        (tmp_path / f"{MODULE}.py").write_text(PLUGIN.replace("PLAN_BODY", plan_body))
        import methods

        methods.load_plugins(MODULE)
        return sys.modules[MODULE]

    yield load
    for live, old in zip((registry._METHODS, kv._POLICIES, long_tasks._REGISTRY), saved):
        live.clear()
        live.update(old)
    sys.modules.pop(MODULE, None)


@pytest.mark.parametrize("body, rc, says, traceback", [
    ('raise ValueError("no plan for you")', 1, f"ValueError: no plan for you (in plug-in {MODULE}.Broken.plan; ",
     'raise ValueError("no plan for you")'),
    # make_plan's check of what plan() returned names the method's class: a broken contract (exit 2, fix the
    # plug-in), where it was a TypeError (exit 1, as if a rerun might pass)
    ("return None", 2, f"PluginContractError: broken_plan.plan(...) ({MODULE}) returned None; it must return a PruningPlan "
     f"(PruningPlan(self.name, arch.n_layers(model), prefill_layers, decode_layers)) (in plug-in {MODULE}.Broken; ",
     "in make_plan"),
])
def test_a_plugin_plan_that_raises_fails_alone(plugin, cli, tmp_path, body, rc, says, traceback):
    module = plugin(body)
    out = tmp_path / "lat"
    r = cli("latency", "--methods", "broken_plan,unpruned", "--set", "broken_plan.k=1", "--prompt-tokens", "12",
            "--repeats", "2", "--out", out, *ARGS)
    note = out / "broken_plan__disaggregated.failed.json"
    assert r.returncode == rc and "Traceback" not in r.stderr, r.stderr
    assert f"error: broken_plan: {says}traceback in {note})" in r.stderr, r.stderr
    assert records.load(out / "unpruned__disaggregated.json").n_samples == {"latency_T12_n2_b1": 2}
    assert traceback in records.load_failures(out)[0]["traceback"]
    # the report's note names the latency run's plug-in code and what brings the method's record
    (line,) = failure_notes([out])
    where = says.split("(in plug-in ")[1]  # "pd_harness_lat_fault.Broken.plan; "
    assert line.startswith(f"broken_plan/disaggregated (latency) failed in {out}: ") and \
        f"(in plug-in {where}details: {note})" in line, line
    assert line.endswith("no record until it is fixed and the same latency command rerun (which reuses the other "
                         "methods' records)")
    # fixed: the rerun measures it, reuses unpruned's record, and the note of the failure goes
    module.Broken.plan = module.Tail.plan
    r = cli("latency", "--methods", "broken_plan,unpruned", "--set", "broken_plan.k=1", "--prompt-tokens", "12",
            "--repeats", "2", "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    assert "unpruned: finished record found, reused" in r.stderr and not note.exists()
    assert len(records.load(out / "broken_plan__disaggregated.json").plan["decode_layers"]) == 3  # tail.k=1 of 4


def test_a_plugin_policy_whose_keep_raises_in_a_later_round_is_left_out_of_the_rest(plugin, cli, tmp_path):
    """keep() raising from its third run on: the rounds go on without it (the ETA over the plans still measured)."""
    plugin()
    out = tmp_path / "lat"
    r = cli("latency", "--methods", "late_keep_kv,unpruned", *LATE_KEEP, "--prompt-tokens", "12", "--repeats", "4",
            "--out", out, *ARGS)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (f"error: late_keep_kv: KeyError: 'no layer 0' (in plug-in {MODULE}.LateKeep.keep; traceback in "
            f"{out / 'late_keep_kv__disaggregated.failed.json'})") in r.stderr, r.stderr
    assert "unpruned: latency_T12_n2_b1 (round 4/4)" in r.stderr and "late_keep_kv: latency_T12_n2_b1 (round 4/4)" not in r.stderr
    assert records.load(out / "unpruned__disaggregated.json").n_samples == {"latency_T12_n2_b1": 4}
    assert not (out / "late_keep_kv__disaggregated.json").exists()  # 2 of its 4 rounds: not a record
    assert 'raise KeyError(f"no layer {layer}")' in records.load_failures(out)[0]["traceback"]


def test_a_plugin_figure_that_raises_on_a_measurement_keeps_the_samples(plugin, cli, tmp_path):
    plugin()
    out = tmp_path / "lat"
    args = ("latency", "--methods", "unpruned,tail", "--set", "tail.k=1", "--prompt-tokens", "16,12", "--repeats", "1",
            "--out", out, *ARGS)
    r = cli(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    path = out / "tail__disaggregated.json"
    assert (f"error: tail: latency figure 'probe_ms' on latency_T16_n2_b1: ValueError: no probe at 16 tokens (in plug-in "
            f"{MODULE}.probe; traceback in {path}, extra.figure_failures; the record keeps its samples and the other "
            "figures)") in r.stderr, r.stderr
    record = records.load(path)
    failed = record.extra["figure_failures"]["probe_ms"]
    assert (failed["figure"], failed["error_type"], failed["workloads"]) == (f"{MODULE}.probe", "ValueError", ["latency_T16_n2_b1"])
    assert 'raise ValueError("no probe at 16 tokens")' in failed["traceback"]
    t16, t12 = record.latency["latency_T16_n2_b1"], record.latency["latency_T12_n2_b1"]
    assert len(t16.samples["ttft_ms"]) == 1 and "ttft_ms_p50" in t16.figures and "probe_ms" not in t16.figures
    assert t12.figures["probe_ms"] == 1.0
    # the report: a note names the figure, method, workload and error, and a 'failed' cell stands where it failed
    col = collect([out])
    tail, unpruned = figure_failure_notes(col)  # both measured 16 tokens
    assert tail.startswith(f"latency figure 'probe_ms' ({MODULE}.probe) failed for tail on latency_T16_n2_b1: "
                           f"ValueError: no probe at 16 tokens (traceback: {path}, extra.figure_failures); fix it and "
                           "rerun the same latency command"), tail
    assert unpruned.startswith(f"latency figure 'probe_ms' ({MODULE}.probe) failed for unpruned on latency_T16_n2_b1")
    assert _probe_cells(col) == {(m, w): "failed" if w == "latency_T16_n2_b1" else "1.000" for m in ("tail", "unpruned")
                                 for w in ("latency_T16_n2_b1", "latency_T12_n2_b1")}
    # the figure fixed: the rerun reuses both records and computes it from their samples
    figures.FIGURES["probe_ms"] = lambda x: {"probe_ms": 2.0}
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "tail: finished record found, reused; figures added or recomputed from its samples: probe_ms" in r.stderr
    record = records.load(path)
    assert "figure_failures" not in record.extra
    assert [record.latency[w].figures["probe_ms"] for w in ("latency_T16_n2_b1", "latency_T12_n2_b1")] == [2.0, 2.0]
    assert not figure_failure_notes(collect([out])) and set(_probe_cells(collect([out])).values()) == {"2.000"}


def _probe_cells(col) -> dict:
    """{(method, workload): the latency figures table's probe_ms cell}."""
    from reports.formats import rows

    t = figures_table(col)
    labels = {title: lab for title, lab, _ in latency_groups(col)}
    return {(m, labels[title]): c for g, title in enumerate(dict.fromkeys(t["title"]))
            for m, c in rows(t, g)[["Method", "probe_ms"]].itertuples(index=False)}


def test_an_error_of_the_harness_own_code_still_ends_the_run_with_its_traceback(plugin, cli, tmp_path, monkeypatch):
    """Measuring a plug-in method's plan, an error raised by the harness itself is no plug-in failure."""
    from harness.run import latency_run

    plugin()
    monkeypatch.setattr(latency_run, "measure", dict)  # the harness calling something wrongly: a TypeError
    with pytest.raises(TypeError):
        cli("latency", "--methods", "late_keep_kv", *LATE_KEEP, "--prompt-tokens", "12", "--repeats", "1",
            "--out", tmp_path / "lat", *ARGS)
    assert not (tmp_path / "lat" / "late_keep_kv__disaggregated.failed.json").exists()


def test_a_figure_of_the_harness_own_that_raises_ends_the_run_after_the_records_are_saved(cli, tmp_path, monkeypatch):
    from harness.latency import measure

    monkeypatch.setattr(figures, "FIGURES", {**figures.FIGURES, "ttft_ms": measure.percentile})  # TypeError inside
    monkeypatch.setattr(figures, "check", lambda *a, **k: None)  # which would refuse it before the measuring
    with pytest.raises(TypeError):
        cli("latency", "--methods", "unpruned", "--prompt-tokens", "16", "--repeats", "1", "--out", tmp_path / "lat", *ARGS)
    record = records.load(tmp_path / "lat" / "unpruned__disaggregated.json")
    assert len(record.latency["latency_T16_n2_b1"].samples["ttft_ms"]) == 1
    assert record.extra["figure_failures"]["ttft_ms"]["error_type"] == "TypeError"


def test_blame_names_the_plugin_code_and_never_the_harness_own(plugin):
    from harness.errors import PluginContractError
    from harness.run.plugin_faults import blame

    module = plugin()
    with pytest.raises(ValueError) as raised:
        module.probe(figures.FigureInputs(measure_at(16)))
    assert blame(raised.value) == f"{MODULE}.probe"
    wrapped = figures.compute_each(measure_at(16))[1]["probe_ms"]  # the harness's wrapping, raised from the figure's
    assert blame(wrapped) == f"{MODULE}.probe"
    policy_method = registry.get("late_keep_kv")()
    assert blame(PluginContractError("x"), policy_method) == f"{MODULE}.LateKeep"  # the KV baseline's plug-in policy
    assert blame(PluginContractError("x"), registry.get("streamingllm")()) is None  # the package's own
    from harness.latency.measure import percentile

    figures.FIGURES["ttft_ms"] = percentile  # the harness's own code failing (a TypeError inside it): no plug-in frame
    own = figures.compute_each(measure_at(16))[1]["ttft_ms"]
    assert isinstance(own.__cause__, TypeError) and blame(own, percentile) is None


def measure_at(tokens: int):
    from harness.latency.measure import Measurement, Workload

    return Measurement("m", Workload(tokens, 3, 1), "perf_counter_ns", ttft_ms=[2.0], handoff_ms=[0.1], itl_ms=[1.0, 1.1],
                       tpot_ms=[1.05], kv_bytes=4096, kv_bytes_paged=8192)


def test_a_figure_failing_on_several_workloads_names_each_and_is_computed_again_next_time(plugin):
    """measured_figures: a figure that raises on two of three workloads is noted once with both; keep_failures writes
    both into the record and drops that figure's code digest (and only its), so the next run computes it again."""
    from types import SimpleNamespace

    from harness.run.latency_figures import keep_failures, measured_figures

    plugin()
    measured = {"a": (measure_at(16), None), "b": (measure_at(12), None), "c": (measure_at(16), None)}
    latency, _, _, errors = measured_figures((100.0,), measured, 1.0)
    assert set(errors) == {"probe_ms"} and errors["probe_ms"][1] == ["a", "c"]
    assert [("probe_ms" in latency[w].figures) for w in "abc"] == [False, True, False]
    record = SimpleNamespace(extra={"figure_code": {"probe_ms": {MODULE: "old"}, "other_ms": {"m": "d"}}})
    assert keep_failures(record, errors)
    assert record.extra["figure_code"] == {"other_ms": {"m": "d"}}
    assert record.extra["figure_failures"]["probe_ms"]["workloads"] == ["a", "c"]
    assert not keep_failures(record, errors)  # the same failures again: nothing changed


def test_a_notebooks_own_code_that_raises_is_a_plugins_failure():
    """Code defined in `__main__` (a notebook's cell, a script's own plug-in) is plug-in code: its error is blamed on
    it, not taken for the harness's own (which would end the latency run)."""
    from harness.run.plugin_faults import blame

    cell = {"__name__": "__main__"}
    exec("def plan(model):\n    raise ValueError('no plan')\n", cell)  # noqa: S102 - a notebook cell's definition
    with pytest.raises(ValueError) as raised:
        cell["plan"](None)
    assert blame(raised.value) == "__main__.plan"
