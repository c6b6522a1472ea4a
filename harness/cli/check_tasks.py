"""The `--tasks` of a run checked by name before any model work: each defined by the harness (local data,
long-context), an `--include-path` YAML or lm-eval, none defined twice; a typo gets the names it was meant to be."""

from __future__ import annotations

from harness.config import did_you_mean
from harness.errors import UsageError


def check_tasks(tasks: tuple[str, ...], data_dir: str | None, include_path: tuple[str, ...] | None = None) -> None:
    """A UsageError for an empty --tasks, a task no source defines, an --include-path folder that is missing or holds
    no YAML, or a name of the run defined both by such a folder and by the harness itself."""
    from harness.quality import include_tasks, local_tasks, long_tasks

    if not tasks:
        raise UsageError("--tasks is empty; give at least one task, e.g. --tasks arc_easy")
    own: dict = {}
    if include_path:
        include_tasks.check_folders(include_path)
        own = include_tasks.defined_names(include_path)
        _refuse_shadowed(tasks, data_dir, own)
        include_tasks.check_data_files(tasks, own)
    unknown = [t for t in tasks if not local_tasks.is_local_task(t) and not long_tasks.is_long_task(t) and t not in own]
    if not unknown:
        return
    names = [*local_tasks.names(), *long_tasks.names(), "standard", "long", *own]  # what a typo was meant to be
    if data_dir is None:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [t for t in unknown if t not in known]
        if not unknown:
            return
        names += sorted(known)
    skipped = include_tasks.unreadable(include_path) if include_path else []
    mine = (f"; the YAMLs under --include-path {', '.join(include_path)} define: {', '.join(sorted(own)[:20]) or 'none'}"
            f"{' ...' if len(own) > 20 else ''}" if include_path else
            "; a task YAML of your own: --include-path DIR")
    if skipped:
        mine += (f"; lm-eval skips {len(skipped)} YAML(s) there it cannot read: "
                 + "; ".join(f"{y} ({err})" for y, err in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    typed = ", ".join(t + did_you_mean(t, names) for t in unknown)
    raise UsageError(f"unknown task(s) {typed}; tasks with local data: {', '.join(sorted(local_tasks.names()))}; "
                     f"long-context: {', '.join(long_tasks.names())}; aliases: standard, long"
                     + ("" if data_dir else " (without --data-dir, any lm-eval task name)")
                     + " (a plug-in's task: name its module in HARNESS_PLUGINS or a spec's top-level plugins key)" + mine)  # as methods say


def _refuse_shadowed(tasks: tuple[str, ...], data_dir: str | None, own: dict) -> None:
    """A UsageError for a task of the run that an --include-path YAML defines and the harness runs itself: a
    long-context task, or an lm-eval task on local data under --data-dir (its generated YAML would win silently).
    Without --data-dir your YAML replaces lm-eval's own task of that name, as lm-eval's --include_path does."""
    from harness.quality import local_tasks, long_tasks

    for t in (t for t in tasks if t in own):
        which = "long-context task" if long_tasks.is_long_task(t) else \
            "lm-eval task on local data (--data-dir)" if data_dir and local_tasks.is_local_task(t) else None
        if which:
            raise UsageError(f"task {t} is defined by {own[t] or '--include-path'} and is the harness's own {which}; "
                             f"rename the task in your YAML (its task: key) and name it in --tasks")
