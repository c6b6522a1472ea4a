"""Reports given hostile names (method, model, task, KV policy, option values): links, emails, mentions and emoji
on GitHub, spreadsheet formulas, control and bidi characters, names too long for a page, anything at all."""

import csv
import html
import io
import re
import xml.dom.minidom

import cmarkgfm
import pytest
from cmarkgfm.cmark import Options
from conftest import ROOT
from test_report_escapes import _pdflatex, _renamed

from harness.store.records import save
from reports.escape import csv_text, visible
from reports.formats import cell, make_table, to_csv, to_html, to_latex, to_markdown, wide

WJ = "\u2060"  # the word joiner md_cell puts where GitHub would match across an escape
EMOJI = re.compile(r":[\w+-]+:")  # GitHub's emoji filter: `:name:` in the rendered text
MENTION = re.compile(r"(?:^|\W)@[A-Za-z0-9]")  # its @mention filter


def _gfm_rows(md: str) -> list[list[str]]:
    """The text of every cell of every row (header row first) as GitHub's own parser (cmark-gfm, with its table,
    autolink and strikethrough extensions) renders `md`, bold cells unwrapped once; fails on any other markup (a link,
    emphasis, code, raw HTML). The caption paragraph is the first row."""
    page = cmarkgfm.github_flavored_markdown_to_html(md, options=Options.CMARK_OPT_UNSAFE)
    caption = re.match(r"<p><em>(.*?)</em></p>", page, re.S)
    assert caption and "<" not in caption[1], page[:300]
    out = [[html.unescape(caption[1])]]
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = []
        for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S):
            inner = re.fullmatch(r"<strong>(.*)</strong>", c)
            inner = inner[1] if inner else c
            assert "<" not in inner, f"markup in a cell: {c}"
            cells.append(html.unescape(inner))
        out.append(cells)
    return out


def _typed_rows(t) -> list[list[str]]:
    """What `_gfm_rows` should give: the caption, the header, each group's heading row and rows, as typed (a line
    break a space, leading and trailing spaces trimmed as a table cell trims them)."""
    def shown(s, wrapped=False):  # a line break or tab a space, a control character its picture (test_control_...)
        return visible(s).strip() if wrapped else visible(s).strip(" ")

    text = wide(t, "text")
    out = [[shown(t.attrs["caption"], True)], [shown(c) for c in t.attrs["columns"]]]
    for (_, title), block in text.groupby(level=["group", "title"], sort=True):
        out += [[shown(title, True), *[""] * (len(text.columns) - 1)]] if title else []
        out += [[shown(x) for x in row] for row in block.itertuples(index=False)]
    return out


def _table(names, title="G", caption="c", columns=("Method", "S")):
    rows = [[cell(n), *[cell("1.0", 1.0)] * (len(columns) - 1)] for n in names]
    return make_table("x", caption, list(columns), [(title, rows)])


LINKY = ["https://x.y/z", "see www.x.y/a for it", "HTTP://A.B", "ftp://f.g", "a_www.x.y", "a@b.co", "mailto:a@b.co",
         "xmpp:a@b.co/r", "@team and @org/group", ":smile: :+1:", "k=2:tada:3", "[x](https://x.y)", "<https://x.y>"]


@pytest.mark.parametrize("bold", [False, True])
def test_names_that_github_would_link_mention_or_emojify_show_as_typed(bold):
    """GitHub autolinks a bare URL, `www.` and an email (GFM's autolink extension), links and notifies `@name` and
    turns `:name:` into an emoji: a method, model or task name showed as something else. Now a URL's `:` and `www`'s
    `.` are backslash-escaped (what the extension reads is the source text), and an email's `@` (found in the text
    after escapes are resolved), a mention's and an emoji's get an invisible word joiner: GitHub's parser renders
    every name as typed, in cells, bold cells, group headings and the caption, and the text matches no mention or
    emoji pattern."""
    for name in LINKY:
        t = _table([name, "pdtrim@k_decode=2"], title=name, caption=f"scores on {name}")
        t["bold"] = bold
        rows = _gfm_rows(to_markdown(t))
        assert [[c.replace(WJ, "") for c in r] for r in rows] == _typed_rows(t), name
        for text in (c for r in rows for c in r):
            assert not EMOJI.search(text) and not MENTION.search(text), text
    ordinary = to_markdown(_table(["pdtrim@k_decode=2", "stage:shortgpt@k=2", "a:b"]))
    assert WJ not in ordinary and "\\:" not in ordinary and "\\." not in ordinary  # nothing GitHub reads: as before


def test_control_characters_and_bidi_overrides_stay_inside_their_cell():
    """The Markdown is printed to the terminal: an ESC in a name drove it (`\\x1b[2J` cleared the screen), and an
    unclosed right-to-left override reversed the rest of the row, numbers and other cells included. Now a control
    character shows as its control picture and an override or isolate a name opens is closed at its cell's end."""
    names = ["\x1b[2Jx\x07", "a\u202eb", "\u2067c\u202bd", "e\u2069\u2066f\u202c"]
    md = to_markdown(_table(names))
    assert not re.search(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]", md), repr(md)
    assert "\u241b[2Jx\u2407" in md
    for line in md.splitlines()[4:]:
        for c in line.split(" | "):
            depth = [0]
            for ch in c:  # every opener closed in the same cell, innermost first
                depth.append(depth[-1] + (ch in "\u202a\u202b\u202d\u202e\u2066\u2067\u2068") - (ch in "\u202c\u2069"))
            assert depth[-1] <= 0 or (c.count("\u2069") >= c.count("\u2066") + c.count("\u2067") + c.count("\u2068")
                                      and c.count("\u202c") >= sum(c.count(x) for x in "\u202a\u202b\u202d\u202e")), repr(c)
    assert md.splitlines()[6].endswith("a\u202eb\u202c | 1.0 |")
    assert md.splitlines()[7].endswith("\u2067c\u202bd\u202c\u2069 | 1.0 |")


def test_csv_text_a_spreadsheet_would_run_starts_with_a_quote_and_reads_back():
    """A method named `=HYPERLINK(...)` was a live formula in Excel or LibreOffice (CSV injection). OWASP's advice: a
    text cell starting with `=`, `+`, `-`, `@`, tab or CR gets a `'` in front, in the cells, the group column and the
    headers; numbers, negative ones too, stay numbers, and `csv_text` gives every text back."""
    names = ['=HYPERLINK("http://x","y")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx", "'=x", "'", "plain", "-", "-0.5"]
    t = make_table("x", "c", ["Method", "=task", "S"],
                   [("=G", [[cell(n), cell("-0.5", -0.5), cell("—")] for n in names])])
    got = list(csv.reader(io.StringIO(to_csv(t), newline="")))
    assert got[0] == ["group", "Method", "'=task", "S"]
    assert [r[1] for r in got[1:]] == ['\'=HYPERLINK("http://x","y")', "'+1+2", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "''=x",
                                       "''", "plain", "'-", "-0.5"]
    assert all(r[0] == "'=G" and r[2] == "-0.5" and r[3] == "—" for r in got[1:])
    assert [csv_text(r[1]) for r in got[1:]] == names and csv_text("'=task") == "=task"
    import pandas as pd

    back = pd.read_csv(io.StringIO(to_csv(t)))
    assert back["'=task"].dtype == "float64" and (back["'=task"] == -0.5).all()


LONG_MODEL = "org-with-a-long-name/SmolLM2-135M-Instruct-finetuned-on-something-rather-long-v2.1-gguf-q4_1-dequantised"


def test_a_long_model_name_in_a_heading_caption_or_header_fits_the_page(tmp_path):
    """A group heading is one `l` multicolumn: a long model name ran past the page (and so did a caption word or a
    column header of one: neither could break). Now a heading wider than the line wraps to it (short ones stay as
    they were), a long word of a caption breaks as a long method name does, and a long header is a paragraph as
    wide as the name column."""
    t = _table(["unpruned", "pdtrim"], title=f"{LONG_MODEL} · PD-disaggregated", caption=f"Scores on {LONG_MODEL}.",
               columns=("Method", "S", "t:" + LONG_MODEL))
    tex = to_latex(t)
    assert r"\ifdim\wd0>\dimexpr\linewidth-2\tabcolsep\relax\parbox[t]" in tex
    assert r"\parbox[b]{14em}{\raggedleft t:\allowbreak{}" in tex
    assert max(_pdflatex(tmp_path, tex), default=0) < 1
    short = to_latex(_table(["a"], title="PD-disaggregated"))
    assert r"\multicolumn{2}{l}{\textit{PD-disaggregated}} \\" in short


def test_latex_leaves_out_invisible_characters_and_compiles(tmp_path):
    """pdflatex stopped at a bidi mark or zero-width space ("Unicode character not set up for use with LaTeX") and at
    a control character: a name of them broke the paper's build. Now invisible format characters are left out and
    control characters written in caret notation."""
    names = {"pdtrim": "a\u202eb\u200fc\u200bd", "shortgpt": "e\x1b[1mf\x07"}
    quality = ROOT / "results" / "reference" / "quality"
    from reports.tables import quality_table

    tex = to_latex(quality_table(_renamed(quality, names, "m\u2066odel\u2069")))
    assert r"abcd" in tex and r"e\textasciicircum{}[[1mf\textasciicircum{}G" in tex
    _pdflatex(tmp_path, tex, "\\usepackage[a3paper,margin=1cm]{geometry}\n")


def test_every_renderer_takes_any_name_and_markdown_keeps_every_cell():
    """Any text as a method name, group title, caption and column header: every format renders it, each Markdown row
    keeps its cells with their text as typed (GitHub's parser, as above), and CSV reads back every text."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    text = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(st.sampled_from(list("|\\*_`[]()<>!&;#:@./w~$-=+ \n\t")),
                                                                       max_size=20)

    @hyp.settings(max_examples=200, deadline=None, derandomize=True)
    @hyp.given(st.lists(text, min_size=1, max_size=3), text, text)
    def check(names, title, header):
        header = header or "h"  # a column needs a header to be a column
        t = _table(names, title=title, caption=title or "c", columns=("Method", header))
        to_latex(t), to_html(t)
        rows = _gfm_rows(to_markdown(t))
        assert [[c.replace(WJ, "") for c in r] for r in rows] == _typed_rows(t)
        got = list(csv.reader(io.StringIO(to_csv(t), newline="")))
        assert [csv_text(r[1]) for r in got[1:]] == names and csv_text(got[0][1]) == "Method"

    check()


@pytest.mark.filterwarnings("error::UserWarning")
def test_figures_take_control_characters_and_long_names(tmp_path):
    """An SVG figure is XML, which cannot hold a control character: a name with an ESC made every figure a file no
    browser opens. And a 2000-character name made the figures 19,000 pixels wide (a longer one: too large to save).
    Now a control character is in caret notation and a long label wraps onto a few lines. A UserWarning fails the test:
    matplotlib's 'Glyph 9243 (SYMBOL FOR ESCAPE) missing' (the control picture drawn as an empty box) and 'Tight
    layout not applied' (a 50-line legend entry left the axes no room) were both warnings only."""
    from PIL import Image

    from reports.plots import save_plots
    from reports.tables import _as_collection

    recs = _renamed(ROOT / "results" / "reference" / "quality", {"pdtrim": "a\x1b[31mb\x07", "shortgpt": "x" * 2000}, "m")
    notes: list[str] = []
    figs = save_plots(_as_collection(recs), tmp_path, notes=notes)
    assert figs and notes == []  # a glyph missing from the font (the control picture's empty box) is a note now
    for paths in figs.values():
        xml.dom.minidom.parse(str(paths["svg"]))
        assert Image.open(paths["png"]).size[0] < 4000


def test_a_label_the_font_cannot_draw_is_a_note_of_the_report(tmp_path):
    """A method named in CJK (a plug-in's name) showed as empty boxes in every figure, without a word, while the
    tables showed it: matplotlib's 'Glyph ... missing from font(s)' warning went nowhere. Each character the font
    lacks is now named in the report's notes, once; a character it has makes no note."""
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    from reports.render import render_report

    glyphs = FT2Font(font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))).get_charmap()
    name = "剪枝\ue000"  # two CJK ideographs and a private-use character
    lacking = sorted(ch for ch in name if ord(ch) not in glyphs)
    assert "\ue000" in lacking  # no font has a picture of a private-use character
    recs = _renamed(ROOT / "results" / "reference" / "quality", {"pdtrim": name}, "m")
    for r in recs:
        save(r, tmp_path / "run")
    rep = render_report([tmp_path / "run"], tmp_path / "rep", html=False, plots=True)
    said = [m for m in rep.missing if "are not in the figures' font" in m]
    assert len(said) == 1 and f"{len(lacking)} character(s) of the labels ({''.join(lacking)})" in said[0], rep.missing
    plain = render_report([ROOT / "results" / "reference" / "quality"], tmp_path / "rep2", html=False, plots=True)
    assert not [m for m in plain.missing if "figures' font" in m]


def test_figure_labels_are_in_the_fonts_glyphs_bounded_and_distinct():
    """A figure label has only characters matplotlib's font draws (every C0 control, DEL, a C1 control, a lone
    surrogate, a control picture typed as such), in caret notation where `visible` gives a control picture; a long
    name is at most LABEL_LINES lines of LABEL_CHARS, and two long names that differ only in the middle keep two
    labels (the digest of the whole name on the middle line)."""
    from matplotlib import font_manager, rcParams
    from matplotlib.ft2font import FT2Font

    from reports.figure_labels import LABEL_CHARS, LABEL_LINES
    from reports.figure_labels import plain as _plain

    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"])))
    glyphs = font.get_charmap()
    names = ["a\x1b[31mb\x07", "".join(map(chr, range(0x20))) + "\x7f\x9b\ud800\u241b", "x" * 2000,
             "x" * 1000 + "a" + "x" * 1000, "x" * 1000 + "b" + "x" * 1000, "_" + "ab,cd " * 300]
    labels = [_plain(n) for n in names]
    for label in labels:
        assert all(ord(ch) in glyphs for ch in label.replace("\n", "")), [ch for ch in label if ord(ch) not in glyphs]
        lines = label.removeprefix("\u200b").split("\n")  # the zero-width space that keeps a leading `_` in a legend
        assert len(lines) <= LABEL_LINES and max(map(len, lines)) <= LABEL_CHARS, label
    assert labels[0] == "a^[[31mb^G"
    assert labels[1].startswith("^@^A^B") and labels[1].endswith("^_^?\ufffd\ufffd^[")  # tab and line breaks: spaces
    assert len(set(labels[2:5])) == 3
    assert labels[2].startswith("x" * LABEL_CHARS + "\n…[1920 characters left out, ")


def test_escape_edges_unmatched_closers_line_separators_and_words_that_look_like_numbers():
    """Unicode's bidi rules: a PDF (U+202C) inside an isolate that opened no embedding closes nothing, so the isolate
    is still closed at the cell's end. Every line break str.splitlines knows (CR LF, NEL, LINE SEPARATOR) is one
    space. A spreadsheet reads `-inf` or `+nan` as a formula (not a number): they get the quote, `-1e-3` does not."""
    from reports.escape import csv_cell, md_cell, visible

    assert md_cell("\u2067a\u202cb") == "\u2067a\u202cb\u2069"
    assert md_cell("\u202bx\u2067y\u202c") == "\u202bx\u2067y\u202c\u2069\u202c"  # the PDF closes neither
    assert visible("a\r\nb\x85c\u2028d\re") == "a b c d e"
    assert [csv_cell(v) for v in ("-inf", "+nan", "-1e-3", "+.5", "-1.", "-1e")] == ["'-inf", "'+nan", "-1e-3", "+.5",
                                                                                      "-1.", "'-1e"]
