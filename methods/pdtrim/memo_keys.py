"""The keys of PDTrim's search disk memo (`methods/pdtrim/search.py`): their format, checked as the memo loads, and
the exact objective values read back from them.

A key is a kind, ':', and block sets split by '|': "p:<R>" and "d:<R_D>|<R_P>" hold exact E_P, E_D; "sp:", "sd:" the
same on the sensitivity sequences; a "b" in front, the bfloat16 screen's estimate of them.
"""

from __future__ import annotations

from methods.cached import parse_set


def memo_key_ok(k: str) -> bool:
    """Whether `k` is a key of the search's disk memo: a kind, ':', block sets split by '|' (see the module doc)."""
    _, sep, sets = k.partition(":")
    try:
        return bool(sep) and all(parse_set(part) is not None for part in sets.split("|"))
    except ValueError:
        return False


def exact_values(values: dict[str, float]) -> tuple[dict[frozenset, float], dict[tuple[frozenset, frozenset], float]]:
    """(E_P by R, E_D by (R_D, R_P)) of the exact values among the disk memo's `values` (keys "p:" and "d:")."""
    memo_p: dict[frozenset, float] = {}
    memo_d: dict[tuple[frozenset, frozenset], float] = {}
    for k, v in values.items():
        kind, _, sets = k.partition(":")
        if kind == "p":
            memo_p[parse_set(sets)] = v
        elif kind == "d":
            rd, _, rp = sets.partition("|")
            memo_d[(parse_set(rd), parse_set(rp))] = v
    return memo_p, memo_d
