"""One writer per output folder: an exclusive lock held for the whole run.

`hold(folder)` takes `folder/.harness.lock` with `fcntl.flock` (LOCK_EX | LOCK_NB) and writes the
holder's pid, host and command line into it. A second writer is refused at once with a
`UsageError` naming the holder; the kernel drops a flock when its process dies, so a lock file
left by a killed run is simply taken over. `hold_beside(path)` locks `.<name>.lock` next to a
folder that is replaced whole (references, exports), since a lock inside it would be swapped away.

A process may hand its lock down: `child_env()` gives its children `HARNESS_HELD_LOCKS` (the lock
tokens it holds), and a child asked to lock a folder whose lock carries one of those tokens works
under its parent's lock (a sweep's parent holds the run folder; its cells run as children).

Without fcntl (not POSIX) there is no lock, only the check that nobody else wrote a lock file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from harness.errors import UsageError
from harness.store.files import remove_stale_temps

LOCK_NAME = ".harness.lock"
ENV = "HARNESS_HELD_LOCKS"
_held: dict[str, str] = {}  # lock file -> token, of the locks this process holds


def _holder(f) -> dict:
    try:
        f.seek(0)
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _refuse(folder: Path, lock: Path, info: dict) -> UsageError:
    who = f"pid {info.get('pid', '?')}" + (f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else "")
    cmd = info.get("command") or "an unknown command"
    return UsageError(f"{folder} is in use by another harness process ({who}: {cmd}); two runs writing one folder would "
                      f"overwrite each other's records. Wait for it to finish, or choose another --out (lock: {lock})")


def _inherited(info: dict) -> bool:
    return bool(info.get("token")) and info["token"] in os.environ.get(ENV, "").split(",")


@contextlib.contextmanager
def hold_file(lock: Path, folder: Path | None = None) -> Iterator[bool]:
    """Hold the lock file `lock` (guarding `folder`) for the body, or raise `UsageError` naming its holder.

    Yields True when this call took the lock, False when this process or its parent already holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing to lock with
        yield True
        return
    lock, folder = Path(lock), Path(folder or lock.parent)
    key = str(lock.resolve())
    if key in _held:  # this process already holds it
        yield False
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held until the body ends
    except OSError as e:
        raise UsageError(f"{folder}: cannot write there ({e.strerror or e}); choose a folder you can write") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(f)
            if _inherited(info):  # our parent holds it for us
                yield False
                return
            raise _refuse(folder, lock, info) from None
        if not _same_file(f, lock):  # the previous holder removed the file after we opened it: lock the new one
            f.close()
            with hold_file(lock, folder) as took:
                yield took
            return
        token = uuid.uuid4().hex
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                            "command": " ".join(["python -m harness", *sys.argv[1:]])[:500]}))
        f.flush()
        _held[key] = token
        try:
            yield True
        finally:
            del _held[key]
            lock.unlink(missing_ok=True)  # under the lock: a waiter that opened it re-checks the file (above)
    finally:
        f.close()


def _same_file(f, path: Path) -> bool:
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[bool]:
    """Lock the output folder `folder` (created if missing) for one writer; the temp files of writers
    killed mid-write are removed once the lock is ours (nobody else can be writing them)."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        with hold_file(folder / LOCK_NAME, folder) as took:
            if took:
                remove_stale_temps(folder, LOCK_NAME)
            yield took
    finally:
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def hold_beside(folder: Path) -> contextlib.AbstractContextManager[bool]:
    """Lock a folder that is replaced whole, by a lock file next to it (`.<name>.lock`)."""
    folder = Path(folder)
    return hold_file(folder.resolve().with_name(f".{folder.resolve().name}.lock"), folder)


def child_env() -> dict[str, str]:
    """Environment for child processes that write under the locks this process holds."""
    tokens = [*os.environ.get(ENV, "").split(","), *_held.values()]
    return {ENV: ",".join(t for t in tokens if t)}
