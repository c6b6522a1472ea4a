"""Latency figures are a typed field of the record; schema-1 records (figures as fake scores) still load."""

import json

from conftest import ROOT

from harness.store import records
from harness.store.latency import WorkloadLatency, upgrade_v1

REFERENCE_LATENCY = ROOT / "results" / "reference" / "latency"
LABEL = "latency_T256_n8_b1"


def _v1(name="shortgpt__disaggregated.json"):
    return json.loads((REFERENCE_LATENCY / name).read_text())


def test_a_schema_1_latency_record_is_converted_on_load():
    old = _v1()
    assert old["schema_version"] == 1 and "ttft_ms_p50" in old["scores"][LABEL]  # the committed reference is schema 1
    r = records.RunRecord.from_dict(old)
    assert r.schema_version == records.SCHEMA_VERSION == 2
    assert r.scores == {} and "latency" not in r.extra and r.extra["clock"] == "perf_counter_ns"
    wl = r.latency[LABEL]
    assert isinstance(wl, WorkloadLatency)
    assert wl.figures == {m: v["value"] for m, v in old["scores"][LABEL].items()}
    assert wl.samples == old["extra"]["latency"][LABEL] and len(wl.samples["itl_ms"]) == 3 * 7
    assert r.figure(LABEL, "tpot_ms_p50") == old["scores"][LABEL]["tpot_ms_p50"]["value"]
    assert r.figure(LABEL, "no_such_ms") is None and r.figure("latency_T1_n1_b1", "ttft_ms_p50") is None
    assert old["schema_version"] == 1 and "latency" in old["extra"]  # the input dict is left as it was


def test_upgrade_leaves_a_quality_record_alone_but_for_the_empty_latency_field():
    q = json.loads(next((ROOT / "results" / "reference" / "quality").glob("pdtrim__disaggregated.json")).read_text())
    up = upgrade_v1(q)
    assert up["latency"] == {} and up["scores"] == q["scores"] and up["extra"] == q["extra"]
    assert records.RunRecord.from_dict(q).scores == q["scores"]


def test_schema_2_round_trip_keeps_figures_samples_and_summary_rows(tmp_path):
    r = records.RunRecord.from_dict(_v1())
    path = records.save(r, tmp_path)
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 2 and stored["scores"] == {}
    assert set(stored["latency"][LABEL]) == {"figures", "samples"}
    again = records.load(path)
    assert again.latency == r.latency
    # summary.csv is the same whether the record was written before or after the change
    old_rows = records.summary_rows([records.load(REFERENCE_LATENCY / "shortgpt__disaggregated.json")])
    assert records.summary_rows([again]) == old_rows
    ttft = next(row for row in old_rows if row["metric"] == "ttft_ms_p50")
    assert ttft["task"] == LABEL and ttft["stderr"] is None and ttft["n_samples"] == 3 and ttft["primary"] is False
    assert ttft["kv_bytes_sent"] == 10223616


def test_a_figure_registered_later_is_added_to_a_reused_record_from_its_samples(cli, tmp_path, monkeypatch):
    from harness.latency import figures

    out = tmp_path / "lat"
    run = ("latency", "--model", "random:tiny", "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens", "3",
           "--batch-size", "1", "--warmup", "0", "--repeats", "2", "--out", out, "-q")
    assert cli(*run).returncode == 0
    path = out / "unpruned__disaggregated.json"
    before = json.loads(path.read_text())
    monkeypatch.setitem(figures.FIGURES, "itl_max_ms", lambda x: {"itl_max_ms": max(x.m.itl_ms)} if x.m.itl_ms else {})
    again = cli(*run)
    assert again.returncode == 0 and "figures added or recomputed from its samples: itl_max_ms" in again.stderr, again.stderr
    after = json.loads(path.read_text())
    for label, wl in before["latency"].items():
        now = after["latency"][label]
        assert now["figures"] == {**wl["figures"], "itl_max_ms": max(wl["samples"]["itl_ms"])}  # the measured ones kept
        assert now["samples"] == wl["samples"]
    assert after["run_key"] == before["run_key"] and "figures added" not in cli(*run).stderr  # once


def test_a_kv_baseline_latency_record_is_reused_by_the_same_command(cli, tmp_path):
    """Its options() leave out policy options at their defaults; the stored side was compared with them filled in,
    so every rerun refused the run's own record ("different configuration (run_key K != K)")."""
    run = ("latency", "--model", "random:tiny", "--methods", "snapkv", "--set", "snapkv.base=shortgpt", "--set",
           "snapkv.base_options=k=1", "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1",
           "--warmup", "0", "--repeats", "1", "--out", tmp_path / "lat", "-q")
    assert cli(*run).returncode == 0
    again = cli(*run)
    assert again.returncode == 0 and "snapkv: finished record found, reused" in again.stderr, again.stderr
    other = cli(*run[:-3], "--set", "snapkv.keep_ratio=0.5", *run[-3:])  # another configuration is still refused
    assert other.returncode == 2 and "of a different configuration" in other.stderr


def test_an_edited_plugin_figure_is_recomputed_from_the_samples_of_a_reused_record(cli, tmp_path, monkeypatch):
    """A figure plug-in carried no code digest: after an edit, a rerun kept the old value silently."""
    import importlib
    import sys

    from harness.latency import figures

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(figures, "FIGURES", dict(figures.FIGURES))  # the registry as it was, afterwards
    source = ("from harness.latency.figures import figure\n\n\n@figure('probe_x')\ndef probe(x):\n"
              "    return {'probe_x': VALUE}\n")
    module = tmp_path / "pd_harness_test_figure.py"
    module.write_text(source.replace("VALUE", "1.0"))
    importlib.import_module("pd_harness_test_figure")
    out = tmp_path / "lat"
    run = ("latency", "--model", "random:tiny", "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens", "2",
           "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--out", out, "-q")
    try:
        assert cli(*run).returncode == 0
        before = json.loads((out / "unpruned__disaggregated.json").read_text())
        module.write_text(source.replace("VALUE", "2.0"))
        importlib.reload(sys.modules["pd_harness_test_figure"])  # replaces the figure: no "registered twice"
        again = cli(*run)
        assert again.returncode == 0 and "figures added or recomputed from its samples: probe_x" in again.stderr
        after = json.loads((out / "unpruned__disaggregated.json").read_text())
        for label, wl in before["latency"].items():
            assert after["latency"][label]["figures"] == {**wl["figures"], "probe_x": 2.0}  # the others as measured
    finally:
        sys.modules.pop("pd_harness_test_figure", None)


def test_refreshing_a_plugin_figure_touches_only_its_own_values(cli, tmp_path, monkeypatch):
    """A plug-in figure named `ttft` (a prefix of the package's `ttft_ms_*`) had the package's measured values
    recomputed along with its own."""
    import importlib
    import sys

    from harness.latency import figures
    from harness.run.latency_run import LatencyConfig, refresh_figures

    out = tmp_path / "lat"
    assert cli("latency", "--model", "random:tiny", "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens",
               "2", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--out", out, "-q").returncode == 0
    record = records.load(out / "unpruned__disaggregated.json")
    (label, wl), = record.latency.items()
    wl.figures["ttft_ms_p50"] = 1234.5  # as an older formula gave: the package's values stay as measured
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(figures, "FIGURES", dict(figures.FIGURES))
    module = tmp_path / "pd_harness_test_ttft.py"
    source = "from harness.latency.figures import figure\n\n\n@figure('ttft')\ndef ttft_s(x):\n    return BODY\n"
    module.write_text(source.replace("BODY", "{'ttft_s_p50': 0.5}"))
    try:
        importlib.import_module("pd_harness_test_ttft")
        assert refresh_figures(LatencyConfig(), record) == ["ttft_s_p50"]
        assert wl.figures["ttft_ms_p50"] == 1234.5 and wl.figures["ttft_s_p50"] == 0.5
        module.write_text(source.replace("BODY", "{'ttft_s_p50': 0.25}"))
        importlib.reload(sys.modules["pd_harness_test_ttft"])
        assert refresh_figures(LatencyConfig(), record) == ["ttft_s_p50"] and wl.figures["ttft_s_p50"] == 0.25
        assert wl.figures["ttft_ms_p50"] == 1234.5
    finally:
        sys.modules.pop("pd_harness_test_ttft", None)
