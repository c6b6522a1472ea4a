"""Registry of method classes (classes, not instances: each run builds its own)."""

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
    if name not in _METHODS:
        near = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UsageError(f"unknown method {name!r}{hint}; known methods: {', '.join(names())}")
    return _METHODS[name]


def names() -> list[str]:
    return sorted(_METHODS)
