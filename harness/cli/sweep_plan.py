"""Expanding a sweep spec (`python -m harness sweep`) into its cells: one `run` process per
(method, mode), the `[latency]` job and the `[report]` arguments, all validated before any
process starts (harness/cli/sweep.py runs them)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError


@dataclass
class Cell:
    """One process of the sweep: `python -m harness <argv>` writing into `workdir`."""

    name: str  # "shortgpt/unified", or "latency"
    argv: list[str]
    workdir: Path  # the child's --out
    log: Path  # the child's stdout and stderr
    # quality cells: where its finished records belong, one per variant of a depth sweep (`tail@k=1__unified.json`, ...)
    records: list[Path] = field(default_factory=list)
    seeded: set[str] = field(default_factory=set)  # names of finished records linked into workdir before the run


@dataclass
class Plan:
    """The expanded spec: quality cells, then an optional latency job, then an optional report."""

    run_out: Path
    cells: list[Cell]
    latency: Cell | None = None
    report_argv: list[str] | None = None
    uses_gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # the spec's `plugins` (imported here; the cells get them with HARNESS_PLUGINS's)


def _scope(item: str) -> str:
    return item.partition("=")[0].strip().partition(".")[0]


def expand(spec_path: Path, out: Path | None) -> Plan:
    """Cells of the spec's [run] section (validated here, before any process starts), its latency job and report."""
    from harness.cli.check_tasks import check_tasks
    from harness.cli.flags import MODES
    from harness.cli.run import run_config, run_parser
    from harness.cli.spec import Spec, load_spec, to_namespace
    from harness.run import pipeline
    from harness.store.records import check_writable

    if spec_path.is_dir():
        raise UsageError(f"{spec_path}: a folder, not a spec file (specs live in configs/, e.g. configs/ci.toml)")
    if not spec_path.is_file():
        raise UsageError(f"{spec_path}: no such spec file (specs live in configs/, e.g. configs/ci.toml)")
    if out is not None:  # else refused as "[run] out OUT/quality: cannot write there", a folder inside the file
        check_writable(out, "--out")
    spec = load_spec(spec_path, flag="")
    if "run" not in spec.sections:
        raise UsageError(f"{spec.path}: a sweep needs a [run] section (its cells are the run's methods × modes); "
                         f"for latency or report only, use python -m harness --config {spec.path}")
    outs = {"run": out / "quality", "latency": out / "latency", "report": out / "report"} if out else \
        {s: spec.out(s) for s in ("run", "latency", "report")}
    if outs["run"] is None:
        raise UsageError(f"{spec.path} [run]: give out = \"<folder>\" (or --out DIR) so a rerun resumes its finished records")
    run_out = outs["run"].resolve()
    for kind, folder in outs.items():  # before any cell: each cell's own check sees only its folder under .sweep
        if folder is not None and (kind == "run" or kind in spec.sections):  # a dangling link, the references, a file
            check_writable(folder, f"[{kind}] out")
    section = {k.replace("-", "_"): v for k, v in spec.sections["run"].items()}
    overrides = [str(x) for x in _as_list(section.pop("set", []))]
    section["out"] = str(run_out)
    # the section as `run` would take it (errors name the spec, the section and the key), as --config converts it
    args = to_namespace(Spec(spec.path, {"run": section}), "run", run_parser(), {"set": overrides})
    if not args.methods:
        raise UsageError(f"{spec.path} [run]: methods is empty")
    cfg = run_config(args)  # the whole run's configuration: its cells' run keys are the cells' own
    data_dir = cfg.data_dir
    prepared = pipeline.prepare(cfg)  # method names and every --set option, as the full run would check them
    check_tasks(cfg.tasks, cfg.data_dir, cfg.include_path)
    _refuse_old_work(cfg, prepared, run_out)
    if cfg.num_fewshot:  # a few-shot pool too small: refused now, not by every cell after its model load
        _check_fewshot(cfg)
    if data_dir:  # the children must not depend on the environment (Ray workers may not inherit it)
        section["data_dir"] = data_dir
    cells = _spec_cells(spec, section, overrides, list(prepared.methods), MODES[args.mode], run_out)
    latency = _latency_cell(spec, outs["latency"], run_out)
    report_argv = _report_argv(spec, outs["report"] if out else None, run_out, latency)
    return Plan(run_out, cells, latency, report_argv, uses_gpu=args.device != "cpu", plugins=spec.plugins)


def _refuse_old_work(cfg, prepared, run_out: Path) -> None:
    """Another configuration's records, or work from other data or code, refused now, as `run` does, not by every cell
    after its start: in the run folder, and in the cells' own folders, where an interrupted sweep left its resume
    states and records it never moved (the cell's start would move such a record into the run folder). The options
    the tokenizer rules out and what the model's config rules out (its family, counts too deep) are refused first,
    as `run` refuses them before the weights load, and the tokenizer's default prefix decides whether long-context
    results of an older task version still hold: without it such results were refused only by each cell, after its
    model load, where the tokenizer prepends a BOS (Llama's)."""
    from harness.quality.long_tasks.base import special_prefix
    from harness.run import inputs, made_on, pipeline, reuse, task_check

    # its tokenizer and config only, not the weights; `tail.k=2,8` on 4 layers: not by k=8's cell, after its start-up
    tokenizer = task_check.before_load(cfg, prepared)
    prefix = special_prefix(tokenizer) if tokenizer is not None else None
    now = inputs.digests(cfg, prepared=prepared)
    # on a Ray cluster (RAY_ADDRESS) the cells run on its nodes: `--device auto` there need not be this driver's CPU,
    # and `--device cuda` need not exist here, so where a record was scored is left to each cell's own check
    where = made_on.computed_elsewhere() if os.environ.get("RAY_ADDRESS") else contextlib.nullcontext()
    with where:
        for folder in [run_out, *sorted(p for p in (run_out / ".sweep").glob("*") if p.is_dir())]:
            reuse.refuse_foreign_work(cfg, prepared, folder, lambda *cell: pipeline.cell_identity(cfg, prepared, *cell))
            inputs.refuse_stale_work(cfg, prepared, folder, now, prefix)


def _check_fewshot(cfg) -> None:
    """`--num-fewshot` against each lm-eval task's few-shot pool (harness.quality.evaluate.check_fewshot)."""
    from harness.quality.evaluate import TaskCache, check_fewshot

    tasks = TaskCache(cfg.tasks, Path(cfg.data_dir) if cfg.data_dir else None)
    try:
        check_fewshot(tasks, cfg.tasks, cfg.num_fewshot)
    finally:
        tasks.close()


def _spec_cells(spec, section: dict, overrides: list[str], variants: list[str], modes, run_out: Path) -> list[Cell]:
    """One cell per (method, mode), each a `run` of one method into its own work folder. `variants` are
    the run's method instances: a method with a depth sweep (`tail.k=1,2`) is one cell that writes one
    record per variant (`tail@k=1__disaggregated.json`, ...), as a single run names them."""
    from harness.cli.run import run_parser
    from harness.cli.spec import Spec, to_argv
    from harness.config import sweep_base
    from harness.quality import long_tasks
    from harness.store.records import record_filename

    shared = [o for o in overrides if _scope(o) == "calib" or long_tasks.is_long_task(_scope(o))]
    cells = []
    for method in dict.fromkeys(sweep_base(v) for v in variants):  # a depth sweep's variants (tail@k=1, tail@k=2): one cell
        # a cell runs one method, and `--set` rejects scopes that are not in its run: only its own options go along
        mine = [o for o in overrides if _scope(o) == method]
        for mode in modes:
            stem = record_filename(method, mode)[: -len(".json")]
            workdir = run_out / ".sweep" / stem
            argv = ["run", *to_argv(Spec(spec.path, {"run": section}), "run", run_parser(),
                                    {"methods": [method], "mode": mode, "set": [*mine, *shared], "out": str(workdir),
                                     "quiet": True})]
            records = [run_out / record_filename(v, mode) for v in variants if sweep_base(v) == method]
            cells.append(Cell(f"{method}/{mode}", argv, workdir, run_out / ".sweep" / f"{stem}.log", records))
    return cells


def _latency_cell(spec, lat_out: Path | None, run_out: Path) -> Cell | None:
    """The spec's [latency] section as one job (its plans may come from the run's records), or None."""
    from harness.cli.latency import latency_parser
    from harness.cli.spec import check_latency, from_run, to_argv, to_namespace

    if "latency" not in spec.sections:
        return None
    if lat_out is None:
        raise UsageError(f"{spec.path} [latency]: give out = \"<folder>\" (or --out DIR)")
    lat_out = lat_out.resolve()
    replace: dict[str, Any] = {"out": str(lat_out), "quiet": True}
    replace.update(from_run(spec, run_out))
    # bad values exit 2 now, not after the quality cells: the parser's types, then what the command checks itself
    check_latency(spec, to_namespace(spec, "latency", latency_parser(), replace))
    argv = to_argv(spec, "latency", latency_parser(), replace)
    return Cell("latency", ["latency", *argv], lat_out, run_out / ".sweep" / "latency.log")


def _report_argv(spec, rep_out: Path | None, run_out: Path, latency: Cell | None) -> list[str] | None:
    """`report` arguments of the spec's [report] section (over the run's and latency's folders), or None."""
    from harness.cli.report import report_parser
    from harness.cli.spec import Spec, check_report, report_inputs, to_argv, to_namespace

    if "report" not in spec.sections:
        return None
    rep = dict(spec.sections["report"])
    inputs = report_inputs(spec, [str(run_out), *([str(latency.workdir)] if latency else [])])
    rep.pop("results", None)
    if rep_out is not None:
        rep["out"] = str(rep_out)
    check_report(spec, to_namespace(Spec(spec.path, {"report": rep}), "report", report_parser(), {"results": inputs}))
    return [*inputs, *to_argv(Spec(spec.path, {"report": rep}), "report", report_parser())]


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]
