"""Which option types `--set` can give (`harness.config.coerce` parses them), checked when a method or a
long-context task registers: an option of another type, or a type the annotations cannot resolve, is named
then rather than breaking `--help` and every run. Imports nothing of the harness (the registries use it)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def settable(hint: Any) -> bool:
    """Whether `coerce` can parse a `--set` value for an option of type `hint` (int, float, str, bool, a tuple of
    one of those, or one of those or None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return len(args) == 1 and settable(args[0])
    if origin is tuple:
        args = typing.get_args(hint)
        return len(args) == 2 and args[1] is Ellipsis and settable(args[0])
    return hint in (int, float, str, bool)


def option_types(cls_config: type, owner: str) -> dict[str, Any]:
    """The option types of the options dataclass `cls_config`, as `--set` and `--help` read them; a ValueError naming
    `owner` when they cannot be read (a type imported only for type checkers) or `--set` could not give one."""
    try:
        hints = typing.get_type_hints(cls_config)
    except Exception as e:  # noqa: BLE001 - NameError and friends from the plug-in's annotations
        raise ValueError(f"{owner}: the types of its Config options cannot be read ({type(e).__name__}: {e}); import "
                         "every type an option names at module level, not under TYPE_CHECKING") from None
    bad = [f"{f.name}: {hints.get(f.name)}" for f in dataclasses.fields(cls_config) if not settable(hints.get(f.name))]
    if bad:
        raise ValueError(f"{owner}: --set cannot give options of these types: {'; '.join(bad)}; use int, float, str, "
                         "bool, tuple[X, ...] of one of those, or X | None")
    return hints
