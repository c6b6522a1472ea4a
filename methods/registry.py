"""Registry of method classes (classes, not instances: each run builds its own).

`stage:<name>` (methods/stage.py) is the stage-aware variant of a registered depth-pruning
method with a removal order; its class is made on first use and cached.
"""

from __future__ import annotations

import difflib

from harness.errors import UsageError
from methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} defined twice: {_METHODS[cls.name].__module__}, {cls.__module__}")
    _METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    from methods import stage

    if name.startswith(stage.PREFIX) and name[len(stage.PREFIX):] in _METHODS:
        return stage.stage_method(name, _METHODS[name[len(stage.PREFIX):]])
    if name not in _METHODS:
        near = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UsageError(f"unknown method {name!r}{hint}; known methods: {', '.join(sorted(_METHODS))}; "
                         f"stage-aware variants: {', '.join(stage.PREFIX + b for b in stage_bases())}")
    return _METHODS[name]


def stage_bases() -> list[str]:
    """Registered methods that have a `stage:` variant."""
    from methods import stage

    return [n for n in sorted(_METHODS) if stage.supports(_METHODS[n])]


def names() -> list[str]:
    """Every method name: the registered ones, then their `stage:` variants."""
    from methods import stage

    return sorted(_METHODS) + [stage.PREFIX + b for b in stage_bases()]
