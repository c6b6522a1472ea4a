"""The efficiency table of latency records: per workload and hardware, TTFT, TPOT and E2E p50, the KV bytes sent per
request and the factors against the unpruned record (`reports.tables` holds the groups it shares with the plug-in
figures' table, `latency_groups`). Only records are read (no model, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from harness.store.records import RunRecord
from reports.collect import Collection, reference
from reports.formats import CellSpec, bold_best, cell, make_table
from reports.record_values import MIB
from reports.tables import _as_collection, _ratio_cell, clocks, latency_groups, mib_decimals, mib_text, removed_text


def _v(r: RunRecord | None, label: str, metric: str) -> float | None:
    return None if r is None else r.figure(label, metric)


def _request_bytes(r: RunRecord | None, label: str) -> float | None:
    """KV bytes `r` sent per request in workload `label`."""
    kv = r.kv.get(label, {}) if r is not None else {}
    return kv["kv_bytes"] / max(1, kv.get("handoffs", 1)) if kv else None


def efficiency_table(records: Collection | Sequence[RunRecord], bandwidth_gbit: float = 100.0) -> pd.DataFrame:
    """Per workload (prompt, decode tokens, batch, decode path) and hardware: TTFT, TPOT and E2E
    p50, KV bytes sent per request, and factors versus `unpruned` in the same group."""
    col = _as_collection(records)
    runs = isinstance(records, Collection)  # a plain list says nothing of runs: configuration only
    e2e = f"e2e_ms_p50@{bandwidth_gbit:g}gbit"
    groups, grouped = [], latency_groups(col)
    places = mib_decimals((_request_bytes(r, lab) for _, lab, rs in grouped for r in rs), 2)
    for title, lab, rs in grouped:
        g: list[list[CellSpec]] = []
        for r in rs:
            dense = reference(rs, r, col=col, same_run=runs)  # r's own run's: latency samples compare within one run
            # bytes are counted, not timed: any unpruned record of r's configuration, as the quality table's KV ×
            per_req, dense_req = _request_bytes(r, lab), _request_bytes(reference(rs, r, col=col), lab)
            ttft, tpot, end = _v(r, lab, "ttft_ms_p50"), _v(r, lab, "tpot_ms_p50"), _v(r, lab, e2e)
            g.append([
                cell(col.label(r)), cell(removed_text(r)),
                cell("—") if ttft is None else cell(f"{ttft:.1f}", ttft),
                cell("—") if tpot is None else cell(f"{tpot:.2f}", tpot),
                cell("—") if end is None else cell(f"{end:.1f}", end),
                cell("—") if per_req is None else cell(mib_text(per_req, places), per_req / MIB),
                _ratio_cell(dense_req, per_req),
                _ratio_cell(_v(dense, lab, "ttft_ms_p50"), ttft),
                _ratio_cell(_v(dense, lab, "tpot_ms_p50"), tpot),
                _ratio_cell(_v(dense, lab, e2e), end),
            ])
        groups.append((title, g))
    caption = (f"Latency per request (p50 over all measured runs; TTFT includes the first token, TPOT is the mean "
               f"decode step) and KV bytes the prefill stage sends per request. E2E = TTFT + transfer at "
               f"{bandwidth_gbit:g} Gbit/s + (n-1)·TPOT. Factors are unpruned ÷ method (higher is better); a speedup only "
               f"against the unpruned record of the row's own run ('—' without one: timings compare within one run). "
               f"Clock: {clocks(col)}.")
    columns = ["Method", "Removed", "TTFT (ms)", "TPOT (ms)", f"E2E (ms) @{bandwidth_gbit:g} Gbit/s",
               "KV sent (MiB)", "KV reduction", "TTFT speedup", "TPOT speedup", "E2E speedup"]
    t = make_table("efficiency", caption, columns, groups)
    for c in columns[2:6]:
        bold_best(t, c, lower_is_better=True)
    for c in columns[6:]:
        bold_best(t, c)
    return t
