"""Labelled, transient progress bars for the long loops of planning (calibration forwards, searches).

Every bar goes to stderr, disappears when its loop ends (`leave=False`) and is silenced by
TQDM_DISABLE=1, which `-q` sets (read when each bar starts, since tqdm reads it only at import, and a notebook's
tqdm.auto bars take no default from it); so planning shows what it is doing without adding to stdout.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def progress(items: Iterable, desc: str, total: int | None = None):
    """A transient bar over `items` named `desc`, with an ETA when `total` (or len(items)) is known."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, disable=quiet())


def quiet() -> bool:
    """Whether `-q` (TQDM_DISABLE) turned the bars off."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def calib_batches(calib, batch_size: int, device, desc: str) -> Iterator[tuple[Any, Any]]:
    """`calib.batches(batch_size, device)` under a bar counting batches (calibration forwards)."""
    n = math.ceil(len(calib.input_ids) / batch_size)
    return progress(calib.batches(batch_size, device), desc, total=n)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    """A one-step bar for a block with no loop of its own to count (e.g. reference forwards), so the
    terminal names what is running and for how long."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=desc, leave=False, bar_format="{desc}: {elapsed}", disable=quiet())
    try:
        yield
    finally:
        bar.close()


class SearchBars:
    """Two bars for a greedy search, driven by wrapping its callbacks rather than editing the search:
    steps done (one per `stepped` call: the search re-bases once per removed block) and the candidates
    evaluated in the current step (one per `counted` call: the objective)."""

    def __init__(self, desc: str, steps: int) -> None:
        from tqdm.auto import tqdm

        self.steps = tqdm(total=max(steps, 0), desc=f"{desc}: steps", leave=False, unit="step", disable=quiet())
        self.cands = tqdm(desc=f"{desc}: candidates evaluated this step", leave=False, unit="eval", disable=quiet())

    def counted(self, fn: Callable[..., float]) -> Callable[..., float]:
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.cands.update(1)
            return out
        return wrapped

    def stepped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args):
            out = fn(*args)
            self.steps.update(1)
            self.cands.reset()
            return out
        return wrapped

    def __enter__(self) -> SearchBars:
        return self

    def __exit__(self, *exc) -> None:
        self.cands.close()
        self.steps.close()
