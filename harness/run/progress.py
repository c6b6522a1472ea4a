"""What a quality run tells its user while it works: the plan up front, an overall line, phase timings.

A `Tracker` is the run's clock. Every phase (model load, calibration set, planning a cell, one task
of one cell, report writing) is entered with `tracker.phase(label)`, which records its seconds; at
the end `timing_line()` sums them per label ("time: load 4.1 s · calibration 45 s · planning
pdtrim 210 s · arc_easy 30 s · … · total 300 s") and `timing()` gives the same as data, which the
pipeline stores, per cell, in each record's `extra["phases_s"]` (`cell_phases`).

While the run works, an overall tqdm line on stderr says which cell and task it is on, items done,
elapsed time and an ETA; a background tick redraws it every `tick_s` seconds, so the terminal is
never still for longer than that even inside one long forward. With `show=False` (`-q`) nothing is
drawn and only the final timing line is printed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

# redraw period of the overall line, seconds (also its elapsed/ETA resolution); 0 turns the redraw off,
# e.g. to find with benchmarks/silence.py which loops lack a bar of their own
TICK_S = float(os.environ.get("HARNESS_PROGRESS_TICK_S", "5"))


@dataclass
class Phase:
    """One timed stretch of the run. `label` groups phases in the timing line (e.g. 'arc_easy' over cells)."""

    label: str
    cell: str | None
    seconds: float


@dataclass
class Work:
    """What the run will do: its cells, and the items each task evaluates per cell (None: not known up front)."""

    cells: list[tuple[str, str]]  # (method, mode)
    items: dict[str, int | None]  # task -> items per cell
    notes: dict[str, str] = field(default_factory=dict)  # task -> what runs (long-context settings, subtasks)

    @property
    def items_per_cell(self) -> int:
        """Items of one cell, counting a task of unknown size as one item."""
        return sum(n or 1 for n in self.items.values())


def fmt_s(seconds: float) -> str:
    """'4.1 s' below 100 s, '210 s' below an hour, '1 h 05 min' above."""
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def statement(work: Work, limit: int | float | None) -> str:
    """The up-front description of a run: cells, tasks with their items, and when an ETA comes."""
    cells = ", ".join(f"{m}/{mode}" for m, mode in work.cells)
    methods = len({m for m, _ in work.cells})
    modes = len({mode for _, mode in work.cells})
    lines = [f"this run: {methods} method(s) × {modes} mode(s) = {len(work.cells)} cell(s): {cells}"]
    cap = f"--limit {limit}" if limit else "no --limit"
    lines.append(f"  {len(work.items)} task(s) per cell ({cap}):")
    for task, n in work.items.items():
        note = f"; {work.notes[task]}" if task in work.notes else ""
        lines.append(f"    {task}: {n if n is not None else 'unknown number of'} items{note}")
    total = work.items_per_cell * len(work.cells)
    lines.append(f"  {total} items in all; ETA after the first task")
    return "\n".join(lines)


class Tracker:
    """Phase timer, overall progress line and ETA of one run (see the module docstring)."""

    def __init__(self, work: Work | None = None, show: bool = True, stream: TextIO | None = None,
                 tick_s: float = TICK_S, since: float | None = None) -> None:
        """`since`: the `time.perf_counter()` the run started at (the command's start: imports, option
        checks); the time from then to now is its first phase, 'startup'."""
        self.work, self.show, self.tick_s = work, show, tick_s
        self.stream = stream or sys.stderr
        now = time.perf_counter()
        self.t0 = now if since is None else since
        self.phases: list[Phase] = [] if since is None else [Phase("startup", None, now - since)]
        self.where = ""  # what the overall line names: the cell, task and phase now running
        self.cell_i, self.cell_name = 0, ""
        self.items_done, self.eval_s = 0, 0.0  # items evaluated by this run, and their seconds (the ETA's rate)
        self.task_s: dict[str, list[float]] = {}  # task -> [items, seconds] evaluated by this run: its own rate
        self._done_here: set[str] = set()  # tasks of the current cell evaluated, resumed or reused
        self._task_now: tuple[str, float] | None = None  # the task being evaluated and when it started
        self._planning_now: tuple[str, float] | None = None  # the method being planned and when it started
        self.plan_s: dict[str, list[float]] = {}  # method -> seconds of each planning, for the ETA
        self._inner: list[float] = []  # seconds of the phases nested in each open phase
        self._bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- phases ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, label: str, cell: str | None = None, shown: str | None = None) -> Iterator[None]:
        """Time the block as one phase named `label` (of `cell`, when it belongs to one); `shown` is how the
        overall line names it (default: the label). A phase entered inside another (the calibration set,
        built on the first planning that needs it) counts only for itself: the outer phase's seconds
        exclude it, so the phases add up to the run's time."""
        before, t = self.where, time.perf_counter()
        self.where = shown or label  # the overall line names the cell already
        is_task = self.work is not None and cell is not None and label in self.work.items
        if is_task:
            self._task_now = (label, t)
        planning = cell is not None and label.startswith("planning ")  # the pipeline's 'planning METHOD'
        if planning:
            self._planning_now = (label[len("planning "):], t)
        self._inner.append(0.0)
        self._refresh()
        try:
            yield
        finally:
            if is_task:
                self._task_now = None
            if planning:
                self._planning_now = None
            spent = time.perf_counter() - t
            self.phases.append(Phase(label, cell, spent - self._inner.pop()))
            if self._inner:
                self._inner[-1] += spent
            self.where = before
            self._refresh()

    def totals(self) -> dict[str, float]:
        """Seconds per phase label, in the order the labels first ran."""
        out: dict[str, float] = {}
        for p in self.phases:
            out[p.label] = out.get(p.label, 0.0) + p.seconds
        return out

    def cell_phases(self, cell: str) -> dict[str, float]:
        """Seconds per label of the phases of `cell` ('method/mode') and of the run-wide ones so far
        (startup, load, calibration): what one record keeps."""
        out: dict[str, float] = {}
        for p in self.phases:
            if p.cell in (None, cell):
                out[p.label] = out.get(p.label, 0.0) + p.seconds
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self) -> dict[str, Any]:
        """The run's phases as data: per label, each phase with its cell, the total and the unaccounted rest."""
        totals, total = self.totals(), self.elapsed()
        return {"total_s": total, "by_label_s": totals, "other_s": max(0.0, total - sum(totals.values())),
                "phases": [{"label": p.label, "cell": p.cell, "seconds": p.seconds} for p in self.phases]}

    def timing_line(self) -> str:
        """'time: load 4.1 s · calibration 45.2 s · … · other 0.3 s · total 300 s' (the parts sum to the total)."""
        t = self.timing()
        parts = [f"{label} {fmt_s(s)}" for label, s in t["by_label_s"].items()]
        if t["other_s"] >= 0.05:
            parts.append(f"other {fmt_s(t['other_s'])}")
        return "time: " + " · ".join([*parts, f"total {fmt_s(t['total_s'])}"])

    # -- the overall line -----------------------------------------------------------------------
    def start(self) -> None:
        """Draw the overall line (when shown) and start its periodic redraw."""
        if not self.show or self.work is None:
            return
        from tqdm.auto import tqdm

        total = self.work.items_per_cell * len(self.work.cells)
        self._bar = tqdm(total=total, desc="starting", unit="item", file=self.stream, position=0, leave=False,
                         mininterval=0.5, bar_format="run {percentage:3.0f}%|{bar:12}| {n}/{total} items · {desc}")
        self._refresh()
        if self.tick_s <= 0:
            return
        self._ticker = threading.Thread(target=self._tick, name="progress-tick", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self._refresh()

    def close(self) -> None:
        """Stop the redraw and remove the overall line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def cell(self, i: int, method: str, mode: str) -> None:
        """Cell `i` (0-based) of the work starts."""
        self.cell_i, self.cell_name = i, f"{method}/{mode}"
        self._done_here = set()
        self._refresh()

    def planned(self, method: str, seconds: float) -> None:
        self.plan_s.setdefault(method, []).append(seconds)

    def task_done(self, task: str, seconds: float) -> None:
        """One task of the current cell finished after `seconds` of evaluation."""
        n = (self.work.items.get(task) if self.work else None) or 1
        self.items_done, self.eval_s = self.items_done + n, self.eval_s + seconds
        done = self.task_s.setdefault(task, [0, 0.0])
        done[0], done[1] = done[0] + n, done[1] + seconds
        self._done_here.add(task)
        if self._bar is not None:
            self._bar.update(n)
        self._refresh()

    def skipped(self, *tasks: str) -> None:
        """Tasks of the current cell that need no work (resumed or reused): their items count as done."""
        n = sum(self.work.items.get(t) or 1 for t in tasks) if self.work else 0
        self._done_here.update(tasks)
        if self._bar is not None:
            self._bar.update(n)

    def _task_seconds(self, task: str) -> float:
        """Expected seconds of `task` in one cell: its items at its own rate in this run, or, before it has run
        once, at the rate over all tasks so far (items of long-context tasks cost many times a short one's)."""
        n = (self.work.items.get(task) if self.work else None) or 1
        items, seconds = self.task_s.get(task) or (self.items_done, self.eval_s)
        return n * seconds / items

    def eta(self) -> str:
        """Remaining time: the tasks left in this cell and the next ones at their rates so far (the running
        task less the time it has run), plus the planning times of the methods seen so far (the running planning
        less the time it has run); methods never planned yet, the one planning now too, are named after a '+'."""
        if self.work is None or not self.items_done:
            return "ETA after the first task"
        per_cell = {t: self._task_seconds(t) for t in self.work.items}
        rest = sum(s for t, s in per_cell.items() if t not in self._done_here)
        if self._task_now is not None:
            task, started = self._task_now
            rest -= min(per_cell.get(task, 0.0), time.perf_counter() - started)
        rest += sum(per_cell.values()) * len(self.work.cells[self.cell_i + 1:])
        planning = [(m, 0.0) for m, _ in self.work.cells[self.cell_i + 1:]]
        if self._planning_now is not None:  # a search of many minutes is not in the tasks' rates
            m, started = self._planning_now
            planning.append((m, time.perf_counter() - started))
        unplanned = set()
        for m, ran_s in planning:  # each at the mean of its plannings so far, less the time it has run
            times = self.plan_s.get(m)
            if times:
                rest += max(0.0, sum(times) / len(times) - ran_s)
            else:
                unplanned.add(m)
        extra = f" + planning {','.join(sorted(unplanned))}" if unplanned else ""
        return f"ETA {fmt_s(rest)}{extra}"

    def _refresh(self) -> None:
        if self._bar is None:
            return
        n = len(self.work.cells) if self.work else 0
        cell = f"cell {self.cell_i + 1} of {n} ({self.cell_name})" if self.cell_name else ""
        parts = [p for p in (cell, self.where, f"elapsed {fmt_s(self.elapsed())}", self.eta()) if p]
        self._bar.set_description_str(" · ".join(parts), refresh=True)

    def say(self, msg: str) -> None:
        """A line above the bars (tqdm.write keeps them intact); plain print when nothing is drawn."""
        if self._bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)


def task_label(task: str, index: int, tasks: Sequence[str]) -> str:
    """'task 2 of 3 (piqa)': how the overall line names a task."""
    return f"task {index + 1} of {len(tasks)} ({task})"


def _local_rows(task: str, data_dir: str | None) -> int | None:
    """Rows of a local-data lm-eval task's evaluation file (a JSON-lines line count); None when not cheap to know."""
    from pathlib import Path

    from harness.quality import local_tasks

    if data_dir is None or not local_tasks.is_local_task(task):
        return None
    path = local_tasks.get(task).path(Path(data_dir))
    if path.suffix != ".jsonl" or not path.is_file():
        return None  # wikitext (documents of a raw file), mmlu (a group of subtasks)
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _subtasks(task: str, data_dir: str | None) -> int | None:
    """How many subtasks a local-data group (MMLU) has: found in `data_dir`, else (the hub's data) as the task
    declares (`LocalTask.hub_subtasks`); None for a single task or one that is not a local-data task."""
    from pathlib import Path

    from harness.errors import UsageError
    from harness.quality import local_tasks

    if not local_tasks.is_local_task(task):
        return None
    cls = local_tasks.get(task)
    if data_dir is None:
        return cls.hub_subtasks
    try:
        found = cls.subtasks(Path(data_dir))
    except UsageError:  # its folder missing: the data-file check before this says so
        return 0
    return None if found is None else len(found)


def work_of(cfg, prepared) -> Work:
    """The run's cells and each task's items per cell (`--limit` applied), from files and options only."""
    from harness.quality import long_tasks
    from harness.quality.long_tasks.base import capped
    from harness.run.task_record import own_tasks

    own = own_tasks(cfg.include_path)  # an --include-path YAML of a local task's name is the YAML's task (no data dir)

    whole = cfg.limit if cfg.limit is None or cfg.limit >= 1 else None  # a fraction's count needs each split's size
    cells = [(name, mode) for name in prepared.methods for mode in cfg.modes]
    items: dict[str, int | None] = {}
    notes: dict[str, str] = {}
    for task in cfg.tasks:
        if task in prepared.task_options:
            opts = prepared.task_options[task]
            items[task] = long_tasks.get(task).items(opts, cfg.limit)
            notes[task] = ", ".join(f"{k}={v}" for k, v in vars(opts).items())
            continue
        rows = _local_rows(task, cfg.data_dir)
        items[task] = capped(rows, cfg.limit) if rows is not None else rows
        if task not in own and (n_sub := _subtasks(task, cfg.data_dir)) is not None:
            items[task] = n_sub * whole if whole else None
            notes[task] = f"{n_sub} subtasks, up to {cfg.limit or 'all'} items each"
        elif rows is None:
            notes[task] = f"up to {cfg.limit} items" if cfg.limit else "size known once loaded"
    return Work(cells, items, notes)


STILL_EVERY_S = 10.0  # how long a silence `still_running` allows


@contextlib.contextmanager
def still_running(say, what: str, every_s: float | None = None) -> Iterator[None]:
    """While the body runs, say '<what>: still running (<elapsed> so far)' every `every_s` seconds: one latency
    measurement of a long prompt ran 96 s on a 2-core CPU without a line. The thread sleeps in between, so what it
    takes from a measurement is one print every `every_s` seconds."""
    every = STILL_EVERY_S if every_s is None else every_s
    stop, t0 = threading.Event(), time.perf_counter()

    def tick() -> None:
        while not stop.wait(every):
            say(f"{what}: still running ({fmt_s(time.perf_counter() - t0)} so far)")

    ticker = threading.Thread(target=tick, name="still-running", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
