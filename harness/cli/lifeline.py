"""A sweep's cell process ends with the process that started it (Linux), instead of running on as an orphan.

A sweep killed with SIGKILL (an out-of-memory kill, a scheduler's hard stop) cannot stop its cells: they ran on for
their whole length, using the cores, and a rerun in that time failed each such cell ("in use by another harness
process"). `run_cell` names its own pid in the cell's environment (`PARENT_ENV`); the cell asks the kernel for a
SIGTERM when that parent dies (prctl PR_SET_PDEATHSIG), which a run takes as Ctrl-C: it stops, keeping what it
finished, and the sweep's rerun resumes it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "HARNESS_SWEEP_PARENT"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent() -> bool:
    """If started by a sweep's cell runner (`PARENT_ENV` set), end with it; the variable is removed so that the
    cell's own children do not apply it to their parent. Returns whether the kernel took the request."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return False
    try:
        took = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol: the cell simply runs as before
        return False
    if str(os.getppid()) != parent:  # the parent died before the request: the signal would never come
        os.kill(os.getpid(), signal.SIGTERM)
    return took
