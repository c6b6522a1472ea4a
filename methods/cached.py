"""Calibration statistics kept on disk (harness/store/cache.py), so a rerun or an interrupted search
does not redo the forwards it already did.

A statistic's key (`stat_key`) names everything its value depends on: the model and calibration
set by content (`methods.base.content_key`), the device type and torch version (float noise can
reorder close scores), the options that change the value, a version string bumped by hand when
the computation changes, and a digest of the source files that compute it (an edit there
invalidates the entries by itself). `HARNESS_CACHE_VERSION` below covers the shared forward code
(harness/pd): bump it when the engine's numbers change.

`DiskMemo` is a dict of values that is written through to one entry after every new value, so a
kill loses at most the evaluation in flight. Values are stored as JSON, whose float text reads
back to the same double: a replayed search makes exactly the choices the first one made.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from harness.pd import arch
from harness.store import cache
from methods.base import content_key

HARNESS_CACHE_VERSION = "1"  # bump when harness/pd's forwards change their numbers


@functools.lru_cache(maxsize=64)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def source_digest(modules: Iterable[ModuleType]) -> str:
    """A digest of the modules' source files (edits to any of them change it); "-" for one without a file (a
    notebook's `__main__`, `<stdin>`), whose classes `plugin_code.code_digest` digests instead."""
    files = (getattr(m, "__file__", None) for m in modules)
    return "-".join(_file_digest(f) if f and Path(f).is_file() else "-" for f in files)


def stat_key(kind: str, model, calib, version: str, sources: Iterable[ModuleType] = (), **options: Any) -> dict[str, Any]:
    """The cache key of statistic `kind` computed on (model, calib) with `options`."""
    model_fp, calib_fp = content_key(model, calib)
    return {"kind": kind, "version": version, "harness": HARNESS_CACHE_VERSION, "source": source_digest(sources),
            "model": model_fp, "calibration": calib_fp, "device": arch.model_device(model).type,
            "torch": torch.__version__.split("+")[0], "options": options}


_HOLDING_MODELS: list[dict] = []  # process-wide memos whose values hold a model (see `holding_models`)


def holding_models(memo: dict) -> dict:
    """Register `memo`, a module-level dict whose values keep a model alive (PDTrim's search states: the model, its
    teacher and every layer's input), so that `release_models` empties it after a run in a longer-lived process."""
    _HOLDING_MODELS.append(memo)
    return memo


def release_models() -> None:
    """Empty the memos of `holding_models`: after `harness.evaluate()` a notebook must not keep the run's model (and
    its accelerator memory) alive until the next run of the same method."""
    for memo in _HOLDING_MODELS:
        memo.clear()


def announce(what: str, step: str = "calibration") -> None:
    """The one line that tells a user why this planning `step` was fast (stderr, like the run's progress)."""
    print(f"{step}: reused cached {what} ({cache.cache_dir()})", file=sys.stderr, flush=True)


def load(kind: str, key: dict[str, Any]) -> Any | None:
    return cache.load(kind, key)


def save(kind: str, key: dict[str, Any], value: Any) -> None:
    cache.save(kind, key, value)


def reject(kind: str, key: dict[str, Any], why: str) -> None:
    """Warn that the entry stored for `key` parses but cannot be right (a hand edit, another version's), so the
    caller recomputes it and overwrites it, as for an unreadable one (docs/cache.md)."""
    warnings.warn(f"cache entry {cache.entry_path(kind, key)} holds {why}; ignoring it and recomputing", cache.CacheWarning,
                  stacklevel=3)


def block_indices(value: Any, n: int) -> bool:
    """Whether `value` is a list of distinct block indices of an n-block model (a removal order)."""
    return isinstance(value, list) and all(type(i) is int and 0 <= i < n for i in value) and len(set(value)) == len(value)


def finite_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool) and finite."""
    return type(value) in (int, float) and math.isfinite(value)


def finite_numbers(value: Any, n: int) -> bool:
    """Whether `value` is a list of n finite numbers (one score per block)."""
    return isinstance(value, list) and len(value) == n and all(finite_number(v) for v in value)


def set_key(blocks: Iterable[int]) -> str:
    """A block set as a memo key: its sorted indices, comma-separated ("" for the empty set)."""
    return ",".join(str(i) for i in sorted(blocks))


def parse_set(text: str) -> frozenset[int]:
    return frozenset(int(i) for i in text.split(",") if i)


class DiskMemo:
    """Values by string key, loaded from cache entry (`kind`, `key`) and written back after every `put`.

    With the cache off it is an in-memory dict. `loaded` counts the values that came from disk.
    """

    def __init__(self, kind: str, key: dict[str, Any], key_ok: Callable[[str], bool] = lambda k: True) -> None:
        self.kind, self.key = kind, key
        stored = cache.load(kind, key)
        if stored is not None and not isinstance(stored, dict):
            reject(kind, key, "no object of values")
        self.values: dict[str, Any] = dict(stored) if isinstance(stored, dict) else {}
        bad = [k for k, v in self.values.items() if not (key_ok(k) and finite_number(v))]
        if bad:  # a hand edit: those values are computed again, the others kept
            warnings.warn(f"cache entry {cache.entry_path(kind, key)}: {len(bad)} value(s) not a finite number under a "
                          f"valid key (e.g. {bad[0]!r}: {self.values[bad[0]]!r}); ignoring them and recomputing",
                          cache.CacheWarning, stacklevel=2)
            for k in bad:
                del self.values[k]
        self.loaded = len(self.values)

    def __contains__(self, k: str) -> bool:
        return k in self.values

    def get(self, k: str, default: Any = None) -> Any:
        return self.values.get(k, default)

    def put(self, k: str, v: Any) -> None:
        self.values[k] = v
        cache.save(self.kind, self.key, self.values)  # atomic (a kill leaves the previous memo); a failed write only warns
