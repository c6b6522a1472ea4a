"""`LocalTask`: an lm-eval task whose rows come from files in the data dir, and the readers the task files share.

A task is one file in this package (or in a `HARNESS_PLUGINS` module): a `LocalTask` subclass decorated with
`@register_task` (`harness/quality/local_tasks/__init__.py`). It names lm-eval's upstream YAML, which runs unchanged
(prompt, choices, target, metrics, split), the files it reads, the splits they give and a loader that turns those
files into the field layout of the Hugging Face dataset the upstream YAML reads; `harness.quality.tasks` writes the
YAML that swaps in the loader as lm-eval's `custom_dataset`.

A task file must not import `harness.config` at module level (config reads the task registries).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from harness.errors import UsageError

RESTORE = "restore it (the README.md beside it names its source)"  # what a data-file error asks
SPLITS = ("train", "validation", "test", "dev")  # split names a task may provide (lm-eval's, and MMLU's few-shot dev)


class LocalTask:
    """One lm-eval task (or group, such as MMLU) on local data. Subclasses set the class attributes and `load`."""

    name: ClassVar[str]  # lm-eval's task name: --tasks' spelling, the generated YAML's `task:`, the record's key
    # files (or folders) it reads, relative to the data dir (an absolute path: a file of your own elsewhere): all must
    # exist (else exit 2 naming the first missing), and records keep their digest. The first is the scored split's
    # file: a JSON-lines file there is counted for the run's up-front item count
    files: ClassVar[tuple[str, ...]]
    splits: ClassVar[tuple[str, ...]]  # the splits `load` returns; the upstream YAML's other splits are set to null
    # lm-eval's YAML relative to lm_eval/tasks (the pinned version's); a group's names `{subtask}`
    upstream: ClassVar[str]
    # the one number tables show under the default `paper` convention (lm-eval's usual reporting); records keep it
    # (`lm_eval.metric_convention`), so reports need no task code
    table_metric: ClassVar[str] = "acc"
    # its column title in the report's tables (e.g. "SciQ"); records keep it beside the table metric
    # (`lm_eval.task_titles`). None: its name, or for the package's tasks reports/tables.py's TASK_TITLE ("ARC-e")
    title: ClassVar[str | None] = None
    # a group's subtask count in lm-eval's hub data (MMLU: 57), for the run's up-front item count without a data dir
    hub_subtasks: ClassVar[int | None] = None

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Rows per split (the keys of `splits`) in the upstream dataset's field layout; a UsageError naming the
        file, line and field for a damaged file. `subtask`: the group's subtask (None for a single task)."""
        raise NotImplementedError

    @classmethod
    def subtasks(cls, data_dir: Path) -> list[str] | None:
        """A group's subtasks found in `data_dir` (MMLU's subjects: lm-eval task `{name}_{subtask}` each, from the
        upstream YAML with `{subtask}` filled in); None for a single task."""
        return None

    @classmethod
    def upstream_yaml(cls, subtask: str | None = None) -> str:
        """The upstream YAML of the task, or of a group's `subtask`, relative to lm_eval/tasks."""
        return cls.upstream.format(subtask=subtask) if subtask is not None else cls.upstream

    @classmethod
    def path(cls, data_dir: Path, index: int = 0) -> Path:
        """Its `index`th data file under `data_dir`."""
        return Path(data_dir) / cls.files[index]


# -- readers shared by the task files ----------------------------------------------------------------
def jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each an object with `fields`; a UsageError names the file, line and field."""
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"data file {path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); "
                                     f"a truncated or edited file? {RESTORE}") from None
                missing = [k for k in fields if k not in row] if isinstance(row, dict) else ["(a JSON object)"]
                if missing:
                    have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise UsageError(f"data file {path}, line {n}: missing field {missing[0]!r} (it has: {have}); "
                                     f"each row needs {', '.join(fields)}")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path}: unreadable ({e})") from None
    return rows


def answers(path: Path, rows: list[dict], ok: Callable[[dict], bool], what: str | Callable[[dict], str]) -> list[dict]:
    """`rows`, each checked by `ok` (its answer names one of its choices): else lm-eval fails later naming nothing.
    `what` says what is wrong (or makes it from the row)."""
    for n, r in enumerate(rows, 1):
        if not ok(r):
            raise UsageError(f"data file {path}, row {n}: {what(r) if callable(what) else what}; {RESTORE}")
    return rows


def text(path: Path) -> str:
    """The file's text; a UsageError naming it when it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path}: unreadable ({e}); {RESTORE}") from None
