"""`LongTask`: the base of a harness-native long-context task, and helpers the tasks share.

A task is one file in this package: a `LongTask` subclass decorated with `@register_task` (see
`harness/quality/long_tasks/__init__.py`). It declares its `name`, its options (`Config`, a frozen
dataclass set with `--set TASK.OPTION=VALUE`), a `version`, a cheap `check_data`, its
`primary_metric` and its `presentation` (how reports show it; stored in every record, so reports
need no task code), and evaluates through a `Scorer`, in either PD setting.

Plug-in files must not import `harness.config` at module level: `harness.config` imports this
package to learn the long-context task names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from harness.store.task_names import TaskPresentation


class LongTask:
    """One long-context workload. Subclasses set the class attributes and implement `evaluate`."""

    name: ClassVar[str]
    Config: ClassVar[type]  # frozen dataclass of the task's options (defaults = the standard setting)
    version: ClassVar[int] = 1  # bump when the same options would give different numbers: older records are refused
    reusable_versions: ClassVar[tuple[int, ...]] = ()  # older versions whose stored results are still reused
    # older versions whose results still hold where the tokenizer prepends no special token (`special_prefix` empty):
    # they differ from this one only by that prefix
    reusable_without_prefix: ClassVar[tuple[int, ...]] = ()
    presentation: ClassVar[TaskPresentation]
    # files (or folders) it reads, relative to the data dir: records keep their digest, so a rerun after they
    # changed does not reuse records made from the old ones (harness/run/inputs.py); none for synthetic tasks
    data_files: ClassVar[tuple[str, ...]] = ()

    @property
    def primary_metric(self) -> str:
        """The task's one number (pooled over its settings)."""
        return self.presentation.primary_metric

    @classmethod
    def check_data(cls, data_dir: Path | None) -> None:
        """Raise UsageError when the task cannot run with `data_dir` (cheap: runs before any model work)."""

    @classmethod
    def too_long_advice(cls, option: str, values, room: int, least: int) -> str:
        """What to do when prompts exceed the context (`check_max_length`): "; give --set TASK.OPTION=a,b (prompts
        that fit), a larger --max-length ...", with the `values` of `option` at most `room` tokens or, where none is,
        `room` itself when it is at least `least` (no --set where no prompt fits)."""
        fit = [v for v in values if v <= room] or [v for v in [room] if v >= least]
        given = f"--set {cls.name}.{option}={','.join(map(str, fit))} (prompts that fit), " if fit else ""
        return f"; give {given}a larger --max-length the model supports, or a model with a longer context"

    @classmethod
    def input_files(cls, data_dir: Path | None, options: Any) -> list[Path]:
        """The files (or folders) the task reads under `options`, those that exist: records keep their digest, so a
        rerun after they changed does not reuse records made from the old ones. By default its `data_files` under
        `data_dir`; a task that reads a file an option names (a user's own file, outside the data dir too) returns
        it here, or a changed file behind the same option would be reused silently (run keys name only the path)."""
        return [data_dir / r for r in cls.data_files if (data_dir / r).exists()] if data_dir else []

    @classmethod
    def stale(cls, result: dict, options: Any, limit: int | float | None) -> str | None:
        """Why a stored result of this task ({"items", "n_samples"}, from a record or resume state of the same
        run key) no longer holds for `options` and `limit`, e.g. made by an older version that chose its samples
        otherwise; None when it holds. The run then refuses to reuse it (harness/run/inputs.py)."""
        return None

    @classmethod
    def check_tokenizer(cls, tokenizer, options: Any, limit: int | float | None) -> None:
        """Raise UsageError when `options` cannot work with the model's tokenizer (e.g. a prompt length too
        short for the task's fixed text); runs once, with the model's tokenizer read before its weights load."""

    @classmethod
    def check_max_length(cls, options: Any, max_length: int, limit: int | float | None = None) -> None:
        """Raise UsageError when `options` (under `limit`) need longer sequences than `max_length` (the context length the run
        scores with); runs with `check_tokenizer`, before the first cell (not after each cell's planning)."""

    def evaluate(self, scorer, tokenizer, data_dir: Path | None, options: Any, limit: int | float | None,
                 progress: bool = False) -> dict:
        """Returns {"scores": {metric: {"value", "stderr"}}, "n_samples", "kv_by": {setting: KV delta},
        "details"}; per-setting scores are named `presentation.setting_prefix` + number and `kv_by`
        is keyed by the same setting (e.g. `ppl_T2048` and `T2048`). Optional: "items" (per-item numbers
        for paired comparisons, `harness.quality.samples.per_item`'s shape; stored in the record) and
        "samples" ({task: [per-sample dict with `doc_id`]}, written by `--log-samples`, never stored)."""
        raise NotImplementedError

    @classmethod
    def items(cls, options: Any, limit: int | None) -> int | None:
        """Requests one evaluation makes under `options` and `--limit` (for the run's up-front statement
        and ETA; cheap: no data is read), or None when that is not known before the data is read."""
        return None

    @classmethod
    def describe(cls, options: Any) -> dict:
        """What a record keeps about the task (`lm_eval.tasks[name].harness_task`): version, options and
        presentation. Not part of the run key: only the options are (`RunConfig.identity`)."""
        return {"version": cls.version, "options": dataclasses.asdict(options),
                "presentation": cls.presentation.to_dict()}


# -- helpers shared by the tasks ----------------------------------------------------------------
def capped(n: int, limit: int | float | None) -> int:
    """How many of a task's `n` samples `--limit` keeps: all (None), at most `limit`, or lm-eval's
    rule for a fraction (0 < limit < 1): ceil(n * limit)."""
    if not limit:
        return n
    return math.ceil(n * limit) if limit < 1 else min(n, int(limit))


@contextlib.contextmanager
def batch_size(scorer, n: int) -> Iterator[None]:
    """Cap the scorer's batch size at `n` for the block (long rows: keep batches small)."""
    old = scorer.batch_size
    scorer.batch_size = min(old, n)
    try:
        yield
    finally:
        scorer.batch_size = old


def kv_delta(scorer, fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    """fn()'s result and the KV bytes the scorer's handoffs sent while it ran."""
    before = scorer.tally.as_dict()
    out = fn()
    return out, scorer.tally.since(before)


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (None for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def special_prefix(tokenizer) -> list[int]:
    """The token ids the tokenizer puts before a text by default (Llama's BOS; none for SmolLM2 or the byte tokenizer
    of the random models): what a served prompt starts with, and what lm-eval's own tasks start with (HFLM keeps the
    tokenizer's default). Long-context prompts are token lists built here, so they add it themselves."""
    bare, full = list(tokenizer.encode("a", add_special_tokens=False)), list(tokenizer.encode("a"))
    # what precedes the text: a tokenizer that also appends a token (an EOS, `add_eos_token`) still has its BOS found
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0) if bare else 0
    return full[:start]
