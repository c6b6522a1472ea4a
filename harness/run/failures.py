"""A quality run's failed cells: each one that raised, and the exception that ends a run in which some did."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.store import records as rec


@dataclass
class CellFailure:
    """A (method, mode) cell that raised; the run went on with the other cells."""

    method: str
    mode: str
    error: BaseException
    file: Path
    plugin: str | None = None  # the plug-in code it came from (`plugin_faults.blame_cell`), None for the harness's own

    @property
    def bad_input(self) -> bool:
        """A usage error (e.g. an option this model cannot take) rather than a crash or OOM."""
        return isinstance(self.error, UsageError)

    def text(self) -> str:
        """The error: with its type for a crash, and as its type alone when it has no message (a plug-in's bare
        `raise NotImplementedError` printed an empty error)."""
        message = str(self.error)
        return message if self.bad_input and message else f"{type(self.error).__name__}: {message}".removesuffix(": ")

    def named(self) -> str:
        """`text()` and the plug-in code it came from, as `latency` names it: "RuntimeError: task exploded" named
        neither the task, the policy nor the method whose code raised it."""
        where = self._where()
        return f"{self.text()} (in plug-in {where})" if where else self.text()

    def line(self) -> str:
        where = f"in plug-in {w}; " if (w := self._where()) else ""
        return f"{self.method}/{self.mode}: {self.text()} ({where}details: {self.file})"

    def _where(self) -> str | None:
        """The plug-in code to name, unless the message names it already (a contract error's does)."""
        return self.plugin if self.plugin and self.plugin not in str(self.error) else None


class CellsFailed(Exception):
    """Some cells failed; `records` holds the ones that finished, `failures` the others."""

    def __init__(self, failures: list[CellFailure], records: list[rec.RunRecord]) -> None:
        super().__init__("; ".join(f.line() for f in failures))
        self.failures, self.records = failures, records
