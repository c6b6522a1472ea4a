"""A small table model rendered to Markdown, LaTeX (booktabs) and CSV.

Builders in `reports/tables.py` fill a `Table`; each renderer only formats. Keeping the raw value
next to the shown text lets CSV carry numbers while Markdown and LaTeX carry the rounded figure,
and lets "best in column" be decided on values, not strings.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field


@dataclass
class Cell:
    text: str
    value: float | str | None = None  # raw value for CSV (None: the text itself)
    bold: bool = False


@dataclass
class Group:
    title: str  # e.g. "SmolLM2-135M · PD-disaggregated"; "" = no group heading
    rows: list[list[Cell]] = field(default_factory=list)


@dataclass
class Table:
    name: str  # file stem and LaTeX label, e.g. "quality"
    caption: str
    columns: list[str]
    groups: list[Group]
    align: str = ""  # LaTeX column spec; default: first two left, rest right

    def bold_best(self, col: int, lower_is_better: bool = False) -> None:
        """Bold the best numeric value of column `col` within each group (ties all bold)."""
        for g in self.groups:
            vals = [r[col].value for r in g.rows if isinstance(r[col].value, (int, float))]
            if len(vals) < 2:
                continue
            best = min(vals) if lower_is_better else max(vals)
            for r in g.rows:
                if isinstance(r[col].value, (int, float)) and abs(r[col].value - best) <= 1e-12 * max(1.0, abs(best)):
                    r[col].bold = True

    @property
    def empty(self) -> bool:
        return not any(g.rows for g in self.groups)


def to_markdown(t: Table) -> str:
    """GitHub Markdown: caption in italics above, a group heading row (bold) before each group."""
    out = [f"*{t.caption}*", "", "| " + " | ".join(t.columns) + " |", "|" + "|".join(["---"] * len(t.columns)) + "|"]
    for g in t.groups:
        if g.title:
            out.append("| " + " | ".join([f"**{g.title}**"] + [""] * (len(t.columns) - 1)) + " |")
        for r in g.rows:
            out.append("| " + " | ".join(f"**{c.text}**" if c.bold else c.text for c in r) + " |")
    return "\n".join(out)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"×": r"$\times$", "—": "--", "–": "--", "±": r"$\pm$", "≥": r"$\geq$", "≤": r"$\leq$", "÷": r"$\div$",
                  "·": r"$\cdot$", "→": r"$\rightarrow$", "⊆": r"$\subseteq$", "µ": r"$\mu$"}


def latex_escape(s: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)
    for sym, rep in _LATEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def to_latex(t: Table) -> str:
    """A `table` float with a booktabs `tabular`; needs `\\usepackage{booktabs}` only."""
    n = len(t.columns)
    align = t.align or ("ll" + "r" * (n - 2) if n > 2 else "l" * n)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(t.caption)}}}",
           rf"\label{{tab:{t.name}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(latex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for i, g in enumerate(t.groups):
        if i:
            out.append(r"\midrule")
        if g.title:
            out.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{latex_escape(g.title)}}}}} \\")
        for r in g.rows:
            out.append(" & ".join(rf"\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text) for c in r) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def to_csv(t: Table) -> str:
    """Tidy-ish CSV: a `group` column, then the table's columns with raw values where known."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", *t.columns])
    for g in t.groups:
        for r in g.rows:
            w.writerow([g.title, *[c.text if c.value is None else c.value for c in r]])
    return buf.getvalue()


def to_html(t: Table) -> str:
    """An HTML `<table>` (escaped) with a caption; group headings span all columns."""
    from html import escape

    n = len(t.columns)
    align = t.align or ("ll" + "r" * (n - 2) if n > 2 else "l" * n)
    style = ["left" if a == "l" else "right" for a in align]
    out = [f'<div class="scroll"><table class="results" id="table-{escape(t.name)}">', f"<caption>{escape(t.caption)}</caption>",
           "<thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in t.columns) + "</tr></thead>", "<tbody>"]
    for g in t.groups:
        if g.title:
            out.append(f'<tr class="group"><th colspan="{len(t.columns)}">{escape(g.title)}</th></tr>')
        for r in g.rows:
            out.append("<tr>" + "".join(f'<td style="text-align:{a}">' + (f"<b>{escape(c.text)}</b>" if c.bold else escape(c.text))
                                        + "</td>" for c, a in zip(r, style)) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)
