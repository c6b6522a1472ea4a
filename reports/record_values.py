"""What the tables (`reports.tables`) and the figures (`reports.plots`) both read from a run record: its blocks
removed, a stored score and its standard error, the KV bytes it sent, a latency workload's settings; the PD settings'
titles, the standard error of a mean and a latency record's per-run timings. Only records are read (no model, no torch)."""

from __future__ import annotations

import math
import re

from harness.store.records import RunRecord
from harness.store.task_names import STANDARD_TASKS

MODE_ORDER = {"disaggregated": 0, "unified": 1}
MODE_TITLE = {"disaggregated": "PD-disaggregated", "unified": "PD-unified"}
MIB = 2**20


def removed_counts(r: RunRecord) -> tuple[int, int]:
    p = r.plan
    return len(p.get("removed_prefill", [])), len(p.get("removed_decode", []))


def stored_score(r: RunRecord, task: str, metric: str | None) -> tuple[float | None, float | None]:
    """(value, stderr) of a stored score; value None where it is NaN (no score: shown '—', in no average or
    bold), stderr None where lm-eval gave none (or it is not a number)."""
    got = r.scores.get(task, {}).get(metric, {}) if metric else {}
    v, se = got.get("value"), got.get("stderr")
    return (None if v != v else v), (float(se) if isinstance(se, (int, float)) and se == se else None)


def ordered_tasks(records: list[RunRecord], keep) -> list[str]:
    """Tasks of `records` for which keep(record, task) holds: the standard ones in their order, then by name."""
    seen = {t for r in records for t in r.scores if keep(r, t)}
    return [t for t in STANDARD_TASKS if t in seen] + sorted(seen - set(STANDARD_TASKS))


def se_of_mean(ses: list[float | None]) -> float | None:
    """Standard error of a mean over independent samples (tasks): sqrt(sum se²) / n; None if any is unknown."""
    return None if not ses or None in ses else sum(x * x for x in ses) ** 0.5 / len(ses)


def kv_sent(r: RunRecord | None, tasks: list[str]) -> int | None:
    """KV bytes `r` sent over `tasks` (None when any is missing, e.g. unified mode, or none is given)."""
    if r is None or not tasks or not all(t in r.kv for t in tasks):
        return None
    return sum(r.kv[t]["kv_bytes"] for t in tasks)


_WORKLOAD = re.compile(r"latency_T(\d+)_n(\d+)_b(\d+)(?:_(\w+))?$")


def parse_workload(label: str) -> tuple[int, int, int, str] | None:
    """`latency_T2048_n32_b1[_graph]` -> (2048, 32, 1, 'graph'); eager when no suffix."""
    m = _WORKLOAD.match(label)
    return (int(m[1]), int(m[2]), int(m[3]), m[4] or "eager") if m else None


def timing_runs(r: RunRecord, label: str, bandwidth_gbit: float) -> dict[str, list[float]]:
    """Each measured run's `ttft`, `tpot` and `e2e` (ms) in workload `label`, from the record's raw samples: a run's
    E2E is its TTFT + the modelled transfer at `bandwidth_gbit` + (n − 1) · its TPOT, as `e2e_ms_p50` is of the
    medians. A key is left out where the record cannot give it (no samples, a sample not a number, no transfer
    figure, TPOTs not one per run)."""
    wl, shape = r.latency.get(label), parse_workload(label)
    if wl is None or shape is None:
        return {}
    out = {k: xs for k in ("ttft", "tpot") if (xs := _numbers(wl.samples.get(f"{k}_ms")))}
    n, ttft, tpot = shape[1], out.get("ttft", []), out.get("tpot", [])
    transfer = wl.get(f"transfer_ms@{bandwidth_gbit:g}gbit")
    if ttft and transfer is not None and (n == 1 or len(tpot) == len(ttft)):
        out["e2e"] = [x + transfer + (n - 1) * (tpot[i] if n > 1 else 0.0) for i, x in enumerate(ttft)]
    return out


def _numbers(xs: object) -> list[float]:
    """`xs` as floats when it is a list of finite real numbers, else [] (a hand-edited record's samples)."""
    ok = isinstance(xs, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in xs)
    return [float(x) for x in xs] if ok else []
