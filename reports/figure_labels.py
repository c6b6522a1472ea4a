"""Method and folder names as figure text: wrapped, bounded, and safe for matplotlib and SVG (reports/plots.py)."""

from __future__ import annotations

import hashlib

from reports.escape import figure_visible

LABEL_CHARS = 40  # a longer label wraps (`plain`): a 2000-character name made a figure 19,000 pixels wide
LABEL_LINES = 3  # and a label of more lines keeps its first and last: a 50-line legend entry left no room for the axes


def plain(name: str) -> str:
    """A method or folder name as figure text: on one line of at most `LABEL_CHARS` characters or wrapped onto several
    (after its punctuation where it can), at most `LABEL_LINES` of them: a longer one keeps its first and last line
    around a middle line saying how many characters it left out and a digest of the whole name (two names alike but
    in the middle stay two labels; the tables show them whole). A control character is in caret notation
    (`figure_visible`: SVG cannot hold one and the fonts have no picture of it), a `$` escaped, else matplotlib reads
    `$...$` as mathtext (`a$_^$b` raised ValueError when the figure was saved). Mathtext stays on: log axes label
    their ticks with it. A leading `_` gets a zero-width space before it: matplotlib's legend leaves out every label
    that starts with `_`."""
    text = figure_visible(name)
    lines = _wrapped(text)
    if len(lines) > LABEL_LINES:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:6]
        left_out = len(text) - len(lines[0]) - len(lines[-1])
        lines = [lines[0], f"…[{left_out} characters left out, {digest}]…", lines[-1]]
    out = "\n".join(lines).replace("$", r"\$")
    return "\u200b" + out if out.startswith("_") else out


def _wrapped(text: str) -> list[str]:
    """`text` in lines of at most `LABEL_CHARS` characters, each cut after the last punctuation or space in its second
    half, else at `LABEL_CHARS`."""
    lines = []
    while len(text) > LABEL_CHARS:
        cut = max((i + 1 for i, ch in enumerate(text[:LABEL_CHARS]) if ch in " @,=:;/_.+-)]"), default=0)
        cut = cut if cut > LABEL_CHARS // 2 else LABEL_CHARS
        lines.append(text[:cut].rstrip(" "))
        text = text[cut:].lstrip(" ")
    return [*lines, text]
