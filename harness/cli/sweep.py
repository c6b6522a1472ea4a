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
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import filecmp
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError

BACKENDS = ("auto", "ray", "local")
TAIL_CHARS = 2000  # of a failed cell's log, kept in sweep.json
FAILED_NOTE = ".failed.json"  # `<method>__<mode>.failed.json`: the pipeline's note on a cell that raised


@dataclass
class Cell:
    """One process of the sweep: `python -m harness <argv>` writing into `workdir`."""

    name: str  # "shortgpt/unified", or "latency"
    argv: list[str]
    workdir: Path  # the child's --out
    log: Path  # the child's stdout and stderr
    record: Path | None = None  # quality cells: where the finished record belongs
    seeded: bool = False  # a finished record was linked into workdir before the run


@dataclass
class Outcome:
    """What the sweep reports for a cell (one row of the summary table and of sweep.json)."""

    cell: str
    status: str  # ok, reused, failed or skipped
    seconds: float | None = None
    returncode: int | None = None
    record: str | None = None
    log: str | None = None
    error: str | None = None


@dataclass
class Plan:
    """The expanded spec: quality cells, then an optional latency job, then an optional report."""

    run_out: Path
    cells: list[Cell]
    latency: Cell | None = None
    report_argv: list[str] | None = None
    uses_gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("spec", type=Path, metavar="SPEC.toml", help="experiment spec with a [run] section, e.g. configs/ci.toml")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="ray, local (thread pool of processes) or auto "
                   "(ray when installed; default)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="cells at a time (default: the number of GPUs where cells use GPUs, else half the CPU cores); "
                        "the CPU cores are split evenly between them (OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=None, help="instead of the spec's folders: DIR/quality (records, summary.csv, "
                   "sweep.json), DIR/latency and DIR/report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (one line per finished cell still)")
    return p


def _positive(s: str) -> int:
    from harness.cli.flags import positive_int as positive

    return positive(s)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _local_gpus() -> list[str]:
    """GPU ids visible to this process (as CUDA_VISIBLE_DEVICES names them)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:n] if visible else [str(i) for i in range(n)]


# --- expanding the spec -------------------------------------------------------------------------

def _scope(item: str) -> str:
    return item.partition("=")[0].strip().partition(".")[0]


def expand(spec_path: Path, out: Path | None) -> Plan:
    """Cells of the spec's [run] section (validated here, before any process starts), its latency job and report."""
    from harness.cli.flags import MODES
    from harness.cli.run import check_tasks, run_parser
    from harness.cli.spec import Spec, load_spec, to_argv
    from harness.config import RunConfig, expand_tasks
    from harness.run import pipeline

    if not spec_path.is_file():
        raise UsageError(f"{spec_path}: no such spec file (specs live in configs/, e.g. configs/ci.toml)")
    spec = load_spec(spec_path)
    if "run" not in spec.sections:
        raise UsageError(f"{spec.path}: a sweep needs a [run] section (its cells are the run's methods × modes); "
                         f"for latency or report only, use python -m harness --config {spec.path}")
    outs = {"run": out / "quality", "latency": out / "latency", "report": out / "report"} if out else \
        {s: spec.out(s) for s in ("run", "latency", "report")}
    if outs["run"] is None:
        raise UsageError(f"{spec.path} [run]: give out = \"<folder>\" (or --out DIR) so a rerun resumes its finished records")
    run_out = outs["run"].resolve()
    section = {k.replace("-", "_"): v for k, v in spec.sections["run"].items()}
    if "config" in section:
        raise UsageError(f"{spec.path} [run]: config is not a run option in a spec")
    overrides = [str(x) for key in ("set", "overrides") for x in _as_list(section.pop(key, []))]
    section["out"] = str(run_out)
    args = run_parser().parse_args(to_argv(Spec(spec.path, {"run": section}), "run", run_parser(), {"set": overrides}))
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    cfg = RunConfig(methods=args.methods, tasks=expand_tasks(args.tasks), seed=args.seed, data_dir=data_dir,
                    overrides=tuple(args.overrides))
    if not cfg.methods:
        raise UsageError(f"{spec.path} [run]: methods is empty")
    pipeline.prepare(cfg)  # method names and every --set option, as the full run would check them
    check_tasks(cfg.tasks, cfg.data_dir)
    if data_dir:  # the children must not depend on the environment (Ray workers may not inherit it)
        section["data_dir"] = data_dir
    cells = _spec_cells(spec, section, overrides, cfg.methods, MODES[args.mode], run_out)
    latency = _latency_cell(spec, outs["latency"], run_out)
    report_argv = _report_argv(spec, outs["report"] if out else None, run_out, latency)
    return Plan(run_out, cells, latency, report_argv, uses_gpu=args.device != "cpu")


def _spec_cells(spec, section: dict, overrides: list[str], methods: tuple[str, ...], modes, run_out: Path) -> list[Cell]:
    """One cell per (method, mode), each a `run` of one method into its own work folder."""
    from harness.cli.run import run_parser
    from harness.cli.spec import Spec, to_argv
    from harness.quality import long_tasks
    from harness.store.records import record_filename

    shared = [o for o in overrides if _scope(o) == "calib" or long_tasks.is_long_task(_scope(o))]
    cells = []
    for method in dict.fromkeys(methods):  # a method named twice is one method, as in a single run
        # a cell runs one method, and `--set` rejects scopes that are not in its run: only its own options go along
        mine = [o for o in overrides if _scope(o) == method]
        for mode in modes:
            fname = record_filename(method, mode)
            workdir = run_out / ".sweep" / fname[: -len(".json")]
            argv = ["run", *to_argv(Spec(spec.path, {"run": section}), "run", run_parser(),
                                    {"methods": [method], "mode": mode, "set": [*mine, *shared], "out": str(workdir),
                                     "quiet": True})]
            cells.append(Cell(f"{method}/{mode}", argv, workdir, run_out / ".sweep" / f"{fname[: -len('.json')]}.log",
                              run_out / fname))
    return cells


def _latency_cell(spec, lat_out: Path | None, run_out: Path) -> Cell | None:
    """The spec's [latency] section as one job (its plans may come from the run's records), or None."""
    from harness.cli.latency import latency_parser
    from harness.cli.spec import to_argv

    if "latency" not in spec.sections:
        return None
    if lat_out is None:
        raise UsageError(f"{spec.path} [latency]: give out = \"<folder>\" (or --out DIR)")
    lat_out = lat_out.resolve()
    replace: dict[str, Any] = {"out": str(lat_out), "quiet": True}
    if spec.sections["latency"].get("plans_from") == "run":
        replace["plans_from"] = str(run_out)
    argv = to_argv(spec, "latency", latency_parser(), replace)
    latency_parser().parse_args(argv)  # bad values exit 2 now, not after the quality cells
    return Cell("latency", ["latency", *argv], lat_out, run_out / ".sweep" / "latency.log")


def _report_argv(spec, rep_out: Path | None, run_out: Path, latency: Cell | None) -> list[str] | None:
    """`report` arguments of the spec's [report] section (over the run's and latency's folders), or None."""
    from harness.cli.report import report_parser
    from harness.cli.spec import Spec, to_argv

    if "report" not in spec.sections:
        return None
    rep = dict(spec.sections["report"])
    inputs = rep.pop("results", None) or [str(run_out), *([str(latency.workdir)] if latency else [])]
    if rep_out is not None:
        rep["out"] = str(rep_out)
    report_argv = [*map(str, inputs), *to_argv(Spec(spec.path, {"report": rep}), "report", report_parser())]
    report_parser().parse_args(report_argv)
    return report_argv


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


# --- one cell -----------------------------------------------------------------------------------

def run_cell(argv: list[str], cwd: str, env: dict[str, str], log: str) -> tuple[int, str, float]:
    """Run `python -m harness <argv>` in `cwd`; its output goes to `log`. Returns (exit status, log tail, seconds).

    Runs in a Ray worker or a pool thread; `sys.executable` is that worker's Python (on a cluster
    node, the node's own environment). `env` is added to the worker's environment, so the
    GPU Ray assigned (CUDA_VISIBLE_DEVICES) is kept."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, "-m", "harness", *argv], cwd=cwd, env={**os.environ, **env},
                            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    text = Path(log).read_text(encoding="utf-8", errors="replace")
    return rc, text[-TAIL_CHARS:], seconds


def _seed(cell: Cell) -> None:
    """Link a finished record into the cell's folder, where the child reuses it (or rejects a different configuration)."""
    cell.workdir.mkdir(parents=True, exist_ok=True)
    target = cell.workdir / cell.record.name
    target.unlink(missing_ok=True)
    cell.seeded = cell.record.exists()
    if cell.seeded:
        try:
            os.link(cell.record, target)
        except OSError:  # a filesystem without hard links
            shutil.copy2(cell.record, target)


def _settle(cell: Cell, rc: int, tail: str, seconds: float) -> Outcome:
    """Move a new record into the run folder; report ok, reused or failed."""
    produced = cell.workdir / cell.record.name if cell.record else None
    status = "ok" if rc == 0 else "failed"
    if produced is not None and produced.exists():
        if cell.seeded and filecmp.cmp(produced, cell.record, shallow=False):
            produced.unlink()
            status = "reused" if rc == 0 else status
        else:  # a finished record, even if the child failed afterwards
            os.replace(produced, cell.record)
    if rc == 0 and cell.record is not None and not cell.record.exists():
        rc, status, tail = 1, "failed", tail + "\nthe run exited 0 but left no record"
    if cell.record is not None:  # the pipeline's failed-cell note, where a single-process run would have it
        note = cell.record.with_name(cell.record.name[: -len(".json")] + FAILED_NOTE)
        if rc == 0:
            note.unlink(missing_ok=True)
        elif (cell.workdir / note.name).exists():
            os.replace(cell.workdir / note.name, note)
    if rc == 0 and cell.record is not None:
        shutil.rmtree(cell.workdir, ignore_errors=True)  # its summary.csv; nothing left to resume
    record = str(cell.record if cell.record else cell.workdir) if rc == 0 else None
    return Outcome(cell.name, status, round(seconds, 2), rc, record, str(cell.log), None if rc == 0 else _error(rc, tail))


def _error(rc: int, tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if rc < 0:
        return f"killed by signal {-rc} (out of memory?)" + (f"; last output: {lines[-1]}" if lines else "")
    return "\n".join(lines[-12:]) or f"exit status {rc}, no output"


# --- backends -----------------------------------------------------------------------------------

class LocalBackend:
    """A thread pool; each thread waits on its cell's process. Where cells use GPUs, thread i owns GPU i mod n."""

    name = "local"

    def __init__(self, workers: int, gpus: list[str]) -> None:
        self.workers, self.gpus = workers, gpus
        self._ids = itertools.count()
        self._mine = threading.local()

    def _claim_gpu(self) -> None:
        self._mine.gpu = self.gpus[next(self._ids) % len(self.gpus)] if self.gpus else None

    def _run(self, cell: Cell, cwd: str, env: dict[str, str]):
        if self._mine.gpu is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": self._mine.gpu}
        return run_cell(cell.argv, cwd, env, str(cell.log))

    def map(self, cells: list[Cell], cwd: str, env: dict[str, str]):
        """Yield (cell, (rc, tail, seconds)) as cells finish."""
        with cf.ThreadPoolExecutor(max_workers=self.workers, initializer=self._claim_gpu) as pool:
            futures = {pool.submit(self._run, c, cwd, env): c for c in cells}
            for fut in cf.as_completed(futures):
                yield futures[fut], _result(fut.result)

    def close(self) -> None:
        pass


class RayBackend:
    """One Ray task per cell on a local Ray instance (`num_cpus=workers`) or the cluster at RAY_ADDRESS."""

    name = "ray"

    def __init__(self, workers: int, want_gpus: bool) -> None:
        import ray

        self.ray = ray
        t0 = time.perf_counter()
        self.address = os.environ.get("RAY_ADDRESS")
        if self.address:  # a running cluster: its resources are its own
            ray.init(log_to_driver=False)
        else:  # a private local instance, as small as it can be on a laptop
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.init_s = time.perf_counter() - t0
        self.gpus = int(ray.cluster_resources().get("GPU", 0)) if want_gpus else 0
        self.task = ray.remote(run_cell).options(**({"num_gpus": 1} if self.gpus else {"num_cpus": 1}), max_retries=0)

    def map(self, cells: list[Cell], cwd: str, env: dict[str, str]):
        refs = {self.task.remote(c.argv, cwd, env, str(c.log)): c for c in cells}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:  # a task Ray itself gave up on (e.g. its memory monitor killed it) fails that cell only
                yield refs[ref], _result(lambda ref=ref: self.ray.get(ref))

    def close(self) -> None:
        self.ray.shutdown()


def _result(get) -> tuple[int, str, float]:
    """A cell's (exit status, log tail, seconds), or a failure when the engine could not run it."""
    try:
        return get()
    except Exception as e:  # any engine error fails this cell, not the sweep
        return 1, f"{type(e).__name__}: {e}", 0.0


def _backend(name: str, workers: int, plan: Plan, gpus: list[str]):
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


# --- the sweep ----------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    args = sweep_parser().parse_args(argv)
    started = time.perf_counter()
    plan = expand(args.spec, args.out)
    from harness.store import lock

    # the sweep holds the run folder; each cell writes its own folder under .sweep/ and locks that one
    with lock.hold(plan.run_out):
        return _sweep(args, plan, started)


def _sweep(args, plan: Plan, started: float) -> int:
    from harness.store import lock

    gpus = _local_gpus() if plan.uses_gpu and not os.environ.get("RAY_ADDRESS") else []
    workers = args.workers or (len(gpus) if gpus else max(1, _cores() // 2))
    backend = _backend(args.backend, workers, plan, gpus)
    cwd = os.getcwd()
    threads = max(1, _cores() // min(workers, len(plan.cells)))
    # OMP_NUM_THREADS is what torch starts with: N cells of T threads share the cores instead of N × all of them
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", **lock.child_env()}
    info: dict[str, Any] = {"backend": backend.name, "workers": workers, "threads_per_cell": threads}
    if isinstance(backend, RayBackend):
        info.update(ray_version=backend.ray.__version__, ray_init_s=round(backend.init_s, 2),
                    ray_address=backend.address or "local instance", gpus_per_cell=1 if backend.gpus else 0)
    print(f"sweep {args.spec}: {len(plan.cells)} cells on {backend.name} ({workers} workers, {threads} threads each)"
          + (f"; Ray up in {backend.init_s:.1f}s" if isinstance(backend, RayBackend) else "")
          + f"; records -> {plan.run_out}", file=sys.stderr, flush=True)

    outcomes: list[Outcome] = []
    try:
        outcomes += _run_cells(backend, plan.cells, cwd, env, args.quiet, settle=True)
        if plan.latency is not None:
            if any(o.status == "failed" for o in outcomes):
                outcomes.append(Outcome("latency", "skipped", error="not run: a quality cell failed"))
            else:  # alone, with every core
                lat_env = {**env, "OMP_NUM_THREADS": str(_cores()), "MKL_NUM_THREADS": str(_cores())}
                outcomes += _run_cells(backend, [plan.latency], cwd, lat_env, args.quiet, settle=False)
    finally:
        backend.close()

    from harness.store import records as rec

    finished = sorted(p for p in plan.run_out.glob("*__*.json") if not p.name.endswith((".partial.json", FAILED_NOTE)))
    rec.write_summary([rec.load(p) for p in finished], plan.run_out / "summary.csv")
    failed = [o for o in outcomes if o.status == "failed"]
    if plan.report_argv is not None:
        outcomes.append(_report(plan.report_argv, blocked=bool(failed) or any(o.status == "skipped" for o in outcomes)))
        failed += outcomes[-1:] if outcomes[-1].status == "failed" else []
    wall = time.perf_counter() - started
    summary = {"spec": str(args.spec), **info, "wall_s": round(wall, 2),
               "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "cells": [asdict(o) for o in outcomes]}
    rec.atomic_write(plan.run_out / "sweep.json", json.dumps(summary, indent=2))
    print(_table(outcomes))
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} ok in {wall:.0f}s on {backend.name} ({workers} workers); "
          f"records, summary.csv and sweep.json in {plan.run_out}")
    return 1 if failed else 0


def _report(report_argv: list[str], blocked: bool) -> Outcome:
    """Render the spec's report in this process, or skip it when a cell failed or was skipped."""
    if blocked:
        return Outcome("report", "skipped", error="not rendered: a cell failed")
    from harness.cli.report import cmd_report

    t0 = time.perf_counter()
    try:
        rc, err = cmd_report(report_argv), None
    except UsageError as e:
        rc, err = 2, str(e)
    return Outcome("report", "ok" if rc == 0 else "failed", round(time.perf_counter() - t0, 2), rc, error=err)

def _run_cells(backend, cells: list[Cell], cwd: str, env: dict[str, str], quiet: bool, settle: bool) -> list[Outcome]:
    from tqdm import tqdm

    for c in cells:
        if c.record is not None:
            _seed(c)
    outcomes = []
    with tqdm(total=len(cells), disable=quiet, file=sys.stderr, unit="cell", leave=False) as bar:
        for i, (cell, (rc, tail, seconds)) in enumerate(backend.map(cells, cwd, env), 1):
            o = _settle(cell, rc, tail, seconds) if settle else \
                Outcome(cell.name, "ok" if rc == 0 else "failed", round(seconds, 2), rc, str(cell.workdir) if rc == 0 else None,
                        str(cell.log), None if rc == 0 else _error(rc, tail))
            outcomes.append(o)
            detail = o.error.splitlines()[-1] if o.error else (o.record or "")
            bar.write(f"[{i}/{len(cells)}] {o.cell}: {o.status} in {seconds:.1f}s  {detail}", file=sys.stderr)
            bar.update()
    order = {c.name: i for i, c in enumerate(cells)}
    return sorted(outcomes, key=lambda o: order[o.cell])


def _table(outcomes: list[Outcome]) -> str:
    rows = [("cell", "status", "seconds", "record / error")]
    for o in outcomes:
        what = (o.error.splitlines()[-1] if o.error else "") or o.record or ""
        rows.append((o.cell, o.status.upper() if o.status == "failed" else o.status,
                     "" if o.seconds is None else f"{o.seconds:.1f}", what))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
