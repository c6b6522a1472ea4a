"""Reports show user-provided strings (method, model, task names) as typed in every format, whatever they hold, and
their LaTeX tables fit their box."""

import copy
import csv
import html
import io
import re

import pytest
from conftest import ROOT

from harness.store.records import load_dir
from reports.efficiency import efficiency_table
from reports.formats import cell, make_table, to_csv, to_markdown, wide
from reports.tables import long_context_table, quality_table

QUALITY = ROOT / "results" / "issue3" / "default"
LATENCY = ROOT / "results" / "issue4" / "cpu_smollm2"
NAMES = {"pdtrim": "my*method", "shortgpt": "<b>x</b>"}  # as registered (a plug-in's name, a --set variant)
MODEL = "Smol_LM `v2` [hub](http://x)"


def _renamed(folder, names=NAMES, model=MODEL):
    recs = copy.deepcopy(load_dir(folder))
    for r in recs:
        r.method = names.get(r.method, r.method)
        r.model["name"] = model
    return recs


def _adversarial_tables():
    return [quality_table(_renamed(QUALITY)), long_context_table(_renamed(QUALITY)), efficiency_table(_renamed(LATENCY))]


def _md_cells(md: str) -> list[str]:
    """Each body cell's text as a CommonMark renderer with GitHub's tables shows it (bold cells unwrapped once);
    fails on any other markup: emphasis, code, links, raw HTML."""
    mdit = pytest.importorskip("markdown_it")
    page = mdit.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    out = []
    for cell_html in re.findall(r"<td[^>]*>(.*?)</td>", page):
        inner = re.fullmatch(r"<strong>(.*)</strong>", cell_html)
        inner = inner[1] if inner else cell_html
        assert "<" not in inner, f"markup in a cell: {cell_html}"
        out.append(html.unescape(inner))
    caption = re.match(r"<p><em>(.*?)</em></p>", page)
    assert caption and "<" not in caption[1], page[:300]
    return [html.unescape(caption[1]), *out]


def _expected_cells(t) -> list[str]:
    text = wide(t, "text")
    out = [t.attrs["caption"]]
    for (_, title), block in text.groupby(level=["group", "title"], sort=True):
        out += [title, *[""] * (len(text.columns) - 1)] if title else []
        out += [x for row in block.itertuples(index=False) for x in row]
    return out


def test_markdown_shows_adversarial_names_as_typed_in_every_table():
    """`my*method` rendered as emphasis, `<b>x</b>` as bold HTML, a backtick as code, `[a](b)` as a link: Markdown only
    escaped `|`. Now each is escaped where GitHub Markdown would read it, in cells, group headings and captions."""
    for t in _adversarial_tables():
        md = to_markdown(t)
        assert r"| my\*method |" in md or r"| **my\*method** |" in md, md
        assert r"\<b>x\</b>" in md and "<b>x" not in md.replace(r"\<b>x", "")
        if t.attrs["name"] != "long_context":  # the model is in its caption or group headings
            assert r"Smol_LM \`v2\` \[hub](http\://x)" in md  # the URL escaped too: GitHub would autolink it
        assert _md_cells(md) == _expected_cells(t)


def test_markdown_escapes_only_what_markdown_reads():
    """Ordinary text stays byte for byte (the stored report tables do): `_` inside a word, a `*` that can open
    nothing (the paired table's `+4.0* [...]`), `<` before a space, brackets that are no link."""
    t = make_table("x", "a * b; p < 0.05; [x] (y)", ["Method", "S"],
                   [("G", [[cell("pdtrim@k_decode=2"), cell("+4.0* [-1.0, +9.0] p=0.04")],
                           [cell("_lead"), cell("3 ~ 4 & <x> `c` $1$ \\*")]])])
    assert to_markdown(t).splitlines() == [
        "*a * b; p < 0.05; [x] (y)*", "", "| Method | S |", "|---|---|", "| **G** |  |",
        "| pdtrim@k_decode=2 | +4.0* [-1.0, +9.0] p=0.04 |", r"| \_lead | 3 \~ 4 & \<x> \`c\` \$1\$ \\* |"]
    t.loc[t["text"] == "+4.0* [-1.0, +9.0] p=0.04", "bold"] = True  # inside ** **, that '*' would close the bold
    assert r"| **+4.0\* [-1.0, +9.0] p=0.04** |" in to_markdown(t)
    assert _md_cells(to_markdown(t)) == _expected_cells(t)


@pytest.mark.parametrize("wrapped", [False, True])
def test_markdown_cell_round_trips_any_mix_of_markup(wrapped):
    """Every string of Markdown's special characters renders as typed, in a plain cell and in a bold one."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=300, deadline=None, derandomize=True)
    @hyp.given(st.lists(st.sampled_from(list("ab *_`[]()<>!&;#\\|~$/") + ["&lt;", "<b>", "](", "**"]), min_size=1, max_size=10))
    def check(parts):
        s = "".join(parts).strip() or "a"
        t = make_table("x", "c", ["Method"], [("", [[cell(s)]])])
        t["bold"] = wrapped
        assert _md_cells(to_markdown(t))[1:] == [s]

    check()


def test_csv_keeps_quotes_commas_and_line_breaks_in_names():
    t = make_table("x", "c", ["Method", "S"], [('G, "1"', [[cell('a,"b"\nc'), cell("1.0", 1.0)]])])
    assert list(csv.reader(io.StringIO(to_csv(t)))) == [["group", "Method", "S"], ['G, "1"', 'a,"b"\nc', "1.0"]]


def _pdflatex(tmp_path, body: str, preamble: str = "", options: str = "") -> list[float]:
    """Compile `body` in an article (class `options`, booktabs and `preamble`); the overfull boxes' excess widths in pt."""
    import shutil
    import subprocess

    exe = shutil.which("pdflatex")
    assert exe, "pdflatex missing: .ci/run installs texlive-latex-base and texlive-latex-recommended"
    doc = f"\\documentclass[{options}]{{article}}\n\\usepackage{{booktabs}}\n{preamble}\\begin{{document}}\n{body}\\end{{document}}\n"
    (tmp_path / "t.tex").write_text(doc)
    r = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide", (tmp_path / "t.log").read_text(errors="replace"))]


LONG = "pdtrim@k_prefill=2,k_decode=10,prefill_ratio=0.5,samples=64,calibration=wikitext2_long--variant,seed=1234,stage=both"
WORD = "averyveryveryverylongmethodnamewithoutanypunctuationwhatsoeverthatwouldnotbreakanywhereelseatallnotevenonce"


def test_latex_wraps_a_long_name_in_a_ragged_right_column_that_breaks_it():
    """An `l` column cannot break a line: a long method name ran the table past its box however narrow the rest.
    Now a name over NAME_CHARS makes the name column p{NAME_WIDTH}, ragged right, with breaks after punctuation
    (and every 8 characters of a long run of letters); a table of ordinary names keeps its `l` column."""
    from reports.formats import NAME_WIDTH, latex_escape, to_latex

    t = make_table("s", "c", ["Method", "A"], [("", [[cell(LONG), cell("1.0", 1.0)], [cell("my*method"), cell("2.0", 2.0)],
                                                      [cell(WORD), cell("3.0", 3.0)]])])
    t.loc[(t["text"] == LONG), "bold"] = True
    tex = to_latex(t)
    assert f"\\begin{{tabular}}{{p{{{NAME_WIDTH}}}l}}" in tex
    assert r"\raggedright \textbf{pdtrim@\allowbreak{}k\_\allowbreak{}prefill=\allowbreak{}2,\allowbreak{}" in tex
    assert r"--\allowbreak{}-\allowbreak{}variant" not in tex and r"long-\allowbreak{}-\allowbreak{}variant" in tex
    assert r"\raggedright averyver\allowbreak{}yveryver\allowbreak{}" in tex and r"\raggedright my*method & 2.0 \\" in tex
    short = make_table("s", "c", ["Method", "A"], [("", [[cell("pdtrim@k_prefill=2,k_decode=10"), cell("1.0")]])])
    assert r"\begin{tabular}{ll}" in to_latex(short) and r"\raggedright" not in to_latex(short)
    # a typed '--', "''" or '`' is shown as typed, not as a dash or quotes; a line break is a space
    assert latex_escape("a--b ''c'' `d`\ne") == r"a-{}-b '{}'c'{}' \textasciigrave{}d\textasciigrave{} e"


def test_latex_tables_with_long_names_compile_and_fit(tmp_path):
    """Every table with method names of over 100 characters compiles and fits a page that fits it with ordinary names
    (A3 portrait, 1 cm margins; a single column for a small table): before, the names overflowed by hundreds of pt."""
    from reports.formats import to_latex
    from reports.plans import plans_table

    quality, latency = ROOT / "results" / "reference" / "quality", ROOT / "results" / "reference" / "latency"
    names = {"pdtrim": LONG, "shortgpt": WORD}
    tables = [quality_table(_renamed(quality, names)), long_context_table(_renamed(quality, names)),
              efficiency_table(_renamed(latency, names)), plans_table(_renamed(quality, names))]
    body = "\n".join(to_latex(t) + "\\clearpage\n" for t in tables)
    assert max(_pdflatex(tmp_path, body, "\\usepackage[a3paper,margin=1cm]{geometry}\n"), default=0) < 2
    small = make_table("s", "c", ["Method", "Score", "KV ×"], [("", [[cell(n), cell("1.0"), cell("2.00×")] for n in (LONG, WORD)])])
    assert max(_pdflatex(tmp_path, to_latex(small)), default=0) < 2


def test_paired_latex_table_fits_one_text_column(tmp_path):
    """The paired table put every task's difference, CI and p-value side by side: about 1300 pt wide for seven tasks,
    against a two-column paper's 240 pt column. Now each cell stacks them (details in small print) and the tabular is
    scaled down to the column's width, never up (graphicx): no overfull box in a two-column article."""
    from reports.collect import collect
    from reports.formats import to_latex
    from reports.significance import paired_table

    tables = [paired_table(collect([ROOT / "results" / "issue15" / "paired_8of30"]), "shortgpt"),
              paired_table(collect([ROOT / "results" / "issue15" / "depth_curve"]))]
    tex = [to_latex(t) for t in tables]
    assert all(r"\resizebox{\ifdim\width>\columnwidth\columnwidth\else\width\fi}{!}{\begin{tabular}{l" in x for x in tex)
    assert r"& \begin{tabular}[t]{@{}r@{}}-2.9* \\ \scriptsize {}[-5.4, -0.4] \\ \scriptsize p=0.026\end{tabular} &" in tex[0]
    assert r"\begin{tabular}[t]{@{}l@{}}1 better \\ \scriptsize 5 same \\ \scriptsize 1 worse\end{tabular} \\" in tex[0]
    assert max(_pdflatex(tmp_path, "\n".join(tex), "\\usepackage{graphicx}\n", "twocolumn"), default=0) < 1


def test_latex_tables_with_adversarial_names_compile(tmp_path):
    """Every character LaTeX reads (a row starting '[' was read as the \\\\[length] of the row before: 'Missing number')."""
    from reports.formats import to_latex
    from reports.plans import plans_table

    quality, latency = ROOT / "results" / "reference" / "quality", ROOT / "results" / "reference" / "latency"
    names = {"pdtrim": "[x] my*method <b>", "shortgpt": "a_b^c $d$ %e #f &g {h} ~i \\j |k -- '' `l`"}
    model = "[m] 50% {x}"
    tables = [quality_table(_renamed(quality, names, model)), long_context_table(_renamed(quality, names, model)),
              efficiency_table(_renamed(latency, names, model)), plans_table(_renamed(quality, names, model))]
    tex = "\n".join(to_latex(t) for t in tables)
    assert r"\raggedright {}[x]\allowbreak{} \allowbreak{}my*method \allowbreak{}\textless{}b\textgreater{} &" in tex  # wrapped: a long name
    _pdflatex(tmp_path, tex, "\\usepackage[a3paper,margin=1cm]{geometry}\n")


@pytest.mark.parametrize("folder, baseline", [("depth_curve", "unpruned"), ("paired_8of30", "shortgpt")])
def test_stored_report_tables_rerender_byte_for_byte(folder, baseline):
    """The escapes touch only what a format would read: the stored issue15 tables (`python -m harness report`, the
    README there) come out byte for byte as committed."""
    from reports.collect import collect
    from reports.formats import to_latex
    from reports.render import build_tables

    path = ROOT / "results" / "issue15" / folder
    tables, _ = build_tables(collect([path]), baseline=baseline)
    stored = sorted(p.name for p in (path / "report" / "tables").iterdir())
    assert stored == sorted(f"{t.attrs['name']}.{ext}" for t in tables for ext in ("csv", "md", "tex"))
    for t in tables:
        for ext, text in (("md", to_markdown(t) + "\n"), ("tex", to_latex(t)), ("csv", to_csv(t))):
            assert (path / "report" / "tables" / f"{t.attrs['name']}.{ext}").read_text(encoding="utf-8") == text, (t.attrs["name"], ext)


def test_a_name_starting_with_an_underscore_is_in_the_figure_legends(tmp_path):
    """Matplotlib's legend leaves out a label starting with `_` (its mark for a private artist): a method `_x` was
    drawn but unnamed. `_` and `^` elsewhere are text outside `$...$`; `$` is escaped (test_report_mixing)."""
    import matplotlib.pyplot as plt

    from reports.plots import plot_score_vs_blocks, plot_score_vs_kv
    from reports.tables import _as_collection

    recs = _renamed(ROOT / "results" / "reference" / "quality", {"pdtrim": "_x", "shortgpt": "a_b^c $d$"}, "m")
    col = _as_collection([r for r in recs if r.mode == "disaggregated"])
    for fig in (plot_score_vs_blocks(col), plot_score_vs_kv(col)):
        texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert {"\u200b_x", r"a_b^c \$d\$", "unpruned"} <= set(texts), texts
        plt.close(fig)
