"""The quality pipeline: methods × modes × tasks through lm-eval, one record per (method, mode).

Finished records are never recomputed: a record whose `run_key` matches the configuration is
reused, and a (method, mode) interrupted between tasks resumes from its `.partial.json`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import RunConfig, build_options, expand_sweeps, split_overrides
from harness.errors import UsageError
from harness.pd.arch import n_layers
from harness.pd.plan import PruningPlan
from harness.quality import lm_eval_json
from harness.quality.calibration import CalibConfig, build_calibration
from harness.quality.distributed import Dist, ShardedScorer
from harness.quality.evaluate import TaskCache, check_fewshot, check_tasks, evaluate_task, flatten_results, is_download_error  # noqa: F401 - some re-exported
from harness.quality.long_tasks.base import special_prefix
from harness.quality.samples import lm_eval_lines, samples_path
from harness.run import inputs, made_on, plugin_faults, reuse, task_check, task_record
from harness.run.failures import CellFailure, CellsFailed
from harness.run.progress import Tracker, task_label, work_of
from harness.store import records as rec
from methods.base import refuse_too_deep

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Validated inputs of a run: method instances and calibration options, before any model work."""

    config: RunConfig
    methods: dict[str, Any]
    calib_config: CalibConfig
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # long-context task -> its options


def prepare(cfg: RunConfig, need_data: bool = True) -> Prepared:
    """Validate names and `--set` options (cheap; no model, no data loaded).

    `need_data=False` skips the check that calibrating methods have a data dir (their plans
    may come from elsewhere, e.g. replayed records)."""
    import methods as registry
    from harness.quality import distributed, long_tasks

    if not cfg.methods:  # run, latency and their spec sections all come through here before any model work
        raise UsageError("--methods is empty; known methods: " + ", ".join(registry.names()))
    classes = {name: registry.get(name) for name in cfg.methods}
    long_here = [t for t in cfg.tasks if long_tasks.is_long_task(t)]
    distributed.check_items_per_rank(cfg.limit, [t for t in cfg.tasks if t not in long_here], cfg.num_fewshot)
    raw = split_overrides(cfg.overrides, [*cfg.methods, "calib", *long_here])
    instances = {variant: cls(build_options(cls.Config, name, opts))  # `shortgpt.k=2,4` -> shortgpt@k=2, shortgpt@k=4
                 for name, cls in classes.items() for variant, opts in expand_sweeps(cls.Config, name, raw.get(name, {}))}
    task_options = {t: build_options(long_tasks.get(t).Config, t, raw.get(t, {})) for t in long_here}
    calib_raw = dict(raw.get("calib", {}))
    calib_raw.setdefault("seed", str(cfg.seed))
    calib = build_options(CalibConfig, "calib", calib_raw)
    needing = [n for n, m in instances.items() if m.needs_calibration]
    if needing and need_data and not cfg.data_dir:
        raise UsageError(f"{', '.join(needing)} calibrate on PIQA + MMLU from local data: pass --data-dir "
                         "(or set HARNESS_DATA_DIR) pointing at a folder laid out like ../shared/data")
    for t in long_here:  # each task checks its data before any model work
        long_tasks.get(t).check_data(Path(cfg.data_dir) if cfg.data_dir else None)
    return Prepared(cfg, instances, calib, task_options)


def _partial_path(out_dir: Path, method: str, mode: str) -> Path:
    return out_dir / rec.partial_filename(method, mode)


@dataclass
class _Run:
    """What every (method, mode) cell of one run shares."""

    cfg: RunConfig
    prepared: Prepared
    out_dir: Path
    loaded: Any
    tasks: TaskCache
    env: dict[str, Any]
    say: Callable[[str], None]
    progress: bool
    calib: Any = None
    dist: Dist = dataclasses.field(default_factory=Dist)
    log_samples: bool = False
    tracker: Tracker = dataclasses.field(default_factory=lambda: Tracker(show=False))
    inputs: dict = dataclasses.field(default_factory=dict)  # harness.run.inputs.digests: kept in records

    def calibration(self):
        if self.calib is None:
            data_dir = Path(self.cfg.data_dir) if self.cfg.data_dir else None
            with self.tracker.phase("calibration"):
                self.calib = build_calibration(self.loaded.tokenizer, data_dir, self.prepared.calib_config)
        return self.calib


def run(cfg: RunConfig, out_dir: Path, prepared: Prepared | None = None, loaded=None,
        on_progress: Callable[[str], None] | None = None, progress: bool = False, log_samples: bool = False,
        tracker: Tracker | None = None, tasks: TaskCache | None = None) -> list[rec.RunRecord]:
    """Evaluate every (method, mode) of `cfg`; write records and summary.csv into `out_dir`, and with
    `log_samples` each evaluated (cell, task)'s per-sample log under `out_dir/samples/`. `tracker` times
    the phases and draws the overall line (default: a silent one); each record keeps its cell's phase seconds.
    `tasks`: the run's lm-eval tasks as `task_check.tasks_before_load` built them (default: built here, before
    the model loads); closed on return."""
    from harness.quality import distributed

    d = distributed.current()
    prepared = prepared or prepare(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracker or Tracker(work_of(cfg, prepared), show=False)
    reuse.refuse_foreign_work(cfg, prepared, out_dir, lambda *cell: cell_identity(cfg, prepared, *cell))  # before any work
    tasks = tasks if tasks is not None else task_check.tasks_before_load(cfg, prepared, out_dir)  # rows: before loading
    records, failures = [], []
    try:  # also on Ctrl-C: the tasks' temporary YAMLs are removed
        state = _start(cfg, prepared, out_dir, loaded, tasks, tracker, on_progress or (lambda msg: log.info(msg)),
                       progress and d.is_main, log_samples)
        for i, (name, mode) in enumerate((n, m) for n in prepared.methods for m in cfg.modes):
            tracker.cell(i, name, mode)
            try:
                records.append(_run_cell(state, name, prepared.methods[name], mode))
            except Exception as e:  # noqa: BLE001 - one cell's failure (OOM, bad option) must not stop the others
                failures.append(_record_failure(state, name, prepared.methods[name], mode, e))
                if d.enabled:  # the other ranks wait in the cell's collectives: stop the group (the launcher
                    raise  # ends them) rather than leave it hanging; the rerun retries the cell
    finally:
        tasks.close()
    if d.is_main:  # every readable record in the folder; an unreadable one is named and skipped
        with tracker.phase("report"):
            rec.refresh_summary(out_dir)
    d.barrier()
    if failures:
        raise CellsFailed(failures, records)
    return records


def _start(cfg: RunConfig, prepared: Prepared, out_dir: Path, loaded, tasks: TaskCache, tracker: Tracker,
           say: Callable[[str], None], progress: bool, log_samples: bool) -> _Run:
    """What the cells share: the model (loaded now unless given), the run's input digests (work made from other
    files behind the same paths refused), and the checks that need the model or the built tasks, before any cell."""
    from harness.pd.models import load_model
    from harness.quality import distributed
    from harness.run.env import env_info

    d = distributed.current()
    if loaded is None:
        with tracker.phase("load"):  # the tokenizer first: options it rules out are refused before the weights load
            task_check.before_load(cfg, prepared)
            loaded = load_model(cfg.model, distributed.device_for(cfg.device, d), cfg.dtype, cfg.seed, cfg.placement(),
                                cfg.model_arg_dict())
    else:
        task_check.options_against_tokenizer(cfg, prepared, loaded)
    env = env_info(str(next(loaded.model.parameters()).device))
    env["data_parallel_ranks"] = d.world_size
    digests = inputs.digests(cfg, loaded, prepared)  # the files behind --model and --data-dir, which run keys name by path
    inputs.refuse_stale_work(cfg, prepared, out_dir, digests, special_prefix(loaded.tokenizer))
    state = _Run(cfg, prepared, out_dir, loaded, tasks, env, say, progress, dist=d, log_samples=log_samples,
                 tracker=tracker, inputs=digests)
    check_tasks(state.tasks, cfg, d.world_size)  # a few-shot pool too small, a rank with no item: before any cell
    refuse_too_deep(prepared.methods, n_layers(loaded.model), cfg.modes)  # a model given loaded: its own depth
    return state


def _record_failure(st: _Run, name: str, method, mode: str, e: Exception) -> CellFailure:
    """Write `<method>__<mode>.failed.json` (error, traceback) and free what the failure left behind."""
    _free_accelerator_memory()
    key = "?"
    try:
        key = _cell_identity(st, name, method, mode)[0]
    except Exception:  # noqa: BLE001 - the note matters more than its key
        pass
    path = st.out_dir / rec.failure_filename(name, mode)
    failure = CellFailure(name, mode, e, path, plugin_faults.blame_cell(e, method))
    if st.dist.is_main:
        try:  # the report's note names the plug-in code too
            rec.save_failure(st.out_dir, name, mode, key, e, traceback.format_exc(),
                             dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             **({"plugin": failure.plugin} if failure.plugin else {}))
        except OSError as note_error:  # e.g. a full disk: the note is best-effort, the other cells still run
            st.say(f"{name}/{mode}: could not write {path.name} ({note_error.strerror or note_error})")
    where = f" in plug-in {failure.plugin}" if failure.plugin else ""
    st.say(f"{name}/{mode}: FAILED ({type(e).__name__}: {str(e)[:200]}{where}); continuing with the other cells")
    return failure


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cell_identity(cfg: RunConfig, prepared: Prepared, name: str, method, mode: str) -> tuple[str, dict | None, dict]:
    """(run_key, calibration options or None, long-context task options) of one (method, mode) cell."""
    calib_desc = dataclasses.asdict(prepared.calib_config) if method.needs_calibration else None
    task_opts = {t: dataclasses.asdict(o) for t, o in prepared.task_options.items()}
    return cfg.identity(name, mode, method.options(), calib_desc, task_opts), calib_desc, task_opts


def _cell_identity(st: _Run, name: str, method, mode: str) -> tuple[str, dict | None, dict]:
    return cell_identity(st.cfg, st.prepared, name, method, mode)


def _run_cell(st: _Run, name: str, method, mode: str) -> rec.RunRecord:
    """One (method, mode): reuse its finished record, or plan, evaluate task by task and save."""
    from harness.quality.lm import PDLM

    cfg, model = st.cfg, st.loaded.model
    options = method.options()
    identity = _cell_identity(st, name, method, mode)
    key = identity[0]
    final = st.out_dir / rec.record_filename(name, mode)
    if final.exists():
        st.tracker.skipped(*cfg.tasks)
        done = reuse.finished_record(st.cfg, name, method, mode, final, identity, st.say)
        _tidy(st, name, mode)  # what a run killed just after saving the record left behind
        if st.log_samples and st.dist.is_main:
            reuse.note_unlogged(st.out_dir, name, mode, cfg.tasks, final.name, st.say)
        return done
    partial_path = _partial_path(st.out_dir, name, mode)
    partial = _resume_state(st, name, method, mode, partial_path, identity)
    plan = _cell_plan(st, name, method, mode, partial)
    partial["inputs"] = inputs.with_plan_code(partial.get("inputs") or st.inputs, name, partial["plan"])  # its policy's
    if mode == "unified" and not plan.is_unified:
        raise ValueError(f"{name} returned a plan with two layer sets or KV pruning for unified mode")
    if st.log_samples and st.dist.is_main:
        reuse.note_unlogged(st.out_dir, name, mode, [t for t in cfg.tasks if t in partial["tasks"]], partial_path.name, st.say)
    with method.apply(model, plan) as applied:
        lm = PDLM(model, st.loaded.tokenizer, applied, mode, batch_size=cfg.batch_size, max_length=cfg.max_length,
                  progress=st.progress, dist=st.dist)
        for j, task in enumerate(cfg.tasks):
            if task in partial["tasks"]:
                st.tracker.skipped(task)  # done before an interruption
                continue
            st.say(f"{name}/{mode}: {task}")
            lm.scorer.label = f"{task} ({name}/{mode})"
            with st.tracker.phase(task, f"{name}/{mode}", shown=task_label(task, j, cfg.tasks)):
                partial["tasks"][task] = _eval_task(st, lm, task, name, mode)
            st.tracker.task_done(task, partial["tasks"][task]["seconds"])
            if st.dist.is_main:  # one writer; other ranks hold no aggregated scores
                rec.atomic_write(partial_path, json.dumps(partial))
    if st.dist.is_main:  # the record last: once it exists the cell is done, and a rerun only tidies up
        template = lm.chat_template(cfg.apply_chat_template) if cfg.apply_chat_template else None
        lm_eval_json.write_cell_results(st.out_dir, name, mode, lm_eval_json.cell_results(cfg, name, mode, partial["tasks"], st.env, {
            "run_key": key, "max_length": lm.max_length, "chat_template": template,
            "batch_sizes": sorted({n for t in partial["tasks"].values() for n in t.get("batch_sizes", [])})}))
        _save_record(st, name, mode, key, options, plan, partial, lm.max_length)
        _tidy(st, name, mode)
    st.dist.barrier()
    return rec.load(final)  # the record as stored (JSON types), same as a later reader sees


def _resume_state(st: _Run, name: str, method, mode: str, partial_path: Path, identity: tuple) -> dict:
    """The cell's resume state at `partial_path` where it resumes (`identity`: `_cell_identity`'s), else a fresh one;
    either way under this run's key, data and include folders, and where it runs."""
    cfg, (key, calib_desc, task_opts) = st.cfg, identity
    partial = reuse.resume_state(partial_path, lambda why: st.say(f"{name}/{mode}: {why}"), n_layers(st.loaded.model))
    if not reuse.resumable(cfg, method, partial, key, (name, mode, calib_desc, task_opts)):
        partial = {"run_key": key, "tasks": {}, "inputs": st.inputs}
    elif done := [t for t in cfg.tasks if t in partial["tasks"]]:
        st.say(f"{name}/{mode}: resuming: {', '.join(done)} kept from an interrupted run ({partial_path.name})")
    # a moved data or include folder's resume state goes on under this one
    partial.update(run_key=key, data_dir=cfg.data_dir, **({"include_path": cfg.include_path} if cfg.include_path else {}),
                   **({"made_on": list(made)} if (made := made_on.runs_on(cfg)) else {}))  # `auto` resumed on a GPU: refused
    return partial


def _tidy(st: _Run, name: str, mode: str) -> None:
    """Remove what a finished record supersedes: the cell's resume state and an earlier failure's note."""
    if st.dist.is_main:
        _partial_path(st.out_dir, name, mode).unlink(missing_ok=True)
        (st.out_dir / rec.failure_filename(name, mode)).unlink(missing_ok=True)


def _cell_plan(st: _Run, name: str, method, mode: str, partial: dict) -> PruningPlan:
    """The cell's plan: stored by another run (--plans-from), kept in the resumable state, or made now.
    Updates `partial` with the plan, its planning time and calibration description."""
    reused = reuse.stored_plan(st.cfg, st.prepared, name, mode, method.options(), lambda: st.calibration().description,
                               st.inputs) if "plan" not in partial else None
    if reused is not None:
        reuse.fit_to_model(reused[0], reused[1], n_layers(st.loaded.model))
        st.say(f"{name}/{mode}: plan reused from {reused[1]}")
        partial.update(plan=reused[0].to_dict(), plan_s=0.0, calibration=reused[2], plan_reused_from=str(reused[1]))
        return reused[0]
    if "plan" in partial and not method.needs_replan_on_resume():
        return PruningPlan.from_dict(partial["plan"])
    if st.cfg.plans_from and "plan" not in partial:  # say why, before a search of minutes a typo'd folder would cost
        st.say(f"{name}/{mode}: no plan to reuse in --plans-from {st.cfg.plans_from} "
               f"({reuse.why_not_reused(st.cfg, st.prepared, name, mode)}); planning afresh")
    st.say(f"{name}/{mode}: planning")
    with st.tracker.phase(f"planning {name}", f"{name}/{mode}", shown="planning"):
        if st.dist.enabled and not method.needs_replan_on_resume():  # plans are deterministic: plan once, share
            plan, plan_s, calib_used = st.dist.broadcast_object(_make_plan(st, method, mode) if st.dist.is_main else None)
        else:
            plan, plan_s, calib_used = _make_plan(st, method, mode)
    st.tracker.planned(name, plan_s)
    if "plan" in partial and PruningPlan.from_dict(partial["plan"]) != plan:
        raise RuntimeError(f"{name}/{mode}: planning again on resume gave a different plan than the stored one")
    partial.update(plan=plan.to_dict(), plan_s=partial.get("plan_s", plan_s), calibration=calib_used)
    return plan


def _eval_task(st: _Run, lm, task: str, name: str, mode: str) -> dict:
    """One task's result (scores, n_samples, provenance) with the KV bytes its handoffs sent and its seconds."""
    cfg = st.cfg
    before, t_task = lm.tally.as_dict(), time.perf_counter()
    lm.scorer.sizes_used.clear()  # the batch sizes this task uses (found by --batch-size auto): recorded
    try:
        if task in st.prepared.task_options:
            from harness.quality import long_tasks

            scorer = ShardedScorer(lm.scorer, st.dist) if st.dist.enabled else lm.scorer
            result = long_tasks.evaluate(task, scorer, st.loaded.tokenizer, Path(cfg.data_dir) if cfg.data_dir else None,
                                         st.prepared.task_options[task], cfg.limit, st.progress)
            sent = scorer.tally.as_dict() if st.dist.enabled else lm.tally.since(before)
        else:
            result = evaluate_task(lm, task, st.tasks, cfg) or {}  # {} on ranks > 0
            sent = st.dist.sum_counts(lm.tally.since(before))  # each rank counted its own documents
    except Exception as e:
        if cfg.data_dir is None and is_download_error(e):
            raise UsageError(f"task {task}: its dataset could not be fetched from the Hugging Face hub "
                             f"({type(e).__name__}); offline, pass --data-dir with local data") from e
        raise
    samples = result.pop("samples", None)
    if st.log_samples and samples and st.dist.is_main:
        write_samples(st.out_dir, name, mode, samples)
    result["kv"] = sent if mode == "disaggregated" else {}
    if mode != "disaggregated":
        result.pop("kv_by", None)
    result["seconds"], result["batch_sizes"] = time.perf_counter() - t_task, list(lm.scorer.sizes_used)
    return result


def write_samples(out_dir: Path, name: str, mode: str, samples: dict[str, list[dict]]) -> None:
    """One JSON-lines file per (sub)task of one cell, in lm-eval's per-sample format."""
    for task, items in samples.items():
        rec.atomic_write(samples_path(out_dir, name, mode, task), "".join(line + "\n" for line in lm_eval_lines(items)))


def _make_plan(st: _Run, method, mode: str) -> tuple[PruningPlan, float, dict | None]:
    """(plan, seconds spent planning, calibration description) of `method` for `mode`."""
    calib = st.calibration() if method.needs_calibration else None
    t0 = time.perf_counter()
    plan = method.make_plan(st.loaded.model, calib, mode)
    return plan, time.perf_counter() - t0, calib.description if calib is not None else None


def _save_record(st: _Run, name: str, mode: str, key: str, options: dict, plan: PruningPlan, partial: dict,
                 max_length_used: int) -> Path:
    from harness.pd.engine import PAGE_TOKENS

    cfg = st.cfg
    done = partial["tasks"]
    record = rec.RunRecord(
        method=name, mode=mode, run_key=key,
        config={**cfg.recorded(), "method_options": options, "max_length_used": max_length_used,
                "batch_sizes_used": {t: done[t].get("batch_sizes") for t in cfg.tasks},
                "plan_reused_from": partial.get("plan_reused_from"),
                "page_tokens": PAGE_TOKENS},
        plan=plan.to_dict(), environment=st.env, model=st.loaded.description, calibration=partial["calibration"],
        scores={t: done[t]["scores"] for t in cfg.tasks},
        kv={t: done[t]["kv"] for t in cfg.tasks if done[t]["kv"]},
        n_samples={t: done[t]["n_samples"] for t in cfg.tasks},
        lm_eval={"version": st.env["packages"].get("lm_eval"),
                 "tasks": {t: done[t].get("lm_eval") or {"harness_task": done[t]["harness_task"]} for t in cfg.tasks},
                 "bootstrap_iters": cfg.bootstrap_iters, "limit": cfg.limit,
                 **task_record.lm_eval_fields(cfg.tasks, {t: done[t]["scores"] for t in cfg.tasks}, frozenset(st.tasks.defined()))},
        timing_s={"plan": partial["plan_s"], **{f"eval_{t}": done[t]["seconds"] for t in cfg.tasks}},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"kv_by_setting": {t: done[t]["kv_by"] for t in cfg.tasks if done[t].get("kv_by")},
               "task_details": {t: done[t]["details"] for t in cfg.tasks if "details" in done[t]},
               "items": {t: done[t]["items"] for t in cfg.tasks if done[t].get("items")},
               "phases_s": st.tracker.cell_phases(f"{name}/{mode}"),  # this run's, up to this record
               "inputs": inputs.with_plan_code(st.inputs, name, plan.to_dict())},
    )
    return rec.save(record, st.out_dir)
