"""Run lm-eval's own task definitions on local data files (no dataset hub).

For each task (the plug-ins of `harness/quality/local_tasks/`), a generated YAML `include:`s lm-eval's upstream
YAML unchanged (prompt, choices, target, metrics, split) and replaces only the data source with `custom_dataset`,
lm-eval's documented hook, pointing at `load_local` below. `load_local` calls the task's loader, which turns the
files of a data dir laid out like `../shared/data` into the field layout of the Hugging Face dataset the upstream
task reads (bridges documented in each data folder's README). Splits the local data lacks (training splits, only
used for few-shot examples) are set to null.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.quality import local_tasks
from harness.quality.local_tasks.mmlu import mmlu_rows, mmlu_subjects  # noqa: F401 - callers import them from here
from harness.quality.local_tasks.wikitext import wikitext_pages  # noqa: F401 - callers import it from here

SPLIT_KEYS = {"training_split": "train", "validation_split": "validation", "test_split": "test", "fewshot_split": None}


def local_rows(task: str, data_dir: str | Path, subject: str | None = None) -> dict[str, list[dict]]:
    """Rows per split of `task` read from `data_dir`, in the upstream dataset's field layout (`subject`: a group's
    subtask, such as an MMLU subject)."""
    data, cls = Path(data_dir), local_tasks.get(task)
    splits = cls.load(data, subject)
    _check_layout(task, cls, splits)
    empty = [k for k, rows in splits.items() if not rows]
    if empty:  # else lm-eval fails later with an IndexError that names nothing
        files = ", ".join(str(data / f) for f in cls.files)
        raise UsageError(f"task {task}{' (' + subject + ')' if subject else ''}: its {empty[0]} split has no rows "
                         f"(data: {files}); restore them (the task folder's README.md names their source)")
    return splits


def _check_layout(task: str, cls: type, splits: Any) -> None:
    """A PluginContractError naming the loader when it returned anything but {split: [row dict, ...]} with each split
    `cls.splits` declares: a list, None or a dict without the declared split failed in lm-eval, in every cell after the
    model loaded, with an AttributeError or a KeyError naming neither the task nor the loader (exit 1)."""
    from harness.errors import PluginContractError

    if not isinstance(splits, dict):
        wrong = f"a {type(splits).__name__}"
    elif missing := [k for k in cls.splits if k not in splits]:
        wrong = f"splits {sorted(splits)}, without {missing} (its `splits`)"
    else:
        odd = [k for k, rows in splits.items() if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)]
        wrong = f"split {odd[0]!r} as a {type(splits[odd[0]]).__name__} not of row dicts" if odd else None
    if wrong is not None:
        raise PluginContractError(f"task {task}: {cls.__module__}.{cls.__qualname__}.load returned {wrong}; it must return "
                                  f"{{split: [row dict, ...]}} with each of its splits {list(cls.splits)} "
                                  "(harness/quality/local_tasks/base.py)")


def load_local(harness_task: str, harness_data_dir: str, harness_subject: str | None = None, **_: Any):
    """lm-eval `custom_dataset` hook: a `datasets.DatasetDict` of the local files."""
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in
                                 local_rows(harness_task, harness_data_dir, harness_subject).items()})


def check_files(tasks: Iterable[str], data_dir: Path) -> None:
    """Raise a `UsageError` naming the first data file a task needs that is missing, or a plug-in task's upstream
    YAML that the installed lm-eval lacks (before any model work, not when the first cell builds the task)."""
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such directory (expected a folder laid out like ../shared/data)")
    tasks = list(tasks)
    for task in tasks:
        cls = local_tasks.get(task)
        for rel in cls.files:
            if not (data_dir / rel).exists():
                raise UsageError(f"missing data file {data_dir / rel} (needed by task {task}); " + _where_files_go(cls))
    upstream_yamls(tasks, data_dir)


def _where_files_go(cls: type) -> str:
    """What a missing-file error asks: the package's tasks read a folder laid out like ../shared/data; a plug-in
    task reads its own files, relative to the same data dir (which may come from $HARNESS_DATA_DIR, not a flag)."""
    data_dir = "the data dir (--data-dir, else $HARNESS_DATA_DIR)"
    if local_tasks.is_builtin(cls):
        return f"{data_dir} must be laid out like ../shared/data"
    return f"put it there: {cls.__module__}.{cls.__qualname__} reads it relative to {data_dir}"


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def _units(task: str, data_dir: Path) -> list[tuple[str, str | None]]:
    """The lm-eval tasks `task` runs as (name, subtask): itself, or a group's `{task}_{subtask}` each (MMLU's subjects)."""
    subtasks = local_tasks.get(task).subtasks(data_dir)
    return [(task, None)] if subtasks is None else [(f"{task}_{s}", s) for s in subtasks]


def write_overrides(tasks: Iterable[str], data_dir: Path, out_dir: Path, upstream: dict[str, Path]) -> list[str]:
    """Write one override YAML per lm-eval task into `out_dir`; return the task names written.

    `upstream` maps an lm-eval task name to its YAML file (`upstream_yamls`).
    """
    written = []
    data_dir = data_dir.resolve()
    for task in tasks:
        provided = set(local_tasks.get(task).splits)
        for name, subject in _units(task, data_dir):
            if name not in upstream:
                raise UsageError(f"lm-eval has no task {name!r} to attach local data to")
            lines = [f"include: {_yaml_str(str(upstream[name]))}", f"task: {_yaml_str(name)}",  # "1.5", "null": text
                     "custom_dataset: !function harness.quality.tasks.load_local",
                     "dataset_kwargs:", f"  harness_task: {_yaml_str(task)}",
                     f"  harness_data_dir: {_yaml_str(str(data_dir))}"]
            if subject:
                lines.append(f"  harness_subject: {_yaml_str(subject)}")
            lines += [f"{key}: null" for key, split in SPLIT_KEYS.items() if split and split not in provided]
            if "test" in provided and not provided & {"train", "validation"}:
                # --num-fewshot draws from the scored test split then; lm-eval leaves the item out of its own
                # examples only when the few-shot split is named and equals the test split (api/task.py)
                lines.append("fewshot_split: test")
            (out_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
            written.append(name)
    return written


def task_manager(tasks: Iterable[str], data_dir: Path | None, workdir: Path | None = None,
                 include_path: Iterable[str | Path] = ()):
    """An lm-eval `TaskManager` whose `tasks` read `data_dir` (or the hub when `data_dir` is None), and which also
    knows the tasks of the YAML folders `include_path` (`--include-path`, lm-eval's `include_path`).

    Its override YAMLs go into `workdir`, which the caller removes once the tasks are built (without one,
    a new temporary folder that outlives the call)."""
    from lm_eval.tasks import TaskManager

    include = [str(p) for p in include_path]
    if data_dir is None:
        return _hub_manager(tasks, include)
    tasks = [t for t in tasks if local_tasks.is_local_task(t)]
    check_files(tasks, data_dir)
    out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="harness-tasks-"))
    upstream = upstream_yamls(tasks, data_dir)
    names = write_overrides(tasks, data_dir, out, upstream)
    # Index only the folders of the upstream YAMLs these tasks use (MMLU's holds its group files), the user's
    # folders, then the overrides, which win: indexing all of lm-eval's ~14,000 task YAMLs cost ~8 s per run.
    folders = sorted({str(upstream[name].parent) for name in names})
    return TaskManager(include_path=[*folders, *include, str(out)], include_defaults=False)


def _hub_manager(tasks: Iterable[str], include: list[str]):
    """The TaskManager of a run without a data dir. lm-eval's ~14,000 task YAMLs are indexed (~12 s on a slow 2-core
    host) only when a task may need them: when every lm-eval task of `tasks` is a task (not a group or tag) that a
    YAML of the `include` folders defines, the index of those folders alone builds it the same (a folder's names win
    over lm-eval's in the full index too, and a YAML's `include:` is a file path). A group's member missing from the
    small index would be built as an inline task of that name instead (lm-eval's factory), and a tag gathers tasks
    from every folder, so groups and tags keep the full index."""
    from lm_eval.tasks import TaskManager

    from harness.quality import long_tasks

    wanted = [t for t in tasks if not long_tasks.is_long_task(t)]
    if include and wanted:
        own = TaskManager(include_path=include, include_defaults=False)
        if set(wanted) <= set(own.all_subtasks):  # tasks, YAML or Python (lm-eval's Kind.TASK, Kind.PY_TASK)
            return own
    return TaskManager(include_path=include or None, include_defaults=True)


def upstream_yamls(tasks: Iterable[str], data_dir: Path) -> dict[str, Path]:
    """Paths of the installed lm-eval's task YAMLs for `tasks` (lm-eval task name -> YAML; a group's subtasks each)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    paths, missing = {}, []
    for task in tasks:
        cls = local_tasks.get(task)
        for name, subtask in _units(task, data_dir):
            paths[name] = root / cls.upstream_yaml(subtask)
            if not paths[name].is_file() and not local_tasks.is_builtin(cls):
                raise UsageError(f"lm-eval task on local data {task!r} ({cls.__module__}): lm-eval "
                                 f"{getattr(lm_eval, '__version__', '?')} has no {paths[name]}; `upstream` names a task "
                                 "YAML relative to lm_eval/tasks, e.g. 'sciq/sciq.yaml'")
            missing += [] if paths[name].is_file() else [str(paths[name])]
    if missing:
        raise RuntimeError(f"lm-eval {getattr(lm_eval, '__version__', '?')} lacks task files {missing[:3]}; "
                           "the harness pins lm-eval==0.4.13")
    return paths



@contextlib.contextmanager
def without_env_report():
    """Skip lm-eval's `add_env_info` and `get_git_commit_hash` while inside: on every `simple_evaluate` they build
    torch's environment report (`pip list` and other subprocesses, 1-4 s a call) and run `git describe` in the
    current folder (outside a repository it prints "fatal: not a git repository" past -q; inside one it names that
    repository, not the harness), into results fields the harness never reads; records carry the harness's own
    `environment`, and its lm-eval results file the harness's commit (`lm_eval_json`)."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info, ev.get_git_commit_hash
    ev.add_env_info, ev.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        yield
    finally:
        ev.add_env_info, ev.get_git_commit_hash = saved
