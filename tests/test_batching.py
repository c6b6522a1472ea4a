"""`batching.length_groups`: the least-cost split of rows into padded forwards, against every split."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pd.batching import length_groups


def cost(groups: list[list[int]], lengths: list[int], forward_tokens: float) -> float:
    return sum(len(g) * max(lengths[i] for i in g) + forward_tokens for g in groups)


def partitions(items: list[int]):
    """Every set partition of `items` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=7), st.sampled_from([0.0, 1.0, 8.0, 64.0]))
def test_length_groups_costs_the_least_of_all_splits(lengths, forward_tokens):
    groups = length_groups(lengths, forward_tokens)
    rows = [i for i, n in enumerate(lengths) if n > 0]
    assert sorted(i for g in groups for i in g) == rows  # every row once; rows of length 0 in none
    assert all(g == sorted(g) and g for g in groups)
    assert [max(lengths[i] for i in g) for g in groups] == sorted((max(lengths[i] for i in g) for g in groups), reverse=True)
    best = min(cost(p, lengths, forward_tokens) for p in partitions(rows))
    assert math.isclose(cost(groups, lengths, forward_tokens), best)


def test_an_infinite_forward_cost_gives_one_group_and_a_free_one_a_group_per_length():
    lengths = [3, 0, 9, 3, 1, 9]
    assert length_groups(lengths, math.inf) == [[0, 2, 3, 4, 5]]
    assert length_groups(lengths, 0.0) == [[2, 5], [0, 3], [4]]
    assert length_groups([0, 0], 1.0) == [] and length_groups([], 1.0) == []
