"""The option types of a method's or long-context task's Config, read when it registers: a type the annotations
cannot resolve (imported only under TYPE_CHECKING) is named then, rather than breaking `--help` and every run with
a NameError. Imports nothing of the harness (the registries use it)."""

from __future__ import annotations

import typing
from typing import Any


def option_types(cls_config: type, owner: str) -> dict[str, Any]:
    """The option types of the options dataclass `cls_config`, as `--set` and `--help` read them; a ValueError naming
    `owner` when they cannot be read. (`--set` gives int, float, str, bool, tuples of those and `X | None`; an option
    of another type keeps its default and `--set` on it says so.)"""
    try:
        return typing.get_type_hints(cls_config)
    except Exception as e:  # noqa: BLE001 - NameError and friends from the plug-in's annotations
        raise ValueError(f"{owner}: the types of its Config options cannot be read ({type(e).__name__}: {e}); import "
                         "every type an option names at module level, not under TYPE_CHECKING") from None
