"""Reports: tables from stored records in three formats, plots, the HTML report in a real browser."""

import copy
import csv
import io
import json
import re
import shutil
import statistics
import subprocess

import pytest
from conftest import ROOT, lock_holder

from harness.store.records import RunRecord, load_dir, save, save_failure
from reports.collect import ReportError, collect
from reports.efficiency import efficiency_table
from reports.formats import groups, rows, to_csv, to_html, to_latex, to_markdown
from reports.plans import plans_table
from reports.significance import paired_table
from reports.tables import long_context_table, quality_table

QUALITY = ROOT / "results" / "issue3" / "default"
LATENCY = ROOT / "results" / "issue4" / "cpu_smollm2"


@pytest.fixture
def report(cli):
    """`python -m harness report ARGS`, in this process."""
    return lambda *args: cli("report", *args)


def _fake(method: str, mode: str, scores: dict, removed=(), kv=None, model: str = "M", config_model: str = "m") -> RunRecord:
    keep = [i for i in range(4) if i not in removed]
    return RunRecord(method=method, mode=mode, run_key=method + mode, config={"model": config_model, "seed": 0},
                     environment={},
                     plan={"prefill_layers": keep, "decode_layers": keep, "removed_prefill": list(removed),
                           "removed_decode": list(removed), "kv_policy": {"n_first": 0, "n_last": 0, "layers": []}},
                     model={"name": model}, calibration=None,
                     scores={t: {m: {"value": v, "stderr": 0.01} for m, v in ms.items()} for t, ms in scores.items()},
                     kv=kv or {}, n_samples={t: 10 for t in scores}, lm_eval={"version": "0.4.13"}, timing_s={}, created="")


def test_quality_table_conventions_bold_and_average():
    recs = [_fake("unpruned", "disaggregated", {"hellaswag": {"acc": 0.40, "acc_norm": 0.50}, "boolq": {"acc": 0.60}},
                  kv={"hellaswag": {"kv_bytes": 400, "handoffs": 4}, "boolq": {"kv_bytes": 200, "handoffs": 2}}),
            _fake("x", "disaggregated", {"hellaswag": {"acc": 0.45, "acc_norm": 0.30}, "boolq": {"acc": 0.70}}, removed=(1,),
                  kv={"hellaswag": {"kv_bytes": 100, "handoffs": 4}, "boolq": {"kv_bytes": 50, "handoffs": 2}})]
    paper = quality_table(recs, "paper")
    text, bold = rows(paper).set_index("Method"), rows(paper, field="bold").set_index(rows(paper)["Method"])
    assert list(text.columns) == ["Removed", "HellaSwag", "BoolQ", "Avg", "KV ×"]
    # HellaSwag acc_norm, BoolQ, avg, KV; ± the stderr (avg: sqrt(1² + 1²) / 2)
    assert list(text.loc["unpruned"][1:]) == ["50.0 ± 1.0", "60.0 ± 1.0", "55.0 ± 0.7", "1.00×"]
    assert list(text.loc["x"][1:]) == ["30.0 ± 1.0", "70.0 ± 1.0", "50.0 ± 0.7", "4.00×"]
    assert bold.loc["unpruned", "HellaSwag"] and not bold.loc["x", "HellaSwag"] and bold.loc["x", "BoolQ"] and bold.loc["x", "KV ×"]
    assert "acc_norm for HellaSwag" in paper.attrs["caption"] and groups(paper) == ["PD-disaggregated"]
    acc = quality_table(recs, "acc")
    assert list(rows(acc).loc[1, ["HellaSwag", "BoolQ"]]) == ["45.0 ± 1.0", "70.0 ± 1.0"] and "acc everywhere" in acc.attrs["caption"]
    norm = quality_table(recs, "acc_norm")  # acc_norm where the task has it (HellaSwag), acc elsewhere (BoolQ)
    assert list(rows(norm).loc[1, ["HellaSwag", "BoolQ", "Avg"]]) == ["30.0 ± 1.0", "70.0 ± 1.0", "50.0 ± 0.7"]
    # within noise: 5-point standard errors make 45 vs 40 (and 70 vs 60) no win, so nothing is bold but the bytes
    noisy = [_fake(r.method, r.mode, {t: {m: v["value"] for m, v in ms.items()} for t, ms in r.scores.items()},
                   removed=r.plan["removed_decode"], kv=r.kv) for r in recs]
    for r in noisy:
        for ms in r.scores.values():
            for v in ms.values():
                v["stderr"] = 0.05
    nb = rows(quality_table(noisy, "acc"), field="bold").set_index(rows(quality_table(noisy, "acc"))["Method"])
    assert not nb[["HellaSwag", "BoolQ", "Avg"]].to_numpy().any() and nb.loc["x", "KV ×"]
    # no stderr at all: no bold either (a sample too small to tell is not a win)
    for r in noisy:
        for ms in r.scores.values():
            for v in ms.values():
                v["stderr"] = None
    t0 = quality_table(noisy, "paper")
    assert not rows(t0, field="bold")[["HellaSwag", "BoolQ", "Avg"]].to_numpy().any() and "± " not in to_markdown(t0).split("|", 1)[1]
    with pytest.raises(ReportError, match="unknown metric convention 'f1'; expected one of paper, acc_norm, acc"):
        quality_table(recs, "f1")


def test_a_row_without_a_score_does_not_take_the_bold_from_the_best():
    """A '—' cell (a task the row lacks) is NaN among the column's values; sorted with the numbers it made the
    best and the runner-up arbitrary, so 64 ± 4.8 against 48 ± 5.0 lost its bold."""
    recs = [_fake("unpruned", "disaggregated", {"arc_easy": {"acc": 0.48}, "boolq": {"acc": 0.60}}),
            _fake("x", "disaggregated", {"boolq": {"acc": 0.60}}, removed=(1,)),
            _fake("y", "disaggregated", {"arc_easy": {"acc": 0.64}, "boolq": {"acc": 0.60}}, removed=(2,))]
    for r in recs:
        r.scores.get("arc_easy", {}).get("acc", {})["stderr"] = 0.05
    t = quality_table(recs)
    bold = rows(t, field="bold").set_index(rows(t)["Method"])["ARC-e"]
    assert dict(bold) == {"unpruned": False, "x": False, "y": True}  # 16 > 1.96 · sqrt(5² + 5²) = 13.9


def test_a_nan_score_is_no_score_not_nan_in_the_cell_and_the_average():
    """A NaN value (JSON NaN in a record) was shown 'nan ± 1.0' and made the row's Avg 'nan ± 0.7': it is a missing
    score, in the tables and the figures' averages."""
    from reports.plots import avg_score

    recs = [_fake("unpruned", "disaggregated", {"arc_easy": {"acc": 0.50}, "boolq": {"acc": 0.60}}),
            _fake("x", "disaggregated", {"arc_easy": {"acc": float("nan")}, "boolq": {"acc": 0.60}}, removed=(1,))]
    t = quality_table(recs)
    assert list(rows(t).set_index("Method").loc["x", ["ARC-e", "Avg"]]) == ["—", "—"] and "nan" not in to_markdown(t)
    assert avg_score(recs[1], ["arc_easy", "boolq"], "paper") == (None, None)


def test_kv_ratio_leaves_out_a_task_the_row_handed_nothing_over_for():
    """A task of zero items (kv: 0 bytes in 0 handoffs) counted unpruned's bytes of it against none: 12.00×, not 4.00×."""
    recs = [_fake("unpruned", "disaggregated", {"arc_easy": {"acc": 0.5}, "boolq": {"acc": 0.6}},
                  kv={"arc_easy": {"kv_bytes": 400, "handoffs": 4}, "boolq": {"kv_bytes": 200, "handoffs": 2}}),
            _fake("x", "disaggregated", {"arc_easy": {"acc": None}, "boolq": {"acc": 0.6}}, removed=(1,),
                  kv={"arc_easy": {"kv_bytes": 0, "handoffs": 0}, "boolq": {"kv_bytes": 50, "handoffs": 2}})]
    assert rows(quality_table(recs)).set_index("Method").loc["x", "KV ×"] == "4.00×"


def test_formats_escape_and_group_rows_and_bold_the_same_cells_everywhere():
    from reports.formats import bold_best, cell, make_table

    t = make_table("x_y", "a <caption> & 50% ± 1", ["Method", "Removed", "Score"],
                   [("G <1>", [[cell("a_b"), cell("1"), cell("2.0", 2.0)], [cell("c"), cell("1"), cell("3.0", 3.0)]]),
                    ("", [[cell("d"), cell("2"), cell("—")]])])  # "": no heading row
    bold_best(t, "Score")
    assert to_markdown(t).splitlines()[2:] == ["| Method | Removed | Score |", "|---|---|---|", "| **G <1>** |  |  |",
                                               "| a_b | 1 | 2.0 |", "| c | 1 | **3.0** |", "| d | 2 | — |"]
    tex = to_latex(t)
    assert r"\caption{a \textless{}caption\textgreater{} \& 50\% $\pm$ 1}" in tex  # < > as OT1 prints them and r"\label{tab:x_y}" in tex
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule")[0].splitlines()
    assert body == [r"\multicolumn{3}{l}{\textit{G \textless{}1\textgreater{}}} \\", r"a\_b & 1 & 2.0 \\", r"c & 1 & \textbf{3.0} \\", r"\midrule",
                    r"d & 2 & -- \\"]
    html = to_html(t)
    assert "<caption>a &lt;caption&gt; &amp; 50% ± 1</caption>" in html and "<script" not in html
    assert html.count('<tr class="group">') == 1 and '<tr class="group"><th colspan="3">G &lt;1&gt;</th></tr>' in html
    assert html.split("<tbody>")[1].count("<tr") == 4 and re.search(r"#T_x_y_row1_col2 \{\s*font-weight: bold;", html)
    assert "font-weight" not in html.replace("#T_x_y_row1_col2 {\n  font-weight", "")  # only c's score is bold
    assert to_csv(t).splitlines() == ["group,Method,Removed,Score", "G <1>,a_b,1,2.0", "G <1>,c,1,3.0", ",d,2,—"]


def test_markdown_escapes_a_pipe_in_a_name_so_every_row_keeps_its_columns():
    """A `|` in a method, model or column name split its Markdown cell: the row had one column too many."""
    from reports.formats import cell, make_table

    t = make_table("q", "c", ["Method", "A|B"], [("M | 2", [[cell("x|y <b>"), cell("1.0", 1.0)]])])
    lines = [line for line in to_markdown(t).splitlines() if line.startswith("|")]
    assert lines == [r"| Method | A\|B |", "|---|---|", r"| **M \| 2** |  |", r"| x\|y \<b> | 1.0 |"]  # <b>: test_report_escapes
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in lines} == {3}


def test_values_shown_as_the_best_is_are_bold_too():
    """bold_best compared raw values: of 1.6021 and 1.6017, both shown '1.60×', only one was bold."""
    from reports.formats import bold_best, cell, make_table

    t = make_table("k", "c", ["Method", "KV ×"], [("", [[cell("a"), cell("1.60×", 1.6021)], [cell("b"), cell("1.60×", 1.6017)],
                                                       [cell("c"), cell("1.59×", 1.5912)]])])
    bold_best(t, "KV ×")
    assert list(rows(t, field="bold")["KV ×"]) == [True, True, False]


def test_rows_go_by_blocks_removed_from_decode_then_prefill_with_unpruned_first():
    recs = [_fake(m, "disaggregated", {"arc_easy": {"acc": 0.5}}) for m in ("y", "x", "h2o", "unpruned")]
    recs[0].plan.update(removed_prefill=[1], removed_decode=[1, 2])  # 1 / 2
    recs[1].plan.update(removed_prefill=[1, 2], removed_decode=[1])  # 2 / 1
    t = rows(quality_table(recs))
    assert list(t["Method"]) == ["unpruned", "h2o", "x", "y"] and list(t["Removed"]) == ["0", "0", "2 / 1", "1 / 2"]


def test_bold_needs_a_gap_strictly_beyond_the_noise_and_a_runner_up():
    """|best - second| > z·sqrt(se_b² + se_s²): a gap of exactly that is no win; a group of one number has no best."""
    from reports.formats import bold_beyond_noise, cell, make_table

    t = make_table("k", "c", ["Method", "S"], [("", [[cell("a"), cell("10", 10.0)], [cell("b"), cell("0", 0.0)]]),
                                                 ("g", [[cell("c"), cell("5", 5.0)]])])
    bold_beyond_noise(t, "S", {0: 3.0, 1: 4.0, 2: 0.1}, z=2.0)  # 2 · sqrt(9 + 16) = 10: the gap, not more
    assert not t["bold"].any()
    bold_beyond_noise(t, "S", {0: 3.0, 1: 4.0}, z=1.9)
    assert list(rows(t, field="bold")["S"]) == [True, False]


def test_a_time_is_bold_only_where_welchs_test_tells_it_from_the_runner_up():
    """`bold_beyond_spread`: the best of a group is bold only where Welch's two-sided t-test on its samples and the
    runner-up's gives p < alpha, the best's mean the better; one sample a row (`--repeats 1`) is never bold, as there
    is no spread to tell noise by. `welch_p` is scipy's `ttest_ind(equal_var=False)`."""
    from scipy import stats

    from reports.formats import bold_beyond_spread, cell, make_table, welch_p

    def table():
        return make_table("e", "c", ["Method", "T"], [("", [[cell("a"), cell("10", 10.0)], [cell("b"), cell("12", 12.0)],
                                                          [cell("c"), cell("30", 30.0)]])])

    apart, overlap = ([10.0, 10.2, 9.9], [12.0, 12.1, 11.8]), ([10.0, 13.0, 9.0], [12.0, 9.5, 14.0])
    for a, b in (apart, overlap, ([1.0, 2.0], [3.0, 4.0, 9.0])):
        assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert welch_p([10.0], [12.0, 12.1]) is None and welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0
    for samples, bold in [({0: apart[0], 1: apart[1]}, [True, False, False]),  # p ≈ 0.0003
                          ({0: [10.0], 1: [12.0], 2: [30.0]}, [False] * 3),  # one run each: bold_best bolded a
                          ({0: overlap[0], 1: overlap[1]}, [False] * 3),  # p ≈ 0.7
                          ({0: apart[1], 1: apart[0]}, [False] * 3),  # the best p50's runs are the slower: no win
                          ({0: apart[0]}, [False] * 3)]:  # the runner-up's runs unknown
        t = table()
        bold_beyond_spread(t, "T", samples, lower_is_better=True)
        assert list(rows(t, field="bold")["T"]) == bold, samples


def test_the_efficiency_table_bolds_no_time_of_a_single_run_and_bytes_still():
    """Latency tables bolded the lowest time with `--repeats 1` too, and at the reference's prompt 512 shortgpt's TTFT
    (647.8 ms against pdtrim's 747.0, runs 638-651 against 686-752: Welch p = 0.056). A time is bold only beyond the
    runs' spread, and its speedup with it; bytes are counted, so their best stays bold whatever the runs."""
    from reports.record_values import timing_runs

    recs = load_dir(LATENCY)
    e = efficiency_table(recs, 100)
    for r in recs:  # a run's E2E is its TTFT + transfer + 31 TPOTs: their median is near the sum of the medians
        for lab in r.latency:
            e2e = timing_runs(r, lab, 100)["e2e"]
            assert len(e2e) == 3 and statistics.median(e2e) == pytest.approx(r.figure(lab, "e2e_ms_p50@100gbit"), rel=0.02)
    g512 = next(i for i, title in enumerate(groups(e)) if "prompt 512" in title)
    bold = rows(e, g512, "bold").set_index(rows(e, g512)["Method"])
    assert not bold[["TTFT (ms)", "TTFT speedup", "E2E (ms) @100 Gbit/s", "E2E speedup"]].to_numpy().any()
    assert bold.loc["pdtrim", "TPOT (ms)"] and bold.loc["pdtrim", "TPOT speedup"]  # 43.1-43.3 against 45.1-45.9
    for r in recs:  # one measured run each, as --repeats 1 records them
        for w in r.latency.values():
            w.samples.update(ttft_ms=w.samples["ttft_ms"][:1], tpot_ms=w.samples["tpot_ms"][:1])
    one = efficiency_table(recs, 100)
    assert list(rows(one, g512)["TTFT (ms)"]) == list(rows(e, g512)["TTFT (ms)"])  # p50s as recorded
    timed = [c for c in one.attrs["columns"] if "ms" in c or "speedup" in c]
    assert len(timed) == 6 and not rows(one, field="bold")[timed].to_numpy().any()
    bytes_bold = rows(one, g512, "bold").set_index(rows(one, g512)["Method"])
    assert bytes_bold.loc["pdtrim", "KV sent (MiB)"] and bytes_bold.loc["pdtrim", "KV reduction"]
    assert "so never with one run per row" in one.attrs["caption"]


def test_bold_best_needs_two_numbers_in_a_group():
    from reports.formats import bold_best, cell, make_table

    t = make_table("k", "c", ["Method", "KV ×"], [("", [[cell("a"), cell("2.00×", 2.0)], [cell("b"), cell("1.00×", 1.0)]]),
                                                    ("g", [[cell("c"), cell("3.00×", 3.0)], [cell("d"), cell("—")]])])
    bold_best(t, "KV ×")
    assert list(rows(t, 0, field="bold")["KV ×"]) == [True, False]
    assert not rows(t, 1, field="bold")["KV ×"].any()  # one number and a '—': no best


def test_latex_writes_a_pipe_as_a_bar_not_the_em_dash_ot1_prints():
    """pdflatex's default OT1 font prints a text-mode '|' as '—': a method 'a | b' read 'a — b' in the PDF."""
    from reports.formats import latex_escape

    assert latex_escape("a | b <c>") == r"a \textbar{} b \textless{}c\textgreater{}"


def test_tables_from_stored_records_in_three_formats():
    col = collect([QUALITY, LATENCY])
    q, e, lc, pl = quality_table(col), efficiency_table(col, 100), long_context_table(col), plans_table(col)
    assert groups(q) == ["PD-disaggregated", "PD-unified"]
    assert list(rows(q)["Method"]) == ["unpruned", "pdtrim", "shortgpt"]  # 0 blocks first, then 4 / 8, then 8
    md = to_markdown(q)
    # at 100 items only BoolQ's gap is beyond noise (1.96 combined standard errors)
    assert "| pdtrim | 4 / 8 | 39.0 ± 4.9 | 23.0 ± 4.2 |" in md and "**61.0 ± 4.9**" in md and "**49.0" not in md
    # efficiency: ratios are computed from the records, not copied
    unp = load_dir(LATENCY)
    ttft = {r.method: r.figure("latency_T2048_n32_b1", "ttft_ms_p50") for r in unp}
    g = next(i for i, title in enumerate(groups(e)) if "prompt 2048" in title)
    text, value = rows(e, g).set_index("Method"), rows(e, g, "value").set_index(rows(e, g)["Method"])
    assert value.loc["shortgpt", "TTFT speedup"] == pytest.approx(ttft["unpruned"] / ttft["shortgpt"])
    assert text.loc["pdtrim", "KV reduction"] == "3.56×"  # 90 MiB / 25.3 MiB at T=2048
    # times and bytes: the lowest is bold (shortgpt's TTFT, pdtrim's TPOT and KV), speedups: the highest
    bold = rows(e, g, "bold").set_index(rows(e, g)["Method"])
    assert [m for m in bold.index if bold.loc[m, "TTFT (ms)"]] == ["shortgpt"] == [m for m in bold.index if bold.loc[m, "TTFT speedup"]]
    assert [m for m in bold.index if bold.loc[m, "TPOT (ms)"]] == ["pdtrim"] == [m for m in bold.index if bold.loc[m, "KV sent (MiB)"]]
    # settings by number (the records store ppl_T1024, ppl_T2048, ppl_T512); the lowest perplexity is the bold one
    assert [c for c in lc.attrs["columns"] if c.startswith("PPL")] == ["PPL T512", "PPL T1024", "PPL T2048"]
    assert list(rows(lc, 0, "bold")["PPL T512"]) == [True, False, False]  # unpruned: 20.26 ± 2.19
    assert "PPL T2048" in lc.attrs["columns"] and lc.loc[lc["group"] == 0, "text"].str.contains("25.3 (3.56×)", regex=False).any()
    assert "3 4 5 7 16 17 25 26" in list(rows(pl)["Removed (decode)"])
    csv_text = to_csv(q)
    assert csv_text.splitlines()[0].startswith("group,Method,Removed,ARC-e") and ",49.0," in csv_text


def _check_latex_structure(tex: str, n_cols: int) -> None:
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    assert all(k in tex for k in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\label{tab:"))
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    for line in body.strip().splitlines():
        if line.startswith((r"\midrule", r"\multicolumn")):
            continue
        assert line.endswith(r"\\") and len(re.split(r"(?<!\\)&", line)) == n_cols, line
    assert not re.search(r"(?<!\\)[_%#]", tex.replace(r"\_", "").replace(r"\%", "").replace(r"\#", "")
                         .replace("tab:long_context", "").replace("tab:", "")), "unescaped special character"


def test_latex_tables_compile(tmp_path):
    col = collect([QUALITY, LATENCY])
    paired = paired_table(collect([ROOT / "results" / "issue15" / "paired_8of30"]), "shortgpt")  # caption: −, <
    assert len(paired)
    tables = [quality_table(col), efficiency_table(col), long_context_table(col), plans_table(col), paired]
    for t in tables:
        _check_latex_structure(to_latex(t), len(t.attrs["columns"]))
    pdflatex = shutil.which("pdflatex")
    assert pdflatex, "pdflatex missing: .ci/run installs texlive-latex-base and texlive-latex-recommended"
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"  # as to_latex promises (graphicx: paired)
           "\\usepackage[a3paper,landscape,margin=1cm]{geometry}\n\\begin{document}\n"
           + "\n".join(to_latex(t) for t in tables) + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    r = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "t.pdf").stat().st_size > 5000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no Chromium found: .ci/run installs the Debian package 'chromium'")


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const tables = [...document.querySelectorAll('table.results')];
  const shown = i => i.complete && i.naturalWidth > 100 && i.getBoundingClientRect().height > 50;
  const out = {images: imgs.length, images_rendered: imgs.filter(shown).length,
               tables: tables.length, tables_rendered: tables.filter(t => t.getBoundingClientRect().height > 40).length,
               rows: tables.map(t => t.querySelectorAll('tbody tr').length)};
  const pre = document.createElement('pre'); pre.id = 'render-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


def test_report_cli_writes_everything_and_the_html_renders_in_chromium(tmp_path, report):
    out = tmp_path / "rep"
    r = report(QUALITY, LATENCY, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("quality", "efficiency", "long_context", "plans"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 200
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == sorted(f"{n}.{e}" for n in ("bytes_vs_prompt", "latency_bars", "score_vs_blocks", "score_vs_kv",
                                                 "stage_sensitivity") for e in ("png", "svg"))
    for f in (out / "figures").glob("*.png"):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, static
    assert "AMD EPYC" in html or "x86_64" in html  # hardware provenance
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_SCRIPT))
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', r.stdout)
    assert m, r.stderr[-2000:]
    seen = json.loads(m.group(1).replace("&quot;", '"'))
    assert seen["images"] == seen["images_rendered"] == 5
    assert seen["tables"] == seen["tables_rendered"] == 4
    assert seen["rows"][0] == 8  # quality: 2 group rows + 6 records


def test_report_bad_input_exits_2_naming_the_problem(tmp_path, report):
    r = report(tmp_path / "nope")
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.csv").write_text("method,mode\n")  # the run's table, not a record: said so, not
    r = report(tmp_path / "run" / "summary.csv")                       # "unreadable record (Expecting value: ...)"
    assert r.returncode == 2 and "summary.csv: not a run record (a run's records are its <method>__<mode>.json files); give " \
                                 "a run folder (one holding <method>__<mode>.json records" in r.stderr, r.stderr  # none there
    shutil.copy(ROOT / "results" / "reference" / "quality" / "unpruned__unified.json", tmp_path / "run")
    r = report(tmp_path / "run" / "summary.csv")  # beside records: that folder is meant
    assert r.returncode == 2 and f"summary.csv: not a run record (a run's records are its <method>__<mode>.json " \
                                 f"files); give the run folder: {tmp_path / 'run'}" in r.stderr, r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x__unified.json").write_text("{not json")
    r = report(bad)
    assert r.returncode == 2 and "x__unified.json: unreadable record" in r.stderr
    rec = json.loads((QUALITY / "unpruned__unified.json").read_text())
    future = copy.deepcopy(rec)
    future["schema_version"] = 99
    (bad / "x__unified.json").write_text(json.dumps(future))
    r = report(bad)
    assert r.returncode == 2 and "x__unified.json: record schema 99, this harness reads 1" in r.stderr
    r = report(QUALITY, "--metric-convention", "f1", "--out", tmp_path / "o")
    assert r.returncode == 2 and "expected one of paper, acc_norm, acc" in r.stderr


def test_plans_table_describes_every_kv_policy_kind():
    from harness.pd.plan import KVBudget, KVPolicy

    first_last = KVPolicy(2, 6, (1, 3))
    snap = KVPolicy(kind="snapkv", budget=KVBudget(match=first_last), window=8, kernel=3, pooling="avg", order="mean_then_pool")
    ref_order = KVPolicy(kind="snapkv", budget=KVBudget(tokens=5), window=8, kernel=3)  # SnapKV's order, the default
    recs = []
    for name, pol in (("pdtrim", first_last), ("snapkv", snap), ("unpruned", KVPolicy()), ("snapkv2", ref_order)):
        r = _fake(name, "disaggregated", {"boolq": {"acc": 0.5}})
        r.plan["kv_policy"] = pol.to_dict()
        recs.append(r)
    text = dict(rows(plans_table(recs)).set_index("Method")["KV policy"])
    assert text["pdtrim"] == "first 2 + last 6 in layers 1 3" and text["unpruned"] == "all positions"
    assert text["snapkv"].startswith("snapkv (window 8, avg-pool 3, per KV head), budget = bytes of first 2 + last 6 in 2 layers")
    assert text["snapkv2"] == "snapkv (window 8, max-pool 3, pooled per query head, per KV head), budget = 5 tokens per layer"


SMOL = "SmolLM2-135M-Instruct (Q4_1, dequantised)"


def _two_models(tmp_path):
    """Folder a: two SmolLM2 records; folder b: two random:tiny records (unified, one task)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, model, cfg, acc in ((a, SMOL, "smollm2-135m", 0.6), (b, "random:tiny", "random:tiny", 0.3)):
        save(_fake("unpruned", "unified", {"boolq": {"acc": acc}}, model=model, config_model=cfg), folder)
        save(_fake("shortgpt", "unified", {"boolq": {"acc": acc - 0.1}}, removed=(1,), model=model, config_model=cfg),
             folder)
    return a, b


def _report_in_process(capsys, *args):
    from harness.cli import main

    rc = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_report_refuses_mixed_models_for_figures_naming_a_file_of_each(tmp_path, capsys):
    a, b = _two_models(tmp_path)
    out = tmp_path / "rep"
    rc, _, err = _report_in_process(capsys, a, b, "--out", out)
    assert rc == 2 and err.startswith("error: records of 2 models: ")
    assert f"{SMOL!r} ({a / 'shortgpt__unified.json'}, ...)" in err and f"'random:tiny' ({b / 'shortgpt__unified.json'}" in err
    assert "pick one with --model NAME" in err and "smollm2-135m" in err and "--no-plots" in err
    assert not out.exists()  # refused before writing anything
    rc, _, err = _report_in_process(capsys, a, b, "--model", "gpt2", "--out", out)
    assert rc == 2 and "--model 'gpt2' matches no record; models present: " in err and "'random:tiny'" in err


def test_report_model_filter_renders_one_model(tmp_path, capsys):
    a, b = _two_models(tmp_path)
    for name, want, other in (("random:tiny", "30.0", "60.0"), ("smollm2-135m", "60.0", "30.0")):  # name or config name
        out = tmp_path / name.replace(":", "_")
        rc, md, err = _report_in_process(capsys, a, b, "--model", name, "--out", out)
        assert rc == 0, err
        quality = (out / "tables" / "quality.md").read_text()
        assert f"| unpruned | 0 | **{want} ± 1.0** |" in quality and other not in quality
        assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["score_vs_blocks.png"]
        html = (out / "report.html").read_text()
        assert f"(model {name} only)" in html and str(b if name == "random:tiny" else a) in html


def test_report_no_plots_with_mixed_models_groups_tables_by_model(tmp_path, capsys):
    a, b = _two_models(tmp_path)
    out = tmp_path / "rep"
    rc, md, err = _report_in_process(capsys, a, b, "--no-plots", "--out", out)
    assert rc == 0, err
    assert not (out / "figures").exists()
    rows = list(csv.reader(io.StringIO((out / "tables" / "quality.csv").read_text())))[1:]
    assert [(r[0], r[1], r[3]) for r in rows] == [(f"{SMOL} · PD-unified", "unpruned", "60.0"),
                                                 (f"{SMOL} · PD-unified", "shortgpt", "50.0"),
                                                 ("random:tiny · PD-unified", "unpruned", "30.0"),
                                                 ("random:tiny · PD-unified", "shortgpt", "20.0")]
    q = (out / "tables" / "quality.md").read_text()
    assert q.index(f"| **{SMOL} · PD-unified** |") < q.index("| unpruned | 0 | **60.0 ± 1.0** |") \
        < q.index("| **random:tiny · PD-unified** |") < q.index("| unpruned | 0 | **30.0 ± 1.0** |")
    plans = (out / "tables" / "plans.md").read_text()
    assert f"**{SMOL} · PD-unified**" in plans and "**random:tiny · PD-unified**" in plans


def test_report_notes_failed_cells_and_still_renders(tmp_path, capsys):
    from harness.errors import UsageError

    a, b = _two_models(tmp_path)
    note = save_failure(a, "pdtrim", "unified", "k", UsageError("pdtrim: --remove 40 exceeds 30 blocks"), "Traceback ...",
                        "2025-01-01T00:00:00+00:00")
    out = tmp_path / "rep"
    rc, _, err = _report_in_process(capsys, a, "--out", out)
    assert rc == 0, err
    line = f"pdtrim/unified failed in {a}: UsageError: pdtrim: --remove 40 exceeds 30 blocks (details: {note})"
    assert f"note: {line}\n" in err
    html = (out / "report.html").read_text()
    assert "<h2>Notes</h2>" in html and f'<li class="missing">{line}</li>' in html
    # the note belongs to folder a (SmolLM2): a report of random:tiny does not mention it
    rc, _, err = _report_in_process(capsys, a, b, "--model", "random:tiny", "--out", tmp_path / "tiny")
    assert rc == 0 and "pdtrim/unified failed" not in err


def test_a_rerender_into_the_same_folder_leaves_no_table_or_figure_of_the_earlier_one(tmp_path, capsys):
    """A report of quality and latency records, then one of the quality records alone into the same --out: the
    efficiency table and the latency figures of the first stayed beside the new files (a paper's
    \\input{tables/efficiency.tex} read latency no longer reported)."""
    out = tmp_path / "rep"
    rc, _, err = _report_in_process(capsys, QUALITY, LATENCY, "--out", out)
    assert rc == 0, err
    assert (out / "tables" / "efficiency.tex").exists() and (out / "figures" / "latency_bars.png").exists()
    mine = out / "tables" / "notes.txt"
    mine.write_text("not the report's")
    rc, _, err = _report_in_process(capsys, QUALITY, "--out", out)
    assert rc == 0, err
    assert not list((out / "tables").glob("efficiency.*")) and not list((out / "figures").glob("latency_bars.*"))
    assert (out / "tables" / "quality.tex").exists() and mine.read_text() == "not the report's"
    rc, _, err = _report_in_process(capsys, LATENCY, "--no-plots", "--out", out)
    assert rc == 0, err
    assert not list((out / "tables").glob("quality.*")) and (out / "figures" / "score_vs_blocks.png").exists()


def test_a_rerender_removes_only_what_an_earlier_report_wrote(tmp_path, capsys):
    """The rerender removed every known table or figure name it did not write: a paper folder given as --out lost
    the user's own tables/efficiency.tex (hand-edited, or from another tool) without a word, though no report had
    written it there."""
    out = tmp_path / "paper"
    (out / "tables").mkdir(parents=True)
    mine = out / "tables" / "efficiency.tex"
    mine.write_text("% the user's own table")
    rc, _, err = _report_in_process(capsys, QUALITY, "--no-plots", "--out", out)
    assert rc == 0, err
    assert (out / "tables" / "quality.tex").exists() and mine.read_text() == "% the user's own table"


def test_a_rerender_over_a_report_of_an_earlier_version_still_removes_its_stale_tables(tmp_path, capsys):
    """Reports made before `.pd-harness-report.json` list nothing: the first rerender over one (a paper folder made last
    month) kept its efficiency table of latency no longer reported, and listed only its own files, so it stayed."""
    from reports.render import MANIFEST

    out = tmp_path / "rep"
    rc, _, err = _report_in_process(capsys, QUALITY, LATENCY, "--no-plots", "--out", out)
    assert rc == 0 and (out / "tables" / "efficiency.tex").exists(), err
    (out / MANIFEST).unlink()  # as an earlier version left the folder
    rc, _, err = _report_in_process(capsys, QUALITY, "--no-plots", "--out", out)
    assert rc == 0, err
    assert not list((out / "tables").glob("efficiency.*")) and (out / "tables" / "quality.tex").exists()


def test_a_second_report_into_one_out_is_refused_naming_the_first(tmp_path, capsys):
    """Another report writing the same --out holds it: this one exits 2 naming it, and says what would go wrong there
    (tables and figures mixed), not that "two runs" would overwrite "records", which a report folder does not hold."""
    from harness.cli import main as cli_main

    out = tmp_path / "rep"
    with lock_holder(out) as holder:
        assert cli_main(["report", str(QUALITY), "--no-plots", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another harness process (pid {holder.pid}" in err, err
    assert "two reports writing one folder would mix their tables and figures" in err and "choose another --out" in err, err
    assert "records" not in err and "two runs" not in err, err


def test_kv_mib_below_the_last_decimal_keeps_two_significant_digits():
    """A tiny model's 3,072-byte handoff was printed as a bold 0.00 MiB beside the dense plan's figure."""
    from reports.tables import mib_text

    assert [mib_text(b, 2) for b in (3072, 11.25 * 2**20, 0, 2**30)] == ["0.0029", "11.25", "0.00", "1,024.00"]
    assert [mib_text(b, 1) for b in (40_000, 0.6 * 2**20)] == ["0.038", "0.6"]


def test_a_column_of_kv_mib_shows_every_value_with_the_same_decimals():
    """A tiny model's long-context column read `0.1 (1.00×)` beside `0.047 (1.33×)`: each value rounded its own way
    (0.0625 to one decimal, 0.047 to two significant digits), so the figures contradicted their own ratios."""
    from reports.formats import rows
    from reports.record_values import MIB
    from reports.tables import long_context_table, mib_decimals

    assert mib_decimals([0.0625 * MIB, 0.046875 * MIB, None, 0], 1) == 3
    assert mib_decimals([23.4 * MIB, 0.6 * MIB], 1) == 1 and mib_decimals([], 2) == 2
    recs = []
    for name, removed, per_req in (("unpruned", (), 0.0625), ("tail@k=1", (3,), 0.046875), ("tail@k=2", (2, 3), 0.03125)):
        r = _fake(name, "disaggregated", {"pd_ppl": {"ppl_T512": 10.0}}, removed=removed,
                  kv={"pd_ppl": {"kv_bytes": int(2 * per_req * MIB), "handoffs": 2}})
        r.extra["kv_by_setting"] = {"pd_ppl": {"T512": {"kv_bytes": int(2 * per_req * MIB), "handoffs": 2}}}
        recs.append(r)
    t = rows(long_context_table(recs)).set_index("Method")
    column = next(c for c in t.columns if c.startswith("KV/req"))
    assert [t.loc[m, column] for m in ("unpruned", "tail@k=1", "tail@k=2")] == \
        ["0.062 (1.00×)", "0.047 (1.33×)", "0.031 (2.00×)"]


def test_the_captions_say_how_standard_errors_are_combined():
    """The Avg's ± is sqrt(sum se²)/k over tasks taken as independent, and the bold rule's 'combined standard errors'
    are sqrt(se1² + se2²), the two rows taken as independent samples; rows scored on the same items are positively
    correlated, so the rule is conservative (PDTrim v ShortGPT on PIQA, 1000 items: 2.9 points apart, combined standard
    error 2.2 points, the paired one 1.26 (item correlation 0.67), McNemar p = 0.026). The captions named neither."""
    quality = quality_table(collect([ROOT / "results" / "issue15" / "paired_8of30"])).attrs["caption"]
    assert "Avg: of the mean over tasks, the root of the sum of the tasks' squared standard errors over their number, tasks " \
           "taken as independent" in quality
    assert "1.96 combined standard errors (the root of the sum of the two squared standard errors, as for independent " \
           "samples; rows scored on the same items are not, so this is conservative" in quality
    long = long_context_table(collect([ROOT / "results" / "reference" / "quality"])).attrs["caption"]
    assert "1.96 combined standard errors (the root of the sum of the two squared standard errors" in long
