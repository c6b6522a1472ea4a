"""Pruning-method adapters. Adding one: a new file with a `@register`ed class, plus its import here."""

from methods import manual, pdtrim, shortgpt, unpruned  # noqa: F401  (registers the methods)
from methods.base import Method
from methods.registry import get, names, register

__all__ = ["Method", "get", "names", "register"]
