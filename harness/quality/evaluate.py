"""One lm-eval task (or group) evaluated through the harness's LM: the task objects built once per run
from local data, lm-eval's results flattened into the record's scores, and per-item results kept."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class TaskCache:
    """Builds each lm-eval task (or group) once per run and hands the same object to every evaluation.

    Reuse is safe: lm-eval rebuilds a task's request instances on every `evaluate` call, and no
    request cache is used; it saves rebuilding documents (seconds per task, e.g. HellaSwag).
    """

    def __init__(self, tasks, data_dir: Path | None) -> None:
        self._tasks, self._data_dir = tuple(tasks), data_dir
        self.manager = None
        self._built: dict[str, Any] = {}
        self._workdir: tempfile.TemporaryDirectory | None = None  # the override YAMLs, removed by close()

    def get(self, task: str):
        from harness.quality.tasks import task_manager

        if task not in self._built:
            if self.manager is None:
                self._workdir = self._workdir or tempfile.TemporaryDirectory(prefix="harness-tasks-")
                self.manager = task_manager(self._tasks, self._data_dir, Path(self._workdir.name))
            loaded = self.manager.load([task])
            self._built[task] = loaded["groups"].get(task) or loaded["tasks"].get(task) or task
        return self._built[task]

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
    with without_env_report():
        out = simple_evaluate(
            model=lm, tasks=[obj], limit=cfg.limit, task_manager=tasks.manager, bootstrap_iters=cfg.bootstrap_iters,
            num_fewshot=cfg.num_fewshot or None,  # None: each task's own default (0 for every task here)
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
                    "higher_is_better": out.get("higher_is_better", {}).get(task, {})},
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
