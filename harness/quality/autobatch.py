"""`--batch-size auto` / `auto:N`: the largest batch that runs, found the way lm-eval's HFLM finds it.

HFLM (`batch_size="auto"`) runs its longest request at `max_batch_size` (64) and shrinks the size on
every out-of-memory error by accelerate's `find_executable_batch_size` step (x0.9 in accelerate 1.x;
halving in older versions), so both pick the same size; `auto:N` searches again N times as
the length-sorted requests get shorter. The harness does the same through its own scoring path (so a
disaggregated cell's prefill, handoff and decode all fit), once per lm-eval request list (one task).
On a CPU nothing runs out of memory usefully, so `auto` is the fixed `CPU_AUTO_BATCH` there.
Scores do not depend on the size: padding and per-request positions are exact (tests/test_lm_requests.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

AUTO_MAX_BATCH = 64  # lm-eval HFLM's default max_batch_size: where the search starts, in requests
CPU_AUTO_BATCH = 16  # `auto` on a CPU: the harness's default --batch-size, in requests


def parse(batch_size: int | str, device_type: str) -> tuple[int, int]:
    """(batch size, or the search's starting size for auto; how many times auto searches, 0 = fixed)."""
    if isinstance(batch_size, int):
        return batch_size, 0
    kind, _, times = str(batch_size).partition(":")
    if kind != "auto":
        raise ValueError(f"batch_size must be a positive int, 'auto' or 'auto:N', got {batch_size!r}")
    if device_type != "cuda":
        return CPU_AUTO_BATCH, 0
    return AUTO_MAX_BATCH, int(times or 1)


def search_points(n_requests: int, times: int) -> list[int]:
    """Positions in the length-sorted request list where auto:N searches again (first one: 0)."""
    if times <= 0 or n_requests == 0:
        return []
    step = max(1, -(-n_requests // times))
    return list(range(0, n_requests, step))


def fit_batch_size(probe: Callable[[int], None], start: int) -> int:
    """Largest size from `start` down, in accelerate's steps on out-of-memory errors, at which `probe(size)` runs;
    1 if none does. Other errors propagate."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=start)
    def attempt(batch_size: int) -> int:
        probe(batch_size)
        return batch_size

    try:
        with _frozen_heap():
            return attempt()
    except RuntimeError as e:
        if "No executable batch size found" in str(e):
            return 1
        raise


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects alive before the search, out of the collector's sight while it runs (`gc.freeze`).

    accelerate runs a full `gc.collect()` before every attempt; with torch, transformers and lm-eval
    loaded that walks ~400k objects (~0.3 s on a laptop core), about 20 times from 64 down. What an
    attempt leaves behind is all younger than the freeze, so it is still collected. A caller that froze
    the heap itself keeps its freeze."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def distinct_copies(ctx: list[int], cont: list[int], n: int, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """`n` requests as long as (ctx, cont) whose contexts all differ (identical ones would share one row
    or one prefill, so the probe would not hold `n` rows in memory)."""
    return [([(ctx[0] + i) % vocab_size, *ctx[1:]], list(cont)) for i in range(n)]
