"""SIGTERM handled as Ctrl-C: a scheduler's stop (SLURM, Kubernetes, `timeout`, `kill`) ends a command the way Ctrl-C
does, with its one-line message and the rerun's advice, rather than killing the process mid-line."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from harness import stops


def _interrupt(signum, frame):
    stops.note()
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_noted() -> Iterator[None]:
    """Within the block, Ctrl-C (while SIGINT has Python's own handler, not a caller's: a test's, Ray's) is noted in
    `harness.stops` as it raises KeyboardInterrupt, so a stop a library swallowed is raised again where the harness
    takes control back; the block starts and ends with no stop noted. Outside the main thread, nothing changes."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _interrupt)
    stops.clear()
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        stops.clear()


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (outside it, as before), noted as Ctrl-C
    is (`ctrl_c_noted`). Elsewhere than the main thread (a notebook's worker) both are left as they are."""
    try:
        old = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        with ctrl_c_noted():
            yield
    finally:
        signal.signal(signal.SIGTERM, old)


DUPLICATE_S = 1.0  # two deliveries of one stop arrive microseconds apart; a person's second Ctrl-C takes longer


@contextlib.contextmanager
def one_stop_per_burst(window_s: float = DUPLICATE_S) -> Iterator[None]:
    """Within the block, a SIGINT or SIGTERM arriving within `window_s` of the last one acted on is dropped: it is the
    same stop delivered twice. `timeout` signals its command and then the command's whole process group, and SLURM
    signals every process of a job step, so a sweep got the stop twice; the second KeyboardInterrupt, raised while the
    sweep was stopping its cells, ended it without its table and sweep.json, the cells' finished records unsettled.
    A later signal is handled as before (a second Ctrl-C). Signals whose handler is not Python's (default, ignored)
    are left as they are, and so is everything outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    last: list[float] = []

    def once(old):
        def handle(signum, frame):
            now = time.monotonic()
            if last and now - last[0] < window_s:
                return
            last[:] = [now]
            old(signum, frame)
        return handle

    olds = {s: h for s in (signal.SIGINT, signal.SIGTERM) if callable(h := signal.getsignal(s))}
    for s, h in olds.items():
        signal.signal(s, once(h))
    try:
        yield
    finally:
        for s, h in olds.items():
            signal.signal(s, h)
