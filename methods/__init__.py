"""Pruning-method adapters. Adding one: a new file with a `@register`ed class, plus its import here."""

from methods import (  # noqa: F401  (registers the methods)
    kv_baselines,
    manual,
    pdtrim,
    random_blocks,
    shortened_ppl,
    shortened_taylor,
    shortgpt,
    sleb,
    streamline,
    tail,
    unpruned,
)
from methods.base import Method
from methods.registry import get, names, register

__all__ = ["Method", "get", "names", "register"]
