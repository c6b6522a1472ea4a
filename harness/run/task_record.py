"""What a record says of its tasks for the reports, which never import task code: each task's one number
(`lm_eval.metric_convention`) and the column titles lm-eval tasks on local data declare (`lm_eval.task_titles`).

A task an `--include-path` YAML defines is that YAML's, also where a local-data plug-in has its name: without
`--data-dir` the YAML replaces lm-eval's task of that name, the one the plug-in would have meant (with `--data-dir`
such a run is refused, `harness.cli.check_tasks.check_tasks`), so the plug-in's `table_metric` and `title` do not apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.quality import include_tasks, local_tasks, long_tasks
from harness.store import records as rec


def own_tasks(include_path: Iterable[str] | None) -> set[str]:
    """The task, group and tag names the `--include-path` folders define (none without the flag)."""
    return set(include_tasks.defined_names(include_path)) if include_path else set()


def _local(task: str, own: set[str]) -> bool:
    """Whether `task` runs as the lm-eval task on local data of that name (not an --include-path YAML of it)."""
    return local_tasks.is_local_task(task) and task not in own


def primary_metric(task: str, scores: dict | None = None, own: Iterable[str] = ()) -> str:
    """A long-context task's own primary metric, a local-data lm-eval task's `table_metric` (stored in the record:
    reports read a plug-in's from there), else lm-eval's usual one (records.PRIMARY_METRIC); for an --include-path
    task (`own`) whose `scores` lack that, its first (its metric_list's order: exact_match for a generation task)."""
    own = set(own)
    if long_tasks.is_long_task(task):
        return long_tasks.get(task).presentation.primary_metric
    usual = local_tasks.get(task).table_metric if _local(task, own) else rec.primary_metric(task)
    return next(iter(scores)) if task in own and scores and usual not in scores else usual


def lm_eval_fields(tasks: Iterable[str], scores: dict[str, dict], own: Iterable[str] = ()) -> dict[str, Any]:
    """The record's `lm_eval.metric_convention` ({task: its one number}) and, when a local-data task of the run
    declares a `title`, `lm_eval.task_titles` (left out otherwise: a record of the package's tasks keeps its shape)."""
    own = set(own)
    titles = local_tasks.titles(tuple(t for t in tasks if _local(t, own)))
    return {"metric_convention": {t: primary_metric(t, scores.get(t), own) for t in tasks},
            **({"task_titles": titles} if titles else {})}
