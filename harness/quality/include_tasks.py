"""lm-eval task YAMLs of the user's own (`--include-path DIR`, lm-eval's `--include_path`): the folders checked, the
task, group and tag names they define, and the files a run's results depend on, for the records' input digests.

lm-eval 0.4.13 indexes every `*.yaml` file under each folder, at any depth (not `.yml`; `__pycache__` and
`.ipynb_checkpoints` skipped); a later folder's name wins over an earlier one's. A YAML's `!function utils.f` is
`utils.py` beside it, and `dataset_kwargs` go to `datasets.load_dataset` unchanged, so a relative `data_files`
path is read from the current folder (or from `dataset_kwargs.data_dir`), not from the YAML's folder.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from harness.errors import UsageError

IGNORED = frozenset({"__pycache__", ".ipynb_checkpoints"})  # lm-eval's index skips these folders
FLAG = "--include-path"


def _under(folder: Path, patterns: Iterable[str]) -> list[Path]:
    """The files under `folder` (any depth) matching `patterns`, outside the folders lm-eval skips, sorted."""
    found = {p for pat in patterns for p in folder.glob(f"**/{pat}") if p.is_file()}
    return sorted(p for p in found if not IGNORED & set(p.relative_to(folder).parts))


def yaml_files(folder: Path) -> list[Path]:
    """The task YAMLs lm-eval indexes under `folder`."""
    return _under(folder, ("*.yaml",))


def check_folders(folders: Iterable[str | Path]) -> None:
    """A UsageError naming the first folder that does not exist or holds no task YAML lm-eval would read."""
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            raise UsageError(f"{FLAG} {f}: no such folder; give a folder of lm-eval task YAMLs (*.yaml)")
        if not yaml_files(p):
            yml = " (its .yml files are not read: lm-eval indexes *.yaml only)" if _under(p, ("*.yml",)) else ""
            raise UsageError(f"{FLAG} {f}: holds no task YAML{yml}; give the folder holding your *.yaml task files")


def defined_names(folders: Iterable[str | Path]) -> dict[str, Path | None]:
    """Task, group and tag name -> the YAML that defines it (None for a tag), as lm-eval's index reads `folders`."""
    from lm_eval.tasks._index import TaskIndex

    return {name: e.yaml_path for name, e in TaskIndex.build([Path(f) for f in folders]).items()}


def unreadable(folders: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """The YAMLs under `folders` that lm-eval's index skips, each with its error on one line: lm-eval logs them at
    debug level only, so the tasks they define are merely "unknown"."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    out = []
    for y in (y for f in folders for y in yaml_files(Path(f))):
        try:
            TaskIndex.process_cfg(load_yaml(y, resolve_func=False, recursive=True), y, {})
        except Exception as e:  # noqa: BLE001 - what lm-eval's index catches
            text = " ".join(str(e).split())  # a YAML error's lines: what, in which file, line and column
            out.append((y, f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__))
    return out


def _load(path: Path, recursive: bool) -> dict[str, Any] | None:
    """A YAML as lm-eval's loader reads it (`!function` left unresolved), or None where lm-eval's index skips it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=False, recursive=recursive)
    except Exception:  # noqa: BLE001 - lm-eval skips a YAML it cannot read the same way (a log line at debug level)
        return None


def _included(path: Path, seen: set[Path]) -> Iterator[Path]:
    """The YAMLs `path` names in `include:` (relative to its folder, as lm-eval resolves them), recursively."""
    cfg = _load(path, recursive=False) or {}
    names = cfg.get("include") or []
    for inc in names if isinstance(names, list) else [names]:
        p = (path.parent / str(inc)).resolve()
        if p.is_file() and p not in seen:
            seen.add(p)
            yield p
            yield from _included(p, seen)


def code_files(folder: Path) -> list[Path]:
    """What lm-eval reads from `folder` besides data: its YAML and Python files (`!function` modules), and the
    YAMLs elsewhere that its task YAMLs `include:`. Sorted, each once."""
    own = _under(folder, ("*.yaml", "*.yml", "*.py"))
    seen = {p.resolve() for p in own}
    outside = [p for y in yaml_files(folder) for p in _included(y, seen)]
    return own + sorted(outside)


def _dataset_kwargs(cfg: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """One task config's `dataset_kwargs` ({} when it has none) and the folder its relative `data_files` are read
    from: `dataset_kwargs.data_dir`, else the current folder (as `datasets.load_dataset` reads them)."""
    kwargs = cfg.get("dataset_kwargs") if isinstance(cfg.get("dataset_kwargs"), dict) else {}
    return kwargs, Path(str(kwargs.get("data_dir") or "."))


def _group_tasks(cfg: dict[str, Any]) -> list:
    """A group config's `task` list (task names and inline task configs); [] for a task config."""
    return cfg.get("task") if isinstance(cfg.get("task"), list) else []


def _file_patterns(cfg: dict[str, Any]) -> Iterator[str]:
    """The local paths (glob patterns too) in one task config's `dataset_kwargs.data_files`, as written: a path, a list
    or split -> paths (hf:// and URLs left out)."""
    files = _dataset_kwargs(cfg)[0].get("data_files")
    for item in files.values() if isinstance(files, dict) else [files]:
        for pat in (item if isinstance(item, list) else [item]):
            if isinstance(pat, str) and "://" not in pat:  # hf:// and URLs are not local files
                yield pat


def check_data_files(tasks: Iterable[str], defined: dict[str, Path | None]) -> None:
    """A UsageError naming the first of `tasks` (or of the tasks a group of them lists) whose YAML (`defined`, from
    `defined_names`) names a local `data_files` path that matches no file: `datasets` reads a relative one from the
    current folder (or from `dataset_kwargs.data_dir`), not from the YAML's folder, and would fail only once the model
    is loaded, naming neither the YAML nor the rule."""
    seen: set[str] = set()
    todo: list[tuple[str, dict | None, Path | None]] = [(t, None, None) for t in tasks]
    while todo:
        task, cfg, group_yaml = todo.pop(0)
        yaml = defined.get(task) if cfg is None else group_yaml  # a group's inline task config is in the group's YAML
        if cfg is None:
            if task in seen or yaml is None:
                continue
            seen.add(task)
            cfg = _load(yaml, recursive=True) or {}
        kwargs, base = _dataset_kwargs(cfg)
        for pat in _file_patterns(cfg):
            if not glob.glob(str(base / pat), recursive=True):
                raise UsageError(f"task {task} ({yaml or '--include-path'}): dataset_kwargs.data_files {pat!r} matches "
                                 f"no file{_why_no_file(pat, kwargs, base, yaml)}")
        for sub in _group_tasks(cfg):
            if isinstance(sub, str):
                todo.append((sub, None, None))
            elif isinstance(sub, dict):
                todo.append((str(sub.get("task", task)), sub, yaml))


def _why_no_file(pat: str, kwargs: dict[str, Any], base: Path, yaml: Path | None) -> str:
    """What the error of a `data_files` path `pat` that matches no file adds: where a relative one was looked for, and
    the file beside the YAML of that name when there is one."""
    if Path(pat).is_absolute():
        return ""
    if kwargs.get("data_dir"):
        return f" in dataset_kwargs.data_dir {str(base)!r} ({base.resolve()})"
    near = yaml.parent / pat if yaml is not None else None
    return (f": a relative path is read from the current folder ({Path.cwd()}), not from the YAML's folder; "
            + (f"{near} exists: give that absolute path" if near and glob.glob(str(near), recursive=True)
               else "give an absolute path, or run from the folder it is relative to"))


def _data_of(cfg: dict[str, Any]) -> Iterator[Path]:
    """The local paths one task config loads: `dataset_kwargs.data_files` (a path, a list or split -> paths; glob
    patterns too) relative to `dataset_kwargs.data_dir` or the current folder, a `data_dir` without files, and a
    `dataset_path` that is a local file or folder; also the inline task configs of a group's `task` list."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    kwargs, base = _dataset_kwargs(cfg)
    files = kwargs.get("data_files")
    for pat in _file_patterns(cfg):
        yield from (Path(p) for p in sorted(glob.glob(str(base / pat), recursive=True)))
    if files is None and kwargs.get("data_dir") and base.exists():
        yield base
    path = cfg.get("dataset_path")
    if isinstance(path, str) and path not in _PACKAGED_DATASETS_MODULES and Path(path).exists():
        yield Path(path)
    for sub in _group_tasks(cfg):
        if isinstance(sub, dict):
            yield from _data_of(sub)


def data_files(folder: Path) -> list[Path]:
    """The local data files and folders the task YAMLs under `folder` load (`_data_of`, includes merged in, paths
    resolved from the current folder as `datasets` resolves them); existing ones only, sorted, each once."""
    found = {p.resolve() for y in yaml_files(folder) if (cfg := _load(y, recursive=True)) for p in _data_of(cfg)}
    return sorted(found)
