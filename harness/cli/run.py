"""`python -m harness [run]`: evaluate methods' plans on lm-eval and long-context tasks."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from harness.cli.check_tasks import check_tasks
from harness.cli.flags import (
    DTYPE_HELP,
    MODES,
    Parser,
    batch_size_arg,
    csv_list,
    device_arg,
    dtype_arg,
    env_path,
    limit_arg,
    model_arg,
    need_records_folder,
    nonneg_int,
    path_arg,
    positive_int,
    seed_arg,
    user_dir,
    user_path,
)
from harness.config import DEFAULT_LIMIT, DEFAULT_METHODS, STANDARD_TASKS, RunConfig, expand_tasks
from harness.errors import UsageError
from harness.run.quiet import bars_off, quiet_libraries
from harness.store.records import check_writable, is_record_file


def _methods_epilog() -> str:
    """The help's list of methods and task options. Without plug-ins it is the generated copy
    (harness/cli/methods_help.py), so `--help` imports neither the methods nor torch; with plug-ins
    (or the methods already imported, as in a notebook) it is built live from the registry."""
    if "methods" in sys.modules or _plugins_configured():
        from methods.catalog import help_text

        return help_text()
    from harness.cli.methods_help import TEXT

    return TEXT


def _plugins_configured() -> bool:
    """Whether a method plug-in is named (`HARNESS_PLUGINS`) or installed (the entry-point group)."""
    if os.environ.get("HARNESS_PLUGINS", "").strip():
        return True
    from importlib.metadata import entry_points

    return bool(entry_points(group="pd_harness.methods"))  # the group methods/__init__.py loads


def placement_flags(p: argparse.ArgumentParser) -> None:
    """accelerate's big-model placement: where weights live, not what is computed."""
    g = p.add_argument_group("placement of a model larger than one device")
    g.add_argument("--device-map", default=None, metavar="auto|balanced|balanced_low_0|sequential",
                   help="spread a model larger than one device over GPUs, CPU memory and disk (accelerate's big-model "
                        "loading); each layer's KV stays on that layer's device")
    g.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    g.add_argument("--offload-folder", type=user_path, default=None, metavar="DIR", help="where --device-map puts layers that fit nowhere else")


# every command of harness/cli/__init__.py's COMMANDS, for the top-level help (tests/test_cli.py checks the two agree)
COMMAND_SUMMARIES = {
    "run": "evaluate methods' plans on lm-eval and long-context tasks (the default command)",
    "latency": "per-stage latency (TTFT, TPOT, handoff) of each method's plan",
    "report": "tables, plots and an HTML page from records (no model, no torch)",
    "check": "regression check: rerun configs/ci.toml and compare with reference records",
    "sweep": "a spec's cells, each in its own process, on Ray or a local pool",
    "export": "a method's pruned model as Hugging Face checkpoints",
}


# harness.pd.models.MODEL_ARGS without importing torch for --help (tests/test_lm_eval_habits.py checks they agree)
MODEL_ARG_NAMES = ("revision", "attn_implementation", "trust_remote_code")


def run_parser() -> argparse.ArgumentParser:
    """The parser of `python -m harness [run]` (and of a spec's [run] section): its flags, in the order --help lists
    them, added by one helper per kind."""
    from harness.quality import long_tasks

    epilog = _methods_epilog()  # first: with plug-ins configured it imports them, and a task plug-in joins long_tasks
    p = Parser(
        prog="python -m harness",
        description="Evaluate pruning methods in PD-unified and PD-disaggregated settings: lm-eval scores "
        "and the KV bytes each handoff sends from the prefill to the decode stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog + "\n\nexamples:\n  python -m harness --methods unpruned,shortgpt --limit 100\n"
        "  python -m harness --methods shortgpt --set shortgpt.k=6 --tasks arc_easy,boolq --mode disaggregated\n"
        "  python -m harness --config configs/main_table.toml          # a spec: runs what a table needs, then renders it\n\n"
        "commands (python -m harness COMMAND --help; without one, run):\n"
        + "\n".join(f"  {name:9s} {what}" for name, what in COMMAND_SUMMARIES.items()),
    )
    _what_flags(p, long_tasks.names())
    _how_flags(p)
    placement_flags(p)
    _lm_eval_flags(p)
    _extra_flags(p)
    return p


def _what_flags(p: argparse.ArgumentParser, long_task_names: tuple[str, ...]) -> None:
    """What a run evaluates and where it writes: methods, model, tasks (`long_task_names`: the long-context ones,
    plug-ins' included), limit, mode, method options, --out."""
    p.add_argument("--methods", type=csv_list, default=",".join(DEFAULT_METHODS), help="comma-separated method names (default: %(default)s)")
    p.add_argument("--model", type=model_arg, default="smollm2-135m",
                   help="smollm2-135m (embedded default), a .gguf file, a model directory, a HF id, or random:<preset>")
    p.add_argument("--tasks", type=csv_list, default="standard,long",
                   help="comma-separated tasks: lm-eval tasks with local data, the harness's long-context tasks "
                        f"({', '.join(long_task_names)}), the tasks of --include-path folders, or the aliases "
                        f"standard ({', '.join(STANDARD_TASKS)}) and long "
                        "(default: %(default)s)")
    p.add_argument("--limit", type=limit_arg, default=DEFAULT_LIMIT,
                   help=f"items per task (per subtask for groups such as mmlu), a fraction 0 < x < 1 of each task's items "
                        f"(lm-eval's --limit 0.1: ceil(n·x)), or 'all' (default: {DEFAULT_LIMIT})")
    p.add_argument("--mode", choices=sorted(MODES), default="disaggregated",
                   help="PD setting(s) to evaluate: disaggregated (the deployment this harness studies), unified (one "
                        "layer set, no handoff) or both (twice the cells; unified is the comparison deployment) "
                        "(default: disaggregated)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE.OPTION=VALUE",
                   help="method, calibration or long-context task option, e.g. shortgpt.k=8, calib.n_samples=64, pd_ppl.docs=8 (repeatable)")
    p.add_argument("--out", "--output_path", dest="out", type=user_dir, default=None,
                   help="output folder (default: results/runs/<date>_<methods>_<run id>, under the current folder; a rerun "
                        "finds it); --output_path is lm-eval's name. Besides the "
                        "records it holds lm_eval/METHOD__MODE/results_<timestamp>.json in lm-eval's results schema")


def _how_flags(p: argparse.ArgumentParser) -> None:
    """How the model runs: seed, batch size, device, dtype."""
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for calibration sampling and lm-eval (default: 0)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=batch_size_arg, default=16, metavar="N|auto|auto:N",
                   help="requests per forward, or as lm-eval's --batch_size: auto (the largest size from 64 down, shrunk on "
                        "out-of-memory as lm-eval does, that runs each task's longest request; on CPU a fixed 16) or auto:N (searched again "
                        "N times as requests get shorter); the size used is in each record (default: 16)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", type=dtype_arg, default="auto", help=DTYPE_HELP)


def _lm_eval_flags(p: argparse.ArgumentParser) -> None:
    """The options lm-eval has too: data, include path, context length, few-shot, chat template, model args,
    bootstrap iterations."""
    p.add_argument("--data-dir", type=path_arg, default=env_path("HARNESS_DATA_DIR"),
                   help="folder laid out like ../shared/data (default: $HARNESS_DATA_DIR; unset = lm-eval's hub datasets)")
    p.add_argument("--include-path", "--include_path", dest="include_path", type=user_dir, action="append", default=None,
                   metavar="DIR",
                   help="a folder of lm-eval task YAMLs of your own (lm-eval's --include_path; repeatable, one folder each, "
                        "a later one's task names winning); --tasks then takes the task and group names they define. "
                        "Recorded, part of the run key, and its YAML, Python and named data files digested")
    p.add_argument("--max-length", type=positive_int, default=None, help="context length (default: the model's, as lm-eval resolves it)")
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=nonneg_int, default=0, metavar="N",
                   help="few-shot examples per item, passed to lm-eval as its --num_fewshot (sampled with the run's --seed; "
                        "recorded and part of the run key; long-context tasks ignore it) (default: 0)")
    p.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template", nargs="?", const=True,
                   default=False, metavar="TEMPLATE",
                   help="as lm-eval's --apply_chat_template: wrap each prompt (few-shot examples as turns) in the tokenizer's "
                        "chat template; a TEMPLATE must name one of the tokenizer's templates (as lm-eval 0.4.13, prompts "
                        "are rendered with its default one and the named one is recorded); part of the run key when given; "
                        "long-context tasks ignore it (raw token prompts)")
    p.add_argument("--model-args", "--model_args", dest="model_args", default=None, metavar="KEY=VALUE,...",
                   help="as lm-eval's --model_args, from_pretrained options: " + ", ".join(MODEL_ARG_NAMES)
                        + " (e.g. revision=main,attn_implementation=eager); the model itself is --model, its dtype "
                          "--dtype; recorded, and part of the run key when given")
    p.add_argument("--bootstrap-iters", type=nonneg_int, default=1000,
                   help="lm-eval bootstrap iterations for stderrs (0: none, and lm-eval then reports no stderr at all, "
                        "accuracies' included; default: %(default)s)")


def _extra_flags(p: argparse.ArgumentParser) -> None:
    """Plans reused from another run, per-item logs, quiet, and --config (a spec instead of flags)."""
    p.add_argument("--plans-from", type=path_arg, default=None, metavar="RUN_DIR",
                   help="reuse plans stored in another run's records where model, seed, method options and calibration "
                        "match (saves a repeated search, e.g. PDTrim's); other plans are made as usual")
    p.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                   help="also write each evaluated (method, mode, task)'s per-item log, in lm-eval's per-sample JSON-lines format, "
                        "to OUT/samples/METHOD__MODE/samples_TASK.jsonl (pd_ppl: per-window NLL; passkey: outputs); "
                        "--log_samples is lm-eval's name")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", metavar="SPEC.toml", help="instead of flags: run an experiment spec from configs/ (its quality and "
                   "latency runs, resuming finished records, then its report), e.g. --config configs/ci.toml")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from its parsed options (the command line's, a spec section's or the API's)."""
    from harness.pd.models import model_args_text, parse_model_args

    return RunConfig(
        model=args.model, methods=args.methods, tasks=expand_tasks(args.tasks), limit=args.limit, modes=MODES[args.mode],
        seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters, num_fewshot=args.num_fewshot, overrides=tuple(args.overrides),
        apply_chat_template=args.apply_chat_template, model_args=model_args_text(parse_model_args(args.model_args)),
        plans_from=str(Path(args.plans_from).resolve()) if args.plans_from else None,
        include_path=_include_paths(getattr(args, "include_path", None)),
        device_map=args.device_map, max_memory=args.max_memory,
        offload_folder=str(Path(args.offload_folder).resolve()) if args.offload_folder else None,
    )


def _include_paths(given) -> tuple[str, ...] | None:
    """--include-path's folders as absolute paths, in the order given, each once; None without any."""
    return tuple(dict.fromkeys(str(Path(p).resolve()) for p in given)) if given else None


def warn_small_limit(limit: int | float | None, threshold_points: float = 3.0) -> None:
    """Say when --limit leaves an accuracy's standard error above `threshold_points` (lm-eval warns on
    any --limit): at n items lm-eval's is sqrt(p(1 - p) / (n - 1)), up to 100·sqrt(0.25 / (n - 1)) points (5.0 at
    the default 100), and two methods' scores are told apart, as the tables' bold rule does, only beyond 1.96
    combined standard errors (1.96·√2 of one). A fraction's count depends on each task's size: not judged here."""
    if limit is None or limit < 1:
        return
    se = 100 * (0.25 / max(limit - 1, 1)) ** 0.5
    if se > threshold_points:
        noise = 1.96 * 2 ** 0.5 * se
        # at 3 items or fewer the threshold passes 100 points, where "within about 139 points" told nothing
        told = (f"differences between two methods within about {noise:.0f} points are noise" if noise < 99.5 else
                "even a 100-point difference between two methods is within the noise")
        print(f"note: --limit {limit}: each accuracy has a standard error of up to {se:.1f} points, so {told} (tables "
              f"show ± and bold only clear wins; `report --baseline` pairs methods on the same items)", file=sys.stderr, flush=True)


def default_out(cfg: RunConfig, root: Path = Path("results") / "runs", kind: str = "") -> Path:
    """Where a run without --out writes its records: `results/runs/<date>_<methods>_<run id>`, readable
    in a listing, or the folder an earlier run of the same configuration made (any date, the bare run id
    of older versions, or the ids they gave with the data folder's or the include folders' paths), so rerunning a
    command resumes it."""
    rid = cfg.run_id()
    if root.is_dir():
        from harness.run.reuse import dtype_spelled_before

        ids = {f"{kind}{c.run_id(with_paths=w, include_paths=i)}" for c in (cfg, *dtype_spelled_before(cfg))
               for w, i in ((False, False), (False, True), (True, False))}
        earlier = sorted(p for p in root.iterdir() if p.is_dir() and (p.name in ids or p.name.split("_")[-1] in ids))
        if earlier:
            return earlier[-1]
    methods = "-".join(cfg.methods)
    methods = methods if len(methods) <= 40 else methods[:37] + "..."
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in methods)
    return root / f"{time.strftime('%Y%m%d-%H%M')}_{safe}_{kind}{rid}"


def cmd_run(argv: list[str] | argparse.Namespace) -> int:
    t_start = time.perf_counter()  # the timing line's 'startup': imports and checks before the model loads
    args = argv if isinstance(argv, argparse.Namespace) else run_parser().parse_args(argv)  # a spec section: options
    if args.quiet or os.environ.get("RANK", "0") != "0":
        os.environ["TQDM_DISABLE"] = "1"  # before torch imports tqdm, which reads it once, at import
    from harness.quality import distributed  # torch: only after parsing, so --help and bad flags stay fast

    if args.device_map and distributed.launched_world_size() > 1:
        raise UsageError(f"--device-map under {distributed.launched_world_size()} data-parallel ranks: each rank would "
                         "spread its own copy of the model over every GPU it sees; run one process with --device-map "
                         "(a model larger than one GPU), or data-parallel ranks without it (a model per GPU)")
    dist = distributed.current()
    if not dist.is_main:  # one voice: rank 0 reports, the others work silently
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    quiet_libraries()
    from harness.run import pipeline

    cfg = run_config(args)
    placement = cfg.placement()  # bad --device-map / --max-memory: exit 2 before loading anything
    need_records_folder(args.plans_from, "--plans-from")
    prepared = pipeline.prepare(cfg)
    check_tasks(cfg.tasks, cfg.data_dir, cfg.include_path)
    from harness.quality import long_tasks

    if dist.is_main and not all(long_tasks.is_long_task(t) for t in cfg.tasks):  # one voice; only accuracies have it
        warn_small_limit(cfg.limit)
    if cfg.data_dir:
        from harness.quality import local_tasks
        from harness.quality.tasks import check_files

        check_files([t for t in cfg.tasks if local_tasks.is_local_task(t)], Path(cfg.data_dir))
    out = args.out or default_out(cfg)
    if dist.is_main:
        check_writable(out, "--out")  # a bad --out fails before the model loads, not after
    from harness.store import lock

    # bars_off: tqdm read TQDM_DISABLE at import, and with plug-ins the parser's --help text imported it before -q set it
    with lock.hold(out) if dist.is_main else contextlib.nullcontext(), bars_off(args.quiet), \
            contextlib.closing(_before_load(cfg, prepared, Path(out))) as tasks:  # one writer per folder (rank 0 writes)
        return _evaluate(cfg, args, prepared, placement, dist, out, t_start, tasks)


def _before_load(cfg: RunConfig, prepared, out: Path):
    """The checks that need `out`, the built tasks, or the model's tokenizer and config, before its weights load
    (minutes for a large one), as docs/running.md says: the options the tokenizer or the context rule out, counts too
    deep for the model, another configuration's work in `out` (pipeline.run checks each again, against the loaded
    model), and the rows of the tasks on local data (`task_check.tasks_before_load`); the run's `TaskCache`, for its
    cells."""
    from harness.run import pipeline, reuse, task_check

    task_check.before_load(cfg, prepared, warn=False)  # a passkey length beyond the context; warned by pipeline.run,
    # which checks again against the loaded model
    if out.is_dir():
        reuse.refuse_foreign_work(cfg, prepared, out, lambda *cell: pipeline.cell_identity(cfg, prepared, *cell))
    return task_check.tasks_before_load(cfg, prepared, out)


def _kept(out: Path) -> str:
    """What an interrupted run leaves in `out` for the rerun: finished records, and cells' finished tasks (resume states)."""
    files = list(out.glob("*__*.json")) if out.is_dir() else []
    partial = sum(p.name.endswith(".partial.json") for p in files)
    done = sum(is_record_file(p) for p in files)
    if not done and not partial:
        return "no cell had finished anything yet"
    parts = [f"{done} finished record(s)"] * bool(done) + [f"the finished tasks of {partial} cell(s)"] * bool(partial)
    return f"{' and '.join(parts)} kept in {out}"


def _print_tables(records) -> None:
    """The quality, long-context and plan tables of `records` (only this configuration's: a refused
    cell's folder may hold another configuration's), as Markdown on stdout."""
    from reports.formats import to_markdown
    from reports.plans import plans_table
    from reports.tables import long_context_table, quality_table

    for table in (quality_table(records), long_context_table(records), plans_table(records)):
        if not table.empty:
            print(to_markdown(table), end="\n\n")


def _evaluate(cfg: RunConfig, args, prepared, placement, dist, out: Path, t_start: float, tasks) -> int:
    """Load the model, run every cell into `out` (`tasks`: the run's TaskCache), print the tables; the exit status."""
    from harness.pd.models import load_model
    from harness.quality import distributed
    from harness.run import pipeline, progress

    tracker = progress.Tracker(progress.work_of(cfg, prepared), show=dist.is_main and not args.quiet,
                               since=t_start)
    if tracker.show:  # what the run will do, before any work
        print(progress.statement(tracker.work, cfg.limit), file=sys.stderr, flush=True)
    tracker.start()
    failures: list[pipeline.CellFailure] = []
    try:
        with tracker.phase("load"):
            loaded = load_model(cfg.model, distributed.device_for(cfg.device, dist), cfg.dtype, cfg.seed, placement,
                                cfg.model_arg_dict())
    except KeyboardInterrupt:  # nothing done yet: the one line `interrupted (Ctrl-C)` of harness/__main__.py
        tracker.close()
        raise
    try:
        ranks = f"; {dist.world_size} data-parallel ranks" if dist.enabled else ""
        if dist.is_main:
            tracker.say(f"model {cfg.model} ({loaded.description.get('n_layers')} layers) loaded in "
                        f"{tracker.phases[-1].seconds:.1f}s; methods {','.join(cfg.methods)}; modes {','.join(cfg.modes)}; "
                        f"tasks {','.join(cfg.tasks)}; limit {cfg.limit or 'all'}{ranks}; records -> {out}")
        start = time.perf_counter()

        def say(msg: str) -> None:
            if dist.is_main:
                tracker.say(f"[{time.perf_counter() - start:7.1f}s] {msg}")

        records = pipeline.run(cfg, out, prepared, loaded, on_progress=say, progress=not args.quiet,
                               log_samples=args.log_samples, tracker=tracker, tasks=tasks)
    except KeyboardInterrupt:
        tracker.close()
        if dist.is_main:  # one voice: a launcher stops every rank (SIGTERM, as Ctrl-C)
            hint = getattr(args, "interrupt_hint", None) or "rerun the same command to resume"  # check: its own
            print(f"\ninterrupted: {_kept(Path(out))}; {hint}\n{tracker.timing_line()}",
                  file=sys.stderr)
        return 130
    except pipeline.CellsFailed as e:
        failures, records = e.failures, e.records
    finally:
        tracker.close()  # the overall line goes before the tables
    with tracker.phase("report"):
        _print_tables(records)
    print(f"\nrecords and summary.csv in {out} ({time.perf_counter() - start:.0f}s)")
    if dist.is_main:
        print(tracker.timing_line(), file=sys.stderr, flush=True)
    return _failed(failures, len(prepared.methods) * len(cfg.modes), dist.is_main) if failures else 0


def _failed(failures: list, n_cells: int, is_main: bool) -> int:
    """Print the failed cells and what to do; the exit status: 2 when every failure was bad input (what to change
    is in the message), 1 for crashes / OOM."""
    # a rerun retries only the failed cells; one refused for bad input fails the same way until the input changes
    then = "fix what each names, then rerun" if all(f.bad_input for f in failures) else "rerun the same command"
    print(f"{len(failures)} of {n_cells} cells FAILED (the others finished; {then} to retry only these):")
    for f in failures:
        print(f"  {f.line()}")
        if is_main:
            print(f"error: {f.method}/{f.mode}: {f.named()}", file=sys.stderr)
    return 2 if all(f.bad_input for f in failures) else 1
