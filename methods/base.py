"""The `Method` contract: `plan` decides (pure), the engine applies (reversibly).

A method never sees the runner: it gets the model (read-only), an optional calibration set and
the mode, and returns a `PruningPlan`. Its options are a frozen dataclass `Config`, set from the
CLI as `--set <name>.<field>=<value>` and recorded with every result.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from harness.plan import PruningPlan


class Method(abc.ABC):
    """Base class of pruning-method adapters. Subclasses set `name` and a nested `Config`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.validate_config(self.config)

    def validate_config(self, config: Any) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise `UsageError` for option values that can never be valid (independent of the model)."""

    @abc.abstractmethod
    def plan(self, model: nn.Module, calib: Any | None, mode: str) -> PruningPlan:
        """Decide what to prune for `mode` ('unified' or 'disaggregated'). Must not modify `model`."""

    @contextlib.contextmanager
    def apply(self, model: nn.Module, plan: PruningPlan) -> Iterator[PruningPlan]:
        """Install `plan` on `model` for the duration of the block.

        The PD engine runs a plan's layers directly, with no change to the model, so the default
        installs nothing; a method that must alter the model (e.g. healed weights) overrides this
        and undoes its change on exit.
        """
        yield plan

    def needs_replan_on_resume(self) -> bool:
        """True when `apply` needs state that only `plan` builds (e.g. trained weights), so a
        resumed run must call `plan` again rather than reuse the stored plan alone."""
        return False

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
