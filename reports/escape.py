"""A user's string (a method, model, task or KV policy name, an option value) as a format shows it as typed.

`visible` is the text a terminal or Markdown shows: a line break is a space and an invisible control character a
visible stand-in (`figure_visible`: the same in characters matplotlib's fonts have). `md_cell` escapes GitHub
Markdown, `csv_cell` keeps a spreadsheet from running a cell as a formula (`csv_text` undoes it). LaTeX and HTML
escaping are in `reports.formats`.
"""

from __future__ import annotations

import re
import unicodedata

# C0 controls and DEL as their Unicode control pictures (U+2400..U+241F, U+2421): an ESC printed with the tables
# would drive the terminal, and SVG (XML 1.0) has no way to hold one. C1 controls (U+0080..U+009F, e.g. the one-byte
# CSI) have no picture: U+FFFD. A lone surrogate (from a record's JSON "\ud800") cannot be written as UTF-8: U+FFFD.
_CONTROLS = {**{c: chr(0x2400 + c) for c in range(0x20)}, 0x7F: "\u2421", **{c: "\ufffd" for c in range(0x80, 0xA0)}}
_SURROGATE = re.compile("[\ud800-\udfff]")


def visible(text: str) -> str:
    """`text` on one line with every character visible or harmless: each line break (str.splitlines's) and tab a
    space, other control characters their stand-ins (`_CONTROLS`), a lone surrogate U+FFFD."""
    text = " ".join(text.splitlines()).replace("\t", " ")
    return _SURROGATE.sub("\ufffd", text).translate(_CONTROLS)


# matplotlib's own fonts (DejaVu Sans, STIX, Computer Modern; checked with matplotlib.font_manager) have no control
# pictures: a figure drew each as an empty box. There a control is in caret notation, as `cat -v` writes it (and
# LaTeX, `reports.formats.latex_escape`).
CARETS = {**{0x2400 + c: "^" + chr(0x40 + c) for c in range(0x20)}, 0x2421: "^?"}


def figure_visible(text: str) -> str:
    """`visible` in characters a figure's font has: each control picture (a C0 control's or DEL's stand-in, or one the
    text held) in caret notation, ESC `^[`, BEL `^G`, DEL `^?`."""
    return visible(text).translate(CARETS)


# Markdown: always escaped: '\\' (else it escapes what follows), code spans, GitHub's $math$ and ~strikethrough~,
# '|' (ends a cell)
_MD_ALWAYS = {"\\": "\\\\", "`": "\\`", "$": "\\$", "~": "\\~", "|": "\\|"}
_MD_HTML = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?\w+;)")  # a tag, comment or autolink; an entity (&lt; would show '<')
_MD_RUN = re.compile(r"\*+|_+")
# GFM's extended autolinks (spec 0.29, "Autolinks (extension)"), as the parser reads the source: the ':' of a scheme
# (http, https, ftp; after no other letter) before '//', the '.' after 'www' (after no letter or digit). Escaped, the
# source no longer holds `https://` or `www.` and cmark-gfm links neither.
_MD_AUTOLINK = re.compile(r"(?<![A-Za-z])(?:https?|ftp)(:)(?=//)|(?<![A-Za-z0-9])www(\.)", re.IGNORECASE | re.ASCII)
# What GitHub finds in the text after escapes are resolved, so that no backslash stops it: an email address (the
# spec's extended email autolink is found in text nodes), an @mention and an :emoji: shortcode (GitHub's filters
# over the rendered text). A WORD JOINER (U+2060: no width, no break) after the '@' of an email or a mention, or the
# first ':' of an emoji stops each (not before an '@': a non-word character there makes a mention of what follows).
_WJ = "\u2060"
_MD_JOINED = re.compile(r"(?<=[A-Za-z0-9.+_-])@(?=[\w.-]*\.[A-Za-z0-9])|(?<!\w)@(?=[A-Za-z0-9])|:(?=[\w+-]+:)", re.ASCII)
# explicit bidi controls: embeddings and overrides (closed by PDF, U+202C), isolates (closed by PDI, U+2069)
_BIDI_OPEN = {"\u202a": "\u202c", "\u202b": "\u202c", "\u202d": "\u202c", "\u202e": "\u202c",
              "\u2066": "\u2069", "\u2067": "\u2069", "\u2068": "\u2069"}


def md_cell(text: str, wrapped: bool = False) -> str:
    """`text` as GitHub Markdown shows it as typed, in a table cell or wrapped in `*` (`wrapped`: the italic caption, a
    bold cell), after `visible`. Escaped only where Markdown would read it, so ordinary text is unchanged (`k_decode`,
    `+4.0* [-1, +9]`): `|`, `\\`, backticks, `$`, `~`; `<` opening a tag and `&` an entity; every `[` of a text holding
    `](` or `][` (a link; a bare `[x]` is none: the output defines no references); each run of `*` or `_` that could
    open emphasis (when `wrapped`, a `*` run that could close it too); a URL's or `www.`'s autolink. An email address,
    `@name` and `:name:` get an invisible U+2060 that GitHub's links, mentions and emoji do not match across, and a
    bidi override or isolate the text leaves open is closed at its end (else it reorders the rest of the row)."""
    text = visible(text)
    esc = {m.start() for m in _MD_HTML.finditer(text)}
    if "](" in text or "][" in text:
        esc |= {i for i, ch in enumerate(text) if ch == "["}
    for m in _MD_RUN.finditer(text):
        if _md_emphasis(text, m.start(), m.end(), wrapped):
            esc |= set(range(m.start(), m.end()))
    esc |= {m.start(g) for m in _MD_AUTOLINK.finditer(text) for g in (1, 2) if m.start(g) >= 0}
    joined = {m.end() for m in _MD_JOINED.finditer(text)}
    out = "".join((_WJ if i in joined else "") + (_MD_ALWAYS.get(ch) or ("\\" + ch if i in esc else ch))
                  for i, ch in enumerate(text))
    return out + _bidi_closers(text)


def _md_emphasis(text: str, start: int, end: int, wrapped: bool) -> bool:
    """Whether the delimiter run text[start:end] of `*` or `_` can open emphasis, or, `wrapped` in `*`, is a `*` run
    that can close it or touches the wrapping `*` (CommonMark's flanking rules; outside the text: a space, or `*`)."""
    edge = "*" if wrapped else " "
    before, after = text[start - 1] if start else edge, text[end] if end < len(text) else edge
    left = not after.isspace() and (not _punct(after) or before.isspace() or _punct(before))
    right = not before.isspace() and (not _punct(before) or after.isspace() or _punct(after))
    if text[start] == "_":  # '_' inside a word (k_decode) neither opens nor closes
        return left and (not right or _punct(before))
    return left or (wrapped and (right or start == 0 or end == len(text)))


def _punct(ch: str) -> bool:
    """Unicode punctuation or symbol, as CommonMark's flanking rules read it."""
    return unicodedata.category(ch)[0] in "PS"


def _bidi_closers(text: str) -> str:
    """The PDF and PDI characters that close what `text` leaves open, innermost first (Unicode's bidi algorithm, X6a:
    a PDI also ends every embedding opened after its isolate; an unmatched PDF or PDI closes nothing)."""
    stack: list[str] = []
    for ch in text:
        if ch in _BIDI_OPEN:
            stack.append(_BIDI_OPEN[ch])
        elif ch == "\u2069" and "\u2069" in stack:
            del stack[len(stack) - 1 - stack[::-1].index("\u2069"):]
        elif ch == "\u202c" and stack and stack[-1] == "\u202c":
            stack.pop()
    return "".join(reversed(stack))


# OWASP's CSV injection advice: a spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...))
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(v: object) -> object:
    """A CSV cell a spreadsheet does not run: a text starting with `=`, `+`, `-`, `@`, a tab or CR (or `'`, so that
    `csv_text` can undo it) gets a `'` in front. Numbers and other values are left alone, and so is a text that is a
    plain number ("-0.5", "+4"): a spreadsheet reads it as that number, not as a formula."""
    if isinstance(v, str) and v.startswith((*_CSV_FORMULA, "'")) and not _NUMBER.fullmatch(v):
        return "'" + v
    return v


def csv_text(s: str) -> str:
    """The text a `csv_cell` came from: one leading `'` dropped (`csv_cell` put one before every text starting with
    `'`)."""
    return s[1:] if s.startswith("'") else s
