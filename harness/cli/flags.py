"""Argument types and flag groups shared by the commands."""

from __future__ import annotations

import argparse

MODES = {"unified": ("unified",), "disaggregated": ("disaggregated",), "both": ("unified", "disaggregated")}


def csv_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


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
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s}")
    return vals


def int_list(s: str) -> tuple[int, ...]:
    vals = tuple(positive_int(x) for x in csv_list(s))
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return vals
