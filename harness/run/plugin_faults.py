"""A plug-in's failure, told apart from the harness's own, in a latency run that goes on past it.

A latency run measures every plan in interleaved rounds (`latency_run.py`): a plug-in method's `plan()`, a plug-in
KV policy's `keep()` or a plug-in latency figure that raised an ordinary exception ended the whole run with a
traceback, and the other plans' measurements with it, where a quality run fails that cell and goes on. Here the
failed method is left out of the rounds (its traceback in `<method>__disaggregated.failed.json`, the note a
quality cell leaves), a failed figure is left out of its record (which keeps the samples and the other figures; the
traceback in the record's `extra.figure_failures`), each is said in one line, and the run ends with a non-zero exit.

Which exceptions are a plug-in's (`blame`): one raised while plug-in code was running (a frame of a plug-in module,
as `methods.plugin_code.is_plugin` tells them, or of a notebook's `__main__`, is on its traceback or on that of the
exception it was raised from), or the harness's check of what a plug-in returned (a `PluginContractError`, and
`Method.make_plan`'s checks of a plan). Anything else is a bug of the harness's own code, and still ends the run with
its traceback: a package method that raises is never a plug-in's failure.
"""

from __future__ import annotations

import datetime as dt
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import PluginContractError, UsageError
from harness.store import records as rec
from methods.plugin_code import MAIN, is_plugin, plugin_classes


def blame(error: BaseException, subject: object = None) -> str | None:
    """The plug-in code `error` comes from: `module.function` of the innermost plug-in frame on its traceback (or on
    the tracebacks of the exceptions it was raised from), or, for the harness's check of what a plug-in returned,
    the plug-in class (or figure function) of `subject`; None when it is the harness's own error."""
    found = _plugin_frame(error)
    if found is not None:
        frame, module, _ = found
        return f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
    if isinstance(error, PluginContractError) or _raised_by_make_plan(error):
        return owner(subject)
    return None


def plugin_line(error: BaseException) -> str | None:
    """'FILE:LINE' of the plug-in frame `blame` names (where no traceback is kept, the line to look at); None when
    no plug-in frame is on it."""
    found = _plugin_frame(error)
    return f"{found[0].f_code.co_filename}:{found[2]}" if found is not None else None


def _plugin_frame(error: BaseException) -> tuple[object, str, int] | None:
    """(frame, module, line) of the innermost plug-in frame on `error`'s traceback or its causes'."""
    found = None
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # the causes are raised deeper down: the last plug-in frame wins
        seen.add(id(e))
        for frame, lineno in traceback.walk_tb(e.__traceback__):
            module = _module_of(frame)
            if module == MAIN or is_plugin(module):
                found = (frame, module, lineno)
        e = e.__cause__
    return found


def blame_cell(error: BaseException, method: object) -> str | None:
    """`blame` in a quality cell, where a contract error need not be the method's: a long-context task's result, a
    local task's rows or a KV policy's mask name their plug-in in the message, so only `Method.make_plan`'s checks
    blame the cell's method (a plug-in method's name on a task's error would send its author to the wrong file)."""
    return blame(error, method if _raised_by_make_plan(error) else None)


def owner(subject: object) -> str | None:
    """`module.Name` of the plug-in code `subject` (a method instance or a figure function) is, or None for the
    package's own."""
    if callable(subject) and not isinstance(subject, type) and hasattr(subject, "__qualname__"):  # a function
        module = subject.__module__
        return f"{module}.{subject.__qualname__}" if module == MAIN or is_plugin(module) else None
    classes = plugin_classes(subject) if subject is not None else []
    return f"{classes[0].__module__}.{classes[0].__qualname__}" if classes else None


def _module_of(frame) -> str:
    """The module a frame runs in; `python -m harness`'s `__main__` is `harness.__main__` (its spec's name)."""
    name = frame.f_globals.get("__name__", "")
    spec = frame.f_globals.get("__spec__")
    return spec.name if name == MAIN and spec is not None else name


def _raised_by_make_plan(error: BaseException) -> bool:
    """Whether `Method.make_plan` itself raised `error`: its checks of the plan `plan()` returned."""
    from methods.base import Method

    frames = [f for f, _ in traceback.walk_tb(error.__traceback__)]
    return bool(frames) and frames[-1].f_code is Method.make_plan.__code__


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@dataclass
class PluginFailure:
    """What failed (a method, or a figure on a method's workloads), the plug-in code blamed, the error, and where
    its traceback is kept."""

    subject: str
    where: str
    error: BaseException
    details: str
    figure: bool = False  # a latency figure's (its record is written), not a method's

    @property
    def bad_input(self) -> bool:
        """The harness's check of a plug-in (fix the plug-in), not a crash a rerun might not meet."""
        return isinstance(self.error, UsageError)

    def line(self) -> str:
        kept = "; the record keeps its samples and the other figures" if self.figure else ""
        message = one_line(self.error)
        where = "" if self.where in message else f"in plug-in {self.where}; "  # a contract error names it already
        return f"{self.subject}: {type(self.error).__name__}: {message} ({where}traceback in {self.details}{kept})"


class PluginsFailed(Exception):
    """Plug-ins failed in a run that went on: `failures`, and the `records` it finished."""

    def __init__(self, failures: list[PluginFailure], records: list[rec.RunRecord]) -> None:
        super().__init__("; ".join(f.line() for f in failures))
        self.failures, self.records = failures, records


@dataclass
class Faults:
    """The plug-in failures of one latency run into `out_dir`, noted as they happen and raised at its end (`check`);
    the first error of the harness's own among the figures is raised there too, once every record is saved."""

    out_dir: Path
    say: Callable[[str], None]
    failures: list[PluginFailure] = field(default_factory=list)
    own: list[BaseException] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # method -> its record's run key, once planned

    def method(self, name: str, method: object, error: Exception) -> None:
        """Note that plug-in method `name` failed (planning or measuring): its note file and one line. The
        harness's own error is raised again, as it was."""
        where = blame(error, method)
        if where is None:
            raise error
        _free_accelerator_memory()
        path = self.out_dir / rec.failure_filename(name, "disaggregated")
        tb = "".join(traceback.format_exception(error))
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        try:
            rec.save_failure(self.out_dir, name, "disaggregated", self.keys.get(name, "?"), error, tb, created,
                             run="latency", plugin=where)  # the report's note names them
        except OSError as e:  # a full disk: the line below still names the failure
            path = Path(f"nowhere: {path.name} could not be written ({e.strerror or e})")
        self.failures.append(PluginFailure(name, where, error, str(path)))
        self.say(f"FAILED {self.failures[-1].line()}; the other methods go on")

    def clear(self, name: str) -> None:
        """`name`'s record is written (or reused): an earlier run's note of its failure no longer holds."""
        (self.out_dir / rec.failure_filename(name, "disaggregated")).unlink(missing_ok=True)

    def figures(self, name: str, errors: dict[str, tuple[Exception, list[str]]], record: Path) -> None:
        """Note the figures that failed on `name`'s workloads (`errors`: figure -> its error and workloads, kept in
        `record`); the error of a figure of the harness's own is kept for `check` to raise."""
        from harness.latency.figures import FIGURES

        for figure, (error, labels) in errors.items():
            where = blame(error, FIGURES.get(figure))
            cause = error.__cause__ or error  # the figure's own exception, not the harness's wrapping of it
            if where is None:
                self.own.append(cause)
                continue
            subject = f"{name}: latency figure {figure!r} on {', '.join(labels)}"
            details = f"{record}, extra.figure_failures"
            self.failures.append(PluginFailure(subject, where, cause, details, figure=True))
            self.say(f"FAILED {self.failures[-1].line()}")

    def check(self, records: list[rec.RunRecord]) -> None:
        """Raise the harness's own error, else `PluginsFailed` when a plug-in failed."""
        if self.own:
            raise self.own[0]
        if self.failures:
            raise PluginsFailed(self.failures, records)


def _free_accelerator_memory() -> None:
    """What a failed plan's measurement left on the GPU, before the other plans' rounds."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
