"""What the tables (`reports.tables`) and the figures (`reports.plots`) both read from a run record: its blocks
removed, a stored score and its standard error, the KV bytes it sent, a latency workload's settings; the PD settings'
titles and the standard error of a mean. Only records are read (no model, no torch)."""

from __future__ import annotations

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
