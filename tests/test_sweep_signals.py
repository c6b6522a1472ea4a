"""A sweep's stop delivered twice (`timeout` signals its command and then the command's process group; SLURM signals
every process of a step) is one stop: the sweep still stops its cells, settles what they finished and writes its
summary, rather than dying of the second KeyboardInterrupt halfway through; and a stopped cell exits within the
sweep's grace time."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.test_sweep import _cell, _record


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_delivered_twice_still_settles_the_cells_and_reports_them(tmp_path, sig):
    from harness.cli import sweep
    from harness.cli.interrupt import sigterm_as_ctrl_c
    from harness.store import records as rec

    running, queued = _cell(tmp_path, "unpruned__unified", ["unpruned"]), _cell(tmp_path, "tail__unified", ["tail@k=1"])

    class Backend:  # one worker: the first cell runs when the stop arrives, twice, as `timeout` sends it
        def map(self, cells, cwd, env):
            rec.save(_record("unpruned", "unified"), running.workdir)  # the running cell finished its record
            os.kill(os.getpid(), sig)  # to the sweep itself ...
            time.sleep(0.5)  # (the handler runs here)
            yield from ()

        def stop(self):
            os.kill(os.getpid(), sig)  # ... then to its process group, the sweep included
            time.sleep(0.05)
            return {running.name: (130, "interrupted (Ctrl-C)", 2.0)}

    with sigterm_as_ctrl_c(), pytest.raises(sweep.Interrupted) as caught:
        try:
            sweep._run_cells(Backend(), [running, queued], ".", {}, quiet=True, settle=True)
        except KeyboardInterrupt:  # not pytest's own interrupt: the failure this test is about
            pytest.fail("the stop's second delivery ended the sweep while it stopped its cells: no summary")
    assert [(o.cell, o.status) for o in caught.value.outcomes] == [("unpruned/unified", "ok"), ("tail/unified", "skipped")]
    assert rec.load(running.records[0]).method == "unpruned"  # settled into the run folder
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_later_signal_is_a_second_ctrl_c_as_before():
    """Only a duplicate is dropped: a second Ctrl-C pressed later still interrupts (it kills the cells at once)."""
    from harness.cli.interrupt import one_stop_per_burst

    raised = []
    with one_stop_per_burst(window_s=0.2):
        for delay in (0.0, 0.01, 0.5):  # the first, its duplicate, a later one
            time.sleep(delay)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # (the handler runs by now)
            except KeyboardInterrupt:
                raised.append(delay)
    assert raised == [0.0, 0.5]


def test_a_command_ends_without_the_exits_collection_over_everything_it_imported():
    """The interpreter's exit collected garbage over every object torch, transformers and lm-eval made: 4-20 s after
    the last line on a loaded 2-core machine, so a cell stopped by the sweep's SIGINT outlived the grace time
    (STOP_GRACE_S) and was killed. `python -m harness` freezes them as it returns (gc.freeze), which that collection skips."""
    import subprocess
    import sys

    from tests.test_sweep import ROOT

    probe = ("import atexit, gc, runpy, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count(), flush=True)); "
             "sys.argv = ['harness', '--version']; runpy.run_module('harness', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("pd-harness "), res.stderr
    assert int(res.stdout.split("frozen ")[1]) > 1000, res.stdout  # the objects the imports made are frozen
