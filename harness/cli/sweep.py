"""`python -m harness sweep SPEC.toml`: a spec's quality run as independent cells on Ray or a local pool.

The spec's `[run]` section is expanded into one cell per (method, mode); each cell is a separate
`python -m harness run ... --methods M --mode X` process, so a crash or out-of-memory kill of one
cell fails that cell only. Cells are scheduled by an existing engine, never by this module:

- `--backend ray`: one Ray task per cell (`num_gpus=1` where the cluster has GPUs and the spec
  does not ask for the CPU, else `num_cpus=1`) on a local Ray instance started with
  `num_cpus=--workers`, or on the cluster `RAY_ADDRESS` names (its nodes must see the same paths);
- `--backend local`: a `concurrent.futures.ThreadPoolExecutor` of `--workers` threads, each
  waiting on its cell's process (one GPU per thread, round robin, where there are GPUs);
- `--backend auto` (default): Ray when it is importable, the local pool otherwise.

Each cell writes into a private folder `<run out>/.sweep/<method>__<mode>/`, and its finished
record is moved into the run's out folder, so no child ever sees another's in-progress files
(`.partial.json`, failure notes, its end-of-run `summary.csv`). A finished record already in
the out folder is linked into the cell's folder first, so the child finds and reuses it (and only
loads the model); the sweep reports such cells as `reused`. An interrupted cell keeps its
`.partial.json` in its private folder and resumes there on the next sweep.

After the quality cells, a `[latency]` section runs as one more job, alone (latency measured next
to other busy cells would be distorted), and `[report]` renders once in this process. Both are
skipped when a quality cell failed. The summary goes to `<run out>/summary.csv` (over every record
there) and `<run out>/sweep.json` (every cell's status, seconds, log and error, backend, workers,
wall time); the exit status is 1 when any cell failed, 0 otherwise, 2 for bad input.

Ctrl-C stops the sweep: no queued cell starts, the running ones get SIGINT (as from a Ctrl-C of
their own; killed after `STOP_GRACE_S`), the records they finished are moved into the out folder,
the table and sweep.json say which cells finished, were interrupted or never started, and the
exit status is 130, as for an interrupted `run`. A rerun reuses the finished records and resumes
the interrupted cells; a record a child finished but the sweep never moved (the sweep was killed)
is moved into the out folder by the rerun, not computed again.

This module is the command (its flags, the order of the steps, the summary); the spec is expanded
into cells by `sweep_plan.py`, and cells are run by `sweep_backends.py` and settled by `sweep_cells.py`.
"""


from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from harness.cli.flags import Parser, spec_arg, user_dir
from harness.cli.interrupt import one_stop_per_burst
from harness.cli.sweep_backends import STOP_GRACE_S, Outcome, RayBackend, cores, local_gpus, make_backend
from harness.cli.sweep_cells import error_text
from harness.cli.sweep_cells import seed as seed_cell
from harness.cli.sweep_cells import settle as settle_cell
from harness.cli.sweep_plan import Cell, Plan, expand
from harness.errors import UsageError

BACKENDS = ("auto", "ray", "local")


def sweep_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m harness sweep",
        description="Run a spec's [run] section as one process per (method, mode) cell on Ray (one GPU per cell where "
        "there are GPUs, a local Ray instance otherwise) or a local process pool, then its [latency] section as one "
        "job and its [report]. Finished records are reused; a failing cell does not stop the others.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness sweep configs/ci.toml --backend ray --workers 2\n"
        "  python -m harness sweep configs/main_table.toml --backend local --workers 4 --out results/runs/main-sweep\n\n"
        "Ray: pip install ray (or pip install -e '.[sweep]'); RAY_ADDRESS=host:port connects to a running cluster, "
        "whose nodes must see the same paths (the cells write their records directly).",
    )
    p.add_argument("spec", type=spec_arg, metavar="SPEC.toml", help="experiment spec with a [run] section, e.g. configs/ci.toml")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="ray, local (thread pool of processes) or auto "
                   "(ray when installed; default)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="cells at a time (default: the number of GPUs where cells use GPUs, else half the CPU cores); "
                        "the CPU cores are split evenly between them (OMP_NUM_THREADS)")
    p.add_argument("--out", type=user_dir, default=None, help="instead of the spec's folders: DIR/quality (records, summary.csv, "
                   "sweep.json), DIR/latency and DIR/report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (one line per finished cell still)")
    return p


def _positive(s: str) -> int:
    from harness.cli.flags import positive_int as positive

    return positive(s)


# --- the sweep ----------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    args = sweep_parser().parse_args(argv)
    started = time.perf_counter()
    plan = expand(args.spec, args.out)
    from harness.store import lock

    # the sweep holds the run folder; each cell writes its own folder under .sweep/ and locks that one. SIGTERM is
    # Ctrl-C here too (harness.cli.main runs every command under sigterm_as_ctrl_c): by default it ended the sweep
    # alone, and its cells ran on as orphans holding their folders
    with lock.hold(plan.run_out):
        return _sweep(args, plan, started)


def cell_env(threads: int, spec_plugins: Sequence[str] = ()) -> dict[str, str]:
    """What each cell's process gets on top of its worker's environment. OMP_NUM_THREADS is what torch starts with: N
    cells of T threads share the cores instead of N × all of them. HARNESS_PLUGINS: this process's plug-ins and then
    the spec's `plugins`, each once (`spec_plugins.combined`), the ones the spec was checked with; a Ray cluster's node
    runs its cells in its own environment, which lacks them (each cell then failed on an unknown method), and a cell
    runs the `run` command, not the spec."""
    from harness.cli.spec_plugins import combined
    from harness.store import lock

    plugins = ",".join(combined(spec_plugins))
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", **lock.child_env(),
            **({"HARNESS_PLUGINS": plugins} if plugins else {})}


def _sweep(args, plan: Plan, started: float) -> int:
    gpus = local_gpus() if plan.uses_gpu and not os.environ.get("RAY_ADDRESS") else []
    workers = args.workers or (len(gpus) if gpus else max(1, cores() // 2))
    backend = make_backend(args.backend, workers, plan, gpus)
    cwd = os.getcwd()
    threads = max(1, cores() // min(workers, len(plan.cells)))
    env = cell_env(threads, plan.plugins)
    info: dict[str, Any] = {"backend": backend.name, "workers": workers, "threads_per_cell": threads,
                            **({"plugins": env["HARNESS_PLUGINS"].split(",")} if "HARNESS_PLUGINS" in env else {})}
    if isinstance(backend, RayBackend):
        info.update(ray_version=backend.ray.__version__, ray_init_s=round(backend.init_s, 2),
                    ray_address=backend.address or "local instance", gpus_per_cell=1 if backend.gpus else 0)
    print(f"sweep {args.spec}: {len(plan.cells)} cells on {backend.name} ({workers} workers, {threads} threads each)"
          + (f"; Ray up in {backend.init_s:.1f}s" if isinstance(backend, RayBackend) else "")
          + f"; records -> {plan.run_out}", file=sys.stderr, flush=True)

    outcomes: list[Outcome] = []
    interrupted = False
    try:
        outcomes += _run_cells(backend, plan.cells, cwd, env, args.quiet, settle=True)
        if plan.latency is not None:
            if any(o.status == "failed" for o in outcomes):
                outcomes.append(Outcome("latency", "skipped", error="not run: a quality cell failed"))
            else:  # alone, with every core
                lat_env = {**env, "OMP_NUM_THREADS": str(cores()), "MKL_NUM_THREADS": str(cores())}
                outcomes += _run_cells(backend, [plan.latency], cwd, lat_env, args.quiet, settle=False)
    except Interrupted as e:
        outcomes += e.outcomes
        interrupted = True
        if plan.latency is not None and outcomes[-1].cell != "latency":
            outcomes.append(Outcome("latency", "skipped", error="not run: the sweep was interrupted (Ctrl-C)"))
    finally:
        backend.close()
    return _finish(args, plan, outcomes, info, started, interrupted)


def _finish(args, plan: Plan, outcomes: list[Outcome], info: dict[str, Any], started: float, interrupted: bool) -> int:
    """summary.csv, the report (unless a cell failed or the sweep was interrupted), sweep.json, the table; the exit
    status: 0, 1 if a cell crashed, 2 if each failed cell (and a failed report) refused its input, 130 after Ctrl-C."""
    from harness.store import records as rec

    # every readable record, as `run` rewrites it: an unreadable file there that is none of this spec's cells (a record
    # of a method dropped from the spec, cut off by a copy) ended the sweep with exit 2 once every cell had run, with
    # neither the table nor sweep.json
    rec.refresh_summary(plan.run_out)
    failed = [o for o in outcomes if o.status == "failed"]
    if plan.report_argv is not None:
        blocked = "the sweep was interrupted (Ctrl-C)" if interrupted else \
            "a cell failed" if failed or any(o.status == "skipped" for o in outcomes) else None
        outcomes.append(_report(plan.report_argv, blocked))
        failed += outcomes[-1:] if outcomes[-1].status == "failed" else []
    wall = time.perf_counter() - started
    summary = {"spec": str(args.spec), **info, "wall_s": round(wall, 2), "interrupted": interrupted,
               "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "cells": [asdict(o) for o in outcomes]}
    rec.atomic_write(plan.run_out / "sweep.json", json.dumps(summary, indent=2))
    print(_table(outcomes))
    where = f"records, summary.csv and sweep.json in {plan.run_out}"
    if interrupted:  # as `run` ends on Ctrl-C (harness/cli/run.py): 130, and how to go on
        cells = [o for o in outcomes if o.cell not in ("latency", "report")]  # the quality cells the progress bar counts
        done = sum(o.status in ("ok", "reused") for o in cells)
        print(f"\ninterrupted (Ctrl-C): {done} of {len(cells)} cells finished in {wall:.0f}s; {where}; rerun the same "
              "command to go on (finished records are reused, interrupted cells resume)", file=sys.stderr)
        return 130
    ok = sum(o.status in ("ok", "reused") for o in outcomes)  # a skipped report is not ok
    print(f"\n{ok} of {len(outcomes)} ok in {wall:.0f}s on {info['backend']} ({info['workers']} workers); " + where)
    return exit_status(failed)


def exit_status(failed: list[Outcome]) -> int:
    """As a single run's: 0 when nothing failed; 2 when every failed cell refused its input (an option of the spec
    that cannot apply: fix the spec), the report included (`_report` fails only on its refusal, exit 2); 1 when a cell
    crashed."""
    return (2 if all(o.returncode == 2 for o in failed) else 1) if failed else 0


def _report(report_argv: list[str], blocked: str | None) -> Outcome:
    """Render the spec's report in this process, or skip it when `blocked` says why (a cell failed or was skipped)."""
    if blocked:
        return Outcome("report", "skipped", error=f"not rendered: {blocked}")
    from harness.cli.report import cmd_report

    t0 = time.perf_counter()
    try:
        rc, err = cmd_report(report_argv), None
    except UsageError as e:
        rc, err = 2, str(e)
    return Outcome("report", "ok" if rc == 0 else "failed", round(time.perf_counter() - t0, 2), rc, error=err)


class Interrupted(Exception):
    """Ctrl-C during a sweep's cells, once they stopped: `outcomes` of every cell (finished, interrupted or never started)."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("interrupted")
        self.outcomes = outcomes


def _run_cells(backend, cells: list[Cell], cwd: str, env: dict[str, str], quiet: bool, settle: bool) -> list[Outcome]:
    """Run `cells` on `backend`; their outcomes in the spec's order, or `Interrupted` with them after a Ctrl-C or
    SIGTERM (one stop, even when delivered twice: `one_stop_per_burst`)."""
    with one_stop_per_burst():
        return _cells_on(backend, cells, cwd, env, quiet, settle)


def _cells_on(backend, cells: list[Cell], cwd: str, env: dict[str, str], quiet: bool, settle: bool) -> list[Outcome]:
    from tqdm import tqdm

    for c in cells:
        if c.records:
            seed_cell(c)
    outcomes: list[Outcome] = []
    order = {c.name: i for i, c in enumerate(cells)}
    with tqdm(total=len(cells), disable=quiet, file=sys.stderr, unit="cell", leave=False) as bar:
        try:
            for i, (cell, (rc, tail, seconds)) in enumerate(backend.map(cells, cwd, env), 1):
                outcomes.append(_outcome(cell, rc, tail, seconds, settle))
                o = outcomes[-1]
                detail = o.error.splitlines()[-1] if o.error else (o.record or "")
                bar.write(f"[{i}/{len(cells)}] {o.cell}: {o.status} in {seconds:.1f}s  {detail}", file=sys.stderr)
                bar.update()
        except KeyboardInterrupt:
            seen = {o.cell for o in outcomes}
            outcomes += _stop(backend, [c for c in cells if c.name not in seen], settle)
            raise Interrupted(sorted(outcomes, key=lambda o: order[o.cell])) from None
    return sorted(outcomes, key=lambda o: order[o.cell])


def _outcome(cell: Cell, rc: int, tail: str, seconds: float, settle: bool) -> Outcome:
    if settle:
        return settle_cell(cell, rc, tail, seconds)
    return Outcome(cell.name, "ok" if rc == 0 else "failed", round(seconds, 2), rc, str(cell.workdir) if rc == 0 else None,
                   str(cell.log), None if rc == 0 else error_text(rc, tail))


def _stop(backend, rest: list[Cell], settle: bool) -> list[Outcome]:
    """Outcomes of the cells a Ctrl-C caught unfinished: the running ones are stopped and what they finished is
    settled into the run folder (their resume state stays in their folders); the queued ones never start."""
    print(f"\ninterrupted (Ctrl-C): starting no more cells; stopping the running ones (up to {STOP_GRACE_S:.0f}s; "
          "Ctrl-C again kills them)", file=sys.stderr, flush=True)
    ran = backend.stop()
    out = []
    for cell in rest:
        if cell.name not in ran:
            out.append(Outcome(cell.name, "skipped", error="not started: the sweep was interrupted (Ctrl-C)"))
            continue
        rc, tail, seconds = ran[cell.name]
        o = _outcome(cell, rc, tail, seconds, settle)
        if rc != 0:  # stopped by the Ctrl-C (or failing just then): a rerun resumes it either way
            kept = [str(r) for r in cell.records if r.exists()]
            o.record = ", ".join(kept) or None
            if cell.records and len(kept) == len(cell.records):  # stopped after its last record: nothing to resume
                o.status, o.error = "ok", None
            else:
                o.status, o.error = "interrupted", f"interrupted (Ctrl-C) after {seconds:.0f}s; a rerun resumes it (log: {cell.log})"
        out.append(o)
    return out


def _table(outcomes: list[Outcome]) -> str:
    rows = [("cell", "status", "seconds", "record / error")]
    for o in outcomes:
        what = (o.error.splitlines()[-1] if o.error else "") or o.record or ""
        rows.append((o.cell, o.status.upper() if o.status == "failed" else o.status,
                     "" if o.seconds is None else f"{o.seconds:.1f}", what))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
