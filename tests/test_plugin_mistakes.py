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
