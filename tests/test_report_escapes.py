"""Reports show user-provided strings (method, model, task names) as typed in every format, whatever they hold."""

import copy
import csv
import html
import io
import re

import pytest
from conftest import ROOT

from harness.store.records import load_dir
from reports.formats import cell, make_table, to_csv, to_markdown, wide
from reports.tables import efficiency_table, long_context_table, quality_table

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
            assert r"Smol_LM \`v2\` \[hub](http://x)" in md
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
