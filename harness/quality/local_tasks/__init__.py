"""lm-eval tasks that run on local data files, as plug-ins: one file per dataset family in this package.

lm-eval's own YAML defines each task (prompt, choices, target, metrics, split); a task here says where its rows
are in the data dir and how they map to the fields that YAML reads (`base.LocalTask`), and `harness.quality.tasks`
writes the YAML that swaps its loader in as lm-eval's `custom_dataset`.

Adding a task: a file here with a `LocalTask` subclass decorated with `@register_task` (or the same in a
`HARNESS_PLUGINS` module). Every module of the package is imported below, so `--tasks`, the data-file checks, the
data digests in records, the run's item count and, through the metric stored in each record, the reports know it.
The `standard` alias stays the paper's seven tasks (`harness.store.task_names.STANDARD_TASKS`): a new task runs
when `--tasks` names it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from harness.quality.local_tasks.base import SPLITS, LocalTask
from harness.registration import (
    LM_EVAL_NAME_RULE,
    LM_EVAL_NAME_TEXT,
    TaskRegistry,
    check_callable_as,
    check_name,
    import_package_modules,
    same_definition,
)

__all__ = ["LocalTask", "register_task", "unregister_task", "names", "get", "is_local_task", "is_builtin", "titles"]

_REGISTRY = TaskRegistry()  # name -> LocalTask subclass
# the built-in files come first, in this order (the order of the tables this registry replaced)
_BUILTIN = ("arc", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "wikitext", "lambada", "mmlu")
ALIASES = ("standard", "long")  # --tasks' aliases (harness.config.expand_tasks)


def register_task(cls: type[LocalTask]) -> type[LocalTask]:
    """Class decorator: make `cls` the lm-eval task `cls.name` on local data; a ValueError (which `HARNESS_PLUGINS`
    turns into exit 2 naming the module) for a declaration the harness could not use or a name that is taken."""
    if not (isinstance(cls, type) and issubclass(cls, LocalTask)):
        raise ValueError(f"{cls!r}: an lm-eval task on local data is a subclass of harness.quality.local_tasks.LocalTask")
    name = getattr(cls, "name", None)
    owner = f"lm-eval task on local data {name!r} ({cls.__module__}.{cls.__qualname__})"
    check_name("lm-eval task on local data", name, f"{cls.__module__}.{cls.__qualname__}", LM_EVAL_NAME_RULE,
               LM_EVAL_NAME_TEXT)
    _check_fields(cls, owner)
    _check_name_free(cls, owner)
    _REGISTRY[name] = cls
    return cls


def _check_fields(cls: type[LocalTask], owner: str) -> None:
    """The class attributes `harness.quality.tasks` and the pipeline read, of the types they need."""
    files, splits = getattr(cls, "files", None), getattr(cls, "splits", None)
    if not isinstance(files, tuple) or not files or not all(isinstance(f, str) and f for f in files):
        raise ValueError(f"{owner}: `files` must be a non-empty tuple of paths relative to the data dir (or absolute), "
                         f"got {files!r}")
    if not isinstance(splits, tuple) or not splits or not set(splits) <= set(SPLITS):
        raise ValueError(f"{owner}: `splits` must be a non-empty tuple of {', '.join(SPLITS)}, got {splits!r}")
    upstream = getattr(cls, "upstream", None)
    if not isinstance(upstream, str) or not upstream.endswith(".yaml") or upstream.startswith("/"):
        raise ValueError(f"{owner}: `upstream` must be lm-eval's task YAML relative to lm_eval/tasks, e.g. "
                         f"'sciq/sciq.yaml', got {upstream!r}")
    if not isinstance(cls.table_metric, str) or not cls.table_metric:  # LocalTask's default: "acc"
        raise ValueError(f"{owner}: `table_metric` must name one of the task's lm-eval metrics, e.g. 'acc'")
    if cls.title is not None and (not isinstance(cls.title, str) or not cls.title.strip()):  # default None: its name
        raise ValueError(f"{owner}: `title` must be the text of its column in the report's tables, e.g. 'SciQ', or "
                         f"None for its name, got {cls.title!r}")
    load = inspect.getattr_static(cls, "load")
    if load is inspect.getattr_static(LocalTask, "load") or not isinstance(load, classmethod):
        raise ValueError(f"{owner}: `load(cls, data_dir, subtask=None)` must be a classmethod of its own, returning "
                         "rows per split")
    check_callable_as(owner, cls.load, "load(cls, data_dir, subtask)", cls)


def _check_name_free(cls: type[LocalTask], owner: str) -> None:
    """Refuse a name `--tasks` already means (an alias, a long-context task, MMLU's subtasks `mmlu_*`) or that another
    definition registered; the same class imported again (`importlib.reload`) replaces itself."""
    from harness.quality import long_tasks  # imported here: each registry refuses the other's names

    name = cls.name
    if name in ALIASES or name.startswith("mmlu_") or long_tasks.is_long_task(name):
        raise ValueError(f"lm-eval task on local data {name!r} ({cls.__module__}): the name is a long-context task, "
                         "an MMLU subtask or a --tasks alias; choose another")
    old = _REGISTRY.get(name)
    if old is not None and not same_definition(old, cls):
        raise ValueError(f"lm-eval task on local data {name!r} is already registered by {old.__module__}.{old.__qualname__}")


unregister_task, names, get = _REGISTRY.forget, _REGISTRY.names, _REGISTRY.task


def is_local_task(name: str) -> bool:
    return name in _REGISTRY


def is_builtin(cls: type[LocalTask]) -> bool:
    """Whether `cls` is one of this package's tasks (a file here), not a plug-in's."""
    return cls.__module__.startswith(f"{__name__}.")


def titles(tasks: tuple[str, ...]) -> dict[str, str]:
    """{task: its declared `title`} for the tasks of `tasks` that declare one (records store it as
    `lm_eval.task_titles`, only when some task has one: a record of the package's tasks keeps its shape)."""
    return {t: cls.title for t in tasks if (cls := _REGISTRY.get(t)) is not None and cls.title is not None}


import_package_modules(__name__, Path(__file__).parent, _BUILTIN)  # registration order = `names()`
