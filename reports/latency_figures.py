"""The latency figures table: every figure a latency record holds beyond the package's own, and the notes of the
figures that failed.

A latency figure is a plug-in kind (`@harness.latency.figures.figure("name")`): `python -m harness latency` stores
what each one returns in the record (`latency[workload].figures`, `{value name: number}`), and nothing else about
it: no unit field, no direction. The contract puts the unit in the value's name (`decode_tok_per_s`, `probe_ms_p50`),
so a column is titled by that name as the figure returned it. The efficiency table shows the package's figures it
needs by name (TTFT, TPOT, E2E); a plug-in's could only be read from `summary.csv`. This table shows them from the
records alone (reports load no plug-in), and is left out when no record holds one, so a report without plug-in
figures is the same as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from harness.store.records import RunRecord
from reports.collect import Collection, error_line, natural_key
from reports.formats import CellSpec, cell, make_table
from reports.tables import _as_collection, clocks, latency_groups, removed_text

# The package's figures (harness/latency/figures.py) the efficiency table and summary.csv already give: their
# p50/p90/p99/mean, transfer and E2E per bandwidth, decode bound and real transfer would fill this table with numbers
# every latency record has. Any other figure, a plug-in's or one the package adds later, gets a column here.
PACKAGE_FIGURES = ("ttft_ms", "handoff_ms", "itl_ms", "tpot_ms", "transfer_ms", "e2e_ms", "decode_bound_ms",
                   "real_transfer_recv_ms")


def figure_of(value: str, r: RunRecord) -> str | None:
    """The figure that returned `value` in `r`: the longest of the package's figures and `r`'s plug-in figures (those
    with code digests, `extra.figure_code`, or a failure, `extra.figure_failures`) that `value` starts with, since a
    plug-in `ttft_ms_p95` beside the package's `ttft_ms` starts with both; None when it starts with none of them (a
    plug-in figure the run that reused `r` no longer loaded)."""
    names = [*PACKAGE_FIGURES, *(r.extra.get("figure_code") or {}), *(r.extra.get("figure_failures") or {})]
    return max((n for n in names if value.startswith(n)), key=len, default=None)


def extra_values(r: RunRecord, workload: str) -> list[str]:
    """The values of `r`'s `workload` that none of the package's figures returned."""
    wl = r.latency.get(workload)
    return [] if wl is None else [k for k in wl.figures if figure_of(k, r) not in PACKAGE_FIGURES]


def _failed(r: RunRecord, workload: str, value: str) -> bool:
    """Whether the figure `value` belongs to failed on `workload` in `r` (a value it returned before stays stored)."""
    entry = (r.extra.get("figure_failures") or {}).get(figure_of(value, r) or "")
    return isinstance(entry, dict) and workload in (entry.get("workloads") or ())


def number_text(v: float) -> str:
    """A figure's value at about four significant digits, in plain notation down to 0.001 (a figure's unit and scale
    are its own: ms, tokens per second, bytes)."""
    a = abs(v)
    if a == 0:
        return "0"
    if a < 1e-3:
        return f"{v:.3g}"
    return f"{v:,.{max(0, 3 - math.floor(math.log10(a)))}f}"


def _cell(r: RunRecord, workload: str, value: str) -> CellSpec:
    if _failed(r, workload, value):
        return cell("failed")
    v = r.figure(workload, value)
    return cell("—") if v is None else cell(number_text(v), v)


def figures_table(records: Collection | Sequence[RunRecord]) -> pd.DataFrame:
    """Rows: methods per model, workload and hardware (the efficiency table's groups); a column per figure value
    beyond the package's, titled by its name (its unit in it), as the records store it; empty (left out of the
    report) when no record has one. Not bold: whether higher or lower is better is the figure's own business."""
    col = _as_collection(records)
    values = sorted({k for r in col.latency for lab in r.latency for k in extra_values(r, lab)}, key=natural_key)
    groups = []
    for title, lab, rs in latency_groups(col) if values else ():
        cells = [[_cell(r, lab, v) for v in values] for r in rs]
        if any(c[0] != "—" for row in cells for c in row):  # a workload no figure applies to (one token): no group
            groups.append((title, [[cell(col.label(r)), cell(removed_text(r)), *row] for r, row in zip(rs, cells)]))
    if not groups:
        return make_table("latency_figures", "", ["Method"], [])
    caption = ("Latency figures beyond the package's TTFT, TPOT, ITL, handoff, transfer and E2E (plug-in figures), "
               "as each record stores them: one column per value a figure returned, titled by its name, which "
               "carries its unit. '—': the figure returned none there (or was not loaded); 'failed': it raised on "
               f"that workload (see the notes). Clock: {clocks(col)}.")
    return make_table("latency_figures", caption, ["Method", "Removed", *values], groups)


def figure_failure_notes(col: Collection) -> list[str]:
    """One line per latency figure that failed on a record's workloads (`extra.figure_failures`, written by
    `python -m harness latency`): the figure, the method and workloads, the error and where the traceback is."""
    lines = []
    for r in sorted(col.latency, key=lambda r: str(col.source(r))):
        for name, f in sorted((r.extra.get("figure_failures") or {}).items()):
            f = f if isinstance(f, dict) else {}
            err = error_line(f.get("error", ""))
            lines.append(f"latency figure {name!r} ({f.get('figure', name)}) failed for {col.label(r)} on "
                         f"{', '.join(map(str, f.get('workloads') or ())) or '?'}: {f.get('error_type', 'error')}: {err} "
                         f"(traceback: {col.source(r)}, extra.figure_failures); fix it and rerun the same latency "
                         "command: the record is reused and the figure computed from its stored samples")
    return lines
