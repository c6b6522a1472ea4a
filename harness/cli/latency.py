"""`python -m harness latency`: time each method's plan per workload (TTFT, ITL, handoff, transfer)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from harness.cli.flags import (
    DTYPE_HELP,
    Parser,
    csv_list,
    device_arg,
    dtype_arg,
    env_path,
    float_list,
    int_list,
    model_arg,
    need_records_folder,
    nonneg_int,
    path_arg,
    positive_int,
    seed_arg,
    user_dir,
)
from harness.cli.run import default_out, placement_flags
from harness.config import DEFAULT_METHODS, RunConfig
from harness.errors import RoundsInterrupted, UsageError
from harness.run.quiet import quiet_libraries
from harness.store.records import check_writable


def latency_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m harness latency",
        description="Per-stage latency of each method's plan in a PD deployment: TTFT (prefill + first token), "
        "ITL samples and TPOT (each decode step timed), handoff time, KV bytes sent (exact and 16-token pages), "
        "modelled transfer time per link bandwidth, and E2E = TTFT + transfer + (n-1)·TPOT. CUDA events on GPU (a model spread over "
        "several GPUs by --device-map: the host's clock between synchronisations of all of them), a monotonic clock on "
        "CPU (recorded as such).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness latency --methods unpruned,shortgpt --model random:llama3-8b "
        "--prompt-tokens 2048 --decode-tokens 128 --batch-size 1 --out DIR\n"
        "  python -m harness latency --methods unpruned,shortgpt,pdtrim --plans-from results/runs/RUN --prompt-tokens 512,2048",
    )
    p.add_argument("--methods", type=csv_list, default=",".join(DEFAULT_METHODS), help="comma-separated method names (default: %(default)s)")
    p.add_argument("--model", type=model_arg, default="smollm2-135m", help="as for a quality run; random:<preset> for shapes without weights")
    p.add_argument("--model-args", "--model_args", dest="model_args", default=None, metavar="KEY=VALUE,...",
                   help="from_pretrained options, as for a quality run (e.g. revision=v1.0,trust_remote_code=true); "
                        "recorded, and part of the record's identity when given")
    p.add_argument("--prompt-tokens", type=int_list, default=(512, 2048, 8192), help="prompt lengths (default: 512,2048,8192)")
    p.add_argument("--decode-tokens", type=int_list, default=(128,), help="tokens generated per request, EOS ignored (default: 128)")
    p.add_argument("--batch-size", type=int_list, default=(1, 8), help="batch sizes (default: 1,8)")
    p.add_argument("--bandwidths", type=float_list, default=(25.0, 100.0, 400.0), help="link bandwidths in Gbit/s (default: 25,100,400)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="unmeasured runs per workload (default: 1)")
    p.add_argument("--repeats", type=positive_int, default=3, help="measured runs per workload (default: 3)")
    p.add_argument("--plans-from", type=path_arg, default=None, help="folder of quality-run records whose disaggregated plans to replay")
    p.add_argument("--decode-mode", type=csv_list, default=("eager",),
                   help="decode paths to time: eager (growing cache), static (preallocated, fixed shapes), graph (static "
                        "step captured as a CUDA graph; CUDA only, not with --device-map). Comma-separated (default: eager)")
    p.add_argument("--real-transfer", action="store_true",
                   help="also move one handoff per workload between a prefill and a decode process (gloo on CPU; on GPU "
                        "NCCL across two GPUs, CUDA IPC on one), checking the bytes received against the bytes counted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE.OPTION=VALUE", help="method option")
    p.add_argument("--out", type=user_dir, default=None, help="output folder (default: results/runs/<date>_<methods>_latency-<run id>, "
                                                                   "under the current folder)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed for the random prompt tokens, random:<preset> weights and calibration sampling (default: 0)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", type=dtype_arg, default="auto", help=DTYPE_HELP)
    p.add_argument("--data-dir", type=path_arg, default=env_path("HARNESS_DATA_DIR"),
                   help="for methods that calibrate (default: $HARNESS_DATA_DIR)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    placement_flags(p)  # a model larger than one GPU: timed by the host's clock between synchronisations of every GPU
    return p


def check_latency_args(args: argparse.Namespace, decode_modes: tuple[str, ...]) -> None:
    """What argparse's types cannot see, before any model work (UsageError: exit 2); method names and
    options are `pipeline.prepare`'s to check."""
    from harness.pd.models import resolve_device

    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    for flag in ("methods", "prompt_tokens", "decode_tokens", "batch_size", "bandwidths", "decode_mode"):
        values = list(getattr(args, flag))  # a repeat would measure a workload twice under one record's n_samples
        if len(values) != len(set(values)):
            raise UsageError(f"--{flag.replace('_', '-')} {','.join(map(str, values))}: "
                             f"{next(v for v in values if values.count(v) > 1)} is given twice; give each value once")
    bad = [m for m in args.decode_mode if m not in decode_modes]
    if bad or not args.decode_mode:
        raise UsageError(f"--decode-mode {','.join(bad) or repr('')}: expected any of {', '.join(decode_modes)}")
    from harness.pd.models import Placement

    Placement.parse(args.device_map, args.max_memory, args.offload_folder)  # a bad --device-map / --max-memory: exit 2 now
    if args.device_map and "graph" in args.decode_mode:
        raise UsageError("--decode-mode graph with --device-map: a CUDA graph captures one GPU's stream, and the model "
                         "would be spread over several; use eager or static (or no --device-map)")
    device = resolve_device(args.device) if "graph" in args.decode_mode else None
    if device is not None and device.type != "cuda":
        raise UsageError(f"--decode-mode graph: CUDA graphs need a CUDA device, this run is on {device}; use eager or static there")


# the rounds interleave the plans so that every plan's repeats sample the same load (harness/run/latency_run.py)
INTERRUPTED_ROUNDS = ("latency: a method's record is written when all --repeats rounds are measured, and the rounds "
                      "interleave the methods, so the rounds measured so far are not kept (records of methods reused "
                      "from --out are); for a shorter run give fewer --repeats, workloads or methods")


def cmd_latency(argv: list[str] | argparse.Namespace) -> int:
    args = argv if isinstance(argv, argparse.Namespace) else latency_parser().parse_args(argv)  # a spec section: options
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    quiet_libraries()
    from harness.latency import figures
    from harness.latency.measure import DECODE_MODES
    from harness.run import pipeline
    from harness.run.latency_run import refuse_edited_plugins

    check_latency_args(args, DECODE_MODES)
    cfg, model_args = _latency_config(args)
    prepared = pipeline.prepare(RunConfig(methods=cfg.methods, tasks=(), seed=cfg.seed, data_dir=cfg.data_dir,
                                          overrides=cfg.overrides), need_data=cfg.plans_from is None)
    need_records_folder(args.plans_from, "--plans-from")
    # two checks, each for one case: without --plans-from every calibrating method needs the folder, refused here before
    # --out, the lock and the config; with it, only a method whose plan is not replayed, known once `_measured` has
    # matched the records against the config's depth (a None here defers to that second call)
    _need_data_dir(cfg.data_dir, prepared.methods, {} if cfg.plans_from is None else None)
    figures.check(cfg.bandwidths_gbit)  # a plug-in figure that fails does so now, not after the measuring
    out = args.out or default_out(cfg, kind="latency-")
    check_writable(out, "--out")  # a bad --out fails before the model loads, not after
    refuse_edited_plugins(Path(out), prepared.methods)
    records, failures = _measured(cfg, model_args, prepared, out)
    if records:
        _print_tables(records, cfg.bandwidths_gbit, out)
    return _failed(failures, len(prepared.methods), len(records)) if failures else 0


def _latency_config(args: argparse.Namespace):
    """(LatencyConfig, the parsed --model-args) of checked options; a bad --model-args key: exit 2 before any model work."""
    from harness.pd.models import model_args_text, parse_model_args
    from harness.run.latency_run import LatencyConfig

    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    model_args = parse_model_args(args.model_args)
    cfg = LatencyConfig(model=args.model, model_args=model_args_text(model_args), methods=args.methods,
                        prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                        batch_sizes=args.batch_size, bandwidths_gbit=args.bandwidths, warmup=args.warmup, repeats=args.repeats,
                        seed=args.seed, device=args.device, dtype=args.dtype, data_dir=data_dir, plans_from=args.plans_from,
                        real_transfer=args.real_transfer, decode_modes=args.decode_mode,
                        overrides=tuple(args.overrides), device_map=args.device_map, max_memory=args.max_memory,
                        offload_folder=str(Path(args.offload_folder).resolve()) if args.offload_folder else None)
    return cfg, model_args


def _measured(cfg, model_args: dict, prepared, out) -> tuple[list, list]:
    """(the records, the plug-in failures) of measuring every method under `out`'s lock: what the config rules out is
    refused before the weights load."""
    from harness.pd.models import load_model, model_config
    from harness.run.latency_plans import plans_to_time
    from harness.run.latency_run import run_latency
    from harness.run.plugin_faults import PluginsFailed
    from harness.run.task_check import model_before_load
    from harness.store import lock

    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    with lock.hold(out):  # one writer per folder
        try:
            # before the weights load: an architecture refused, a method unfit for it, counts too deep
            config = model_config(cfg.model, model_args)  # read once (for a hub id, one probe of the hub)
            depth = model_before_load(cfg.model, model_args, prepared.methods, config=config)
            _refuse_unfit_workloads(cfg, config)
            replay = plans_to_time(cfg.plans_from, depth, prepared.methods) if depth is not None else None
            _need_data_dir(cfg.data_dir, prepared.methods, replay if cfg.plans_from else None)  # --plans-from: not replayed
            loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.seed, placement=cfg.placement(), model_args=model_args)
            return run_latency(cfg, prepared, out, loaded, say, replay), []
        except RoundsInterrupted:  # not while the model loads or a method plans: no round had measured anything then
            print(INTERRUPTED_ROUNDS, file=sys.stderr)
            raise
        except PluginsFailed as e:  # the other plans are measured and recorded
            return e.records, e.failures


def _refuse_unfit_workloads(cfg, config) -> None:
    """UsageError (exit 2) for a workload whose prefill cannot fit in the memory free, from the model's `config` alone
    (`harness.latency.memory`): a huge --prompt-tokens ended in the allocator's error after the weights loaded."""
    from harness.latency.memory import refuse_unfit
    from harness.pd.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    text = config.get_text_config()  # the decoder run, as model_before_load reads it
    refuse_unfit(text, cfg.workloads(), resolve_dtype(cfg.dtype, device), device, spread=cfg.device_map is not None)


def _print_tables(records: list, bandwidths_gbit: tuple[float, ...], out) -> None:
    """The efficiency table at 100 Gbit/s (else the first bandwidth given), the plug-in figures, the clock."""
    from reports.efficiency import efficiency_table
    from reports.formats import to_markdown
    from reports.latency_figures import figures_table

    print(to_markdown(efficiency_table(records, 100.0 if 100.0 in bandwidths_gbit else bandwidths_gbit[0])))
    if not (extra := figures_table(records)).empty:  # plug-in figures: shown where they are made, too
        print("\n" + to_markdown(extra))
    print(f"\nclock: {records[0].extra.get('clock')}; records and summary.csv in {out}")


def _need_data_dir(data_dir: str | None, methods: dict, replayed: dict | None) -> None:
    """A UsageError when `data_dir` is no folder and a method calibrates here, i.e. is not in `replayed` (the plans
    --plans-from gives; None: not known before the weights load, so left to the calibration): it said "piqa/valid.jsonl:
    unreadable (Not a directory)". A replayed plan needs no data: a machine without it times replayed plans."""
    if not data_dir or Path(data_dir).is_dir() or replayed is None:
        return
    if any(m.needs_calibration for name, m in methods.items() if name not in replayed):
        raise UsageError(f"--data-dir {data_dir}: no such directory (expected a folder laid out like ../shared/data, "
                         "which the methods that calibrate read)")


def _failed(failures: list, n_methods: int, n_records: int) -> int:
    """Say which plug-ins failed, one line each; the exit status: 2 when each was the harness's check of what a
    plug-in returned (fix it), 1 when a plug-in raised."""
    figures = "; a failed figure is computed from the samples its record keeps" if any(f.figure for f in failures) else ""
    print(f"\n{len(failures)} plug-in failure(s); {n_records} of {n_methods} methods recorded (fix the plug-in, then "
          f"rerun the same command: finished records are reused{figures}):", file=sys.stderr)
    for f in failures:
        print(f"error: {f.line()}", file=sys.stderr)
    return 2 if all(f.bad_input for f in failures) else 1
