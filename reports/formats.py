"""Tables as tidy pandas rows, pivoted and rendered to Markdown, LaTeX (booktabs), CSV and HTML.

A table is a `pandas.DataFrame` with one row per cell (`CELL_FIELDS`): the group it belongs to
(position and title, e.g. "SmolLM2-135M · PD-disaggregated"; "" = no heading), the row number, the
column name, the shown text, the raw value, whether it is bold and the numbers that qualify the
value (`stats`, e.g. {"stderr": 1.0} or a CI and p-value; None when none). `frame.attrs` holds the
table's name (file stem and LaTeX label), caption, column order and LaTeX column spec.

Keeping the raw value next to the shown text lets CSV carry numbers (and each stat as a column of
its own) while Markdown and LaTeX carry the rounded figure, and lets "best in column" be decided on
values, not strings. Each renderer pivots the cells to the wide layout (`wide`); LaTeX and HTML go
through `Styler`, Markdown is a few lines here (pandas' `to_markdown` needs `tabulate`, which is not
a dependency, and re-parses and re-pads numbers, so "39.0" would not stay "39.0").

Every format shows a name as typed (`reports.escape.md_cell`, `latex_escape`, HTML escaping,
and in CSV `reports.escape.csv_cell` against spreadsheet formulas). LaTeX needs
`\\usepackage{booktabs}`, and a table made to fit its column (`latex_fit` in its attrs: the paired table) also
`\\usepackage{graphicx}` for its `\\resizebox`. A name over `NAME_CHARS` characters wraps in a `p{NAME_WIDTH}`
name column, core LaTeX. Two optional attrs shape LaTeX only: `latex_lines` (a regex: where a cell's text is split into
stacked lines) and `latex_fit` (scale the tabular down to `\\columnwidth` where it is wider).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from html import escape

import jinja2
import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler

from reports.escape import CARETS, csv_cell, md_cell, visible

CELL_FIELDS = ["group", "title", "row", "column", "text", "value", "bold", "stats"]
INDEX = ["group", "title", "row"]

# one cell as a builder writes it: (shown text, raw value or None when the text is the value, stats or None)
CellSpec = tuple[str, object, dict[str, float] | None]


def cell(text: str, value: object = None, **stats: float | None) -> CellSpec:
    """A cell; `stats` are numbers that qualify `value` (stderr=..., ci_low=..., p_mcnemar=...; None ones
    are left out), which CSV writes as columns `<column>_<name>`."""
    kept = {k: v for k, v in stats.items() if v is not None}
    return (text, value, kept or None)


def make_table(name: str, caption: str, columns: Sequence[str], groups: Sequence[tuple[str, Sequence[Sequence[CellSpec]]]],
               align: str = "") -> pd.DataFrame:
    """The tidy cells of a table: `groups` is [(title, rows)], each row one `cell` per column.
    `align` is the LaTeX column spec; default: first two left, the rest right."""
    n = len(columns)
    records, i = [], 0
    for g, (title, rows) in enumerate(groups):
        for row in rows:
            assert len(row) == n, f"{name}: a row of {len(row)} cells for {n} columns"
            records += [(g, title, i, c, *spec[:2], False, spec[2] if len(spec) > 2 else None) for c, spec in zip(columns, row)]
            i += 1
    t = pd.DataFrame.from_records(records, columns=CELL_FIELDS)
    t["value"] = t["value"].astype(object)  # numbers and None side by side; None: CSV writes the text
    t.attrs.update(name=name, caption=caption, columns=list(columns), align=align or ("ll" + "r" * (n - 2) if n > 2 else "l" * n))
    return t


def bold_best(t: pd.DataFrame, column: str, lower_is_better: bool = False) -> None:
    """Bold the best numeric value of `column` within each group (ties all bold, and so are values shown as the
    best is: 1.6017 and 1.6021 both read 1.60×; a group needs two numbers to have a best)."""
    sel = t["column"] == column
    nums = pd.to_numeric(t.loc[sel, "value"].where(t.loc[sel, "value"].map(_is_number)), errors="coerce")
    by = nums.groupby(t.loc[sel, "group"])
    best = by.transform("min" if lower_is_better else "max")
    enough = by.transform("count") >= 2
    hit = enough & ((nums - best).abs() <= 1e-12 * np.maximum(1.0, best.abs()))
    shown = set(zip(t.loc[hit[hit].index, "group"], t.loc[hit[hit].index, "text"]))
    hit |= nums.notna() & pd.Series([k in shown for k in zip(t.loc[sel, "group"], t.loc[sel, "text"])], index=nums.index)
    t.loc[hit[hit].index, "bold"] = True


def _best_two(t: pd.DataFrame, column: str, lower_is_better: bool):
    """Per group of `column` with two numbers or more: (its rows, (best value, row), (runner-up value, row))."""
    for _, part in t[t["column"] == column].groupby("group"):
        vals = sorted(((float(v), int(r)) for v, r in zip(part["value"], part["row"]) if _is_number(v)),
                      reverse=not lower_is_better)
        if len(vals) >= 2:
            yield part, vals[0], vals[1]


def bold_beyond_noise(t: pd.DataFrame, column: str, stderr: dict[int, float], lower_is_better: bool = False,
                      z: float = 1.96) -> None:
    """Bold the best value of `column` within each group only where it beats the runner-up by more than
    noise: |best − second| > z·sqrt(se_best² + se_second²), with `stderr` keyed by table row. No bold
    where either standard error is unknown: a sample too small to tell is not a win."""
    for part, (best, rb), (second, rs) in _best_two(t, column, lower_is_better):
        if rb in stderr and rs in stderr and abs(best - second) > z * (stderr[rb] ** 2 + stderr[rs] ** 2) ** 0.5:
            t.loc[part.index[part["row"] == rb], "bold"] = True


def bold_beyond_spread(t: pd.DataFrame, column: str, samples: dict[int, Sequence[float]], lower_is_better: bool = False,
                       alpha: float = 0.05) -> None:
    """Bold the best value of `column` within each group only where Welch's t-test on its row's samples and the
    runner-up's (`samples` keyed by table row: a latency row's measured runs) rejects equal means at two-sided
    `alpha`, the best's mean being the better. No bold where either row has fewer than two samples (one run gives
    no spread to tell noise by) or the two values tie."""
    for part, (best, rb), (second, rs) in _best_two(t, column, lower_is_better):
        a, b = samples.get(rb, ()), samples.get(rs, ())
        p = welch_p(a, b) if best != second else None
        if p is not None and p < alpha and (np.mean(a) < np.mean(b)) == lower_is_better:
            t.loc[part.index[part["row"] == rb], "bold"] = True


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that `a` and `b` share a mean (unequal variances); None with fewer than
    two samples in either. Both without spread: 0 where the means differ, 1 where they do not."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats  # only the tables that test need it

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return 0.0 if diff else 1.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * stats.t.sf(abs(diff) / (va + vb) ** 0.5, df))


def _is_number(v: object) -> bool:
    """A number to rank: not a bool, not NaN (pandas stores the value of a '—' cell, None, as NaN)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and v == v


def wide(t: pd.DataFrame, field: str = "text") -> pd.DataFrame:
    """One field of the cells pivoted to the table's layout: index (group, title, row), the
    table's columns in order."""
    if t.empty:  # pivot of nothing has no index levels
        return pd.DataFrame(columns=t.attrs["columns"], index=pd.MultiIndex.from_arrays([[], [], []], names=INDEX))
    return t.pivot(index=INDEX, columns="column", values=field).reindex(columns=t.attrs["columns"])


def groups(t: pd.DataFrame) -> list[str]:
    """Group titles in order."""
    return t.drop_duplicates("group")["title"].tolist()


def rows(t: pd.DataFrame, group: int = 0, field: str = "text") -> pd.DataFrame:
    """One field (text, value or bold) of the rows of the `group`-th group in the table's layout,
    numbered from 0."""
    w = wide(t, field)
    return w[w.index.get_level_values("group") == group].reset_index(drop=True)


def _group_blocks(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per group of a `wide` frame, in order."""
    return [(title, block) for (_, title), block in frame.groupby(level=["group", "title"], sort=True)]


def to_markdown(t: pd.DataFrame) -> str:
    """GitHub Markdown: caption in italics above, a group heading row (bold) before each group. Every string
    goes through `md_cell`, so a name shows as typed (`my*method`, `<b>x</b>`, `` `x` ``, `[a](b)`)."""
    cols = [md_cell(c) for c in t.attrs["columns"]]
    out = [_md_wrapped(t.attrs["caption"], "*"), "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    text, bold = wide(t, "text"), wide(t, "bold").astype(bool)
    shown = text.copy()
    for c in text.columns:  # a bold cell is wrapped in ** **: a '*' inside it could close that early
        shown[c] = [_md_wrapped(x, "**") if b else md_cell(x) for x, b in zip(text[c], bold[c])]
    for title, block in _group_blocks(shown):
        if title:
            out.append("| " + " | ".join([_md_wrapped(title, "**")] + [""] * (len(cols) - 1)) + " |")
        out += ["| " + " | ".join(r) + " |" for r in block.itertuples(index=False)]
    return "\n".join(out)


def _md_wrapped(text: str, mark: str) -> str:
    """`text` in italics (`mark` "*") or bold ("**"), its edge whitespace left out: a `*` after a space closes nothing
    (`**x **` showed its stars), and a cell or paragraph trims that whitespace anyway. Nothing left: no marks."""
    inner = md_cell(visible(text).strip(), wrapped=True)
    return f"{mark}{inner}{mark}" if inner else ""


def to_csv(t: pd.DataFrame) -> str:
    """Tidy-ish CSV: a `group` column, then the table's columns with raw values where known, then one
    column `<column>_<stat>` per stat of a column's cells (`<column>_stderr`, `_ci_low`, `_ci_high`,
    `_p_mcnemar`), in the table's column order; empty where a cell has none. A text cell or header a spreadsheet
    would run as a formula starts with `'` (`csv_cell`; `reports.escape.csv_text` reads it back)."""
    text, value = wide(t, "text"), wide(t, "value")
    out = value.where(value.notna(), text)
    out.insert(0, "group", out.index.get_level_values("title"))
    stats = wide(t, "stats")
    for c in t.attrs["columns"]:
        names = dict.fromkeys(k for d in stats[c] if isinstance(d, dict) for k in d)
        for name in names:
            out[f"{c}_{name}"] = [d.get(name) if isinstance(d, dict) else None for d in stats[c]]
    out = out.map(csv_cell).rename(columns=csv_cell)
    # a CR in a text is quoted only where it is in the line terminator: else a reader ends the row there. Such a table
    # gets RFC 4180's CRLF rows; every other keeps its LF rows, byte for byte
    cr = any("\r" in x for x in [*out.columns, *out.to_numpy().ravel()] if isinstance(x, str))
    return out.to_csv(index=False, lineterminator="\r\n" if cr else "\n")


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "`": r"\textasciigrave{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}  # OT1 would print < > | as ¡ ¿ —
_LATEX_SYMBOLS = {"×": r"$\times$", "—": "--", "–": "--", "±": r"$\pm$", "≥": r"$\geq$", "≤": r"$\leq$", "÷": r"$\div$",
                  "·": r"$\cdot$", "→": r"$\rightarrow$", "⊆": r"$\subseteq$", "µ": r"$\mu$", "−": r"$-$", "↓": r"$\downarrow$",
                  "↑": r"$\uparrow$"}
_LATEX_CONTROLS = CARETS | {0xFFFD: "?"}  # `visible`'s
NAME_CHARS, NAME_WIDTH = 30, "14em"  # a name column with a longer name wraps at this width (`_latex_wrap_names`)


def latex_escape(s: str) -> str:
    """LaTeX special characters escaped and the symbols the tables use (×, —, ±, ...) written as
    T1/math commands. pandas' own escape="latex" leaves the symbols as Unicode, which pdflatex's
    default input encoding does not typeset. A typed `--` or `''` stays two characters (`-{}-`: no
    dash or quote ligature) and a line break is a space (a blank line would end the cell's paragraph). A character
    pdflatex stops at and no reader sees is left out: a format character (Unicode Cf: a bidi mark, a zero-width
    space); a control character is written in caret notation (`^[` for ESC, `reports.escape.visible`)."""
    s = "".join(ch for ch in visible(s) if unicodedata.category(ch) != "Cf").translate(_LATEX_CONTROLS)
    out = "".join(_LATEX_ESCAPES.get(ch, ch) + ("{}" if ch in "-'" and s[i + 1:i + 2] == ch else "") for i, ch in enumerate(s))
    for sym, rep in _LATEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return "{}" + out if out.startswith("[") else out  # after a row's \\, "[x]" would be read as \\[length]


def to_latex(t: pd.DataFrame) -> str:
    """A `table` float with a booktabs `tabular`; needs `\\usepackage{booktabs}` only, and a table that fits its
    column needs `\\usepackage{graphicx}` too (`_latex_fit`). A name longer than `NAME_CHARS` makes its column a
    ragged-right `p{NAME_WIDTH}` (core LaTeX) that breaks it (`_latex_wrap_names`)."""
    text, bold = wide(t, "text"), wide(t, "bold").astype(bool)
    text, fmt = _latex_stacked(text, t.attrs["align"], t.attrs.get("latex_lines"))
    text, bold, fmt, align = _latex_wrap_names(text, bold, fmt, t.attrs["align"])
    heads = dict(zip(text.columns, t.attrs["align"]))  # one letter per column, before `_latex_wrap_names`
    st = text.style.hide(axis="index").format(fmt).format_index(lambda c: _latex_header(c, heads[c]), axis="columns")
    st.apply(lambda _: np.where(bold, "textbf: --rwrap;", ""), axis=None)
    st.set_table_styles([{"selector": "small", "props": ":"}])  # Styler writes it after the caption and before the label
    tex = st.to_latex(environment="table", position="t", position_float="centering", hrules=True, column_format=align,
                      caption=_latex_text(t.attrs["caption"]), label=f"tab:{t.attrs['name']}")
    tex = _latex_group_headings(tex, [(title, len(block)) for title, block in _group_blocks(text)], len(text.columns))
    return _latex_fit(tex) if t.attrs.get("latex_fit") else tex


def _latex_stacked(text: pd.DataFrame, align: str, lines: str | None) -> tuple[pd.DataFrame, dict]:
    """(text, formatter per column): with `lines` (a regex, the table's `latex_lines`) each cell of every column but
    the first (the name) is split where it matches into the lines of a nested tabular, top-aligned, aligned as its
    column, the lines after the first in \\scriptsize: "-2.9* [-5.4, -0.4] p=0.026" is a column as wide as its CI in
    small print, not as the three side by side."""
    fmt = {c: latex_escape for c in text.columns}
    if not lines:
        return text, fmt
    text = text.copy()
    for a, c in zip(align[1:], text.columns[1:]):
        text[c] = [_latex_lines([p for p in re.split(lines, x) if p], a) for x in text[c]]
        fmt[c] = str
    return text, fmt


def _latex_lines(parts: list[str], align: str) -> str:
    if len(parts) < 2:
        return latex_escape("".join(parts))
    lines = [latex_escape(parts[0]), *(r"\scriptsize " + latex_escape(p) for p in parts[1:])]  # the figure, then its details
    return rf"\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + r" \\ ".join(lines) + r"\end{tabular}"


def _latex_fit(tex: str) -> str:
    """The tabular scaled down to the column's width where it is wider (never up), with narrower gaps between columns:
    a table of many columns (the paired table: every task's difference, CI and p-value) fits one text column."""
    tex = tex.replace("\\begin{tabular}", "\\setlength{\\tabcolsep}{3pt}\n"
                      "\\resizebox{\\ifdim\\width>\\columnwidth\\columnwidth\\else\\width\\fi}{!}{\\begin{tabular}", 1)
    head, _, tail = tex.rpartition("\\end{tabular}")
    return head + "\\end{tabular}}" + tail


def _latex_wrap_names(text: pd.DataFrame, bold: pd.DataFrame, fmt: dict, align: str) -> tuple[pd.DataFrame, pd.DataFrame, dict, str]:
    """(text, bold, `fmt`, column spec) for Styler (`fmt`: the formatter per column): where the first (name) column is
    left-aligned and holds a name over `NAME_CHARS`, that column becomes `p{NAME_WIDTH}` and its cells are rendered
    here: ragged right, bold inside it (Styler's \\textbf around \\raggedright would undo it), breaks allowed
    (`_latex_breakable`). An `l` column cannot break a line: the name ran past the table's box, however narrow the rest."""
    first = text.columns[0] if len(text.columns) else None
    if first is None or not align.startswith("l") or max(map(len, text[first]), default=0) <= NAME_CHARS:
        return text, bold, fmt, align
    text, bold = text.copy(), bold.copy()
    text[first] = [r"\raggedright " + (rf"\textbf{{{_latex_breakable(x)}}}" if b else _latex_breakable(x))
                   for x, b in zip(text[first], bold[first])]
    bold[first], fmt[first] = False, str
    return text, bold, fmt, f"p{{{NAME_WIDTH}}}" + align[1:]


def _latex_breakable(s: str) -> str:
    """`s` escaped, with a line break allowed after its punctuation (`@ , = : ; / _ . + - ) ]`) and every 8 characters
    of a run of more than 12 with no punctuation or space (a name of letters only must wrap too)."""
    pieces = []
    for part in re.split(r"(?<=[@,=:;/_.+)\]\s-])", s):  # a space is a break already: no part holds one inside
        pieces += [part[i:i + 8] for i in range(0, len(part), 8)] if len(part) > 12 else [part]
    return r"\allowbreak{}".join(latex_escape(p) for p in pieces if p)


def _latex_text(s: str) -> str:
    """`s` escaped, with breaks allowed inside each word over `NAME_CHARS` (`_latex_breakable`): a caption breaks
    lines at its spaces only, and a long model name in it ran past the page."""
    words = visible(s).split(" ")
    if all(len(w) <= NAME_CHARS for w in words):
        return latex_escape(s)
    return " ".join(_latex_breakable(w) if len(w) > NAME_CHARS else latex_escape(w) for w in words)


def _latex_header(name: str, align: str) -> str:
    """A column header: one over `NAME_CHARS` (a plug-in task's long name) in a `NAME_WIDTH` paragraph aligned as its
    column, breakable (`_latex_text`), as a long name in the name column; an `r` column cannot break a line."""
    if len(name) <= NAME_CHARS:
        return latex_escape(name)
    how = {"r": r"\raggedleft", "c": r"\centering"}.get(align, r"\raggedright")
    return rf"\parbox[b]{{{NAME_WIDTH}}}{{{how} {_latex_text(name)}}}"


def _latex_heading(title: str) -> str:
    """A group heading (italics). One over `NAME_CHARS` (a long model name) is measured: where it is wider than the
    line it wraps to the line's width (a ragged-right \\parbox, breakable as `_latex_text`), else it stays one line
    as a short one. It spans every column, so a fixed width would wrap it in a wide table that had room for it."""
    if len(title) <= NAME_CHARS:
        return rf"\textit{{{latex_escape(title)}}}"
    width, text = r"\dimexpr\linewidth-2\tabcolsep\relax", rf"\textit{{{_latex_text(title)}}}"
    return rf"\sbox0{{{text}}}\ifdim\wd0>{width}\parbox[t]{{{width}}}{{\raggedright {text}}}\else\usebox0\fi"


def _latex_group_headings(tex: str, sizes: list[tuple[str, int]], n_cols: int) -> str:
    """Insert each group's heading (a `\\multicolumn` row in italics) and a `\\midrule` between groups
    into Styler's output, which has one line per body row after the header's `\\midrule`: a Styler
    row cannot span columns."""
    lines = tex.splitlines()
    at = lines.index(r"\midrule") + 1
    out = lines[:at]
    for i, (title, n) in enumerate(sizes):
        if i:
            out.append(r"\midrule")
        if title:
            out.append(rf"\multicolumn{{{n_cols}}}{{l}}{{{_latex_heading(title)}}} \\")
        out += lines[at:at + n]
        at += n
    return "\n".join(out + lines[at:]) + "\n"


# Styler's HTML table with a heading row (spanning all columns) before each group's first row: the
# index (group, title, row) is hidden but its cells are still in each row `r` of the template.
_HTML_GROUPED = """{% extends "html_table.tpl" %}
{% block tr %}
{% if r[1].display_value and (loop.first or loop.previtem[0].value != r[0].value) %}
    <tr class="group"><th colspan="{{ r | selectattr('type', 'equalto', 'td') | list | length }}">{{ r[1].display_value }}</th></tr>
{% endif %}
{{ super() -}}
{% endblock tr %}
"""


class _GroupedStyler(Styler):
    env = jinja2.Environment(loader=jinja2.ChoiceLoader([jinja2.DictLoader({"grouped.tpl": _HTML_GROUPED}), Styler.loader]),
                             trim_blocks=True)
    template_html_table = env.get_template("grouped.tpl")


def to_html(t: pd.DataFrame) -> str:
    """An HTML `<table class="results">` (escaped) with a caption; group headings span all columns;
    bold and alignment as CSS in the `<style>` block Styler writes before the table."""
    text, bold = wide(t, "text"), wide(t, "bold").astype(bool)
    st = _GroupedStyler(text, uuid=t.attrs["name"], caption=escape(t.attrs["caption"]), table_attributes='class="results"')
    st.hide(axis="index").format(escape="html").format_index(escape="html", axis="index").format_index(escape="html", axis="columns")
    st.apply(lambda _: np.where(bold, "font-weight: bold", ""), axis=None)
    st.set_table_styles([{"selector": f"{cell}.col{j}", "props": f"text-align: {'left' if a == 'l' else 'right'}"}
                         for j, a in enumerate(t.attrs["align"]) for cell in ("td", "th")])  # a header over its column
    return f'<div class="scroll" id="table-{escape(t.attrs["name"])}">\n{st.to_html().strip()}\n</div>'
