"""The plans table: which blocks each method removed in each stage, and the KV policy of its handoff.
Only records are read (no model, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from harness.store.records import RunRecord
from reports.collect import Collection
from reports.formats import cell, make_table
from reports.tables import _as_collection, _groups, removed_text


def _layers(xs: list[int]) -> str:
    return " ".join(map(str, xs)) if xs else "—"


def _policy_text(kv: dict, info: dict | None = None) -> str:
    """Readable KV policy of a stored plan (any kind; older records have no `kind`): the policy's own text.

    Reports load no plug-ins, so a plug-in policy's class is unknown here: then the text the plan's method
    stored (`info["kv"]["policy"]`, as every KV baseline does), else the kind and its options."""
    from harness.pd.kv import policy_from_dict  # torch-free

    try:
        return policy_from_dict(kv).table_text()
    except (KeyError, TypeError, ValueError):
        stored = ((info or {}).get("kv") or {}).get("policy") if isinstance(info, dict) else None
        if isinstance(stored, str):
            return stored
        if isinstance(kv, dict) and isinstance(kv.get("kind"), str):
            options = ", ".join(f"{k}={v}" for k, v in kv.items() if k not in ("kind", "budget"))
            return (f"{kv['kind']} ({options})" if options else kv["kind"]) + _budget_text(kv.get("budget"))
        return str(kv)


def _budget_text(budget) -> str:
    """', budget = ...' as a token-selection policy words it (`KVBudget.describe`): a plug-in policy's budget is
    the harness's own type, readable without the plug-in; '' for none, or one that is not a budget."""
    from harness.pd.kv import KVBudget  # torch-free (the one import of the engine reports may make, pyproject.toml)

    if not isinstance(budget, dict):
        return ""
    try:
        return ", budget = " + KVBudget.from_dict(budget).describe()
    except (KeyError, TypeError, ValueError):
        return f", budget = {budget}"


def plans_table(records: Collection | Sequence[RunRecord]) -> pd.DataFrame:
    """Which blocks each method removed in each stage, and its KV policy."""
    col = _as_collection(records)
    seen, groups = set(), []
    for title, rs in _groups(col, col.quality or col.latency):
        g = []
        for r in rs:
            p = r.plan
            pol = _policy_text(p.get("kv_policy") or {}, p.get("info"))
            g.append([cell(col.label(r)), cell(removed_text(r)), cell(_layers(p.get("removed_prefill", []))),
                      cell(_layers(p.get("removed_decode", []))), cell(pol)])
            seen.add(r.method)
        groups.append((title, g))
    return make_table("plans", "Blocks removed per stage (indices in the unpruned model) and the KV policy of the handoff.",
                      ["Method", "Removed", "Removed (prefill)", "Removed (decode)", "KV policy"], groups, align="lllll")
