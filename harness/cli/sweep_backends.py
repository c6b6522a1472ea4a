"""Running a sweep's cells: one cell's process and how its record is settled into the run folder,
and the engines that schedule cells (a local thread pool, or Ray). harness/cli/sweep.py drives them.

On Ctrl-C an engine's `stop()` starts no queued cell and stops the running ones the way a Ctrl-C of
their own would (SIGINT: the child keeps what it finished), killing what is still running after
STOP_GRACE_S; the sweep then settles what they finished."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cli.lifeline import PARENT_ENV
from harness.cli.sweep_plan import Cell, Plan
from harness.errors import UsageError

TAIL_CHARS = 2000  # of a failed cell's log, kept in sweep.json
FAILED_NOTE = ".failed.json"  # `<method>__<mode>.failed.json`: the pipeline's note on a cell that raised
# a child stops within seconds of its SIGINT, unless it is inside one long C call (a forward pass, loading weights)
STOP_GRACE_S = 30.0


@dataclass
class Outcome:
    """What the sweep reports for a cell (one row of the summary table and of sweep.json)."""

    cell: str
    status: str  # ok, reused, failed, skipped or interrupted
    seconds: float | None = None
    returncode: int | None = None
    record: str | None = None
    log: str | None = None
    error: str | None = None


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_gpus() -> list[str]:
    """GPU ids visible to this process (as CUDA_VISIBLE_DEVICES names them)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:n] if visible else [str(i) for i in range(n)]


# --- one cell -----------------------------------------------------------------------------------

def run_cell(argv: list[str], cwd: str, env: dict[str, str], log: str, popen=subprocess.Popen) -> tuple[int, str, float]:
    """Run `python -m harness <argv>` in `cwd`; its output goes to `log`. Returns (exit status, log tail, seconds).

    Runs in a Ray worker or a pool thread; `sys.executable` is that worker's Python (on a cluster
    node, the node's own environment). `env` is added to the worker's environment, so the
    GPU Ray assigned (CUDA_VISIBLE_DEVICES) is kept. `popen` starts the process (the local pool's
    keeps it, to stop it on Ctrl-C)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = None
    with open(log, "w", encoding="utf-8") as f:
        try:
            # a Ray worker blocks SIGINT, and a child inherits that: it could not be stopped gently
            with _interrupt_held(), _sigint_unblocked():
                proc = popen([sys.executable, "-m", "harness", *argv], cwd=cwd, env={**os.environ, **env, PARENT_ENV: str(os.getpid())},
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            rc = _wait(proc)
        except KeyboardInterrupt:  # a Ray task cancelled on Ctrl-C: its process stops as on a Ctrl-C of its own
            if proc is None:  # cancelled before its process started
                raise
            stop_processes([proc])
            rc = proc.returncode
    seconds = time.perf_counter() - t0
    text = Path(log).read_text(encoding="utf-8", errors="replace")
    return rc, text[-TAIL_CHARS:], seconds


@contextlib.contextmanager
def _interrupt_held():
    """In the main thread (a Ray task's), a KeyboardInterrupt arriving during the body is raised as the body ends, not
    inside it. Ray cancels a running task with `_thread.interrupt_main()`, a simulated SIGINT: taken inside `popen`
    after the process had started but before run_cell held it, it left the process unstopped and the cell reported
    'not started' (a sweep Ctrl-C'd under load). Elsewhere (a pool thread), or without a Python SIGINT handler, as
    before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    held: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_unblocked():
    """SIGINT unblocked in this thread for the body (a process started there inherits the thread's signal mask)."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait(proc: subprocess.Popen) -> int:
    """`proc.wait()` in short waits: Ray cancels a task by raising KeyboardInterrupt between bytecodes, which one
    blocking wait would put off until the process ended by itself."""
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=1.0)


def stop_processes(procs: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGINT each process still running (it then keeps what it finished and exits, as after its own Ctrl-C),
    wait up to `grace` seconds for them all, then kill the rest; a Ctrl-C during the wait kills them at once."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    try:
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # the second Ctrl-C: no more waiting, but the summary still comes
        pass
    for p in live:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- backends -----------------------------------------------------------------------------------

class LocalBackend:
    """A thread pool; each thread waits on its cell's process. Where cells use GPUs, thread i owns GPU i mod n."""

    name = "local"

    def __init__(self, workers: int, gpus: list[str]) -> None:
        self.workers, self.gpus = workers, gpus
        self._ids = itertools.count()
        self._mine = threading.local()
        self._lock = threading.Lock()  # guards _procs and _stopping: no process starts once stop() has begun
        self._procs: list[subprocess.Popen] = []
        self._stopping = False
        self._pool: cf.ThreadPoolExecutor | None = None
        self._ran: dict[str, tuple[int, str, float]] = {}  # by the threads, as their cells end: what stop() reports
        self._active = 0  # threads inside _run; stop() waits for none (guarded by _lock, signalled by _idle)
        self._idle = threading.Condition(self._lock)

    def _claim_gpu(self) -> None:
        self._mine.gpu = self.gpus[next(self._ids) % len(self.gpus)] if self.gpus else None

    def _popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._stopping:  # a thread took its cell from the queue just as the sweep was interrupted
                raise _NotStarted
            proc = subprocess.Popen(*args, **kwargs)
            self._procs.append(proc)
            return proc

    def _run(self, cell: Cell, cwd: str, env: dict[str, str]):
        """The cell's (exit status, log tail, seconds), also kept in `_ran`; None if it was not started. Kept by the
        thread, not read from its future: a Ctrl-C the main thread takes between submitting a cell and storing its
        future (`map`) left the futures without a cell that ran, and `stop` called it not started."""
        with self._lock:
            self._active += 1
        result = None
        try:
            result = _result(lambda: self._start(cell, cwd, env))
        finally:
            with self._lock:
                if result is not None:
                    self._ran[cell.name] = result
                self._active -= 1
                self._idle.notify_all()
        return result

    def _start(self, cell: Cell, cwd: str, env: dict[str, str]):
        if self._stopping:
            return None
        if self._mine.gpu is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": self._mine.gpu}
        try:
            return run_cell(cell.argv, cwd, env, str(cell.log), popen=self._popen)
        except _NotStarted:
            cell.log.unlink(missing_ok=True)
            return None

    def map(self, cells: list[Cell], cwd: str, env: dict[str, str]):
        """Yield (cell, (rc, tail, seconds)) as cells finish."""
        self._pool = cf.ThreadPoolExecutor(max_workers=self.workers, initializer=self._claim_gpu)
        futures = {self._pool.submit(self._run, c, cwd, env): c for c in cells}
        try:
            for fut in _completed(futures):
                if (result := _result(fut.result)) is not None:  # None: not started, the sweep is stopping
                    yield futures[fut], result
        finally:  # not `with`: its exit waits for every queued cell to run, so a Ctrl-C would start them all
            self._pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> dict[str, tuple[int, str, float]]:
        """After a Ctrl-C: start no queued cell, stop the running ones (`stop_processes`); then the (exit status,
        log tail, seconds) of every cell that ran, by name."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        if self._pool is None:
            return {}
        self._pool.shutdown(wait=False, cancel_futures=True)
        stop_processes(procs)
        self._pool.shutdown(wait=True)  # its threads return as their processes end
        # not shutdown(wait=True) alone: a Ctrl-C taken inside submit(), between the pool starting a thread and
        # recording it, leaves that thread out of what shutdown joins, and its running cell was reported 'not started'
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0)
            return dict(self._ran)

    def close(self) -> None:
        pass


class _NotStarted(Exception):
    pass


def _completed(futures, poll_s: float = 0.5):
    """`cf.as_completed`, with the main thread awake every `poll_s`. Why: the kernel may hand a Ctrl-C to a pool
    thread (any thread not blocking SIGINT can get it); that only trips a flag the main thread acts on when it
    runs, and an untimed wait slept on until the running cell ended, so a sweep under load let its cell finish
    (or, the signal lost, started every queued one) where it should stop them."""
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=poll_s, return_when=cf.FIRST_COMPLETED)
        yield from done


class RayBackend:
    """One Ray task per cell on a local Ray instance (`num_cpus=workers`) or the cluster at RAY_ADDRESS."""

    name = "ray"

    def __init__(self, workers: int, want_gpus: bool) -> None:
        import ray

        self.ray = ray
        t0 = time.perf_counter()
        self.address = os.environ.get("RAY_ADDRESS")
        sigterm = signal.getsignal(signal.SIGTERM)  # the sweep's (as Ctrl-C): ray.init replaces it by a sys.exit
        if self.address:  # a running cluster: its resources are its own
            ray.init(log_to_driver=False)
        else:  # a private local instance, as small as it can be on a laptop
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
        self.init_s = time.perf_counter() - t0
        self.gpus = int(ray.cluster_resources().get("GPU", 0)) if want_gpus else 0
        self.task = ray.remote(run_cell).options(**({"num_gpus": 1} if self.gpus else {"num_cpus": 1}), max_retries=0)
        self._refs: dict = {}  # the tasks of the cells map() runs

    def map(self, cells: list[Cell], cwd: str, env: dict[str, str]):
        self._refs = refs = {self.task.remote(c.argv, cwd, env, str(c.log)): c for c in cells}
        pending = list(refs)
        while pending:
            # in short waits: a Ctrl-C is only raised here once ray.wait returns
            done, pending = self.ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:  # a task Ray itself gave up on (e.g. its memory monitor killed it) fails that cell only
                yield refs[ref], _result(lambda ref=ref: self.ray.get(ref))

    def stop(self) -> dict[str, tuple[int, str, float]]:
        """After a Ctrl-C: cancel every task. A queued one never starts; a running one gets KeyboardInterrupt, on
        which run_cell stops its process and returns. Then the (exit status, log tail, seconds) of those that ran."""
        for ref in self._refs:
            self.ray.cancel(ref)
        ran = {}
        for ref, cell in self._refs.items():
            try:
                ran[cell.name] = self.ray.get(ref, timeout=STOP_GRACE_S + 10)
            except Exception:  # cancelled before it started (TaskCancelledError), or still not stopped: reported as not started
                pass
        return ran

    def close(self) -> None:
        self.ray.shutdown()


def _result(get) -> tuple[int, str, float]:
    """A cell's (exit status, log tail, seconds), or a failure when the engine could not run it."""
    try:
        return get()
    except Exception as e:  # any engine error fails this cell, not the sweep
        return 1, f"{type(e).__name__}: {e}", 0.0


def make_backend(name: str, workers: int, plan: Plan, gpus: list[str]):
    if name in ("auto", "ray"):
        try:
            import ray  # noqa: F401
        except ImportError:
            if name == "ray":
                raise UsageError("--backend ray: Ray is not installed; pip install ray (or pip install -e '.[sweep]'), "
                                 "or use --backend local") from None
        else:
            return RayBackend(workers, plan.uses_gpu)
    return LocalBackend(workers, gpus)
