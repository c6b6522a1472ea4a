"""Argument types and flag groups shared by the commands."""

from __future__ import annotations

import argparse
import math

MODES = {"unified": ("unified",), "disaggregated": ("disaggregated",), "both": ("unified", "disaggregated")}


def csv_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _int_at_least(s: str, least: int, what: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is None or n < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return n


def positive_int(s: str) -> int:
    return _int_at_least(s, 1, "a positive integer")


def nonneg_int(s: str) -> int:
    return _int_at_least(s, 0, "an integer >= 0")


def _finite(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return x


def positive_float(s: str) -> float:
    x = _finite(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return x


def nonneg_float(s: str) -> float:
    x = _finite(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return x


def limit_arg(s: str) -> int | None:
    if s.lower() in ("all", "none", "full"):
        return None
    try:
        return positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s}") from None


def float_list(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in csv_list(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s}")
    return vals


def int_list(s: str) -> tuple[int, ...]:
    vals = tuple(positive_int(x) for x in csv_list(s))
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return vals
