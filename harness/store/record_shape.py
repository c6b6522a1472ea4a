"""The shape of a record's nested fields that readers (reports, check, resume) index into without further checks.

`records.RunRecord.from_dict` checks the top-level fields and the scores; this checks what lies below `n_samples`,
`extra`, `model`, `plan`, `lm_eval.tasks` and `environment`, so that a record edited by hand (or truncated by another tool) is refused with
one message naming the field, rather than a traceback from deep inside a table. Each check raises ValueError with
the field's path; `from_dict` names the file."""

from __future__ import annotations

import json
from typing import Any

from harness.store.task_names import TaskPresentation

# TaskPresentation's fields and their JSON types (harness/store/task_names.py)
_PRESENTATION_TYPES = {"title": str, "setting_prefix": str, "primary_metric": str, "metric_format": str,
                       "lower_is_better": bool, "caption": str, "column_order": int}


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _integer(x: Any) -> bool:
    """A JSON integer (true and false are not counts, though Python's bool is an int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_counts(v: Any) -> bool:
    """A KV tally as `kv[task]` and `extra.kv_by_setting[task][setting]` store it: integer counts, kv_bytes among them."""
    return isinstance(v, dict) and "kv_bytes" in v and all(map(_integer, v.values()))


def _objects(value: Any, where: str) -> dict:
    """`value` when it is a JSON object, else a ValueError naming `where` (callers pass {} for a field left out)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} is a JSON {type(value).__name__}, expected an object ({json.dumps(value, default=str)[:60]})")
    return value


def _check_items(items: Any) -> None:
    """`extra.items[task]` = {"ids": [...], "metrics": {metric: [number or null per id]}} (paired comparisons)."""
    for task, v in _objects(items, "extra.items").items():
        where = f"extra.items[{task!r}]"
        v = _objects(v, where)
        ids, metrics = v.get("ids"), _objects(v.get("metrics"), f"{where}.metrics")
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            raise ValueError(f"{where}.ids must be a list of item ids (strings)")
        for metric, values in metrics.items():
            if not isinstance(values, list) or len(values) != len(ids) or not all(map(_number, values)):
                raise ValueError(f"{where}.metrics[{metric!r}] must be a list of {len(ids)} numbers or nulls (one per id)")


def _check_kv_by_setting(by_task: Any) -> None:
    """`extra.kv_by_setting[task][setting]` = integer counts with kv_bytes, as `kv[task]`."""
    for task, settings in _objects(by_task, "extra.kv_by_setting").items():
        for setting, v in _objects(settings, f"extra.kv_by_setting[{task!r}]").items():
            if not is_counts(v):
                raise ValueError(f"extra.kv_by_setting[{task!r}][{setting!r}] must be an object of integer counts with kv_bytes")


def _check_lm_eval_tasks(tasks: Any) -> None:
    """`lm_eval.tasks[task]` objects; a long-context task's `harness_task` holds its presentation and options."""
    for task, v in _objects(tasks, "lm_eval.tasks").items():
        where = f"lm_eval.tasks[{task!r}]"
        ht = _objects(_objects(v, where).get("harness_task", {}), f"{where}.harness_task")
        _objects(ht.get("options", {}), f"{where}.harness_task.options")
        pres = _objects(ht.get("presentation", {}), f"{where}.harness_task.presentation")
        for name, value in pres.items():
            want = _PRESENTATION_TYPES.get(name)
            if want and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
                raise ValueError(f"{where}.harness_task.presentation.{name} must be a JSON {want.__name__}, got {value!r}")
        try:
            TaskPresentation.from_dict(pres) if pres else None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.harness_task.presentation: {e}") from None


def _check_strings(obj: dict, names: tuple[str, ...], where: str) -> None:
    """Each of `names` in `obj` a string or null (digests, paths, kinds: readers slice and hash them)."""
    for name in names:
        if not isinstance(obj.get(name), (str, type(None))):
            raise ValueError(f"{where}.{name} must be a string or null, got {json.dumps(obj[name], default=str)[:60]}")


def _check_plan(plan: dict) -> None:
    """The plan's layer lists (lists of layer indices) and its KV policy (an object)."""
    for name in ("prefill_layers", "decode_layers", "removed_prefill", "removed_decode"):
        v = plan.get(name, [])
        if not isinstance(v, list) or not all(map(_integer, v)):
            raise ValueError(f"plan.{name} must be a list of layer indices, got {json.dumps(v, default=str)[:60]}")
    _objects(plan.get("kv_policy", {}), "plan.kv_policy")


def _check_config(config: dict) -> None:
    """The run settings readers compute with: counts and seeds integers, the limit a number, bandwidths a list."""
    for name in ("num_fewshot", "seed"):
        v = config.get(name)
        if not (v is None or _integer(v)):
            raise ValueError(f"config.{name} must be an integer or null, got {json.dumps(v, default=str)[:60]}")
    if not _number(config.get("limit")):
        raise ValueError(f"config.limit must be a number or null, got {json.dumps(config['limit'], default=str)[:60]}")
    bandwidths = config.get("bandwidths_gbit") or []
    if not isinstance(bandwidths, list) or not all(_number(b) and b is not None for b in bandwidths):
        raise ValueError(f"config.bandwidths_gbit must be a list of numbers, got {json.dumps(bandwidths, default=str)[:60]}")


def check_nested(d: dict[str, Any]) -> None:
    """ValueError naming the first nested field of record `d` (top-level types already checked) readers cannot use."""
    if not all(map(_integer, d["n_samples"].values())):
        raise ValueError("n_samples must map each task to an integer count")
    extra = d.get("extra", {})
    _check_items(extra.get("items", {}))
    _check_kv_by_setting(extra.get("kv_by_setting", {}))
    inputs = _objects(extra.get("inputs") or {}, "extra.inputs")
    _objects(inputs.get("data") or {}, "extra.inputs.data")
    _check_strings(inputs, ("model", "config", "tokenizer"), "extra.inputs")
    _check_strings(d["model"], ("kind", "path", "gguf"), "model")
    _check_plan(d["plan"])
    _check_config(d["config"])
    _check_lm_eval_tasks(d["lm_eval"].get("tasks", {}))
    _objects(d["environment"].get("packages", {}), "environment.packages")
    _objects(d["environment"].get("git") or {}, "environment.git")
