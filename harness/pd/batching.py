"""Token lists -> one padded batch: ids, positions, a validity mask and lengths. The one place that pads.

Every forward of the harness takes a (batch, width) block of token ids with the original position
of each column and a mask of real (non-padding) columns; the engine gives a padding column
position -1 in the cache, so no query ever sees it, and its id never matters (0 is used). Rows are
padded on the right: the engine reads a row's last token at column `length - 1`, and the prefill
observer of SnapKV-style policies takes its window from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBatch:
    """Token rows of a forward, padded to one width W.

    Attributes:
        ids: (B, W) long token ids; 0 in padding columns.
        positions: (B, W) long original position of each column's token (padding columns carry
            whatever the arithmetic gives; they are masked by `valid`).
        valid: (B, W) bool, False in padding columns.
        lengths: (B,) long, real tokens per row.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def dense(cls, ids: torch.Tensor) -> TokenBatch:
        """A batch without padding: every row of `ids` (B, W) is W real tokens at positions 0 .. W-1."""
        B, W = ids.shape
        positions = torch.arange(W, device=ids.device)[None, :].expand(B, W)
        valid = torch.ones((B, W), dtype=torch.bool, device=ids.device)
        return cls(ids, positions, valid, torch.full((B,), W, device=ids.device))


def pad_tokens(
    rows: Sequence[Sequence[int]],
    device,
    *,
    width: int | None = None,
    start: torch.Tensor | None = None,
) -> TokenBatch:
    """Pad token rows on the right into a `TokenBatch` on `device`: row i in columns 0 .. len(i)-1.

    Args:
        rows: B token lists (a row may be empty).
        width: W, at least the longest row; default the longest row.
        start: (B,) position of each row's first token (e.g. the prompt length, for a continuation
            that extends a prompt's cache); default 0.
    """
    lens = [len(r) for r in rows]
    W = max(lens, default=0) if width is None else width
    if lens and max(lens) > W:
        raise ValueError(f"width {W} is shorter than the longest row ({max(lens)} tokens)")
    # one host tensor and one copy: cheaper than filling device rows one by one
    filled = [list(r) + [0] * (W - n) for r, n in zip(rows, lens)]
    ids = torch.tensor(filled, dtype=torch.long, device="cpu").reshape(len(rows), W).to(device)
    lengths = torch.tensor(lens, dtype=torch.long, device=device)
    col = torch.arange(W, device=device)[None, :]
    positions = col if start is None else col + start[:, None]
    return TokenBatch(ids, positions.expand(len(rows), W), col < lengths[:, None], lengths)


def length_groups(lengths: Sequence[int], forward_tokens: float) -> list[list[int]]:
    """Rows with `lengths[i] > 0` split into groups, each run as one padded forward, at least cost.

    A group's cost is rows × its longest row (the padded tokens computed) plus `forward_tokens`,
    the fixed cost of one more forward counted in tokens (reading every weight once; ~50 tokens
    on a 2-core CPU, `benchmarks/cpu_batches.py`). Optimal over groups of consecutive rows by
    length (dynamic programming, O(n²) for n rows); ties go to fewer groups, so
    `forward_tokens = inf` gives one group. Returns row indices, ascending within a group, groups
    longest first; rows of length 0 are in none.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    n = len(order)
    best, cut = [(0.0, 0)] + [(math.inf, 0)] * n, [0] * (n + 1)  # (cost, groups) of each prefix
    for end in range(1, n + 1):
        for start in range(end):  # group order[start:end]; its longest row is order[start]
            cost = (best[start][0] + (end - start) * lengths[order[start]] + forward_tokens, best[start][1] + 1)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end:
        groups.append(sorted(order[cut[end] : end]))
        end = cut[end]
    return groups[::-1]


def chunk_bounds(lengths: Sequence[int], new_row: Sequence[bool], max_items: int, forward_tokens: float) -> list[tuple[int, int]]:
    """Split items already in forward order (longest row first) into consecutive chunks of at most
    `max_items`, each run as one padded forward, at least cost.

    Item i needs a row of `lengths[i]` tokens; `new_row[i]` is False when it shares the row of item
    i - 1 (requests with one prompt share one prefill row). A chunk costs its distinct rows × its
    first (longest) row plus `forward_tokens` (as in `length_groups`). Dynamic programming,
    O(n · max_items); ties go to fewer chunks. Returns (start, end) index bounds, in order. (A
    device without a measured `forward_tokens` runs plain batches of `max_items`: no call here.)
    """
    n = len(lengths)
    if max_items < 1 or not math.isfinite(forward_tokens):
        raise ValueError(f"chunk_bounds needs max_items >= 1 and a finite forward_tokens, got {max_items}, {forward_tokens}")
    best, cut = [(0.0, 0)] + [(math.inf, 0)] * n, [0] * (n + 1)  # (cost, chunks) of each prefix
    for end in range(1, n + 1):
        rows = 0  # distinct rows of the chunk [start, end), grown leftwards
        for start in range(end - 1, max(0, end - max_items) - 1, -1):
            rows += 1 if start == end - 1 or new_row[start + 1] else 0
            cost = (best[start][0] + rows * lengths[start] + forward_tokens, best[start][1] + 1)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    bounds, end = [], n
    while end:
        bounds.append((cut[end], end))
        end = cut[end]
    return bounds[::-1]
