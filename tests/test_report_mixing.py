"""`report` over several folders: which unpruned record a row is compared with (independent of the
order of the folders), labels of same-named folders, depth curves per run and per fixed option,
CSV columns for standard errors, CIs and p-values, and numbers sorted as numbers."""

import csv
import io
import re

import numpy as np
import pytest
from test_reports import _fake

from harness.store.records import save
from reports.collect import ReportError, collect, models, require_one_model, select_model
from reports.formats import rows, to_csv
from reports.significance import paired_table
from reports.tables import quality_table

BOTH = ("arc_easy", "boolq")


def _rec(method: str, tasks=BOTH, kv: int = 100, removed=(), items: list | None = None, limit: int = 4):
    """A disaggregated record of `tasks` (acc 0.5, stderr 0.01), `kv` bytes per task and, with
    `items`, the same per-item accs on every task."""
    r = _fake(method, "disaggregated", {t: {"acc": 0.5} for t in tasks}, removed=removed,
              kv={t: {"kv_bytes": kv, "handoffs": 4} for t in tasks})
    r.config["limit"] = limit
    if items is not None:
        r.extra["items"] = {t: {"ids": list(range(len(items))), "metrics": {"acc": list(map(float, items))}} for t in tasks}
    return r


def _kv_column(folders) -> dict[str, str]:
    t = rows(quality_table(collect(folders)))
    return dict(zip(t["Method"], t["KV ×"]))


def test_kv_ratio_prefers_the_rows_own_folder_then_an_unpruned_record_with_its_tasks(tmp_path):
    a, z, c = tmp_path / "a", tmp_path / "z", tmp_path / "c"
    save(_rec("unpruned", tasks=("boolq",), kv=1000), a)  # same configuration, one task missing
    save(_rec("unpruned", kv=400), z)
    save(_rec("x", kv=100, removed=(1,)), z)
    save(_rec("y", kv=200, removed=(1,)), c)  # no unpruned of its own: z's covers its tasks, a's does not
    for order in ([a, z, c], [z, a, c], [c, a, z]):
        kv = _kv_column(order)
        assert (kv["unpruned (z)"], kv["x"], kv["y"]) == ("1.00×", "4.00×", "2.00×"), order
        assert kv["unpruned (a)"] == "1.00×"  # its own folder's: over the one task it scored


def test_paired_baseline_does_not_depend_on_the_order_of_the_folders(tmp_path):
    a, z, c = tmp_path / "a", tmp_path / "z", tmp_path / "c"
    save(_rec("unpruned", items=[0, 0, 0, 0]), a)
    save(_rec("x", items=[1, 1, 1, 1], removed=(1,)), a)
    save(_rec("unpruned", items=[1, 1, 1, 1]), z)
    save(_rec("x", items=[1, 1, 1, 1], removed=(1,)), z)
    save(_rec("y", items=[1, 1, 0, 0], removed=(1,)), c)  # two baselines cover it: the first by path (a's)
    tables = [rows(paired_table(collect(order))).set_index("Method") for order in ([a, z, c], [z, c, a], [c, z, a])]
    for t in tables:
        assert t.equals(tables[0])
    t = tables[0]
    assert list(t.index) == ["x (a)", "x (z)", "y"]  # each unpruned record is a baseline, not a row
    assert t.loc["x (a)", "BoolQ"].startswith("+100.0") and t.loc["x (z)", "BoolQ"].startswith("+0.0")
    assert t.loc["y", "BoolQ"].startswith("+50.0")


def test_same_named_folders_are_told_apart_by_the_shortest_path_suffix(tmp_path):
    for folder in ("a/run", "b/run", "c/other"):
        save(_rec("x"), tmp_path / folder)
    col = collect([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert sorted(col.label(r) for r in col.quality) == ["x (a/run)", "x (b/run)", "x (other)"]


def test_paired_rows_sort_numbers_as_numbers(tmp_path):
    save(_rec("unpruned", items=[0, 1, 0, 1]), tmp_path)
    for k in (10, 2, 4):
        save(_rec(f"x@k={k}", items=[1, 1, 0, 1], removed=tuple(range(k % 4 + 1))), tmp_path)
    t = rows(paired_table(collect([tmp_path])))
    assert list(t["Method"]) == ["x@k=2", "x@k=4", "x@k=10"]


def test_csv_keeps_the_value_columns_and_adds_stderr_ci_and_p_columns(tmp_path):
    save(_rec("unpruned", items=[0, 1, 0, 1, 1]), tmp_path)
    save(_rec("x", items=[1, 1, 0, 1, 1], removed=(1,)), tmp_path)
    col = collect([tmp_path])
    quality = list(csv.DictReader(io.StringIO(to_csv(quality_table(col)))))
    head = ["group", "Method", "Removed", "ARC-e", "BoolQ", "Avg", "KV ×"]
    assert list(quality[0])[:len(head)] == head
    assert [r["BoolQ"] for r in quality] == ["50.0", "50.0"]  # unchanged: the raw value
    assert [r["BoolQ_stderr"] for r in quality] == ["1.0", "1.0"] and float(quality[0]["Avg_stderr"]) == pytest.approx(np.sqrt(2) / 2)
    paired = list(csv.DictReader(io.StringIO(to_csv(paired_table(col)))))
    assert paired[0]["BoolQ"] == "20.0"
    assert float(paired[0]["BoolQ_ci_low"]) <= 20.0 <= float(paired[0]["BoolQ_ci_high"])
    assert float(paired[0]["BoolQ_p_mcnemar"]) == 1.0 and float(paired[0]["Avg_ci_high"]) >= 20.0


def test_depth_curve_is_one_line_per_run_and_per_fixed_value_of_the_other_swept_options(tmp_path):
    from reports.plots import plot_score_vs_blocks, series

    a, b = tmp_path / "a", tmp_path / "b"
    save(_rec("unpruned"), a)
    for k in (2, 4):
        save(_rec(f"shortgpt@k={k}", removed=range(k)), a)
    for k in (3, 6):  # another run of the same sweep: its own line
        save(_rec(f"shortgpt@k={k}", removed=range(k)), b)
    for p in (4, 2):  # a product sweep: one line per k_prefill, along k_decode
        for d in (6, 2, 4):
            save(_rec(f"pdtrim@k_prefill={p},k_decode={d}", removed=range(d)), a)
    col = collect([b, a])
    assert {series(col, r) for r in col.quality} == {
        "unpruned", "shortgpt (a)", "shortgpt (b)", "pdtrim@k_prefill=2", "pdtrim@k_prefill=4"}
    ax = plot_score_vs_blocks(col).axes[0]
    lines = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}
    assert lines == {"unpruned": [0], "shortgpt (a)": [2, 4], "shortgpt (b)": [3, 6],
                     "pdtrim@k_prefill=2": [2, 4, 6], "pdtrim@k_prefill=4": [2, 4, 6]}


def test_kv_ratio_over_the_tasks_the_row_and_its_unpruned_record_both_scored(tmp_path):
    """Folders with different task sets: each row's KV × over its shared tasks (it was '—' for every row)."""
    save(_rec("unpruned", tasks=("arc_easy",), kv=400), tmp_path / "a")
    save(_rec("x", tasks=("arc_easy",), kv=100, removed=(1,)), tmp_path / "a")
    save(_rec("unpruned", kv=300), tmp_path / "b")
    save(_rec("x", kv=150, removed=(1,)), tmp_path / "b")
    kv = _kv_column([tmp_path / "a", tmp_path / "b"])
    assert (kv["x (a)"], kv["x (b)"], kv["unpruned (a)"]) == ("4.00×", "2.00×", "1.00×")


def test_the_average_counts_the_accuracy_columns_whatever_the_row_order(tmp_path):
    """A perplexity column (WikiText-2) that only a later row has must not make an earlier row's Avg '—'."""
    save(_rec("unpruned", kv=400), tmp_path / "a")  # sorts first: no wikitext
    later = _rec("x", kv=100, removed=(1,))
    later.scores["wikitext"] = {"word_perplexity": {"value": 30.0, "stderr": None}}
    save(later, tmp_path / "b")
    t = rows(quality_table(collect([tmp_path / "a", tmp_path / "b"]))).set_index("Method")
    assert t.loc["unpruned", "Avg"] == t.loc["x", "Avg"] == "50.0 ± 0.7"


def test_paired_average_is_over_the_accuracy_tasks_only(tmp_path):
    """passkey gets its own column but, as in the quality table's Avg, is not averaged."""
    base, other = _rec("unpruned", items=[0, 0, 0, 0]), _rec("x", items=[1, 1, 1, 1], removed=(1,))
    base.scores["passkey"] = other.scores["passkey"] = {"acc": {"value": 0.5, "stderr": 0.1}}
    base.extra["items"]["passkey"] = {"ids": [0, 1, 2, 3], "metrics": {"acc": [0.0, 0.0, 1.0, 1.0]}}
    other.extra["items"]["passkey"] = {"ids": [0, 1, 2, 3], "metrics": {"acc": [0.0, 0.0, 1.0, 1.0]}}
    save(base, tmp_path)
    save(other, tmp_path)
    t = rows(paired_table(collect([tmp_path]))).set_index("Method")
    assert list(t.columns) == ["ARC-e", "BoolQ", "passkey", "Avg", "Verdict"]
    assert t.loc["x", "passkey"].startswith("+0.0") and t.loc["x", "Avg"].startswith("+100.0")


def test_a_folder_of_failed_cells_only_is_a_note_beside_other_inputs(tmp_path):
    from harness.store.records import save_failure
    from reports.render import render_report

    save(_rec("unpruned"), tmp_path / "a")
    save_failure(tmp_path / "f", "manual", "disaggregated", "k", ValueError("decode_layers=9: no such layer"), "", "")
    rep = render_report([tmp_path / "a", tmp_path / "f"], tmp_path / "rep", html=False, plots=False)
    assert any("manual/disaggregated failed in" in m and "no such layer" in m for m in rep.missing)
    with pytest.raises(Exception, match="no run records; failed cells: manual/disaggregated"):
        render_report([tmp_path / "f"], tmp_path / "rep2", html=False, plots=False)


def test_figures_average_over_the_tasks_every_record_scored_and_say_what_is_left_out(tmp_path):
    from reports.plots import plot_score_vs_blocks
    from reports.render import render_report

    save(_rec("unpruned", tasks=("boolq",)), tmp_path / "a")
    save(_rec("x", removed=(1,)), tmp_path / "b")  # arc_easy and boolq
    rep = render_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep", html=False, plots=True)
    assert "score_vs_blocks" in rep.figures
    assert any(m.startswith("figures: scores averaged over the 1 task(s) every record scored (boolq); left out: arc_easy")
               for m in rep.missing), rep.missing
    ax = plot_score_vs_blocks(collect([tmp_path / "a", tmp_path / "b"])).axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["unpruned", "x"]  # both drawn
    save(_rec("y", tasks=("arc_easy",), removed=(1,)), tmp_path / "c")  # no task shared by all: no blank figure
    assert plot_score_vs_blocks(collect([tmp_path / "a", tmp_path / "c"])) is None


def test_records_of_long_context_tasks_only_leave_the_score_figures_as_they_were(tmp_path):
    """A `--tasks long` run's folder beside the accuracy run's counted in the tasks every record must share: none was
    left, both score figures were dropped, and the note said "no data in these records"."""
    from reports.render import render_report

    save(_rec("unpruned"), tmp_path / "acc")
    save(_rec("x", removed=(1,)), tmp_path / "acc")
    alone = render_report([tmp_path / "acc"], tmp_path / "rep1", html=False, plots=True)
    long_only = _fake("unpruned", "disaggregated", {"pd_ppl": {"ppl_T256": 12.0}},
                      kv={"pd_ppl": {"kv_bytes": 50, "handoffs": 2}})
    save(long_only, tmp_path / "long")
    rep = render_report([tmp_path / "acc", tmp_path / "long"], tmp_path / "rep2", html=False, plots=True)
    assert {"score_vs_blocks", "score_vs_kv"} <= set(alone.figures) <= set(rep.figures)
    assert not [m for m in rep.missing if m.startswith(("figure score_", "figures: scores averaged"))], rep.missing


def test_a_lower_is_better_column_names_its_metric_and_direction(tmp_path):
    r = _rec("unpruned")
    r.scores["wikitext"] = {"word_perplexity": {"value": 30.0, "stderr": None}}
    save(r, tmp_path)
    assert list(rows(quality_table(collect([tmp_path]))).columns)[2:] == ["ARC-e", "BoolQ", "WikiText-2 (word ppl ↓)", "Avg",
                                                                           "KV ×"]


def test_html_headers_are_aligned_as_their_columns(tmp_path):
    from reports.formats import to_html
    from reports.plans import plans_table

    save(_rec("unpruned"), tmp_path)
    t = plans_table(collect([tmp_path]))
    html = to_html(t)
    for j, a in enumerate(t.attrs["align"]):
        for cell_ in ("td", "th"):
            rule = re.search(rf"{cell_}\.col{j}\b[^{{]*\{{([^}}]*)\}}", html)
            assert rule and f"text-align: {'left' if a == 'l' else 'right'}" in rule.group(1), (cell_, j)


def test_no_plots_leaves_no_empty_figures_section(tmp_path):
    from reports.render import render_report

    save(_rec("unpruned"), tmp_path / "a")
    render_report([tmp_path / "a"], tmp_path / "rep", html=True, plots=False)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Quality table</h2>" in html and "<h2>Figures</h2>" not in html


def test_a_latency_only_report_says_why_there_is_no_paired_table(tmp_path):
    from conftest import ROOT

    from reports.render import render_report

    rep = render_report([ROOT / "results" / "issue4" / "cpu_smollm2"], tmp_path / "rep", html=False, plots=False)
    assert "paired table: not shown (no quality records)" in rep.missing


def test_paired_perplexity_is_worse_when_higher_and_shown_in_its_own_units(tmp_path):
    """A task whose per-item metric is a perplexity (a plug-in task may log one): higher is worse."""
    def rec(method, ppl, removed=()):
        r = _fake(method, "disaggregated", {"wikitext": {"word_perplexity": float(np.mean(ppl))}}, removed=removed)
        r.extra["items"] = {"wikitext": {"ids": list(range(len(ppl))), "metrics": {"word_perplexity": list(ppl)}}}
        return r

    save(rec("unpruned", [10.0, 11.0, 12.0, 13.0]), tmp_path)
    save(rec("x", [20.0, 21.5, 22.0, 23.5], removed=(1,)), tmp_path)
    save(rec("y", [9.0, 10.0, 11.5, 12.0], removed=(2,)), tmp_path)
    t = rows(paired_table(collect([tmp_path]))).set_index("Method")
    assert t.loc["x", "WikiText-2"].startswith("+10.2*") and t.loc["x", "Verdict"] == "0 better / 0 same / 1 worse"
    assert t.loc["y", "WikiText-2"].startswith("-0.9*") and t.loc["y", "Verdict"] == "1 better / 0 same / 0 worse"


def test_sensitivity_figure_has_one_panel_per_score_present_and_integer_block_ticks(tmp_path):
    from reports.plots import plot_sensitivity

    scored = _rec("shortgpt", removed=(1,))
    scored.plan["info"] = {"block_influence": [0.3, 0.01, 0.05, 0.2]}
    save(scored, tmp_path / "a")
    fig = plot_sensitivity(collect([tmp_path / "a"]))
    assert len(fig.axes) == 1  # no blank panel where no PDTrim sensitivity was stored
    searched = _rec("pdtrim", removed=(2,))
    searched.plan["info"] = {"stage_sensitivity": {"prefill": [1.0, 0.1, None, 0.5], "decode": [0.5, 0.05, 0.01, 0.2]}}
    save(searched, tmp_path / "b")
    fig = plot_sensitivity(collect([tmp_path / "a", tmp_path / "b"]))
    assert len(fig.axes) == 2
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _local(method: str, typed: str, where: str, removed=(), weights: str | None = None):
    """A record of the model folder at `where`, typed `typed` on the command line (weights digest `weights`)."""
    r = _rec(method, kv=400 if method == "unpruned" else 100, removed=removed, items=[1, 0, 1, 0])
    r.config["model"], r.model = typed, {"kind": "directory", "path": where}
    r.extra["inputs"] = {"version": 1, "model": weights} if weights else {}
    return r


def test_a_model_folder_typed_two_ways_is_one_model_and_another_folder_is_not(tmp_path):
    save(_local("unpruned", "m", "/x/m"), tmp_path / "a")  # run from /x
    save(_local("x", "/x/m", "/x/m", removed=(1,)), tmp_path / "b")  # the same folder, typed from elsewhere
    col = collect([tmp_path / "a", tmp_path / "b"])
    require_one_model(col)  # the figures put both on one axis
    assert {col.model(r) for r in col.all} == {"m"} and _kv_column([tmp_path / "a", tmp_path / "b"])["x"] == "4.00×"
    assert list(rows(paired_table(col))["Method"]) == ["x"]  # paired with the unpruned record of that folder
    assert len(select_model(col, "/x/m").all) == 2
    save(_local("x", "m", "/y/m", removed=(1,)), tmp_path / "c")  # another folder named m, run from /y
    col = collect([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert {col.model(r) for r in col.all} == {"m (/x/m)", "m (/y/m)"}
    with pytest.raises(ReportError, match="records of 2 models"):
        require_one_model(col)
    assert len(select_model(col, "m (/y/m)").all) == 1


def test_a_copy_of_a_model_folder_with_the_same_weights_is_the_same_model(tmp_path):
    save(_local("unpruned", "m", "/x/m", weights="w1"), tmp_path / "a")
    save(_local("x", "m", "/clone/m", removed=(1,), weights="w1"), tmp_path / "b")  # a clone elsewhere
    save(_local("y", "m", "/z/m", removed=(1,), weights="w2"), tmp_path / "c")  # other weights
    col = collect([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert len({col.model(r) for r in col.all if r.method != "y"}) == 1 and len(models(col)) == 2
    t = quality_table(col)
    assert list(rows(t, 0)["KV ×"]) == ["1.00×", "4.00×"] and list(rows(t, 1)["KV ×"]) == ["—"]  # no unpruned of w2
    assert sorted(models(col)) == ["m (/clone/m)", "m (/z/m)"]
    save(_local("z", "m", "/x/m", removed=(1,), weights="w3"), tmp_path / "d")  # the first folder, its weights changed
    assert len(models(collect([tmp_path / "a", tmp_path / "d"]))) == 2


def test_paired_avg_needs_every_accuracy_column_and_the_caption_names_rows_left_out_or_partly_paired(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(_rec("unpruned", items=[1, 0, 1, 0]), a)
    save(_rec("x", items=[1, 1, 1, 0], removed=(1,)), a)
    save(_rec("y", tasks=("arc_easy",), items=[0, 0, 1, 0], removed=(2,)), a)  # one of the two accuracy columns
    z = _rec("z", items=[1, 1, 1, 1], removed=(3,))
    z.extra["items"]["boolq"] = {"ids": [0, 1, 7, 8], "metrics": {"acc": [1.0, 1.0, 1.0, 1.0]}}  # 2 of 4 items shared
    save(z, a)
    save(_rec("w", items=[1, 1, 1, 1], removed=(1,), limit=8), b)  # another --limit: no unpruned record of its own
    t = paired_table(collect([a, b]))
    got = rows(t).set_index("Method")
    assert got.loc["x", "Avg"].startswith("+25.0") and got.loc["y", "Avg"] == "—" and "w" not in got.index
    assert "z boolq 2 of 4" in t.attrs["caption"] and "so no row: w" in t.attrs["caption"]


def test_paired_avg_leaves_out_a_perplexity_task_as_the_quality_tables_avg_does(tmp_path):
    """WikiText's word perplexity is paired in its own column but is no accuracy: the Avg is over ARC-e alone (+25.0
    points), not a mean of points and perplexity units."""
    def rec(method, accs, ppls, removed=()):
        r = _fake(method, "disaggregated", {"arc_easy": {"acc": float(np.mean(accs))},
                                            "wikitext": {"word_perplexity": float(np.mean(ppls))}}, removed=removed)
        r.extra["items"] = {"arc_easy": {"ids": [0, 1, 2, 3], "metrics": {"acc": list(map(float, accs))}},
                            "wikitext": {"ids": [0, 1, 2], "metrics": {"word_perplexity": list(ppls)}}}
        return r

    save(rec("unpruned", [1, 0, 1, 0], [10.0, 11.0, 12.0]), tmp_path)
    save(rec("x", [1, 1, 1, 0], [20.0, 21.5, 22.0], removed=(1,)), tmp_path)
    got = rows(paired_table(collect([tmp_path]))).set_index("Method")
    assert got.loc["x", "WikiText-2"].startswith("+10.2*") and got.loc["x", "Avg"].startswith("+25.0 "), got.loc["x"].to_dict()


def test_a_plug_in_long_task_with_its_own_primary_metric_is_paired(tmp_path):
    """A long-context task the package does not know, whose stored presentation names its primary metric."""
    def rec(method, ppl, removed=()):
        r = _fake(method, "disaggregated", {"myppl": {"wppl": float(np.mean(ppl))}}, removed=removed)
        r.extra["items"] = {"myppl": {"ids": [0, 1, 2], "metrics": {"wppl": list(ppl)}}}
        r.lm_eval["tasks"] = {"myppl": {"harness_task": {"presentation": {
            "title": "MyPPL", "primary_metric": "wppl", "lower_is_better": True, "setting_prefix": "wppl_"}}}}
        return r

    save(rec("unpruned", [10.0, 11.0, 12.0]), tmp_path)
    save(rec("x", [20.0, 21.5, 22.0], removed=(1,)), tmp_path)
    got = rows(paired_table(collect([tmp_path]))).set_index("Method")
    assert got.loc["x", "MyPPL" if "MyPPL" in got.columns else "myppl"].startswith("+10.2")


def test_long_context_tasks_only_leave_no_empty_quality_table_and_the_caption_describes_the_tasks_shown(tmp_path):
    from reports.render import build_tables
    from reports.tables import long_context_table

    r = _fake("unpruned", "disaggregated", {"passkey": {"acc": 1.0, "acc_L1024": 1.0}},
              kv={"passkey": {"kv_bytes": 400, "handoffs": 4}})
    save(r, tmp_path)
    col = collect([tmp_path])
    assert quality_table(col).empty
    tables, missing = build_tables(col)
    assert "quality table: not shown (long-context tasks only: see the long_context table)" in missing
    caption = long_context_table(col).attrs["caption"]
    assert "passkey %" in caption and "PPL" not in caption  # pd_ppl is not in these records


def test_figures_draw_no_error_bar_for_an_unknown_standard_error_and_put_a_long_legend_beside_the_axes(tmp_path):
    import math

    import matplotlib.pyplot as plt

    from reports.plots import plot_score_vs_blocks, plot_score_vs_kv

    save(_rec("unpruned"), tmp_path)
    unknown = _rec("x", removed=(1,))
    for ms in unknown.scores.values():
        ms["acc"]["stderr"] = None  # lm-eval gave none
    save(unknown, tmp_path)
    fig = plot_score_vs_blocks(collect([tmp_path]))
    bars = {c.get_label(): c.lines[2][0].get_segments() for c in fig.axes[0].containers}
    assert all(math.isnan(y) for seg in bars["x"] for _, y in seg)  # no bar, not a zero-length one
    assert all(not math.isnan(y) for seg in bars["unpruned"] for _, y in seg)
    plt.close(fig)
    for i in range(12):  # a depth sweep's worth of points
        save(_rec(f"m{i}", removed=(1,), kv=50 + i), tmp_path)
    fig = plot_score_vs_kv(collect([tmp_path]))
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= frame.x1  # beside the axes: it covers no point
    plt.close(fig)


def test_the_score_axis_names_the_one_task_it_scores(tmp_path):
    """A report of one task labelled the score axes 'average score over 1 tasks'; it names the task, and several
    tasks keep 'average score over N tasks'."""
    import matplotlib.pyplot as plt

    from reports.plots import plot_score_vs_blocks, plot_score_vs_kv

    for folder, tasks in ((tmp_path / "one", ("arc_easy",)), (tmp_path / "two", BOTH)):
        save(_rec("unpruned", tasks=tasks), folder)
        save(_rec("x", tasks=tasks, removed=(1,), kv=50), folder)
        want = "score on arc_easy" if len(tasks) == 1 else "average score over 2 tasks"
        for fig, unit in ((plot_score_vs_blocks(collect([folder])), " (%, ± 1 se)"), (plot_score_vs_kv(collect([folder])), " (%)")):
            assert fig.axes[0].get_ylabel() == want + unit
            plt.close(fig)


def test_a_latency_figure_a_record_lacks_draws_no_bar(tmp_path):
    import math

    import matplotlib.pyplot as plt

    from harness.store.latency import WorkloadLatency
    from reports.plots import plot_latency_bars

    label = "latency_T16_n4_b1"
    for method, tpot in (("unpruned", 2.0), ("x", None)):
        r = _fake(method, "disaggregated", {})
        r.config["kind"] = "latency"
        r.latency = {label: WorkloadLatency({"ttft_ms_p50": 5.0, **({"tpot_ms_p50": tpot} if tpot else {})}, {})}
        save(r, tmp_path)
    fig = plot_latency_bars(collect([tmp_path]))
    heights = {c.get_label(): [b.get_height() for b in c] for c in fig.axes[1].containers}
    assert heights["unpruned"] == [2.0] and math.isnan(heights["x"][0])  # not a TPOT of 0 ms
    plt.close(fig)


def test_kv_bytes_figure_leaves_out_a_setting_without_a_prompt_length():
    """A setting the tables sort by name (a plug-in's `Tfull`, no number) raised ValueError in int('full'): the report
    stopped with a traceback after writing its tables."""
    import matplotlib.pyplot as plt

    from reports.plots import plot_bytes_vs_prompt
    from reports.tables import _as_collection

    r = _rec("unpruned")
    r.extra["kv_by_setting"] = {"pd_ppl": {"T512": {"kv_bytes": 4096, "handoffs": 2}, "Tfull": {"kv_bytes": 8192, "handoffs": 2}}}
    fig = plot_bytes_vs_prompt(_as_collection([r]))
    assert [list(line.get_xdata()) for line in fig.axes[0].get_lines()] == [[512]]
    plt.close(fig)


def test_a_name_with_dollar_signs_is_text_in_the_figures(tmp_path):
    """Matplotlib read `$...$` in a legend label as mathtext: a method or folder named `a$_^$b` raised ValueError
    when the figure was saved (a traceback after the tables were written), `$k$` was typeset as math."""
    import matplotlib
    import matplotlib.pyplot as plt

    from reports.plots import plot_score_vs_blocks, save_plots

    save(_rec("unpruned"), tmp_path)
    save(_rec("a$_^$b", removed=(1,)), tmp_path)
    assert "score_vs_blocks" in save_plots(collect([tmp_path]), tmp_path / "figures")
    fig = plot_score_vs_blocks(collect([tmp_path]))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["unpruned", r"a\$_^\$b"]  # shown as typed
    plt.close(fig)
    assert matplotlib.rcParams["text.parse_math"]  # on: the log axes' tick labels ($2^{9}$) are mathtext


def test_kv_figure_leaves_out_a_record_without_handoff_counts():
    """A kv entry the record schema accepts without `handoffs` (only kv_bytes is required) raised KeyError in the
    score-versus-KV figure: a traceback after the tables were written. No per-request point for it."""
    import matplotlib.pyplot as plt

    from reports.plots import plot_score_vs_kv
    from reports.tables import _as_collection

    old = _rec("x", removed=(1,))
    for kv in old.kv.values():
        del kv["handoffs"]
    fig = plot_score_vs_kv(_as_collection([_rec("unpruned"), old]))
    assert [len(c.get_offsets()) for c in fig.axes[0].collections] == [1]  # unpruned's point only
    plt.close(fig)


def test_a_caption_says_which_settings_its_rows_differ_in(tmp_path):
    """Rows of two limits and two weights dtypes shared a group, its Avg column and its bold with nothing said."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, limit, dtype in ((a, 4, "float32"), (b, 8, "bfloat16")):
        for method, removed in (("unpruned", ()), (f"x{limit}", (1,))):
            r = _rec(method, removed=removed, limit=limit)
            r.model["dtype"] = dtype
            save(r, folder)
    mixed = quality_table(collect([a, b])).attrs["caption"]
    assert "Rows were run with different settings, compared side by side: limit 4 / 8; weights dtype bfloat16 / float32" in mixed
    assert "Rows were run with different" not in quality_table(collect([a])).attrs["caption"]
    c = tmp_path / "c"
    save(_rec("unpruned", limit=24), c)
    assert "limit 4 / 8 / 24;" in quality_table(collect([a, b, c])).attrs["caption"]  # as numbers, not '24' after '8'
    r = _rec("y", removed=(1,))
    r.model.pop("dtype", None)  # a record from before the resolved dtype was kept: unknown, not different
    save(r, a)
    assert "Rows were run with different" not in quality_table(collect([a])).attrs["caption"]


def test_the_paired_caption_names_tasks_a_row_scored_that_its_baseline_did_not(tmp_path):
    """x's boolq had per-item results but unpruned never scored boolq: its paired row left boolq out with no word
    (its paired Avg then covered other tasks than its quality-table Avg)."""
    save(_rec("unpruned", tasks=("arc_easy",), items=[0, 1, 0, 1]), tmp_path)
    save(_rec("x", items=[1, 1, 0, 1], removed=(1,)), tmp_path)
    caption = paired_table(collect([tmp_path])).attrs["caption"]
    assert "Not paired, as its unpruned record did not score them: x boolq." in caption
    save(_rec("unpruned", items=[0, 1, 0, 1]), tmp_path)
    assert "Not paired" not in paired_table(collect([tmp_path])).attrs["caption"]


def test_a_folder_of_unfinished_cells_only_says_which_and_that_their_command_resumes_them(tmp_path):
    """A run interrupted before any cell finished leaves only resume states: 'no run records' alone read like a wrong
    folder."""
    import warnings

    from harness.api import load_results
    from harness.store.records import partial_filename
    from reports.render import render_report

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / partial_filename("pdtrim", "disaggregated")).write_text("{}")
    (tmp_path / "r" / partial_filename("tail@k=2", "unified")).write_text("{}")
    (tmp_path / "r" / ".x__unified.partial.json").write_text("{}")  # a temp file, not a cell
    said = "cells not finished there: pdtrim/disaggregated, tail@k=2/unified (rerun the command that made them"
    with pytest.raises(ReportError, match=re.escape(said)):
        render_report([tmp_path / "r"], tmp_path / "rep", html=False, plots=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_results(tmp_path / "r").empty
    assert any(said in str(w.message) for w in caught), [str(w.message) for w in caught]
    (tmp_path / "e").mkdir()  # nothing at all: no hint
    with pytest.raises(ReportError, match=r"found$"):
        render_report([tmp_path / "e"], tmp_path / "rep2", html=False, plots=False)
