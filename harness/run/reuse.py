"""Reusing finished work: plans stored by another run (`--plans-from`) and records made before a
method gained options that are now at their defaults (an added option must not invalidate them)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config import DTYPES, LATER_DEFAULTS, RunConfig, sweep_base
from harness.errors import UsageError
from harness.pd.plan import PruningPlan
from harness.run.made_on import differs, other_device, runs_on, spelled_otherwise
from harness.store import records as rec


def stored_plan(cfg: RunConfig, prepared, name: str, mode: str, options: dict,
                calibration: Callable[[], dict] | None = None, inputs: dict | None = None) -> tuple[PruningPlan, Path, Any] | None:
    """The plan of `name`/`mode` in `--plans-from` records, if made on the same model (and `model_args`),
    seed, method options and calibration (plans are deterministic given those); None otherwise. The
    calibration matches by its options and, with `calibration` (this run's description, built on demand),
    by its tokens' digest: the same options on other data (another --data-dir) are another calibration.
    The record of `name` itself is tried first, then those of its sweep siblings (`shortgpt@k=2` for
    `shortgpt` with k=2, and back): the same method, named after option values. With `inputs` (this run's
    `harness.run.inputs.digests`), a record made on other weights behind the same --model path does not match."""
    if not cfg.plans_from or prepared.methods[name].needs_replan_on_resume():
        return None
    for path in candidates(Path(cfg.plans_from), name, mode):
        try:
            old = rec.load(path)
        except rec.RecordError as e:
            if path.name != rec.record_filename(name, mode):
                continue  # a sibling's record that cannot be read is not this cell's to refuse
            raise UsageError(f"--plans-from: {e}; remove that file or pick another run folder") from None
        if old.mode == mode and _made_alike(cfg, prepared, name, options, old, calibration) and \
                not (inputs and _other_weights(old, inputs)):
            return plan_of(old, path), path, old.calibration
    return None


def why_not_reused(cfg: RunConfig, prepared, name: str, mode: str) -> str:
    """Why `stored_plan` found nothing for `name`/`mode` in `cfg.plans_from`, for the run's note."""
    if prepared.methods[name].needs_replan_on_resume():
        return f"{name} plans with trained state no record keeps"
    found = candidates(Path(cfg.plans_from), name, mode)
    if not found:
        return f"no record {rec.record_filename(name, mode)} there"
    try:  # the cell's own record if there is one, else its first sweep sibling: what it was made with
        old = rec.load(found[0])
    except rec.RecordError:
        old = None
    why = old and _difference(cfg, prepared, name, prepared.methods[name].options(), old, None)
    if why:
        return f"{found[0].name} there was made with {why}"
    return "its records there were made with another model, seed, method options, calibration or code"


def _other_weights(old: rec.RunRecord, inputs: dict) -> bool:
    """Whether `old` was planned on other weights than this run's (both fingerprints known and different)."""
    stored = old.inputs()
    then = stored.get("model") if stored.get("version") == inputs.get("version") else None  # one digest algorithm
    return bool(then and inputs.get("model") and then != inputs["model"])


def candidates(folder: Path, name: str, mode: str) -> list[Path]:
    """`name`'s record file in `folder`, then those of the other variants of its method (sweep names), by name."""
    own = folder / rec.record_filename(name, mode)
    siblings = sorted(p for p in folder.glob(f"*__{mode}.json")
                      if p != own and sweep_base(p.name[: -len(f"__{mode}.json")]) == sweep_base(name))
    return ([own] if own.exists() else []) + siblings


def _made_alike(cfg: RunConfig, prepared, name: str, options: dict, old: rec.RunRecord,
                calibration: Callable[[], dict] | None) -> bool:
    """Whether `old`'s plan is what `name` would plan now: model, seed, options and calibration equal."""
    return _difference(cfg, prepared, name, options, old, calibration) is None


def _difference(cfg: RunConfig, prepared, name: str, options: dict, old: rec.RunRecord,
                calibration: Callable[[], dict] | None) -> str | None:
    """What `old`'s plan was made with that `name` would not plan with now, as 'X, not Y' (None: the same model and
    `model_args`, seed, method options, plug-in code and calibration)."""
    method = prepared.methods[name]
    if not _same_model(cfg.model, old):
        return f"--model {old.config.get('model')}, not {cfg.model}"
    if old.config.get("model_args") != cfg.model_args:
        return f"--model-args {old.config.get('model_args')}, not {cfg.model_args}"
    if old.config.get("seed") != cfg.seed:
        return f"--seed {old.config.get('seed')}, not {cfg.seed}"
    then, now = options_then(method, old), with_defaults(method, options)
    if then != now:
        return f"other {name} options ({options_diff(then, now, 'there', 'here')})"
    if edited := other_code(old, method):  # planned by a plug-in's code as it was then
        return f"other code of plug-in {name} ({', '.join(edited)} changed since)"
    calib_now = dataclasses.asdict(prepared.calib_config) if method.needs_calibration else None
    calib_then = {k: (old.calibration or {}).get(k) for k in calib_now} if calib_now else None
    if calib_now and json.loads(json.dumps(calib_now)) != calib_then:
        return f"other calibration options ({options_diff(calib_then, json.loads(json.dumps(calib_now)), 'there', 'here')})"
    digest = (old.calibration or {}).get("token_sha256_16")
    if calib_now and digest and calibration is not None and calibration().get("token_sha256_16") != digest:
        return "the same calibration options on other calibration tokens (another --data-dir)"
    return None


def other_code(old: rec.RunRecord, method) -> list[str]:
    """The plug-in modules whose code differs between the making of `old`'s plan and `method` now, the plug-in KV
    policy its plan names included ([] for the package's own methods, and for records made before code digests)."""
    from methods.plugin_code import changes, plugin_code, with_policy

    stored = old.extra.get("plugin_code") if "plugin_code" in old.extra else \
        ((old.inputs()["code"] or {}).get("methods") or {}).get(old.method, {}) if "code" in old.inputs() else None
    return [] if stored is None else changes(stored, with_policy(stored, plugin_code(method), old.plan))


def _same_model(model: str, old: rec.RunRecord) -> bool:
    """Whether `old` was made with `--model model`: the same text, or the same model folder or GGUF file typed another
    way (`models/m` from one folder, `m` or an absolute path from another: the record keeps the resolved path)."""
    if old.config.get("model") == model:
        return True
    then = old.model_location()
    return bool(then) and Path(model).exists() and str(Path(model).resolve()) == then


def left_out_means(method) -> dict:
    """Option -> the value a record's stored options mean by leaving it out (JSON): its Config default, or the value
    at which `options()` leaves it out (`Method.omitted_defaults`: a KV baseline's policy dict defaults), also where
    the method's own default for new runs differs (pyramidkv's reserve_window: absent = False, the split before it)."""
    defaults = json.loads(json.dumps(dataclasses.asdict(type(method.config)())))
    defaults.update(json.loads(json.dumps(method.omitted_defaults())))
    return defaults


def with_defaults(method, options: dict) -> dict:
    """`options` as stored in a record (JSON), with every option it leaves out at its Config default: options
    added to a method since a record was made, and a KV baseline's policy options at their dict defaults
    (`KVBaseline.options` leaves those out), so both sides of a comparison say the same thing the same way. An option
    left out means its dict default even where the method's own default differs (`KVPolicy.method_defaults`)."""
    defaults = left_out_means(method)
    stored = json.loads(json.dumps(options))
    return {**{k: v for k, v in defaults.items() if k not in stored}, **stored}


def options_diff(then: dict, now: dict, then_is: str, now_is: str) -> str:
    """'k=1 there, 2 here' for the options that differ (`then_is`/`now_is` name the two sides)."""
    return ", ".join(f"{k}={then.get(k)!r} {then_is}, {now.get(k)!r} {now_is}" for k in sorted(set(then) | set(now))
                     if then.get(k) != now.get(k))


def options_then(method, old: rec.RunRecord) -> dict:
    """The method options `old` was made with, comparable with `with_defaults(method, method.options())`."""
    return with_defaults(method, old.config.get("method_options", {}))


def fit_to_model(plan: PruningPlan, path: Path, n_layers: int) -> PruningPlan:
    """`plan` (reused from `path`) when it is for a model of `n_layers` layers, else a UsageError naming the file:
    a hand-edited `n_layers` failed the cell as a crash (exit 1), or a huge one hung listing the removed layers."""
    if plan.n_layers != n_layers:
        raise UsageError(f"--plans-from {path}: its plan is for a {plan.n_layers}-layer model, this model has "
                         f"{n_layers} layers; remove that record or pick another run folder")
    return plan


def plan_of(record: rec.RunRecord, path: Path) -> PruningPlan:
    """The plan stored in a --plans-from record, or a UsageError naming the file."""
    try:
        return PruningPlan.from_dict(record.plan)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--plans-from {path}: its plan is not valid ({type(e).__name__}: {e}); "
                         "remove that record or pick another run folder") from None


def same_but_newer_options(cfg: RunConfig, method, old: rec.RunRecord, cell: tuple) -> bool:
    """True when `old` was made by this configuration before some method options existed and
    those options are now at their defaults (an added option must not invalidate finished work)."""
    name, mode, calib_desc, task_opts = cell
    then = old.config.get("method_options", {})
    now = json.loads(json.dumps(method.options()))
    defaults = left_out_means(method)  # an option absent from `then` meant this, not a newer default of the method
    added = set(now) - set(then)
    if not added or any(now[k] != defaults.get(k) for k in added) or any(now.get(k) != v for k, v in then.items()):
        return False
    return cfg.identity(name, mode, then, calib_desc, task_opts) == old.run_key


def foreign(cfg: RunConfig, method, old: rec.RunRecord, key: str, cell: tuple) -> bool:
    """Whether the finished record `old` of a cell whose run key is now `key` belongs to another configuration."""
    return kinship(cfg, method, old, key, cell) is None


def kinship(cfg: RunConfig, method, old: rec.RunRecord, key: str, cell: tuple) -> str | None:
    """How `old` is the record of the cell `cell` = (name, mode, calibration, task options) whose run key is now
    `key`: "same", "older options" (made before some method options existed, now at their defaults), "relocated"
    (made with the same inputs behind other paths, `relocated`), or None: another configuration."""
    name, mode, calib_desc, task_opts = cell
    if other_device(cfg, old):  # `--device auto` on a CPU there and a GPU here: one run key, other scores
        return None
    then = relocated(cfg, old.config.get("data_dir"), old, old.config.get("include_path"))
    spelled = [*dtype_spelled_before(cfg), *spelled_otherwise(cfg, old)]  # `--device cpu` there, `auto` here: the same
    for c, how in ((cfg, "same"), (then, "relocated"), *((c, "same") for c in spelled)):
        if c is None:
            continue
        if old.run_key == (key if c is cfg else c.identity(name, mode, method.options(), calib_desc, task_opts)):
            return how
        if same_but_newer_options(c, method, old, cell):
            return "older options" if how == "same" else how
    return None


def dtype_spelled_before(cfg: RunConfig) -> list[RunConfig]:
    """`cfg` with its dtype as versions before `--dtype` was stored by its full name kept it when typed short
    (`--dtype fp32` stored "fp32": the run key of the same command's record)."""
    from harness.config import DTYPES

    return [dataclasses.replace(cfg, dtype=s) for s, full in DTYPES.items() if full == cfg.dtype and s != cfg.dtype]


def resumable(cfg: RunConfig, method, partial: dict, key: str, cell: tuple) -> bool:
    """Whether the resume state `partial` (a `.partial.json`'s content) is this cell's, whose run key is now `key`:
    the same key, or made with the same data folder or --include-path folders at other paths (resume states since
    they record them), and scored on this run's kind of device in its dtype (`made_on`, resume states since they record
    it: one run key, `auto`, on a CPU there and a GPU here, would have mixed the two in one record)."""
    if differs(partial.get("made_on"), runs_on(cfg)):
        return False
    if partial.get("run_key") == key:
        return True
    name, mode, calib_desc, task_opts = cell
    moved = relocated(cfg, partial.get("data_dir"), include_then=partial.get("include_path"))
    then = [c for c in (moved, *dtype_spelled_before(cfg)) if c is not None]
    return any(c.identity(name, mode, method.options(), calib_desc, task_opts) == partial.get("run_key") for c in then)


def relocated(cfg: RunConfig, data_then: Any, old: rec.RunRecord | None = None,
              include_then: Any = None) -> RunConfig | None:
    """`cfg` as it read when work was made from the same inputs behind other paths, which run keys hold: a local data
    folder at another path (`data_then`: a clone elsewhere, a moved ../shared/data; without one, lm-eval's hub
    datasets are another source), as many --include-path folders at other paths (`include_then`, in the order
    given: a moved or copied folder of task YAMLs), or a model folder or GGUF file typed another way (`old`'s,
    resolving to the one `--model` names now). Their files are compared by digest (`inputs.refuse_stale_work`, the
    include folders' by position). None if none."""
    changes: dict[str, Any] = {}
    if isinstance(data_then, str) and data_then and cfg.data_dir and data_then != cfg.data_dir:
        changes["data_dir"] = data_then
    if moved_folders(include_then, cfg.include_path):
        changes["include_path"] = tuple(include_then)
    if old is not None and old.config.get("model") != cfg.model and _same_model(cfg.model, old):
        changes["model"] = old.config["model"]
    return dataclasses.replace(cfg, **changes) if changes else None


def moved_folders(then: Any, now: tuple[str, ...] | None) -> bool:
    """Whether the --include-path folders `then` (a record's or resume state's) are `now`'s folders at other paths:
    as many, paths all, and not the same list."""
    return bool(now) and isinstance(then, (list, tuple)) and len(then) == len(now) and \
        all(isinstance(f, str) and f for f in then) and tuple(then) != tuple(now)


def _relocation_note(cfg: RunConfig, method, old: rec.RunRecord) -> str:
    """'record made with the data folder at X and --include-path Y and --model m (...)', saying which inputs no digest
    vouches for."""
    inputs = old.inputs()
    made, unchecked = [], []
    if old.config.get("data_dir") != cfg.data_dir:
        made.append(f"the data folder at {old.config.get('data_dir')}")
        unchecked += [] if inputs.get("data") else ["its data files"]
        unchecked += ["its calibration data"] if method.needs_calibration and not inputs.get("calibration") else []
    if moved_folders(old.config.get("include_path"), cfg.include_path):
        made.append(f"--include-path {', '.join(old.config['include_path'])}")
        unchecked += [] if inputs.get("include") else ["its task YAMLs"]
    if old.config.get("model") != cfg.model:
        made.append(f"--model {old.config.get('model')} (the same model folder)")
        unchecked += [] if inputs.get("model") else ["its weights"]
    note = f" (made before input digests: {', '.join(unchecked)} unchecked)" if unchecked else ""
    return f"record made with {' and '.join(made)}{note};"


def finished_record(cfg: RunConfig, name: str, method, mode: str, final: Path, identity: tuple,
                    say: Callable[[str], None]) -> rec.RunRecord:
    """The record already at `final` when it is this cell's (or predates options now at their
    defaults); a different configuration's record is refused rather than overwritten."""
    key, calib_desc, task_opts = identity
    old = rec.load_cell(final)
    how = kinship(cfg, method, old, key, (name, mode, calib_desc, task_opts))
    if how is None:  # refused before the run too
        raise UsageError(f"{final} holds a {name}/{mode} record of a different configuration "
                         f"({key_text(old.run_key, key)}{differences(cfg, name, method, old)}); use another --out or "
                         "remove it")
    text = {"same": "finished record found,", "older options": "record predates options now at their defaults;"}
    say(f"{name}/{mode}: {text.get(how) or _relocation_note(cfg, method, old)} reused ({final.name})")
    return old


def key_text(then: str, now: str) -> str:
    """'run_key A != B', or 'the same run_key A' (`--device auto` on another kind of device: `other_device`)."""
    return f"run_key {then} != {now}" if then != now else f"the same run_key {now}"


def differences(cfg: RunConfig, name: str, method, old: rec.RunRecord) -> str:
    """'; limit=2 there, 3 here, tail.k=1 there, 2 here': the run-key flags and `name`'s options in which the record
    `old` differs from this run, so a refusal says what to change back ('' when none does: then the calibration, a
    long-context task's options or the code differ). A data or include folder counts as given or not: its path may
    differ for the same files, which digests decide; a dtype spelled short and a model folder typed another way are
    the same as `kinship` takes them."""
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name not in RunConfig.KEY_SKIP]
    now = cfg.recorded()
    then = {k: old.config.get(k, LATER_DEFAULTS.get(k)) for k in fields}
    now = {k: now.get(k, LATER_DEFAULTS.get(k)) for k in fields}
    if spelled_otherwise(cfg, old):  # `--device cpu` there, `auto` here, on a machine without a GPU: not a difference
        then.update(device=now["device"], dtype=now["dtype"])
    for side in (then, now):
        side.update({k: bool(side.get(k)) for k in ("data_dir", "include_path")})
        side["dtype"] = DTYPES.get(side.get("dtype"), side.get("dtype"))  # `fp32` as older records stored it: float32
    if _same_model(cfg.model, old):  # the same model folder typed another way: not a difference
        then["model"] = now["model"]
    scope = sweep_base(name)  # as --set names the options: `manual.n_last`, also for a sweep's variant `manual@n_first=1`
    then.update({f"{scope}.{k}": v for k, v in options_then(method, old).items()})
    now.update({f"{scope}.{k}": v for k, v in with_defaults(method, method.options()).items()})
    diff = options_diff(*(json.loads(json.dumps(d, default=str)) for d in (then, now)), "there", "here")
    device = other_device(cfg, old)
    diff = ", ".join(x for x in (f"scored on {device}" if device else "", diff) if x)
    return f"; {diff}" if diff else ""


def refuse_foreign_work(cfg: RunConfig, prepared, out_dir: Path, identity: Callable[[str, Any, str], tuple]) -> None:
    """A UsageError naming every record or resume state in `out_dir` of another configuration than this run's
    cells (`identity(name, method, mode)` -> (run_key, calibration options, task options)), before any work:
    a run that refused one cell but wrote the others left one folder holding two configurations."""
    found = []
    for name, method in prepared.methods.items():
        for mode in cfg.modes:
            key, calib_desc, task_opts = identity(name, method, mode)
            final, partial = out_dir / rec.record_filename(name, mode), out_dir / rec.partial_filename(name, mode)
            if final.exists():
                old = rec.load_cell(final)  # an unreadable cell file: refused, not replaced
                if foreign(cfg, method, old, key, (name, mode, calib_desc, task_opts)):
                    found.append(f"{final.name} ({key_text(old.run_key, key)}{differences(cfg, name, method, old)})")
            elif partial.exists() and (doc := partial_doc(partial)) is not None and \
                    not resumable(cfg, method, doc, key, (name, mode, calib_desc, task_opts)):
                where = differs(doc.get("made_on"), runs_on(cfg))
                found.append(f"{partial.name} (unfinished, {key_text(str(doc.get('run_key')), key)}"
                             f"{f'; scored on {where}' if where else ''})")
    if found:
        raise UsageError(f"{out_dir} holds work of a different configuration: {', '.join(found)}; use another --out, "
                         "rerun that configuration to finish it, or remove those files")


def partial_doc(path: Path) -> dict | None:
    """A resume state's content; None when torn or keyless (it is replaced, as before)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("run_key") is not None else None


def resume_state(path: Path, say: Callable[[str], None], n_layers: int) -> dict:
    """A cell's `.partial.json`, or {} when there is none or it does not parse as one (torn, not an object, no run
    key, finished tasks not an object, a plan that is not one for this `n_layers`-layer model): it is replaced as
    the cell starts afresh (and `say` is told), as `refuse_foreign_work` let it be, rather than failing the cell on
    every rerun (or, for a huge `n_layers`, hanging while the plan lists its layers)."""
    if not path.exists():
        return {}
    doc = partial_doc(path)
    why = "is not a readable resume state" if doc is None else _bad_state(doc, n_layers)
    if why:
        say(f"{path.name} {why}; the cell starts afresh")
        return {}
    return doc


def _bad_state(doc: dict, n_layers: int) -> str | None:
    """Why a parsed resume state cannot be resumed from, or None."""
    if not isinstance(doc.get("tasks", {}), dict):
        return "has no object of finished tasks"
    if "plan" not in doc:
        return None
    plan = doc["plan"]
    if not isinstance(plan, dict) or plan.get("n_layers") != n_layers:
        return f"holds no plan for this {n_layers}-layer model"
    try:
        PruningPlan.from_dict(plan)
    except (KeyError, TypeError, ValueError) as e:
        return f"holds a plan that is not valid ({type(e).__name__}: {e})"
    return None


def note_unlogged(out_dir: Path, name: str, mode: str, tasks, done_in: str, say: Callable[[str], None]) -> None:
    """Say which of `tasks`, done by an earlier run, have no per-sample log although --log-samples asks for one:
    a record keeps per-item scores only, so the log cannot be rebuilt without evaluating the task again."""
    from harness.quality.samples import samples_path

    missing = [t for t in tasks if not any(samples_path(out_dir, name, mode, t).parent.glob(f"samples_{t}*.jsonl"))]
    if missing:
        say(f"{name}/{mode}: --log-samples: no per-sample log of {', '.join(missing)}, evaluated by an earlier run "
            f"without it ({done_in}); to log them, rerun into another --out or remove {done_in}")
