"""`report` inputs: overlapping folders read once, ratios and pairs against the unpruned record of
each record's own configuration, and an unknown --baseline refused."""

import copy
import csv
import io
import json

import pytest
from test_reports import LATENCY, QUALITY, _fake

from harness.store.records import RunRecord, load_dir, save
from reports.collect import collect, failure_notes
from reports.efficiency import efficiency_table
from reports.formats import groups, rows
from reports.significance import paired_table
from reports.tables import long_context_table, quality_table


def _run(folder, limit: int, dense_kv: int | None, x_kv: int, items: tuple[list, list] | None = None) -> None:
    """One run in `folder` at `limit`: an unpruned record (KV bytes `dense_kv`; none when None) and
    method x (`x_kv`); `items` = per-item boolq acc of (unpruned, x)."""
    for method, kv, removed, j in (("unpruned", dense_kv, (), 0), ("x", x_kv, (1,), 1)):
        if kv is None:
            continue
        r = _fake(method, "disaggregated", {"boolq": {"acc": 0.5}}, removed=removed,
                  kv={"boolq": {"kv_bytes": kv, "handoffs": 4}})
        r.config["limit"] = limit
        if items:
            r.extra["items"] = {"boolq": {"ids": list(range(len(items[j]))), "metrics": {"acc": items[j]}}}
        save(r, folder)


def _quality_rows(out) -> list[list[str]]:
    return list(csv.reader(io.StringIO((out / "tables" / "quality.csv").read_text())))[1:]


def test_overlapping_inputs_read_each_record_once(tmp_path, cli):
    a = tmp_path / "a"
    _run(a / "sub", 4, 400, 100)
    one = collect([a])
    for inputs in ([a, a], [a, a / "sub"], [a / "sub", a], [a, a / "sub" / "x__disaggregated.json"],
                   [a, tmp_path / "a" / ".." / "a" / "sub"]):
        col = collect(inputs)
        assert sorted(r.method for r in col.quality) == ["unpruned", "x"], inputs
        assert [col.label(r) for r in col.quality] == [one.label(r) for r in one.quality] == ["unpruned", "x"]
    r = cli("report", a, a / "sub", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert [row[1] for row in _quality_rows(tmp_path / "rep")] == ["unpruned", "x"]


def test_a_folder_removed_while_the_records_are_searched_is_skipped(tmp_path, monkeypatch):
    """`report results/` while a `check --update` swaps `results/reference` away beside it: the folder it was
    about to list is gone (here: listing it raises as it would), and the records elsewhere are still read."""
    import os

    from harness.store.records import record_files_under

    _run(tmp_path / "a", 4, 400, 100)
    _run(tmp_path / ".reference.old", 4, 400, 100)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith(".reference.old"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert [p.relative_to(tmp_path).as_posix() for p in record_files_under(tmp_path)] == \
        ["a/unpruned__disaggregated.json", "a/x__disaggregated.json"]
    assert sorted(r.method for r in collect([tmp_path]).quality) == ["unpruned", "x"]
    assert failure_notes([tmp_path]) == []  # the failed-cell notes are searched the same way


def test_a_second_record_of_a_cell_in_one_folder_is_skipped_with_a_note(tmp_path, cli):
    """A renamed copy of a record beside it (`unpruned__disaggregated (copy).json`) gave two rows of one label and,
    first by path, was the baseline of every ratio: x showed 2.00× against the copy instead of 4.00×."""
    _run(tmp_path / "a", 4, 400, 100)
    doc = json.loads((tmp_path / "a" / "unpruned__disaggregated.json").read_text())
    doc["kv"]["boolq"]["kv_bytes"] = 200
    (tmp_path / "a" / "unpruned__disaggregated (copy).json").write_text(json.dumps(doc))
    col = collect([tmp_path / "a"])
    assert dict(rows(quality_table(col)).set_index("Method")["KV ×"]) == {"unpruned": "1.00×", "x": "4.00×"}
    assert col.skipped == [f"{tmp_path / 'a' / 'unpruned__disaggregated (copy).json'}: a second record of unpruned/"
                           "disaggregated in its folder, beside unpruned__disaggregated.json (one record per method and "
                           "PD setting in a folder); skipped"]
    r = cli("report", tmp_path / "a", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 0 and "a second record of unpruned/disaggregated" in r.stderr
    assert [row[1] for row in _quality_rows(tmp_path / "rep")] == ["unpruned", "x"]


def test_kv_ratio_against_the_unpruned_record_of_the_same_configuration(tmp_path):
    _run(tmp_path / "a", 4, 400, 100)  # x: 4×
    _run(tmp_path / "b", 2, 200, 100)  # x: 2×
    _run(tmp_path / "c", 8, None, 50)  # no unpruned at limit 8: no ratio
    text = rows(quality_table(collect([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))).set_index("Method")["KV ×"]
    assert dict(text) == {"unpruned (a)": "1.00×", "unpruned (b)": "1.00×",
                          "x (a)": "4.00×", "x (b)": "2.00×", "x (c)": "—"}
    # the configuration is the run's settings: a separate run of x alone with them pairs with a's unpruned
    _run(tmp_path / "d", 4, None, 50)
    text = rows(quality_table(collect([tmp_path / "a", tmp_path / "d"]))).set_index("Method")["KV ×"]
    assert text["x (d)"] == "8.00×"


def test_kv_ratio_needs_the_same_resolved_dtype(tmp_path):
    """`--dtype auto` is float32 on a CPU and bfloat16 on a GPU: the same configuration, half the KV bytes. A GPU run's
    x was compared with a CPU run's unpruned (8.00× for the 4.00× at one dtype); the records say what auto resolved to."""
    _run(tmp_path / "cpu", 4, 400, 100)
    _run(tmp_path / "gpu", 4, None, 50)
    _run(tmp_path / "old", 4, None, 100)  # a record from before the resolved dtype was kept still pairs
    for folder, dtype in (("cpu", "float32"), ("gpu", "bfloat16")):
        for path in (tmp_path / folder).glob("*__*.json"):
            doc = json.loads(path.read_text())
            doc["model"]["dtype"] = dtype
            path.write_text(json.dumps(doc))
    kv = dict(rows(quality_table(collect([tmp_path / f for f in ("cpu", "gpu", "old")]))).set_index("Method")["KV ×"])
    assert kv == {"unpruned": "1.00×", "x (cpu)": "4.00×", "x (gpu)": "—", "x (old)": "4.00×"}


def test_a_record_made_with_the_data_folder_elsewhere_pairs_unless_its_files_differ(tmp_path):
    """A run in a clone at another path (CI's checkout) records another data_dir; the report compares the files'
    digests, not the path: same files pair with the committed unpruned record, other files do not."""
    _run(tmp_path / "a", 4, 400, 100)
    _run(tmp_path / "b", 4, None, 50)
    for folder, data_dir, digest in (("a", "/work/shared/data", "f1"), ("b", "/check/work/shared/data", "f1")):
        for path in (tmp_path / folder).glob("*__*.json"):
            doc = json.loads(path.read_text())
            doc["config"]["data_dir"] = data_dir
            doc["extra"]["inputs"] = {"version": 2, "data": {"boolq": digest}}
            path.write_text(json.dumps(doc))
    kv = lambda: dict(rows(quality_table(collect([tmp_path / "a", tmp_path / "b"]))).set_index("Method")["KV ×"])  # noqa: E731
    assert kv()["x (b)"] == "8.00×"
    path = tmp_path / "b" / "x__disaggregated.json"
    doc = json.loads(path.read_text())
    doc["extra"]["inputs"]["data"]["boolq"] = "f2"  # scored on other BoolQ files: no baseline among these records
    path.write_text(json.dumps(doc))
    assert kv()["x (b)"] == "—"
    doc["config"]["data_dir"] = None  # lm-eval's hub data is another source, digests or not
    del doc["extra"]["inputs"]
    path.write_text(json.dumps(doc))
    assert kv()["x (b)"] == "—"


def test_paired_table_pairs_each_record_with_its_own_configurations_baseline(tmp_path):
    _run(tmp_path / "a", 4, 400, 100, ([1, 1, 1, 1], [1, 1, 1, 1]))
    _run(tmp_path / "b", 6, 400, 100, ([0] * 6, [1] * 6))  # 6 gained: exact McNemar p = 0.031
    t = rows(paired_table(collect([tmp_path / "a", tmp_path / "b"]))).set_index("Method")
    assert list(t.index) == ["x (a)", "x (b)"]  # b's unpruned is a baseline, not a row against a's
    assert t.loc["x (a)", "BoolQ"].startswith("+0.0 ") and t.loc["x (b)", "BoolQ"].startswith("+100.0* ")


def _other_configuration(records: list[RunRecord], scale: float, field: str, value) -> list[RunRecord]:
    """Copies of `records` as if run with config[field] = value; the unpruned copy's figures and bytes × `scale`."""
    out = []
    for r in map(copy.deepcopy, records):
        r.config[field] = value
        if r.method == "unpruned":
            for wl in r.latency.values():
                wl.figures = {k: v * scale for k, v in wl.figures.items()}
            for kv in [*r.kv.values(), *(s for t in r.extra.get("kv_by_setting", {}).values() for s in t.values())]:
                kv["kv_bytes"] *= scale
        out.append(r)
    return out


def test_efficiency_and_long_context_ratios_use_the_same_configuration():
    lat = load_dir(LATENCY)
    e = efficiency_table([*lat, *_other_configuration(lat, 2.0, "repeats", 99)])
    g = next(i for i, title in enumerate(groups(e)) if "prompt 2048" in title)
    v = rows(e, g, "value").set_index(rows(e, g)["Method"])
    ttft = {r.method: r.figure("latency_T2048_n32_b1", "ttft_ms_p50") for r in lat}
    shortgpt = v[v.index.str.startswith("shortgpt")]["TTFT speedup"]  # one per configuration
    assert sorted(shortgpt) == pytest.approx([ttft["unpruned"] / ttft["shortgpt"], 2 * ttft["unpruned"] / ttft["shortgpt"]])
    qual = [r for r in load_dir(QUALITY) if r.mode == "disaggregated"]
    lc = rows(long_context_table([*qual, *_other_configuration(qual, 2.0, "limit", 7)])).set_index("Method")
    assert sorted(lc[lc.index.str.startswith("pdtrim")]["KV/req T2048 (MiB)"]) == ["25.3 (3.56×)", "25.3 (7.11×)"]


def test_unknown_baseline_exits_2_naming_the_methods(tmp_path, cli):
    _run(tmp_path / "a", 4, 400, 100)
    r = cli("report", tmp_path / "a", "--baseline", "nosuch", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 2 and "--baseline 'nosuch' matches no quality record; methods present: unpruned, x" in r.stderr
    assert not (tmp_path / "rep").exists()
    r = cli("report", tmp_path / "a", "--baseline", "x", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    _run(tmp_path / "b", 4, None, 100, ([1, 1], [1, 0]))  # the default baseline may be absent: no paired table
    r = cli("report", tmp_path / "b", "--no-plots", "--out", tmp_path / "rep_b")
    assert r.returncode == 0 and "paired table: not shown (no unpruned record; --baseline METHOD pairs with another: x)" \
        in r.stderr  # not "no records with per-item results", which they have


def test_a_baseline_alone_says_it_has_nothing_to_pair_with(tmp_path, cli):
    r = _fake("unpruned", "disaggregated", {"boolq": {"acc": 0.5}}, kv={"boolq": {"kv_bytes": 400, "handoffs": 4}})
    r.extra["items"] = {"boolq": {"ids": [0, 1], "metrics": {"acc": [1, 0]}}}
    save(r, tmp_path / "a")
    r = cli("report", tmp_path / "a", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 0 and "paired table: not shown (the records hold unpruned only: no other method to pair " \
        "with it)" in r.stderr  # not "no records with per-item results", which it has


def test_latency_rows_compare_with_the_unpruned_of_their_own_run_and_csv_holds_mib(tmp_path):
    """Two runs of the same latency command: each row against its own run's unpruned (every unpruned row
    1.00×), not the other run's, and the CSV's "KV sent (MiB)" in MiB, as the table shows it."""
    lat = load_dir(LATENCY)
    for run, scale in (("runA", 1.0), ("runB", 2.0)):  # runB measured everything 2× slower
        for r in map(copy.deepcopy, lat):
            for wl in r.latency.values():
                wl.figures = {k: v * scale if k.endswith("_ms_p50") or "_ms_p50@" in k else v for k, v in wl.figures.items()}
            save(r, tmp_path / run)
    e = efficiency_table(collect([tmp_path / "runA", tmp_path / "runB"]))
    g = next(i for i, title in enumerate(groups(e)) if "prompt 2048" in title)
    v = rows(e, g, "value").set_index(rows(e, g)["Method"])
    assert list(v.loc[["unpruned (runA)", "unpruned (runB)"], "TTFT speedup"]) == [1.0, 1.0]
    assert v.loc["shortgpt (runA)", "TTFT speedup"] == pytest.approx(v.loc["shortgpt (runB)", "TTFT speedup"])
    shown = rows(e, g).set_index(rows(e, g)["Method"]).loc["unpruned (runA)", "KV sent (MiB)"]
    assert f"{v.loc['unpruned (runA)', 'KV sent (MiB)']:,.2f}" == shown  # the value is the MiB the table shows


def test_a_latency_run_without_its_own_unpruned_gets_no_speedup_from_another_run(tmp_path):
    """Latency samples compare within one interleaved run: runB measured shortgpt alone, so its speedups are "—", not
    factors against runA's unpruned (measured under another load)."""
    lat = load_dir(LATENCY)
    for r in lat:
        save(r, tmp_path / "runA")
    save(copy.deepcopy(next(r for r in lat if r.method == "shortgpt")), tmp_path / "runB")
    e = efficiency_table(collect([tmp_path / "runA", tmp_path / "runB"]))
    g = next(i for i, title in enumerate(groups(e)) if "prompt 2048" in title)
    got = rows(e, g).set_index(rows(e, g)["Method"])
    assert list(got.loc["shortgpt (runB)", ["TTFT speedup", "TPOT speedup", "E2E speedup"]]) == ["—", "—", "—"]
    assert got.loc["shortgpt (runA)", "TTFT speedup"] != "—"
    # bytes are counted, not timed: runB's KV reduction is against runA's unpruned, as the quality table's KV × (it
    # was '—', beside a caption that says only the speedups keep to the row's own run)
    assert got.loc["shortgpt (runB)", "KV reduction"] == got.loc["shortgpt (runA)", "KV reduction"] == "1.36×"
    assert "a speedup only against the unpruned record of the row's own run" in e.attrs["caption"]


def test_a_bandwidth_the_latency_records_lack_is_named_with_the_ones_they_hold(tmp_path, cli):
    r = cli("report", LATENCY, "--no-plots", "--bandwidth", "50", "--out", tmp_path / "rep")
    assert r.returncode == 0 and "E2E at --bandwidth 50 Gbit/s: the latency records hold it at 25, 100, 400 Gbit/s" in r.stderr
    assert "E2E at" not in cli("report", LATENCY, "--no-plots", "--out", tmp_path / "rep2").stderr  # 100: held


def test_a_record_whose_plan_layers_are_not_lists_of_indices_is_skipped_with_a_note(tmp_path, cli):
    """`plan.removed_decode: null` passed the record checks and the report stopped with a TypeError traceback."""
    _run(tmp_path / "a", 4, 400, 100)
    _run(tmp_path / "b", 4, 400, 100)
    path = tmp_path / "a" / "x__disaggregated.json"
    for bad in (None, [1, "2"], "1 2"):
        doc = json.loads(path.read_text())
        doc["plan"]["removed_decode"] = bad
        (tmp_path / "b" / path.name).write_text(json.dumps(doc))
        col = collect([tmp_path / "b"])
        assert col.skipped == [f"{tmp_path / 'b' / path.name}: plan.removed_decode must be a list of layer indices, "
                               f"got {json.dumps(bad)}; skipped"], bad
    r = cli("report", tmp_path / "a", tmp_path / "b", "--no-plots", "--out", tmp_path / "rep")
    assert r.returncode == 0 and "plan.removed_decode must be a list of layer indices" in r.stderr, r.stderr[-2000:]


def test_efficiency_cells_equal_the_records_arithmetic_per_request():
    """Every factor is unpruned ÷ method of the records' own figures; KV sent is the bytes ÷ handoffs (a batch of 4
    requests sends 4 handoffs' bytes); a zero denominator is no factor, not an error."""
    from reports.tables import MIB, _ratio_cell

    lat = copy.deepcopy(load_dir(LATENCY))
    lab = "latency_T2048_n32_b1"
    for r in lat:
        r.kv[lab]["handoffs"] = 4
    e = efficiency_table(lat, 100)
    g = next(i for i, title in enumerate(groups(e)) if "prompt 2048" in title)
    v = rows(e, g, "value").set_index(rows(e, g)["Method"])
    by = {r.method: r for r in lat}
    dense = by["unpruned"]
    for method, r in by.items():
        row = v.loc[next(i for i in v.index if i.startswith(method))]
        per_req = r.kv[lab]["kv_bytes"] / 4
        assert row["KV sent (MiB)"] == pytest.approx(per_req / MIB)
        assert row["KV reduction"] == pytest.approx(dense.kv[lab]["kv_bytes"] / r.kv[lab]["kv_bytes"], rel=1e-6)
        for col, fig in (("TTFT speedup", "ttft_ms_p50"), ("TPOT speedup", "tpot_ms_p50"), ("E2E speedup", "e2e_ms_p50@100gbit")):
            assert row[col] == pytest.approx(dense.figure(lab, fig) / r.figure(lab, fig), rel=1e-5), (method, col)
    assert _ratio_cell(3.0, 0.0)[0] == "—" and _ratio_cell(3.0, 1.5)[:2] == ("2.00×", 2.0)


def test_records_made_from_other_include_folders_are_named_in_the_caption_unless_their_files_are_the_same(tmp_path):
    """--include-path folders count by number in a record's configuration (a copy elsewhere is the same configuration
    where its files' digests are the same), so rows made from two folders of other YAMLs (two prompt variants of one
    task) lost the caption's note that they were not run alike; a copy holding the same files gets none."""
    from reports.tables import _mixed_text

    _run(tmp_path / "a", 4, 400, 100)
    _run(tmp_path / "b", 4, 400, 50)
    for folder, include, files in (("a", "/x/v1", "f1"), ("b", "/x/v2", "f2")):
        for path in (tmp_path / folder).glob("*__*.json"):
            doc = json.loads(path.read_text())
            doc["config"]["include_path"] = [include]
            doc["extra"]["inputs"] = {"version": 2, "data": {}, "include": {include: {"files": files, "data": "d"}}}
            path.write_text(json.dumps(doc))
    records = collect([tmp_path / "a", tmp_path / "b"]).quality
    assert 'Rows were run with different settings, compared side by side: include_path ["/x/v1"] / ["/x/v2"]' in \
        _mixed_text(records)
    for path in (tmp_path / "b").glob("*__*.json"):  # b: a copy of v1 at another path
        doc = json.loads(path.read_text())
        doc["extra"]["inputs"]["include"]["/x/v2"]["files"] = "f1"
        path.write_text(json.dumps(doc))
    assert _mixed_text(collect([tmp_path / "a", tmp_path / "b"]).quality) == ""
