"""Long-context workloads the harness runs itself, as plug-ins: one file per task in this package.

Short multiple-choice prompts send almost every KV position anyway, so a KV token policy only
shows what it costs and saves on long prompts. Tasks build their requests as token lists (exact
prompt lengths, hence exact byte arithmetic) and go through the same `Scorer` as lm-eval tasks,
in either PD setting; the KV bytes of each setting (prompt length) are counted separately.

Adding a task: a file here with a `LongTask` subclass (`harness/quality/long_tasks/base.py`) decorated
with `@register_task`. Every module of the package is imported below, so the task is known to
`--tasks` (and the `long` alias), `--set TASK.OPTION=VALUE`, the pipeline and, through the
presentation stored in its records, the reports. `--limit N` caps each task's samples.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from harness.errors import HarnessWarning, PluginContractError
from harness.quality.long_tasks.base import LongTask
from harness.registration import TaskRegistry, check_callable_as, check_name, import_package_modules, option_types, same_definition

__all__ = ["LongTask", "register_task", "unregister_task", "names", "get", "is_long_task", "evaluate",
           "check_before_cells"]

_REGISTRY = TaskRegistry()  # name -> LongTask subclass
# the built-in tasks come first, in this order (the order of `--tasks long` and of run keys' task lists)
_BUILTIN = ("pd_ppl", "passkey")


def register_task(cls: type[LongTask]) -> type[LongTask]:
    """Class decorator: make `cls` a long-context task under `cls.name`."""
    name = getattr(cls, "name", None)
    check_name("long-context task", name, f"{cls.__module__}.{cls.__qualname__}")
    for attr in ("Config", "presentation"):
        if not hasattr(cls, attr):
            raise ValueError(f"long-context task {name}: missing `{attr}`")
    option_types(cls.Config, f"long-context task {name!r}")  # --set and --help read them
    if name in _reserved() or name.startswith("mmlu_"):
        raise ValueError(f"long-context task {name!r}: the name is an lm-eval task with local data or a --tasks alias; "
                         "choose another")
    old = _REGISTRY.get(name)
    if old is not None and not same_definition(old, cls):  # a re-import is fine
        raise ValueError(f"long-context task {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    if getattr(cls, "evaluate", None) is LongTask.evaluate:  # else every cell failed late, with an empty message
        raise ValueError(f"long-context task {name!r}: does not define evaluate(scorer, tokenizer, data_dir, options, "
                         "limit, progress)")
    check_callable_as(f"long-context task {name!r} ({cls.__module__}.{cls.__qualname__})", cls.evaluate,
                      "evaluate(self, scorer, tokenizer, data_dir, options, limit, progress)", cls)
    _REGISTRY[name] = cls
    return cls


def _reserved() -> set[str]:
    """Names `--tasks` already means: the aliases and the lm-eval tasks with local data (and `mmlu_*`, MMLU's subjects)."""
    from harness.quality import local_tasks  # imported here: each registry refuses the other's names

    return {*local_tasks.ALIASES, *local_tasks.names()}


unregister_task, names, get = _REGISTRY.forget, _REGISTRY.names, _REGISTRY.task


def is_long_task(name: str) -> bool:
    return name in _REGISTRY


def evaluate(task: str, scorer, tokenizer, data_dir: Path | None, options: Any, limit: int | float | None,
             progress: bool = False) -> dict:
    """Run one long-context task; returns scores, n_samples, per-setting KV deltas, details and
    `harness_task` (version, options and presentation, for the record)."""
    cls = get(task)
    cls.check_data(data_dir)
    out = cls().evaluate(scorer, tokenizer, data_dir, options, limit, progress)
    _check_layout(cls, out)
    _check_settings(cls, out)
    _warn_non_finite(cls, out, getattr(scorer, "label", None))
    out["harness_task"] = cls.describe(options)
    return out


def _warn_non_finite(cls: type[LongTask], out: dict, cell: str | None) -> None:
    """Say so when a score or stderr is NaN or infinite: stored silently, it surfaced only when `check` refused it.
    Not refused here: a model a method broke gives them through the package's own tasks too (pd_ppl's perplexity of
    a diverged model is inf, of NaN logits NaN), a result the record should keep and the report shows, not a broken
    task contract to exit 2 over."""
    bad = [f"{m}.{k}={v[k]}" for m, v in out["scores"].items() for k in ("value", "stderr")
           if isinstance(v.get(k), float) and not math.isfinite(v[k])]
    if bad:
        on = f" on {cell}" if cell else ""
        warnings.warn(f"long-context task {cls.name!r} ({cls.__module__}): evaluate() returned {', '.join(bad)}{on}, "
                      "not finite numbers; the record keeps them, `check` refuses them as references. A diverged model "
                      "gives them; if this model's other scores are sound, the task's arithmetic is at fault",
                      HarnessWarning, stacklevel=2)


RESULT_LAYOUT = ('{"scores": {metric: {"value": number, "stderr": number or None}}, "n_samples": int, '
                 '"kv_by": {setting: KV bytes (kv_delta)}, "details": dict}')


def _check_layout(cls: type[LongTask], out: Any) -> None:
    """`evaluate`'s result in the layout the record stores: a result without `scores` or `n_samples`, a bare number
    for a score or a tensor for a value failed the cell with a KeyError, a TypeError or JSON's error, naming neither
    the task nor what it should return (exit 1, "rerun to retry"), and one without its primary metric was stored."""
    def number(x: Any, none_ok: bool = False) -> bool:
        return (x is None and none_ok) or (isinstance(x, (int, float)) and not isinstance(x, bool))

    scores = out.get("scores") if isinstance(out, dict) else None
    if not isinstance(out, dict):
        wrong = f"a {type(out).__name__}"
    elif not isinstance(scores, dict) or not isinstance(out.get("kv_by"), dict):
        wrong = f"a dict without {'scores' if not isinstance(scores, dict) else 'kv_by'} as a dict"
    elif not number(out.get("n_samples")) or isinstance(out.get("n_samples"), float):
        wrong = f"n_samples={out.get('n_samples')!r}"
    else:
        bad = {m: v for m, v in scores.items() if not isinstance(v, dict) or not number(v.get("value"))
               or not number(v.get("stderr"), none_ok=True)}
        primary = cls.presentation.primary_metric
        wrong = f"scores {bad}" if bad else None if primary in scores else \
            f"no score {primary!r}, its presentation's primary_metric (it has {sorted(scores)})"
    if wrong is not None:
        raise PluginContractError(f"long-context task {cls.name!r} ({cls.__module__}): evaluate() returned {wrong}; "
                                  f"it must return {RESULT_LAYOUT} (harness/quality/long_tasks/base.py)")


def _check_settings(cls: type[LongTask], out: dict) -> None:
    """Every per-setting score needs its KV bytes under the setting the reports read from its name (the prefix's
    last letter and the rest: `ppl_T2048` -> `T2048`); without them the long-context table showed '—' as the
    KV/req of that setting, silently, for every method."""
    prefix = cls.presentation.setting_prefix
    settings = [m[len(prefix) - 1:] for m in out.get("scores", {}) if m.startswith(prefix)]
    missing = [s for s in settings if s not in out.get("kv_by", {})]
    if missing:
        raise PluginContractError(
            f"long-context task {cls.name!r} ({cls.__module__}): scores {[prefix[:-1] + s for s in missing]} have no KV "
            f"bytes under {missing} in the result's kv_by (it has {sorted(out.get('kv_by', {}))}); a setting is "
            f"setting_prefix's last letter and what follows ({prefix!r}: {prefix}2048 -> {prefix[-1]}2048)")


def check_before_cells(tasks, tokenizer, options: dict[str, Any], limit: int | float | None, max_length: int | None,
                       model_config) -> None:
    """Each long-context task of `tasks` checks its options against the loaded tokenizer and the context length the
    run scores with (`max_length`, else the model's, as `PDLM` resolves it), once, before any cell: a prompt longer
    than the context failed each cell after its planning and earlier tasks."""
    from harness.quality.lm import resolve_max_length

    for task in (t for t in tasks if is_long_task(t)):
        get(task).check_tokenizer(tokenizer, options[task], limit)
        get(task).check_max_length(options[task], max_length or resolve_max_length(model_config, tokenizer), limit)


import_package_modules(__name__, Path(__file__).parent, _BUILTIN)  # registration order = `names()`
