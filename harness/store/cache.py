"""An on-disk cache of JSON values keyed by a dict, so interrupted or repeated work is not thrown away.

Where: `$HARNESS_CALIBRATION_CACHE` when set, else `calibration/` in the harness's cache folder
(`$HARNESS_CACHE_DIR`, default `~/.cache/pd-harness`, which also holds converted models);
`HARNESS_CALIBRATION_CACHE=off` turns this cache off (nothing is read or written). A separate
variable, so turning it off or moving it (the tests use a fresh one per test) leaves the converted
models where they are. An entry is `<dir>/<kind>/<digest>.json`, the digest a SHA-256 of the key
dict's canonical JSON; the file holds the key too, and a file whose key differs is a miss.

Safety: every write is a temp file and an atomic rename (`harness.store.files.atomic_write`), so a
kill leaves the old entry or the new one, never a torn one; two processes writing one key each
rename a complete file, and the last writer wins. An entry that still fails to parse (a disk
error, a hand edit) is ignored with a warning, and the caller recomputes and overwrites it. A write
that fails (a read-only or full disk, no permission: any OSError) is skipped with one `CacheWarning`
per folder and process; the run goes on with the values it computed, as with the cache off.

Torch-free (harness.store); what goes into keys and values is the callers' business (methods/cached.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from harness.errors import HarnessWarning
from harness.store.files import atomic_write

ENV = "HARNESS_CALIBRATION_CACHE"
ROOT_ENV = "HARNESS_CACHE_DIR"  # the harness's cache folder (harness/pd/models.py keeps converted models there)
OFF = "off"
DEFAULT_ROOT = Path("~/.cache/pd-harness")


class CacheWarning(HarnessWarning):
    """A cache entry could not be read (it is recomputed), or the cache could not be written (the run goes on uncached)."""


_unwritable: set[str] = set()  # the cache folders this process has warned it cannot write


def cache_dir() -> Path | None:
    """The cache folder, or None when `HARNESS_CALIBRATION_CACHE=off`."""
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() == OFF:
        return None
    if raw:
        return Path(raw).expanduser()
    return cache_root() / "calibration"


def cache_root() -> Path:
    """The harness's cache folder: `HARNESS_CACHE_DIR` (a `~` expanded: a Dockerfile ENV or a CI env block leaves it
    literal) or ~/.cache/pd-harness."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


def enabled() -> bool:
    return cache_dir() is not None


def digest(key: dict[str, Any]) -> str:
    """A stable digest of `key` (canonical JSON: sorted keys, no whitespace); 32 hex characters."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(kind: str, key: dict[str, Any]) -> Path | None:
    """Where `kind`'s entry for `key` lives (None when the cache is off)."""
    root = cache_dir()
    if root is None:
        return None
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"cache kind {kind!r}: must be a plain folder name")
    return root / kind / f"{digest(key)}.json"


def _canonical(key: dict[str, Any]) -> Any:
    """`key` as it reads back from JSON (tuples become lists), for comparing with a stored key."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def load(kind: str, key: dict[str, Any]) -> Any | None:
    """The value stored for `key`, or None (cache off, no entry, or an unreadable one: warned)."""
    path = entry_path(kind, key)
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or "value" not in entry or "key" not in entry:
            raise ValueError("not a cache entry (no 'key' and 'value')")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"cache entry {path} is unreadable ({e}); ignoring it and recomputing", CacheWarning, stacklevel=2)
        return None
    if entry["key"] != _canonical(key):  # a digest collision, or a file copied by hand: not ours
        return None
    return entry["value"]


def save(kind: str, key: dict[str, Any], value: Any) -> Path | None:
    """Store `value` (JSON-serialisable) for `key` atomically; the entry's path (None when off, or when
    the write failed: warned once per folder, since the cache only saves time and the run goes on)."""
    path = entry_path(kind, key)
    if path is None:
        return None
    text = json.dumps({"key": _canonical(key), "value": value}, sort_keys=True)
    try:
        atomic_write(path, text)  # mkdir, temp file, write, fsync, rename: any of them can fail
    except OSError as e:
        _warn_unwritable(path.parent.parent, e)
        return None
    return path


def _warn_unwritable(root: Path, error: OSError) -> None:
    if str(root) in _unwritable:
        return
    _unwritable.add(str(root))
    warnings.warn(f"calibration cache {root} cannot be written ({error.strerror or error}); this run continues uncached "
                  f"(same results, but nothing is saved for the next run). Set {ENV}={OFF} to skip the cache, or point "
                  f"{ENV} (or {ROOT_ENV}) at a writable folder", CacheWarning, stacklevel=3)
