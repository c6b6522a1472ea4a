"""The efficiency table of latency records: per workload and hardware, TTFT, TPOT and E2E p50, the KV bytes sent per
request and the factors against the unpruned record (`reports.tables` holds the groups it shares with the plug-in
figures' table, `latency_groups`). Bytes are counted, so the best is bold; times are sampled, so the best only where
the runs tell it from noise. Only records are read (no model, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from harness.store.records import RunRecord
from reports.collect import Collection, reference
from reports.formats import CellSpec, bold_best, bold_beyond_spread, cell, make_table
from reports.record_values import MIB, timing_runs
from reports.tables import _as_collection, _ratio_cell, clocks, latency_groups, mib_decimals, mib_text, removed_text


def _v(r: RunRecord | None, label: str, metric: str) -> float | None:
    return None if r is None else r.figure(label, metric)


def _request_bytes(r: RunRecord | None, label: str) -> float | None:
    """KV bytes `r` sent per request in workload `label`."""
    kv = r.kv.get(label, {}) if r is not None else {}
    return kv["kv_bytes"] / max(1, kv.get("handoffs", 1)) if kv else None


def efficiency_table(records: Collection | Sequence[RunRecord], bandwidth_gbit: float = 100.0) -> pd.DataFrame:
    """Per workload (prompt, decode tokens, batch, decode path) and hardware: TTFT, TPOT and E2E
    p50, KV bytes sent per request, and factors versus `unpruned` in the same group. Bytes are counted: the best is
    bold; times are sampled: the best only beyond the runs' spread (`bold_beyond_spread`)."""
    col = _as_collection(records)
    runs = isinstance(records, Collection)  # a plain list says nothing of runs: configuration only
    groups, grouped, spread, i = [], latency_groups(col), {}, 0  # spread[column position][row]: per-run samples
    places = mib_decimals((_request_bytes(r, lab) for _, lab, rs in grouped for r in rs), 2)
    for title, lab, rs in grouped:
        g: list[list[CellSpec]] = []
        for r in rs:
            row, samples = _efficiency_row(col, rs, r, lab, places, bandwidth_gbit, runs)
            g.append(row)
            for j, xs in samples.items():
                spread.setdefault(j, {})[i] = xs
            i += 1
        groups.append((title, g))
    columns = ["Method", "Removed", "TTFT (ms)", "TPOT (ms)", f"E2E (ms) @{bandwidth_gbit:g} Gbit/s",
               "KV sent (MiB)", "KV reduction", "TTFT speedup", "TPOT speedup", "E2E speedup"]
    t = make_table("efficiency", _efficiency_caption(col, bandwidth_gbit), columns, groups)
    for j in (2, 3, 4, 7, 8, 9):
        bold_beyond_spread(t, columns[j], spread.get(j, {}), lower_is_better=j < 5)
    bold_best(t, columns[5], lower_is_better=True)  # bytes are counted, not sampled
    bold_best(t, columns[6])
    return t


def _efficiency_row(col: Collection, rs: list[RunRecord], r: RunRecord, lab: str, places: int, bandwidth_gbit: float,
                    runs: bool) -> tuple[list[CellSpec], dict[int, list[float]]]:
    """`r`'s cells in workload `lab`, and the per-run samples of its timed columns by position: its runs' TTFT, TPOT
    and E2E (ms), and for each speedup those runs negated. `runs`: whether the records come
    from runs (a speedup is then against r's own run's unpruned record)."""
    metrics = ("ttft_ms_p50", "tpot_ms_p50", f"e2e_ms_p50@{bandwidth_gbit:g}gbit")
    dense = reference(rs, r, col=col, same_run=runs)  # r's own run's: latency samples compare within one run
    # bytes are counted, not timed: any unpruned record of r's configuration, as the quality table's KV ×
    per_req, dense_req = _request_bytes(r, lab), _request_bytes(reference(rs, r, col=col), lab)
    times, refs = [_v(r, lab, m) for m in metrics], [_v(dense, lab, m) for m in metrics]
    row = [cell(col.label(r)), cell(removed_text(r))]
    row += [cell("—") if v is None else cell(f"{v:.{decimals}f}", v) for v, decimals in zip(times, (1, 2, 1))]
    row += [cell("—") if per_req is None else cell(mib_text(per_req, places), per_req / MIB), _ratio_cell(dense_req, per_req)]
    row += [_ratio_cell(ref, v) for ref, v in zip(refs, times)]
    got = timing_runs(r, lab, bandwidth_gbit)
    samples = {2 + k: got.get(name, []) for k, name in enumerate(("ttft", "tpot", "e2e"))}
    # a speedup is tested on the same runs as its time, negated (higher is better): the test's p is the time's, so a
    # speedup and its time are bold alike when the rows share a reference (ref ÷ each run reshaped the spread: a
    # speedup was bold beside a time that was not)
    samples.update({7 + k: [-x for x in samples[2 + k]] for k in range(3)})
    return row, samples


def _efficiency_caption(col: Collection, bandwidth_gbit: float) -> str:
    return (f"Latency per request (p50 over all measured runs; TTFT includes the first token, TPOT is the mean "
            f"decode step) and KV bytes the prefill stage sends per request. E2E = TTFT + transfer at "
            f"{bandwidth_gbit:g} Gbit/s + (n-1)·TPOT. Factors are unpruned ÷ method (higher is better); a speedup only "
            f"against the unpruned record of the row's own run ('—' without one: timings compare within one run). "
            f"Bold: the least bytes (highest reduction) per group; a time (speedup) only where it is the lowest (highest) "
            f"and Welch's t-test on its row's measured runs and the runner-up's rejects equal means at p < 0.05, "
            f"two-sided (a run's E2E: its TTFT + transfer + (n-1)·its TPOT; a speedup is tested on its row's runs of "
            f"that time), so never with one run per row. Clock: {clocks(col)}.")
