"""What plug-ins put in records shows in the report, from the records alone: a plug-in latency figure gets a column
of the latency figures table (left out, with no note, when no record has one), a figure that failed is a note and
a 'failed' cell, and a plug-in lm-eval task's declared title heads its columns. Before, the tables showed only the
package's TTFT/TPOT/E2E and bytes, a failed figure was said nowhere in the report, and a task's column was its bare
name."""

from __future__ import annotations

import pytest
from conftest import ROOT

from harness.store.records import load_dir
from reports.collect import collect
from reports.formats import rows, to_csv, to_latex, to_markdown
from reports.latency_figures import PACKAGE_FIGURES, figure_failure_notes, figures_table, number_text
from reports.render import build_tables, render_report

LATENCY = ROOT / "results" / "reference" / "latency"
WORKLOAD = "latency_T256_n8_b1"  # the reference latency records' one workload


def _with_plugin_figures():
    """The reference latency records, as a run with two plug-in figures made them: `decode_tok_per_s`, and
    `ttft_ms_p95`, whose name starts with the package's `ttft_ms` (its digest says it is a plug-in's). On shortgpt a
    third, `probe_ms`, failed after it had given a value (a rerun whose edited figure raised: the old value stays)."""
    recs = {r.method: r for r in load_dir(LATENCY)}
    for r, rate in zip(recs.values(), (1000.0, 1250.0, 1500.0)):
        r.latency[WORKLOAD].figures.update({"decode_tok_per_s": rate, "ttft_ms_p95": 3.14159})
        r.extra["figure_code"] = {"decode_tok_per_s": {"my_figs": "d1"}, "ttft_ms_p95": {"my_figs": "d2"}}
    recs["shortgpt"].latency[WORKLOAD].figures["probe_ms"] = 9.0
    recs["shortgpt"].extra["figure_failures"] = {"probe_ms": {
        "figure": "my_figs.probe", "error_type": "ValueError", "error": "no probe\nat 256 tokens", "workloads": [WORKLOAD],
        "traceback": "Traceback ..."}}
    return recs


def test_plugin_figures_get_a_column_each_the_package_figures_none():
    from harness.store.latency import WorkloadLatency

    recs = _with_plugin_figures()
    recs["unpruned"].latency["latency_T512_n1_b1"] = WorkloadLatency({"ttft_ms_p50": 5.0}, {})  # none applies: no group
    t = figures_table(list(recs.values()))
    assert [g.split(" · ")[1] for g in dict.fromkeys(t["title"])] == ["prompt 256, decode 8, batch 1, eager decode"]
    assert t.attrs["columns"] == ["Method", "Removed", "decode_tok_per_s", "probe_ms", "ttft_ms_p95"]
    shown = rows(t).set_index("Method")
    assert shown.loc["pdtrim", "decode_tok_per_s"] == "1,000" and shown.loc["pdtrim", "ttft_ms_p95"] == "3.142"
    assert shown.loc["shortgpt", "probe_ms"] == "failed"  # not its stale 9.0
    assert shown.loc["unpruned", "probe_ms"] == "—"
    assert rows(t, field="value").set_index(shown.index).loc["unpruned", "ttft_ms_p95"] == 3.14159  # CSV's raw value
    assert "its unit" in t.attrs["caption"] and "Clock: perf_counter_ns" in t.attrs["caption"]
    assert not rows(t, field="bold").any(axis=None)  # a figure's direction is unknown: nothing is bold
    for text in (to_markdown(t), to_latex(t), to_csv(t)):
        assert "decode" in text and "ttft_ms_p50" not in text


def test_no_plugin_figure_no_table_and_no_note():
    """Records holding the package's figures only (every stored one): the report is as before, with no word of it."""
    for folder in (LATENCY, ROOT / "results" / "issue4" / "cpu_smollm2"):
        tables, missing = build_tables(collect([folder]))
        assert figures_table(collect([folder])).empty and "latency_figures" not in {t.attrs["name"] for t in tables}
        assert not [m for m in missing if "latency_figures" in m]


def test_the_package_figures_left_out_are_the_package_ones():
    """`PACKAGE_FIGURES` names figures of harness/latency/figures.py: a renamed one would show as a plug-in's."""
    from harness.latency import figures

    assert set(PACKAGE_FIGURES) <= {n for n, fn in figures.FIGURES.items() if fn.__module__ == figures.__name__}


@pytest.mark.parametrize("value, text", [(0.0, "0"), (1234.5678, "1,235"), (12.345, "12.35"), (0.012345, "0.01235"),
                                         (-2.5, "-2.500"), (1.5e-5, "1.5e-05")])
def test_a_figure_value_keeps_about_four_significant_digits(value, text):
    assert number_text(value) == text


def test_a_failed_figure_is_a_note_saying_a_rerun_recomputes_it(tmp_path):
    recs = _with_plugin_figures()
    out = tmp_path / "lat"
    out.mkdir()
    for r in recs.values():
        (out / r.filename).write_text(r.to_json())
    (note,) = figure_failure_notes(collect([out]))
    assert note == (f"latency figure 'probe_ms' (my_figs.probe) failed for shortgpt on {WORKLOAD}: ValueError: no probe "
                    f"at 256 tokens (traceback: {out / 'shortgpt__disaggregated.json'}, extra.figure_failures); fix it "
                    "and rerun the same latency command: the record is reused and the figure computed from its stored "
                    "samples")
    rep = render_report([out], tmp_path / "rep", plots=False)
    assert note in rep.missing and (tmp_path / "rep" / "tables" / "latency_figures.md").is_file()
    assert "<h2>Latency figures table</h2>" in (tmp_path / "rep" / "report.html").read_text()
    # the figures fixed and the plug-in's values gone: a rerender into the same folder removes the table it wrote
    rep = render_report([LATENCY], tmp_path / "rep", plots=False)
    assert not (tmp_path / "rep" / "tables" / "latency_figures.md").exists() and not figure_failure_notes(collect([LATENCY]))


def test_a_stored_task_title_heads_its_columns_and_old_records_fall_back():
    from reports.significance import paired_table
    from reports.tables import quality_table

    col = collect([ROOT / "results" / "issue15" / "paired_8of30"])
    before = quality_table(col).attrs["columns"]
    assert "PIQA" in before and "sciq" not in before  # TASK_TITLE's, for records without titles
    col.quality[0].lm_eval["task_titles"] = {"piqa": "PIQA (local)"}
    assert [c if c != "PIQA (local)" else "PIQA" for c in quality_table(col).attrs["columns"]] == before
    assert "PIQA (local)" in paired_table(col, "shortgpt").attrs["columns"]


def test_a_long_task_without_a_caption_leaves_no_empty_sentence_in_the_caption():
    """A plug-in task's presentation may leave `caption` empty (its default): the caption read "Long-context workloads. . KV/req"."""
    from harness.store.task_names import TaskPresentation
    from reports.tables import long_context_table

    col = collect([ROOT / "results" / "reference" / "quality"])
    bare = TaskPresentation(title="PPL", setting_prefix="ppl_T", primary_metric="ppl", metric_format="decimal",
                            lower_is_better=True).to_dict()
    for r in col.quality:
        r.lm_eval["tasks"]["pd_ppl"]["harness_task"]["presentation"] = bare
    caption = long_context_table(col).attrs["caption"]
    assert caption.startswith("Long-context workloads. KV/req: bytes the prefill stage sends"), caption
