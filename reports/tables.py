"""Comparison tables from `RunRecord`s: method × mode rows, one column per task (metric named)."""

from __future__ import annotations

from collections.abc import Sequence

from harness.config import LONG_TASKS
from harness.records import LOWER_IS_BETTER, RunRecord, primary_metric

MODE_ORDER = {"unified": 0, "disaggregated": 1}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:,.1f} MiB"


def comparison_table(records: Sequence[RunRecord]) -> str:
    """Markdown table: scores of each task's primary metric (×100 for accuracies), their average
    over the accuracy-like multiple-choice tasks (long-context tasks are shown, not averaged), and
    KV bytes handed over (all tasks) with the reduction versus `unpruned` in the same mode.
    Unified rows send nothing (no handoff), shown as '—'."""
    tasks: list[str] = []
    for r in records:
        for t in r.scores:
            if t not in tasks:
                tasks.append(t)
    head = ["method", "mode", *[f"{t} ({primary_metric(t)})" for t in tasks], "avg", "KV sent", "KV ×"]
    if any(t in LONG_TASKS for t in tasks):
        head[head.index("avg")] = "avg (multiple choice)"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = {r.mode: r.kv_bytes_total() for r in records if r.method == "unpruned"}
    for r in sorted(records, key=lambda r: (MODE_ORDER.get(r.mode, 9), r.method != "unpruned", r.method)):
        cells, accs = [r.method, r.mode], []
        for t in tasks:
            m = primary_metric(t)
            v = r.scores.get(t, {}).get(m, {}).get("value")
            if v is None:
                cells.append("—")
            elif m in LOWER_IS_BETTER:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{100 * v:.1f}")
                if t not in LONG_TASKS:
                    accs.append(100 * v)
        cells.append(f"{sum(accs) / len(accs):.1f}" if accs else "—")
        sent = r.kv_bytes_total()
        cells.append(_fmt_bytes(sent))
        ref = dense.get(r.mode)
        cells.append(f"{ref / sent:.2f}×" if sent and ref else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plans_table(records: Sequence[RunRecord]) -> str:
    """Markdown: which layers each method removed in each stage, and its KV policy."""
    lines = ["| method | mode | removed (prefill) | removed (decode) | KV policy |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.method, MODE_ORDER.get(r.mode, 9))):
        p = r.plan
        kv = p.get("kv_policy", {})
        pol = "all positions" if not kv.get("layers") else f"first {kv['n_first']} + last {kv['n_last']} in layers {kv['layers']}"
        lines.append(f"| {r.method} | {r.mode} | {p.get('removed_prefill') or '—'} | {p.get('removed_decode') or '—'} | {pol} |")
    return "\n".join(lines)


def long_context_table(records: Sequence[RunRecord]) -> str:
    """Markdown: per prompt length, `pd_ppl` perplexity and `passkey` accuracy next to the KV bytes
    sent per request in disaggregated mode (reduction versus `unpruned` in brackets)."""
    cols: list[tuple[str, str, str]] = []  # (task, metric, setting)
    for r in records:
        for task, prefix in (("pd_ppl", "ppl_T"), ("passkey", "acc_L")):
            for m in r.scores.get(task, {}):
                if m.startswith(prefix) and (task, m, m[len(prefix) - 1:]) not in cols:
                    cols.append((task, m, m[len(prefix) - 1:]))
    if not cols:
        return ""
    cols.sort(key=lambda c: (c[0], int(c[2][1:])))
    head = ["method", "mode"]
    for task, m, setting in cols:
        head += [f"{task} {m}", f"KV/request @{setting}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def per_request(r: RunRecord, task: str, setting: str) -> float | None:
        kv = r.extra.get("kv_by_setting", {}).get(task, {}).get(setting)
        return kv["kv_bytes"] / kv["handoffs"] if kv and kv.get("handoffs") else None

    dense = {(t, s): per_request(r, t, s) for r in records if r.method == "unpruned" and r.mode == "disaggregated"
             for t, _, s in cols}
    for r in sorted(records, key=lambda r: (MODE_ORDER.get(r.mode, 9), r.method != "unpruned", r.method)):
        cells = [r.method, r.mode]
        for task, m, setting in cols:
            v = r.scores.get(task, {}).get(m, {}).get("value")
            cells.append("—" if v is None else (f"{v:.2f}" if task == "pd_ppl" else f"{100 * v:.1f}"))
            b, ref = per_request(r, task, setting), dense.get((task, setting))
            cells.append("—" if b is None else _fmt_bytes(int(b)) + (f" ({ref / b:.2f}×)" if ref and b else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
