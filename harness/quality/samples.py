"""Per-item results: what paired comparisons need in every record, and lm-eval's per-sample logs.

`per_item` condenses lm-eval's logged samples (`simple_evaluate(log_samples=True)["samples"]`)
into ids and per-metric numbers, kept in each record (`extra.items`) so `report` can compare two
methods on the same items. `write_jsonl` writes the full samples of one (cell, task) in the format
of lm-eval's own `--log_samples` files (one JSON object per line: `doc_id`, `doc`, `target`,
`arguments`, `resps`, `filtered_resps`, `filter`, `metrics` and each metric's value), so lm-eval's
tooling and pandas read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def metric_name(metric: str, filt: str) -> str:
    """The record's name of an lm-eval metric under a filter (`acc`, or `exact_match/strict-match`)."""
    return metric if filt == "none" else f"{metric}/{filt}"


NOT_ITEM_MEANS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}  # lm-eval's corpus-level metrics


def per_item(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """{"ids": ["<task>/<doc_id>", ...] (sorted), "metrics": {metric: [number per id, None if absent]}}.

    `samples` maps each (sub)task to its logged samples; a group (e.g. mmlu) gives one id per
    subtask item. Metrics whose aggregate is not a mean of items are left out: perplexity-type ones, per
    item a (loglikelihood, length) pair or, in LAMBADA, a bare loglikelihood (its `perplexity` is
    exp(-mean), not the mean of those numbers)."""
    rows: dict[str, dict[str, float]] = {}
    for task, items in samples.items():
        for s in items:
            row = rows.setdefault(f"{task}/{s['doc_id']}", {})
            for m in s.get("metrics", []):
                if m in NOT_ITEM_MEANS:
                    continue
                v = s.get(m)
                if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    row[metric_name(m, s.get("filter", "none"))] = float(v)
    ids = sorted(rows, key=_id_order)
    names = sorted({m for r in rows.values() for m in r})
    return {"ids": ids, "metrics": {m: [rows[i].get(m) for i in ids] for m in names}}


def _id_order(item_id: str) -> tuple:
    task, _, doc = item_id.rpartition("/")
    return (task, int(doc)) if doc.isdigit() else (task, 0, doc)


def lm_eval_lines(samples: list[dict[str, Any]]) -> list[str]:
    """lm-eval's per-sample JSON lines (its EvaluationTracker's sanitising: arguments as a dict,
    responses as lists of strings, the target as a string)."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    lines = []
    for s in samples:
        s = dict(s)
        if "arguments" in s:
            s["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)} for i, arg in enumerate(s["arguments"])}
        for key in ("resps", "filtered_resps"):
            if key in s:
                s[key] = sanitize_list(s[key])
        if "target" in s:
            s["target"] = str(s["target"])
        lines.append(json.dumps(s, default=handle_non_serializable, ensure_ascii=False))
    return lines


def samples_path(out_dir: Path, method: str, mode: str, task: str) -> Path:
    """`<out>/samples/<method>__<mode>/samples_<task>.jsonl` (method names such as `stage:sleb` made file-safe)."""
    cell = f"{method}__{mode}".replace(":", "-").replace("/", "-")
    return Path(out_dir) / "samples" / cell / f"samples_{task}.jsonl"
