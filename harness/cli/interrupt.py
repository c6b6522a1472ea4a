"""SIGTERM handled as Ctrl-C: a scheduler's stop (SLURM, Kubernetes, `timeout`, `kill`) ends a command the way Ctrl-C
does, with its one-line message and the rerun's advice, rather than killing the process mid-line."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (outside it, as before).
    Elsewhere than the main thread (a notebook's worker) SIGTERM is left as it is."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
