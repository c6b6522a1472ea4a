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
