"""`python -m harness export`: arguments, the plan's source (a record, a run folder or a method),
and the printout; writing the checkpoints is `harness.run.export`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from harness.cli.export_out import check_out_is_not_cwd, mark, prepare_out, swap_in
from harness.cli.flags import DTYPE_HELP, Parser, device_arg, dtype_arg, env_path, model_arg, path_arg, seed_arg, user_dir
from harness.config import SWEEP_MARK, sweep_base
from harness.errors import UsageError
from harness.run.export import export_plan
from harness.run.reuse import candidates
from harness.store.records import check_writable, refuse_dangling_link

MODES = ("unified", "disaggregated")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m harness export",
        description="Write a method's pruned model as Hugging Face checkpoints (config, renumbered layers, tokenizer) "
        "that from_pretrained and serving engines such as vLLM load. A unified plan gives one checkpoint in OUT; a "
        "disaggregated plan gives OUT/prefill, OUT/decode and OUT/manifest.json, which maps each decode layer to the "
        "prefill layer whose KV it reads and states the KV policy (format: harness/run/export.py, docs/export.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m harness export --method shortgpt --set shortgpt.k=8 --out exports/shortgpt-k8\n"
        "  python -m harness export --method pdtrim --mode disaggregated --plans-from results/issue3/default --out exports/pdtrim\n"
        "  python -m harness export --record results/issue3/default/pdtrim__disaggregated.json --out exports/pdtrim\n"
        "  python -m harness export --method manual --mode disaggregated --set manual.prefill_layers=0,1,2,3 "
        "--set manual.decode_layers=0,3 --model random:tiny --out /tmp/pd-tiny\n\n"
        "load: AutoModelForCausalLM.from_pretrained(OUT) (or OUT/prefill, OUT/decode); vllm serve OUT",
    )
    p.add_argument("--method", default=None,
                   help="method name (python -m harness --help lists them); with --record, optional (must match the record)")
    p.add_argument("--model", type=model_arg, default=None,
                   help="as for a quality run (default: the record's model with --record/--plans-from, else smollm2-135m)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="plan for this PD setting (default: the record's with --record, else unified)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE.OPTION=VALUE",
                   help="method or calibration option, e.g. shortgpt.k=8, calib.n_samples=64 (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--plans-from", type=user_dir, default=None, metavar="RUN_DIR",
                     help="replay the plan stored in RUN_DIR/<method>__<mode>.json instead of planning")
    src.add_argument("--record", type=user_dir, default=None, metavar="FILE",
                     help="replay the plan of this run record (method, mode, model and seed come from it)")
    p.add_argument("--out", type=user_dir, required=True, help="output folder (must be new or empty; see --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds a previous export")
    p.add_argument("--seed", type=seed_arg, default=None, help="seed for random models and calibration (default: the record's, else 0)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", type=dtype_arg, default="auto",
                   help=f"weights are loaded, planned and written in this dtype: {DTYPE_HELP}")
    p.add_argument("--data-dir", type=path_arg, default=env_path("HARNESS_DATA_DIR"),
                   help="calibration data for methods that calibrate (default: $HARNESS_DATA_DIR)")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB",
                   help="largest safetensors file: a number and TB, GB, MB or KB (default: 5GB)")
    return p


def shard_size(s: str) -> str:
    """`--max-shard-size`, checked before any model work: what save_pretrained accepts (huggingface_hub's
    parse_size_to_int: a positive number, then TB, GB, MB or KB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(TB|GB|MB|KB)\s*", s, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size with a unit TB, GB, MB or KB (e.g. 5GB, 500MB), got {s!r}")
    return s


@dataclasses.dataclass
class Source:
    """What to export: method name, mode, model, seed, and the stored record to replay (if any)."""

    method: str
    mode: str
    model: str
    seed: int
    record: Any = None  # harness.store.records.RunRecord
    record_path: Path | None = None


def stored_model_path(record) -> str:
    """The model a record was made with, as loadable from any folder: a model folder or GGUF file given by a
    relative path is stored as typed in `config.model` but resolved in the record's model description. A packaged
    model (the default, `smollm2-135m`) is its name: the file lies in whichever environment loads it."""
    return str(record.model_location() or record.config.get("model"))


def _resolved(model: str) -> str:
    return str(Path(model).resolve()) if Path(model).exists() else model


def resolve_source(args: argparse.Namespace) -> Source:
    """Method, mode, model and seed from the flags and the record, checked against each other."""
    from harness.store import records as rec

    path = None
    if args.record is not None:
        path = args.record
        if not path.is_file():
            raise UsageError(f"--record {path}: no such file (expected a run record <method>__<mode>.json)")
    elif args.plans_from is not None:
        if not args.plans_from.is_dir():
            raise UsageError(f"--plans-from {args.plans_from}: not a folder of run records")
        if not args.method:
            raise UsageError("--plans-from needs --method (and --mode, default unified) to pick a record")
        path = args.plans_from / rec.record_filename(args.method, args.mode or "unified")
        if not path.is_file():
            raise UsageError(_no_record(args.plans_from, args.method, args.mode or "unified", args.overrides))
    if path is None:
        if not args.method:
            raise UsageError("give --method NAME (or --record FILE / --plans-from RUN_DIR to replay a stored plan)")
        return Source(args.method, args.mode or "unified", args.model or "smollm2-135m", 0 if args.seed is None else args.seed)
    try:
        record = rec.load(path)
    except ValueError as e:
        raise UsageError(f"{path}: not a readable run record ({e})") from None
    stored_model, stored_seed = stored_model_path(record), record.config.get("seed", 0)
    clashes = [(flag, given, stored) for flag, given, stored in
               (("--method", args.method, record.method), ("--mode", args.mode, record.mode),
                ("--model", args.model, stored_model), ("--seed", args.seed, stored_seed))
               if given is not None and given != stored and not (flag == "--method" and given == sweep_base(stored))
               and not (flag == "--model" and (given == record.config.get("model") or _resolved(given) == stored))]
    if clashes:
        flag, given, stored = clashes[0]
        raise UsageError(f"{path} holds a plan made with {flag} {stored}, not {given}; pass {flag} {stored} (or omit "
                         f"{flag}) to export it, or plan afresh without --record/--plans-from")
    if record.mode not in MODES:
        raise UsageError(f"{path}: a {record.mode!r} record (latency?); export replays quality-run records "
                         f"({', '.join(MODES)})")
    return Source(record.method, record.mode, stored_model, stored_seed, record, path)


def _no_record(folder: Path, method: str, mode: str, overrides: list[str] = ()) -> str:
    """Why `folder` has no record of (method, mode) to replay: its cell failed or did not finish there, or was never
    run; and the records it has (failure notes and resume states are not records)."""
    from harness.store import records as rec

    have = sorted(p.name for p in folder.glob("*__*.json") if rec.is_record_file(p))
    why = ""
    if (folder / rec.failure_filename(method, mode)).is_file():
        why = f" (that cell failed there: {folder / rec.failure_filename(method, mode)}; rerun it to make its plan)"
    elif (folder / rec.partial_filename(method, mode)).is_file():
        why = " (that cell did not finish there: rerun its command to finish it)"
    variants = [p.name[:-len(f"__{mode}.json")] for p in candidates(folder, method, mode) if rec.is_record_file(p)]
    if variants and not why:  # a sweep's folder: its records are named by variant, not by the method
        why = (f" (a sweep's variants of {method} are there: {', '.join(variants)}; pass one as --method, e.g. "
               f"--method '{_variant_of(variants, method, overrides)}')")
    return (f"--plans-from {folder}: no record {rec.record_filename(method, mode)}{why}; "
            f"records there: {', '.join(have) or 'none'}")


def _variant_of(variants: list[str], method: str, overrides) -> str:
    """The first variant (`shortgpt@k=8`) whose swept options agree with every `--set METHOD.OPTION=VALUE` given for
    them (an option the --set leaves out agrees), else the first: the example a refusal gives for `--method shortgpt
    --set shortgpt.k=8`, or for `--set pdtrim.k_decode=6` among `pdtrim@k_prefill=2,k_decode=4` and `...,k_decode=6`."""
    given = {}
    for o in overrides:  # spelled as `split_overrides` reads them: SCOPE.OPTION=VALUE, spaces around each part dropped
        key, eq, raw = o.partition("=")
        scope, dot, name = key.strip().partition(".")
        if eq and dot and scope == method:
            given[name.strip()] = raw.strip()
    for v in variants:
        swept = (item.partition("=") for item in v.split(SWEEP_MARK, 1)[1].split(","))
        if all(given.get(k, x) == x for k, _, x in swept):
            return v
    return variants[0]


def method_for(source: Source, args: argparse.Namespace, data_dir: str | None):
    """(method instance, calibration options) validated like a run's; with a record, its stored options
    (a depth sweep's record, `tail@k=2__unified.json`, is its method's with the options it stores)."""
    from harness.config import RunConfig
    from harness.run import pipeline

    name = sweep_base(source.method) if source.record is not None else source.method
    sets_method = any(o.split("=", 1)[0].split(".", 1)[0] == name for o in args.overrides)
    try:
        prepared = pipeline.prepare(RunConfig(model=source.model, methods=(name,), tasks=(), seed=source.seed,
                                              data_dir=data_dir, overrides=tuple(args.overrides)), need_data=source.record is None)
    except UsageError as e:  # today's defaults with --set: not what the record's plan was made with, whatever it says
        if source.record is None or not sets_method:
            raise
        raise UsageError(f"--set {name}.*: differs from the options the record's plan was made with "
                         f"({source.record.config.get('method_options', {})}); drop --set or plan afresh without "
                         f"--record/--plans-from (with today's other defaults it does not build: {e})") from None
    if source.record is None:
        return prepared.methods[source.method], prepared.calib_config
    method = prepared.methods[name]
    cls = type(method)
    stored = source.record.config.get("method_options", {})
    known = {f.name for f in dataclasses.fields(cls.Config)}
    if set(stored) - known:
        raise UsageError(f"{source.record_path}: option(s) {sorted(set(stored) - known)} of the record are not options of "
                         f"{name} in this harness; plan afresh without --record/--plans-from")
    from harness.run.reuse import other_code, with_defaults

    try:  # an option the record leaves out at what it meant then (a KV policy's dict default), not today's default
        replayed = cls(dataclasses.replace(cls.Config(), **{k: tuple(v) if isinstance(v, list) else v
                                                            for k, v in with_defaults(method, stored).items()}))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source.record_path}: its method options do not build a {name}: {e}") from None
    if sets_method and json.loads(json.dumps(method.options())) != json.loads(json.dumps(replayed.options())):
        raise UsageError(f"--set {name}.*: differs from the options the record's plan was made with "
                         f"({replayed.options()}); drop --set or plan afresh without --record/--plans-from"
                         f"{_variant_with(source, method)}")
    if edited := other_code(source.record, replayed):  # a plug-in's plan as its older code made it
        raise UsageError(f"{source.record_path}: its plan was made by other code of plug-in method {name} "
                         f"({', '.join(edited)} changed since); export it without --record/--plans-from so it plans afresh")
    if replayed.needs_replan_on_resume():
        raise UsageError(f"{name} with these options installs trained weights (healed blocks or a replacement "
                         "network) that run records do not store; export it without --record/--plans-from so it plans "
                         "and trains afresh")
    return replayed, prepared.calib_config


def _variant_with(source: Source, method) -> str:
    """'; FOLDER/tail@k=2__unified.json was made with them: pass --record ...' for a record beside the replayed one,
    of the same method and mode (a sweep's variant, `tail@k=2` for `--set tail.k=2`), whose options are `method`'s;
    else ''. Compared as a quality run's --plans-from compares them (`reuse.options_then`); an unreadable one is passed
    over."""
    from harness.run.reuse import options_then, with_defaults
    from harness.store import records as rec

    want = with_defaults(method, method.options())
    for path in sorted(source.record_path.parent.glob(f"*__{source.mode}.json")):
        if path == source.record_path or not rec.is_record_file(path) or \
                sweep_base(path.name[: -len(f"__{source.mode}.json")]) != method.name:
            continue
        try:
            if options_then(method, rec.load(path)) == want:
                return f"; {path} was made with them: pass --record {path}"
        except rec.RecordError:
            continue
    return ""


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from harness.run.quiet import quiet_libraries

    quiet_libraries()
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    source = resolve_source(args)
    method, calib_config = method_for(source, args, data_dir)
    check_out_is_not_cwd(args.out)
    refuse_dangling_link(args.out, "--out")  # else the link's target was made, with its parents, and written into
    from harness.store import lock

    # one export into `out` at a time (they share the temporary folder)
    with lock.hold_beside(args.out, what=f"{lock.REPLACED}, or choose another --out"):
        return _export(args, source, method, calib_config, data_dir)


def _export(args: argparse.Namespace, source: Source, method, calib_config, data_dir: str | None) -> int:
    """Plan (or replay), write the checkpoints beside `--out`, mark them, swap them in; print what was written."""
    tmp = prepare_out(args.out, args.force)  # before any model work: bad --out fails fast
    check_writable(tmp.parent, "--out")  # the export is written beside --out: that folder must take files

    from harness.pd import arch
    from harness.pd.models import load_model, parse_model_args
    from harness.run.checkpoint import layer_reference
    from harness.run.task_check import refuse_before_load
    from methods.plugin_code import plugin_code, policy_code

    t0 = time.perf_counter()
    # a replayed record's model as the run loaded it: its --model_args (e.g. a hub model's revision) too
    model_args = parse_model_args(source.record.config.get("model_args")) if source.record is not None else {}
    # as run and latency do: a family the engine refuses, or counts too deep, exit 2 before the weights' minutes
    refuse_before_load(source.model, model_args, {source.method: method}, (source.mode,))
    loaded = load_model(source.model, args.device, args.dtype, source.seed, model_args=model_args)
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"model {source.model} loaded ({arch.n_layers(loaded.model)} layers)")
    layer_reference(loaded.model)  # a model whose layers no pruned config describes: refused before the planning
    plan, calib = _plan_to_export(source, method, calib_config, loaded, data_dir, say)
    if source.mode == "unified" and not plan.is_unified:
        raise UsageError(f"{source.method} made a plan with two layer sets or KV pruning for unified mode; export it with "
                         "--mode disaggregated")
    meta = {"mode": source.mode, "method_options": method.options(),
            "calibration": calib.description if calib is not None else (source.record.calibration if source.record else None),
            "plan_replayed_from": str(source.record_path.resolve()) if source.record_path else None,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            # {} for the package's own methods and policies: the git commit names their code
            "plugin_code": {**plugin_code(method), **policy_code(plan.to_dict())}}
    t_write = time.perf_counter()
    try:
        info = export_plan(loaded, method, plan, tmp, meta, args.max_shard_size)
        mark(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, args.out)  # the empty folder, or the previous export under --force, replaced in one step
    written = time.perf_counter() - t_write
    _print_checkpoints(args.out, info, plan.n_layers)
    print(f"exported {source.method}/{source.mode} of {source.model} in {written:.1f}s "
          f"(total {time.perf_counter() - t0:.1f}s); load with AutoModelForCausalLM.from_pretrained")
    return 0


def _plan_to_export(source, method, calib_config, loaded, data_dir: str | None, say) -> tuple:
    """(plan, calibration or None): the record's plan replayed, or the method's plan made now."""
    from harness.pd.plan import PruningPlan

    if source.record is not None:
        try:
            plan = PruningPlan.from_dict(source.record.plan)
        except (KeyError, ValueError) as e:
            raise UsageError(f"{source.record_path}: its plan is not valid: {e}") from None
        _refuse_other_model(source, loaded)
        say(f"{source.method}/{source.mode}: plan replayed from {source.record_path}")
        return plan, None
    calib = None
    if method.needs_calibration:
        from harness.quality.calibration import build_calibration

        calib = build_calibration(loaded.tokenizer, Path(data_dir) if data_dir else None, calib_config)
    say(f"{source.method}/{source.mode}: planning")
    return method.make_plan(loaded.model, calib, source.mode), calib


def _refuse_other_model(source: Source, loaded) -> None:
    """A record's plan replayed on other weights (or config, tokenizer) than it was made on, behind the same --model
    path, would label a checkpoint with a plan its method never made for them (a quality run's --plans-from does
    not replay it either). Records older than the digests are replayed as before."""
    import torch

    from harness.run.inputs import VERSION, differences, model_digests

    then = {k: v for k, v in source.record.inputs().items() if k in ("version", "model", "config", "tokenizer")}
    now = {"version": VERSION, **model_digests(loaded)}
    was16 = str((source.record.model or {}).get("dtype") or "") == "float16"  # "" in records that predate it
    if (next(loaded.model.parameters()).dtype == torch.float16) != was16:  # float16's rounding: another digest
        then.pop("model", None)
    if changed := differences(then, now):
        raise UsageError(f"{source.record_path}: its plan was made on another model than {source.model} holds now "
                         f"({'; '.join(changed)}); export it without --record/--plans-from so that it plans afresh")


def _print_checkpoints(out: Path, info: dict, n: int) -> None:
    """One line per written checkpoint (layers kept, source layers, size), and the PD manifest's gist."""
    for name, ck in info["checkpoints"].items():
        where = out if name == "." else out / name
        inserted = sum(1 for x in ck["layers"] if x is None)
        extra = f" + {inserted} replacement layer(s)" if inserted else ""
        print(f"{where}: {len(ck['layers']) - inserted} of {n} layers{extra}, source layers "
              f"{[x for x in ck['layers']]}, {_size(ck['bytes'])}")
    if info["kind"] == "disaggregated":
        print(f"{out / 'manifest.json'}: decode layers 0..{len(info['decode_kv_from_prefill']) - 1} read the KV of prefill "
              f"layers {info['decode_kv_from_prefill']}; KV policy: {info['kv_policy']['description']}")
