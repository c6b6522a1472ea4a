"""One lm-eval task (or group) evaluated through the harness's LM: the task objects built once per run
from local data, lm-eval's results flattened into the record's scores, and per-item results kept."""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import stops
from harness.errors import HarnessWarning, UsageError
from harness.quality.samples import metric_name, per_item

if TYPE_CHECKING:
    from harness.config import RunConfig


# the per-task parts of simple_evaluate's output that its EvaluationTracker writes to results_<timestamp>.json
LM_EVAL_PARTS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def flatten_results(res: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's {'acc,none': .., 'acc_stderr,none': ..} -> {'acc': {'value': .., 'stderr': ..}}."""
    out: dict[str, dict[str, float | None]] = {}
    for key, val in res.items():
        if "," not in key or not isinstance(val, (int, float)):
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        se = res.get(f"{name}_stderr,{filt}")
        out[metric_name(name, filt)] = {
            "value": float(val), "stderr": float(se) if isinstance(se, (int, float)) else None}
    return out


def fewshot_split(obj, task: str, told: set[str], num_fewshot: int) -> str | None:
    """The split lm-eval draws `obj`'s few-shot examples from, as its ConfigurableTask chooses (fewshot, then
    training, validation, test split, the first the dataset has); None for a group. A UsageError when that
    split holds fewer than `num_fewshot` examples. With local data that
    lacks a training split this is often the scored split itself: a HarnessWarning says so, once per task and run
    (`told`: the tasks already noted)."""
    config, dataset = getattr(obj, "config", None), getattr(obj, "dataset", None)
    if config is None or dataset is None:
        return None
    have = set(dataset.keys())
    pick = lambda *names: next((n for n in names if n and n in have), None)  # noqa: E731
    shots = pick(config.fewshot_split, config.training_split, config.validation_split, config.test_split)
    scored = pick(config.test_split, config.validation_split)
    pool = len(dataset[shots]) - (shots == scored) if shots is not None else 0  # the item itself is left out
    if num_fewshot > pool:  # else lm-eval fails after the planning ("Sample larger than population")
        raise UsageError(f"--num-fewshot {num_fewshot}: {task} has {pool} few-shot examples to draw from "
                         f"(its {shots} split{', less the item itself' if shots == scored else ''}); give at most {pool}")
    if shots is not None and shots == scored and task not in told:
        told.add(task)
        warnings.warn(f"--num-fewshot: {task}'s few-shot examples come from its scored {shots} split (the local data "
                      "has no training split; lm-eval leaves each item out of its own examples), not from the training "
                      "split stock lm-eval uses; the record notes it (lm_eval fewshot_split)", HarnessWarning, stacklevel=2)
    return shots


def check_fewshot(tasks: TaskCache, names, num_fewshot: int) -> None:
    """`fewshot_split` of each lm-eval task in `names` and of each subtask of a group such as mmlu (long-context
    tasks have no few-shot examples: skipped; the others are built now, as they are for the first cell anyway), so
    a pool too small is refused before any cell plans."""
    from harness.quality import long_tasks

    for task in (t for t in names if not long_tasks.is_long_task(t)):
        fewshot_split(tasks.get(task), task, tasks.told, num_fewshot)
        for sub, obj in tasks.subtasks(task).items():
            fewshot_split(obj, sub, tasks.told, num_fewshot)


def check_tasks(tasks: TaskCache, cfg: RunConfig, world_size: int) -> None:
    """Before any cell: `check_fewshot` under --num-fewshot, and under data parallelism a UsageError for an lm-eval
    task (or a group's subtask) that a fractional --limit (ceil(n·x) items) leaves fewer items than ranks: lm-eval
    failed on the rank with none ("did not find any docs") after the model had loaded. An integer --limit below the
    ranks is refused earlier (`distributed.check_items_per_rank`); only a fraction needs the tasks built."""
    import math

    from harness.quality import long_tasks

    if cfg.num_fewshot:
        check_fewshot(tasks, cfg.tasks, cfg.num_fewshot)
    if world_size < 2 or not (isinstance(cfg.limit, float) and 0 < cfg.limit < 1):  # else the items are >= the ranks
        return
    for task in (t for t in cfg.tasks if not long_tasks.is_long_task(t)):
        for name, obj in (tasks.subtasks(task) or {task: tasks.get(task)}).items():
            if getattr(obj, "eval_docs", None) is None:  # not a built task: lm-eval says what is wrong
                continue
            n = len(obj.eval_docs)
            kept = math.ceil(n * cfg.limit)
            if kept < world_size:
                raise UsageError(f"--limit {cfg.limit} keeps {kept} of {name}'s {n} items for {world_size} data-parallel "
                                 "ranks: each rank needs at least one; give a larger --limit or start fewer ranks")


def shots_for_lm_eval(num_fewshot: int, built: list) -> int | None:
    """`simple_evaluate`'s num_fewshot for the built tasks `built` (a task, or a group and its subtasks): the run's count;
    None (each task's own default, which is 0) when that is 0 and none of them sets its own. Passing None for a YAML
    of one's own with `num_fewshot: 5` (an --include-path task) gave its 5 shots under `--num-fewshot 0`, while
    the record said 0; lm-eval's `--num_fewshot 0` gives none. A task whose YAML sets `num_fewshot: 0` keeps it under
    any count (lm-eval ignores the flag there, with an info line): a warning says so, since the record names the count."""
    if num_fewshot:
        fixed = [getattr(obj.config, "task", "?") for obj in built
                 if getattr(getattr(obj, "config", None), "num_fewshot", None) == 0]
        if fixed:
            warnings.warn(f"--num-fewshot {num_fewshot}: {', '.join(fixed)} set num_fewshot: 0 in its YAML, which lm-eval "
                          "keeps over the flag: scored zero-shot (its record's lm_eval n-shot says 0)", HarnessWarning,
                          stacklevel=2)
        return num_fewshot
    own = any(getattr(getattr(obj, "config", None), "num_fewshot", None) for obj in built)
    return 0 if own else None  # None: no "Overwriting default num_fewshot" note from lm-eval for every task


class TaskCache:
    """Builds each lm-eval task (or group) once per run and hands the same object to every evaluation.

    Reuse is safe: lm-eval rebuilds a task's request instances on every `evaluate` call, and no
    request cache is used; it saves rebuilding documents (seconds per task, e.g. HellaSwag).
    """

    def __init__(self, tasks, data_dir: Path | None, include_path: tuple[str, ...] | None = None) -> None:
        self._tasks, self._data_dir, self._include = tuple(tasks), data_dir, include_path or ()
        self.manager = None
        self._built: dict[str, Any] = {}
        self._subtasks: dict[str, dict[str, Any]] = {}  # a group's built tasks, by name
        self._workdir: tempfile.TemporaryDirectory | None = None  # the override YAMLs, removed by close()
        self.told: set[str] = set()  # tasks whose few-shot source this run has noted (fewshot_split)
        self._defined: dict[str, Path | None] | None = None  # what the --include-path folders define (`defined`)

    def defined(self) -> dict[str, Path | None]:
        """Task, group and tag name -> the YAML defining it, of the run's --include-path folders ({} without): read
        once a run (an index of the folders' YAMLs)."""
        if self._defined is None:
            from harness.quality import include_tasks

            self._defined = include_tasks.defined_names(self._include) if self._include else {}
        return self._defined

    def get(self, task: str):
        from harness.quality.tasks import task_manager

        if task not in self._built:
            if self.manager is None:
                self._workdir = self._workdir or tempfile.TemporaryDirectory(prefix="harness-tasks-")
                self.manager = task_manager(self._tasks, self._data_dir, Path(self._workdir.name), self._include)
            with self._rows_read(task):
                loaded = self.manager.load([task])
            stops.check()  # a stop that `datasets` swallowed while the task was built (harness.stops)
            self._built[task] = loaded["groups"].get(task) or loaded["tasks"].get(task) or task
            self._subtasks[task] = dict(loaded["tasks"]) if task in loaded["groups"] else {}
        return self._built[task]

    def check_rows(self, names, num_fewshot: int = 0) -> None:
        """Build each lm-eval task (or group) of `names` now, which renders the first document of its scored split
        (lm-eval's own check), and under `num_fewshot` the first of its few-shot split too: a row lacking a field a
        template reads is refused here (the error of `get`), before the model loads, rather than in each cell."""
        for task in names:
            built = self.get(task)
            for obj in (self.subtasks(task) or {task: built}).values() if num_fewshot else ():
                self._render_first_shot(task, obj)

    def _render_first_shot(self, task: str, obj) -> None:
        """Render the first document of built task `obj`'s few-shot split as lm-eval renders a few-shot example: text,
        choices and target, with the templates of its `fewshot_config` (a YAML may give the few-shot rows their own);
        the error of `get` when a template reads a field that document lacks."""
        docs, shots = getattr(getattr(obj, "sampler", None), "df", None), getattr(obj, "fewshot_cfg", None)
        if not docs or shots is None:  # no few-shot split, or a group
            return
        with self._rows_read(task):
            obj.doc_to_text(docs[0], shots.doc_to_text)
            if shots.doc_to_choice:
                obj.doc_to_choice(docs[0], shots.doc_to_choice)
            obj.doc_to_target(docs[0], shots.doc_to_target)

    @contextlib.contextmanager
    def _rows_read(self, task: str):
        """Around rendering `task`'s rows: jinja2's UndefinedError (a template reads a field the rows lack) as
        `_missing_field`'s error; any other as it is."""
        try:
            yield
        except Exception as e:
            if type(e).__name__ != "UndefinedError":
                raise
            raise self._missing_field(task, e) from None

    def _missing_field(self, task: str, e: Exception) -> UsageError:
        """The one-line error for a task whose rows lack a field its YAML's templates read (lm-eval renders one row
        while building the task, and jinja2 names only the field): it names the task, the YAML and what gave the rows
        (a plug-in's loader is a PluginContractError)."""
        from harness.errors import PluginContractError
        from harness.quality import local_tasks

        if self._data_dir is not None and local_tasks.is_local_task(task):
            cls = local_tasks.get(task)
            return PluginContractError(
                f"task {task}: lm-eval's {cls.upstream} reads a field that the rows of "
                f"{cls.__module__}.{cls.__qualname__}.load lack ({e}); load() must return each split's rows in the "
                "field layout of the Hugging Face dataset that YAML reads (base.jsonl(path, fields) names a row "
                "missing one)")
        yaml = self.defined().get(task)
        where = f" ({yaml})" if yaml else ""
        return UsageError(f"task {task}{where}: its template reads a field that its data's rows lack ({e}); give every "
                          "row that field, or change the YAML's doc_to_text / doc_to_choice / doc_to_target")

    def subtasks(self, task: str) -> dict[str, Any]:
        """The tasks a group `task` runs (name -> lm-eval task), built with it; {} for a task that is no group."""
        self.get(task)
        return self._subtasks[task]

    def close(self) -> None:
        """Remove the temporary YAML folder (built tasks keep working: lm-eval read the files when building)."""
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def evaluate_task(lm, task: str, tasks: TaskCache, cfg: RunConfig) -> dict[str, Any]:
    """One lm-eval task (or group) through `lm`; returns scores, sample count and lm-eval provenance.

    Under data parallelism lm-eval aggregates on rank 0 only: other ranks get None."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from harness.quality.tasks import without_env_report

    obj = tasks.get(task)
    shots = fewshot_split(obj, task, tasks.told, cfg.num_fewshot) if cfg.num_fewshot else None
    with without_env_report():
        out = simple_evaluate(
            model=lm, tasks=[obj], limit=cfg.limit, task_manager=tasks.manager, bootstrap_iters=cfg.bootstrap_iters,
            num_fewshot=shots_for_lm_eval(cfg.num_fewshot, [obj, *tasks.subtasks(task).values()]),
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, log_samples=True, cache_requests=False,  # per-item results: records keep them
            apply_chat_template=cfg.apply_chat_template,  # False, True (the tokenizer's) or a template name
        )
    if out is None and lm.rank != 0:
        return None
    if task not in out["results"]:
        raise RuntimeError(f"lm-eval returned no results for {task}: {sorted(out['results'])}")
    n = sum(int(v.get("effective", 0)) for v in out.get("n-samples", {}).values())
    samples = out.get("samples", {})
    return {
        "scores": flatten_results(out["results"][task]),
        "n_samples": n,
        "items": per_item(samples),  # for paired comparisons (report --baseline)
        "samples": samples,  # lm-eval's per-sample logs: written with --log-samples, never stored in the record
        "lm_eval": {"n-shot": out.get("n-shot", {}), "versions": out.get("versions", {}),
                    "higher_is_better": out.get("higher_is_better", {}).get(task, {}),
                    **({"fewshot_split": shots} if shots else {})},
        # lm-eval's own results, for the cell's results_<timestamp>.json (harness.quality.lm_eval_json)
        "lm_eval_results": json.loads(json.dumps({k: out[k] for k in LM_EVAL_PARTS if k in out},
                                                 default=handle_non_serializable)),  # as the tracker writes them
    }


def is_download_error(e: BaseException) -> bool:
    """True for errors raised while fetching a dataset (datasets, huggingface_hub, requests, httpx)."""
    while e is not None:
        if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests", "httpx", "urllib3", "socket"):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False
