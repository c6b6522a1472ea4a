"""`batching.length_groups` and `chunk_bounds`: the least-cost split of rows into padded forwards, against
every split."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pd.batching import chunk_bounds, length_groups


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
    costs = [(cost(p, lengths, forward_tokens), len(p)) for p in partitions(rows)]
    best = min(c for c, _ in costs)
    assert math.isclose(cost(groups, lengths, forward_tokens), best)
    assert len(groups) == min(n for c, n in costs if math.isclose(c, best))  # ties go to fewer groups


def test_an_infinite_forward_cost_gives_one_group_and_a_free_one_a_group_per_length():
    lengths = [3, 0, 9, 3, 1, 9]
    assert length_groups(lengths, math.inf) == [[0, 2, 3, 4, 5]]
    assert length_groups(lengths, 0.0) == [[2, 5], [0, 3], [4]]
    assert length_groups([0, 0], 1.0) == [] and length_groups([], 1.0) == []


def chunk_cost(bounds: list[tuple[int, int]], lengths: list[int], new_row: list[bool], forward_tokens: float) -> float:
    """Distinct rows × the first (longest) row, plus the forward's cost, summed over chunks."""
    return sum((1 + sum(new_row[s + 1 : e])) * lengths[s] + forward_tokens for s, e in bounds)


def consecutive_splits(n: int, cap: int):
    """Every split of items 0 .. n-1 into consecutive chunks of 1 .. cap items."""
    if n == 0:
        yield []
        return
    for first in range(1, min(cap, n) + 1):
        for rest in consecutive_splits(n - first, cap):
            yield [(0, first), *((s + first, e + first) for s, e in rest)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3)), max_size=5), st.integers(1, 5),
       st.sampled_from([0.0, 1.0, 8.0, 64.0]))
def test_chunk_bounds_cost_the_least_of_all_consecutive_splits(rows, cap, forward_tokens):
    # items in forward order: rows longest first, each row's requests adjacent (one prompt, several answers)
    rows = sorted(rows, reverse=True)
    lengths = [n for n, k in rows for _ in range(k)]
    new_row = [j == 0 for _, k in rows for j in range(k)]
    bounds = chunk_bounds(lengths, new_row, cap, forward_tokens)
    assert [i for s, e in bounds for i in range(s, e)] == list(range(len(lengths)))  # every item once, in order
    assert all(1 <= e - s <= cap for s, e in bounds)
    costs = [(chunk_cost(b, lengths, new_row, forward_tokens), len(b)) for b in consecutive_splits(len(lengths), cap)]
    best = min(c for c, _ in costs)
    assert math.isclose(chunk_cost(bounds, lengths, new_row, forward_tokens), best)
    assert len(bounds) == min(n for c, n in costs if math.isclose(c, best))  # ties go to fewer chunks


def test_chunk_bounds_ties_go_to_fewer_chunks():
    # [(0, 2), (2, 4), (4, 5)] and [(0, 4), (4, 5)] both cost 23 (rows × longest + 2 a forward)
    assert chunk_bounds([6, 5, 4, 4, 1], [True, True, True, False, True], 7, 2.0) == [(0, 4), (4, 5)]


def test_chunk_bounds_cut_where_padding_costs_more_than_a_forward():
    lengths, new_row = [90, 90, 80, 12, 10, 10, 3], [True, False, True, True, True, False, True]
    assert chunk_bounds(lengths, new_row, 8, 1000.0) == [(0, 7)]  # a forward dearer than any padding: one batch
    assert chunk_bounds(lengths, new_row, 4, 1000.0) == [(0, 3), (3, 7)]  # the fewest batches, then the least padding
    assert chunk_bounds(lengths, new_row, 8, 20.0) == [(0, 3), (3, 7)]  # 90s with 80, 12s with the rest
    assert chunk_bounds(lengths, new_row, 8, 0.0) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]  # free forwards: a batch per row
    assert chunk_bounds([], [], 4, 1.0) == []
    with pytest.raises(ValueError):
        chunk_bounds(lengths, new_row, 4, math.inf)  # no measured cost: the caller runs plain batches
