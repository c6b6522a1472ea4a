"""Command line: `python -m harness [run] --methods unpruned,shortgpt ...`.

Bad input exits with code 2 and a message that says what is wrong and what would be right.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from harness.config import DEFAULT_LIMIT, DEFAULT_METHODS, LONG_TASKS, STANDARD_TASKS, RunConfig, expand_tasks, options_help
from harness.errors import UsageError

MODES = {"unified": ("unified",), "disaggregated": ("disaggregated",), "both": ("unified", "disaggregated")}


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _positive(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


def _limit(s: str) -> int | None:
    if s.lower() in ("all", "none", "full"):
        return None
    try:
        return _positive(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s}") from None


def _methods_epilog() -> str:
    import methods
    from methods.registry import stage_bases
    from methods.stage import STAGE_OPTIONS

    lines = ["methods (options via --set METHOD.OPTION=VALUE):"]
    for name in methods.names():
        if name.startswith("stage:"):
            continue
        cls = methods.get(name)
        lines.append(f"  {name:16s} {cls.summary}")
        lines.append(f"  {'':16s} options: {options_help(cls.Config)}")
    stage_opts = ", ".join(f"{o}={d} (int)" for o, d in STAGE_OPTIONS)
    lines.append(f"  {'stage:BASE':16s} BASE's removal order with the stage-aware scheme: prefill removes its first k_prefill "
                 f"blocks, decode its first k_decode (unified: k_unified); BASE one of {', '.join(stage_bases())}")
    lines.append(f"  {'':16s} options: {stage_opts}, plus BASE's options except k (e.g. --set stage:sleb.k_decode=6)")
    from harness.calibration import CalibConfig

    lines.append(f"  {'calib':16s} calibration set: {options_help(CalibConfig)} (seed defaults to --seed)")
    from harness import long_tasks

    lines.append("long-context tasks (options via --set TASK.OPTION=VALUE when the task is in --tasks):")
    for name in long_tasks.names():
        lines.append(f"  {name:16s} options: {options_help(long_tasks.get(name).Config)}")
    return "\n".join(lines)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness",
        description="Evaluate pruning methods in PD-unified and PD-disaggregated settings: lm-eval scores "
        "and the KV bytes each handoff sends from the prefill to the decode stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_methods_epilog() + "\n\nexamples:\n  python -m harness --methods unpruned,shortgpt --limit 100\n"
        "  python -m harness --methods shortgpt --set shortgpt.k=6 --tasks arc_easy,boolq --mode disaggregated\n"
        "  python -m harness --config configs/main_table.toml          # a spec: runs what a table needs, then renders it\n\n"
        "other commands (python -m harness COMMAND --help): latency (per-stage latency), report (tables, plots, HTML "
        "from records), check (regression check against reference records), sweep (a spec's cells, "
        "each in its own process, on Ray or a local pool), export (pruned Hugging Face checkpoints)",
    )
    p.add_argument("--methods", type=_csv, default=",".join(DEFAULT_METHODS), help="comma-separated method names (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded default), a .gguf file, a model directory, a HF id, or random:<preset>")
    p.add_argument("--tasks", type=_csv, default="standard,long",
                   help="comma-separated tasks: lm-eval tasks with local data, the harness's long-context tasks "
                        f"({', '.join(LONG_TASKS)}), or the aliases standard ({', '.join(STANDARD_TASKS)}) and long "
                        "(default: %(default)s)")
    p.add_argument("--limit", type=_limit, default=DEFAULT_LIMIT,
                   help=f"items per task (per subtask for groups such as mmlu), or 'all' (default: {DEFAULT_LIMIT})")
    p.add_argument("--mode", choices=sorted(MODES), default="both", help="PD setting(s) to evaluate (default: both)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE.OPTION=VALUE",
                   help="method, calibration or long-context task option, e.g. shortgpt.k=8, calib.n_samples=64, pd_ppl.docs=8 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: results/runs/<run id>)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and lm-eval (default: 0)")
    p.add_argument("--batch-size", type=_positive, default=16, help="requests per forward (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device-map", default=None, metavar="auto|balanced|balanced_low_0|sequential",
                   help="spread a model larger than one device over GPUs, CPU memory and disk (accelerate's big-model "
                        "loading); each layer's KV stays on that layer's device")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, metavar="DIR", help="where --device-map puts layers that fit nowhere else")
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR"),
                   help="folder laid out like ../shared/data (default: $HARNESS_DATA_DIR; unset = lm-eval's hub datasets)")
    p.add_argument("--max-length", type=_positive, default=None, help="context length (default: the model's, as lm-eval resolves it)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval bootstrap iterations for perplexity stderrs")
    p.add_argument("--plans-from", default=None, metavar="RUN_DIR",
                   help="reuse plans stored in another run's records where model, seed, method options and calibration "
                        "match (saves a repeated search, e.g. PDTrim's); other plans are made as usual")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", metavar="SPEC.toml", help="instead of flags: run an experiment spec from configs/ (its quality and "
                   "latency runs, resuming finished records, then its report), e.g. --config configs/ci.toml")
    return p


def check_tasks(tasks: tuple[str, ...], data_dir: str | None) -> None:
    from harness import long_tasks
    from harness.offline_tasks import TASK_FILES

    if not tasks:
        raise UsageError("--tasks is empty; give at least one task, e.g. --tasks arc_easy")
    unknown = [t for t in tasks if t not in TASK_FILES and not long_tasks.is_long_task(t)]
    if not unknown:
        return
    if data_dir is None:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [t for t in unknown if t not in known]
        if not unknown:
            return
    raise UsageError(f"unknown task(s) {', '.join(unknown)}; tasks with local data: {', '.join(sorted(TASK_FILES))}; "
                     f"long-context: {', '.join(long_tasks.names())}; aliases: standard, long"
                     + ("" if data_dir else " (without --data-dir, any lm-eval task name)"))


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_run(argv: list[str]) -> int:
    from harness import distributed

    args = run_parser().parse_args(argv)
    dist = distributed.current()
    if not dist.is_main:  # one voice: rank 0 reports, the others work silently
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # also silences lm-eval's own bars
    _quiet_libraries()
    from harness import pipeline
    from harness.records import load_dir
    from reports.formats import to_markdown
    from reports.tables import long_context_table, plans_table, quality_table

    cfg = RunConfig(
        model=args.model, methods=args.methods, tasks=expand_tasks(args.tasks), limit=args.limit, modes=MODES[args.mode],
        seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters, overrides=tuple(args.overrides),
        plans_from=str(Path(args.plans_from).resolve()) if args.plans_from else None,
        device_map=args.device_map, max_memory=args.max_memory,
        offload_folder=str(Path(args.offload_folder).resolve()) if args.offload_folder else None,
    )
    placement = cfg.placement()  # bad --device-map / --max-memory: exit 2 before loading anything
    if cfg.plans_from and not Path(cfg.plans_from).is_dir():
        raise UsageError(f"--plans-from {args.plans_from}: not a folder of run records")
    if not cfg.methods:
        raise UsageError("--methods is empty; known methods: " + ", ".join(__import__("methods").names()))
    prepared = pipeline.prepare(cfg)
    check_tasks(cfg.tasks, cfg.data_dir)
    if cfg.data_dir:
        from harness.offline_tasks import TASK_FILES, check_files

        check_files([t for t in cfg.tasks if t in TASK_FILES], Path(cfg.data_dir))
    out = args.out or Path("results") / "runs" / cfg.run_id()
    from harness.models import load_model

    t0 = time.perf_counter()
    loaded = load_model(cfg.model, distributed.device_for(cfg.device, dist), cfg.dtype, cfg.seed, placement)
    ranks = f"; {dist.world_size} data-parallel ranks" if dist.enabled else ""
    if dist.is_main:
        print(f"model {cfg.model} ({loaded.description.get('n_layers')} layers) loaded in {time.perf_counter() - t0:.1f}s; "
              f"methods {','.join(cfg.methods)}; modes {','.join(cfg.modes)}; tasks {','.join(cfg.tasks)}; "
              f"limit {cfg.limit or 'all'}{ranks}; records -> {out}", file=sys.stderr, flush=True)
    start = time.perf_counter()

    def say(msg: str) -> None:
        if dist.is_main:
            print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    failures: list[pipeline.CellFailure] = []
    try:
        pipeline.run(cfg, out, prepared, loaded, on_progress=say, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished records are kept in {out}; rerun the same command to resume", file=sys.stderr)
        return 130
    except pipeline.CellsFailed as e:
        failures = e.failures
    records = [r for r in load_dir(out) if r.method in cfg.methods and r.mode in cfg.modes]
    for table in (quality_table(records), long_context_table(records), plans_table(records)):
        if not table.empty:
            print(to_markdown(table), end="\n\n")
    print(f"\nrecords and summary.csv in {out} ({time.perf_counter() - start:.0f}s)")
    if not failures:
        return 0
    n_cells = len(cfg.methods) * len(cfg.modes)
    print(f"{len(failures)} of {n_cells} cells FAILED (the others finished; rerun the same command to retry only these):")
    for f in failures:
        print(f"  {f.line()}")
        if dist.is_main:
            print(f"error: {f.method}/{f.mode}: {f.error}", file=sys.stderr)
    # exit 2 when every failure was bad input (what to change is in the message), 1 for crashes / OOM
    return 2 if all(f.bad_input for f in failures) else 1


def _floats(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in _csv(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s}")
    return vals


def _ints(s: str) -> tuple[int, ...]:
    vals = tuple(_positive(x) for x in _csv(s))
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return vals


def latency_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness latency",
        description="Per-stage latency of each method's plan in a PD deployment: TTFT (prefill + first token), "
        "ITL samples and TPOT (each decode step timed), handoff time, KV bytes sent (exact and 16-token pages), "
        "modelled transfer time per link bandwidth, and E2E = TTFT + transfer + (n-1)·TPOT. CUDA events on GPU, "
        "a monotonic clock on CPU (recorded as such).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness latency --methods unpruned,shortgpt --model random:llama3-8b "
        "--prompt-tokens 2048 --decode-tokens 128 --batch-size 1 --out DIR\n"
        "  python -m harness latency --methods unpruned,shortgpt,pdtrim --plans-from results/runs/RUN --prompt-tokens 512,2048",
    )
    p.add_argument("--methods", type=_csv, default=",".join(DEFAULT_METHODS), help="comma-separated method names (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="as for a quality run; random:<preset> for shapes without weights")
    p.add_argument("--prompt-tokens", type=_ints, default=(512, 2048, 8192), help="prompt lengths (default: 512,2048,8192)")
    p.add_argument("--decode-tokens", type=_ints, default=(128,), help="tokens generated per request, EOS ignored (default: 128)")
    p.add_argument("--batch-size", type=_ints, default=(1, 8), help="batch sizes (default: 1,8)")
    p.add_argument("--bandwidths", type=_floats, default=(25.0, 100.0, 400.0), help="link bandwidths in Gbit/s (default: 25,100,400)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per workload (default: 1)")
    p.add_argument("--repeats", type=_positive, default=3, help="measured runs per workload (default: 3)")
    p.add_argument("--plans-from", default=None, help="folder of quality-run records whose disaggregated plans to replay")
    p.add_argument("--decode-mode", type=_csv, default=("eager",),
                   help="decode paths to time: eager (growing cache), static (preallocated, fixed shapes), graph (static "
                        "step captured as a CUDA graph; CUDA only). Comma-separated (default: eager)")
    p.add_argument("--real-transfer", action="store_true",
                   help="also move one handoff per workload between a prefill and a decode process (torch.distributed: "
                        "gloo on CPU, NCCL on GPU), checking the bytes received against the bytes counted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE.OPTION=VALUE", help="method option")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: results/runs/latency-<id>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR"), help="for methods that calibrate (default: $HARNESS_DATA_DIR)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cmd_latency(argv: list[str]) -> int:
    args = latency_parser().parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    _quiet_libraries()
    from harness import pipeline
    from harness.latency_run import LatencyConfig, run_latency
    from harness.models import load_model
    from reports.formats import to_markdown
    from reports.tables import efficiency_table

    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    from harness.latency import DECODE_MODES

    bad = [m for m in args.decode_mode if m not in DECODE_MODES]
    if bad:
        raise UsageError(f"--decode-mode {','.join(bad)}: expected any of {', '.join(DECODE_MODES)}")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    cfg = LatencyConfig(model=args.model, methods=args.methods, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                        batch_sizes=args.batch_size, bandwidths_gbit=args.bandwidths, warmup=args.warmup, repeats=args.repeats,
                        seed=args.seed, device=args.device, dtype=args.dtype, data_dir=data_dir, plans_from=args.plans_from,
                        real_transfer=args.real_transfer, decode_modes=args.decode_mode,
                        overrides=tuple(args.overrides))
    prepared = pipeline.prepare(RunConfig(methods=cfg.methods, tasks=(), seed=cfg.seed, data_dir=data_dir,
                                          overrides=cfg.overrides), need_data=cfg.plans_from is None)
    out = args.out or Path("results") / "runs" / f"latency-{cfg.run_id()}"
    loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.seed)
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    records = run_latency(cfg, prepared, out, loaded, say)
    print(to_markdown(efficiency_table(records, 100.0 if 100.0 in cfg.bandwidths_gbit else cfg.bandwidths_gbit[0])))
    print(f"\nclock: {records[0].extra.get('clock')}; records and summary.csv in {out}")
    return 0


def report_parser() -> argparse.ArgumentParser:
    from reports.collect import CONVENTIONS

    p = argparse.ArgumentParser(
        prog="python -m harness report",
        description="Render stored run records as paper-style tables (Markdown, LaTeX booktabs, CSV), plots (PNG, SVG) "
        "and one self-contained HTML report. Reads records only: no model, no torch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness report results/issue3/default results/issue4/cpu_smollm2 --out reports/out\n"
        "  python -m harness report results/runs/RUN --metric-convention acc --bandwidth 400",
    )
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS_DIR", help="folders (searched recursively) or record files")
    p.add_argument("--out", type=Path, default=Path("reports") / "out", help="output folder (default: reports/out)")
    p.add_argument("--metric-convention", default="paper", metavar="NAME",
                   help=f"metric per task: {', '.join(CONVENTIONS)} (default: paper = acc_norm for HellaSwag, ARC-Challenge, "
                        "OpenBookQA; acc elsewhere)")
    p.add_argument("--bandwidth", type=float, default=100.0, help="link bandwidth in Gbit/s for E2E in the efficiency table (default: 100)")
    p.add_argument("--no-plots", action="store_true", help="tables only (faster)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="only this model's records (its name as the tables show it, or its config name, e.g. smollm2-135m); "
                        "the figures need one model when the records hold several")
    return p


def cmd_report(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    from reports.collect import ReportError
    from reports.render import render_report

    try:
        rep = render_report(args.results, args.out, args.metric_convention, args.bandwidth, plots=not args.no_plots,
                            model=args.model)
    except ReportError as e:
        raise UsageError(str(e)) from None
    print(rep.markdown)
    for m in rep.missing:
        print(f"note: {m}", file=sys.stderr)
    print(f"tables in {args.out / 'tables'} (md, tex, csv); {len(rep.figures)} figures in {args.out / 'figures'}; "
          f"HTML: {args.out / 'report.html'}", file=sys.stderr)
    return 0


def check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness check",
        description="Regression check: rerun the CI spec and compare with reference records. Fails (exit 1) when KV bytes "
        "differ at all, a score moves by more than max(3 × stderr, 0.5 points), a plan's layer sets change, or latency "
        "regresses beyond --latency-tolerance on the same hardware.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness check --against results/reference\n"
        "  python -m harness check --against results/reference --update     # refresh the references on purpose",
    )
    p.add_argument("--against", type=Path, required=True, metavar="REF_DIR", help="reference records, e.g. results/reference")
    p.add_argument("--spec", type=Path, default=Path("configs") / "ci.toml", help="spec to rerun (default: configs/ci.toml)")
    p.add_argument("--current", type=Path, default=None, metavar="DIR",
                   help="compare these records instead of rerunning (e.g. a rerun made earlier)")
    p.add_argument("--out", type=Path, default=None, help="where the rerun writes (default: results/runs/check-<time>)")
    p.add_argument("--latency-tolerance", type=float, default=0.5,
                   help="allowed slowdown of TTFT/TPOT p50 on the same hardware, as a fraction (default: 0.5 = 1.5×)")
    p.add_argument("--update", action="store_true", help="replace the references with the rerun's records (on purpose only)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cmd_check(argv: list[str]) -> int:
    import shutil

    from harness.regress import check
    from harness.spec import load_spec, run_spec

    args = check_parser().parse_args(argv)
    if args.latency_tolerance < 0:
        raise UsageError(f"--latency-tolerance {args.latency_tolerance}: must be >= 0")
    if not args.update and not args.against.is_dir():
        raise UsageError(f"--against {args.against}: no such folder of reference records "
                         f"(create it with: python -m harness check --against {args.against} --update)")
    current = args.current
    if current is None:
        spec = load_spec(args.spec)
        current = args.out or Path("results") / "runs" / f"check-{time.strftime('%Y%m%d-%H%M%S')}"
        q = ["-q"] if args.quiet else []
        commands = {"run": lambda a: cmd_run([*a, *q]), "latency": lambda a: cmd_latency([*a, *q])}
        rc = run_spec(spec, commands, outs={"run": current / "quality", "latency": current / "latency"})
        if rc != 0:
            return rc
    elif not current.is_dir():
        raise UsageError(f"--current {current}: no such folder")
    if args.update:
        if args.against.exists():
            shutil.rmtree(args.against)
        for sub in sorted(p for p in current.iterdir() if p.is_dir()):
            shutil.copytree(sub, args.against / sub.name, ignore=shutil.ignore_patterns(".*", "*.partial.json"))
        print(f"references refreshed: {args.against} now holds the records of {current}")
        return 0
    res = check(args.against, current, args.latency_tolerance)
    for line in res.failures:
        print(f"FAIL  {line}")
    for line in res.notes:
        print(f"note  {line}")
    verdict = "passed" if res.ok else f"FAILED ({len(res.failures)} difference(s))"
    print(f"regression check {verdict}: {res.compared} record(s) of {current} compared with {args.against}")
    return 0 if res.ok else 1


def cmd_config(argv: list[str]) -> int:
    """`python -m harness --config configs/<table>.toml`: run what the spec needs, then render it."""
    from harness.spec import load_spec, run_spec

    quiet = [a for a in argv if a in ("-q", "--quiet")]
    rest = [a for a in argv if a not in quiet]
    if len(rest) != 2 or rest[0] != "--config":
        raise UsageError("with --config, every option comes from the spec file (only -q may be added): "
                         "python -m harness --config configs/<table>.toml")
    commands = dict(COMMANDS)
    if quiet:
        commands.update(run=lambda a: cmd_run([*a, "-q"]), latency=lambda a: cmd_latency([*a, "-q"]))
    return run_spec(load_spec(rest[1]), commands)


def cmd_sweep(argv: list[str]) -> int:
    from harness.sweep import main as sweep_main

    return sweep_main(argv)


def cmd_export(argv: list[str]) -> int:
    from harness.export import main as export_main

    return export_main(argv)


COMMANDS = {"run": cmd_run, "latency": cmd_latency, "report": cmd_report, "check": cmd_check, "sweep": cmd_sweep,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command == "run" and any(a == "--config" or a.startswith("--config=") for a in argv):
        command, argv = "config", [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    try:
        if command == "config":
            return cmd_config(argv)
        return COMMANDS[command](argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        sys.stderr.close()
        return 0
