"""One writer per output folder: an exclusive lock held for the whole run.

`hold(folder)` takes `folder/.harness.lock` with `fcntl.flock` (LOCK_EX | LOCK_NB) and writes the
holder's pid, host and command line into it. A second writer is refused at once with a
`UsageError` naming the holder; the kernel drops a flock when its process dies, so a lock file
left by a killed run is simply taken over. `hold_beside(path)` locks `.<name>.lock` next to a
folder that is replaced whole (references, exports), since a lock inside it would be swapped away.

Readers of such a folder take the same lock shared (`shared=True`, LOCK_SH): any number of them at
once, none while a writer holds it, so a reader sees the old folder or the new one, never a mix. A
reader does not write its pid (they share the file); the last one out removes the file, as a writer
does. Either mode may `wait` (seconds, polling) for the holder to finish before it is refused.

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
import time
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


def _who(info: dict) -> str:
    if not info:  # readers write nothing (and a writer that just took the lock has not written yet)
        return "a process reading it, e.g. python -m harness check"
    host = f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else ""
    return f"pid {info.get('pid', '?')}{host}: {info.get('command') or 'an unknown command'}"


# why a writer is refused and what to do instead: an output folder of records (run, latency, sweep) by default
OUTPUT = "two runs writing one folder would overwrite each other's records. Wait for it to finish, or choose another --out"
REPLACED = "two processes replacing one folder would undo each other's work. Wait for it to finish"
REPORT = "two reports writing one folder would mix their tables and figures. Wait for it to finish, or choose another --out"


def _refuse(folder: Path, lock: Path, info: dict, shared: bool = False, waited: float = 0,
            what: str = OUTPUT) -> UsageError:
    after = f" (waited {waited:g} s)" if waited else ""
    if shared:
        return UsageError(f"{folder} is being replaced by another harness process ({_who(info)}){after}; reading it now "
                          f"could mix old and new files. Try again when it has finished (lock: {lock})")
    return UsageError(f"{folder} is in use by another harness process ({_who(info)}){after}; {what} (lock: {lock})")


def _inherited(info: dict) -> bool:
    return bool(info.get("token")) and info["token"] in os.environ.get(ENV, "").split(",")


@contextlib.contextmanager
def hold_file(lock: Path, folder: Path | None = None, *, shared: bool = False, wait: float = 0,
              what: str = OUTPUT) -> Iterator[bool]:
    """Hold the lock file `lock` (guarding `folder`) for the body, or raise `UsageError` naming its holder.

    Exclusive (a writer) unless `shared` (a reader); `wait`: seconds to wait for a holder to let go
    before refusing (default: refuse at once); `what`: a refused writer's reason and what to do instead.
    Yields True when this call took the lock, False when this process or its parent already holds it
    (or, shared, when the lock file cannot be made)."""
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
    f = _acquire(fcntl, lock, folder, shared, wait, what)
    if f is None:  # our parent holds it for us (or a reader without a lock file it may create)
        yield False
        return
    try:
        if shared:
            try:
                yield True
            finally:
                _release_shared(fcntl, f, lock)
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
            lock.unlink(missing_ok=True)  # under the lock: a waiter that opened it re-checks the file (_acquire)
    finally:
        f.close()


def _open(lock: Path, folder: Path, shared: bool):
    """The lock file, opened (created if missing); None for a reader that may not create it (nobody holds it then)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held until the body ends
    except OSError as e:
        if shared:  # references on a read-only disk, or a folder of someone else's: read them, lock if one exists
            try:
                return open(lock, encoding="utf-8")  # noqa: SIM115
            except OSError:
                return None
        raise UsageError(f"{folder}: cannot write there ({e.strerror or e}); choose a folder you can write") from None


def _acquire(fcntl, lock: Path, folder: Path, shared: bool, wait: float, what: str):
    """The open lock file with the lock taken, None when the lock is our parent's; waits up to `wait` s, then refuses."""
    start, told = time.monotonic(), False
    while True:
        f = _open(lock, folder, shared)
        if f is None:
            return None
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(f)
            f.close()
            if _inherited(info):  # our parent holds it for us
                return None
            waited = time.monotonic() - start
            if waited >= wait:
                raise _refuse(folder, lock, info, shared, round(waited, 1), what) from None
            if not told:
                print(f"{folder} is in use ({_who(info)}); waiting up to {wait:g} s for it to finish", file=sys.stderr, flush=True)
                told = True
            time.sleep(min(0.1, wait - waited))
            continue
        if _same_file(f, lock):
            return f
        f.close()  # the previous holder removed the file after we opened it: lock the new one


def _release_shared(fcntl, f, lock: Path) -> None:
    """A reader's release: the last reader out (the only one that can turn its lock exclusive) removes the file."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # other readers still hold it
        return
    if _same_file(f, lock):
        with contextlib.suppress(OSError):
            lock.unlink()


def _same_file(f, path: Path) -> bool:
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def hold(folder: Path, what: str = OUTPUT) -> Iterator[bool]:
    """Lock the output folder `folder` (created if missing) for one writer; the temp files of writers
    killed mid-write are removed once the lock is ours (nobody else can be writing them). `what`: a refused
    writer's reason and what to do instead (see `hold_file`)."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        with hold_file(folder / LOCK_NAME, folder, what=what) as took:
            if took:
                remove_stale_temps(folder, LOCK_NAME)
            yield took
    finally:
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def hold_beside(folder: Path, *, shared: bool = False, wait: float = 0, what: str = REPLACED) -> Iterator[bool]:
    """Lock a folder that is replaced whole, by a lock file next to it (`.<name>.lock`): exclusive to
    replace it, `shared` to read it (see `hold_file` for `wait` and `what`). The folders made to hold the lock
    file are removed again if they are empty at the end: an export refused or stopped before it wrote anything
    left `a/b/` of `--out a/b/c` behind."""
    folder = Path(folder)
    lock = folder.resolve().with_name(f".{folder.resolve().name}.lock")
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # deepest first
    try:
        with hold_file(lock, folder, shared=shared, wait=wait, what=what) as took:
            yield took
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (what was written there, another writer's lock): kept, and those above it
                break


def writers_under(path: Path) -> list[tuple[Path, str]]:
    """(folder, who) for each output folder at or under `path` that a live harness process is writing now, by the lock
    files writers leave there while they work (a writer's lock file is removed when it ends; one left by a killed
    writer names a pid that is gone). Read only: taking the lock, even shared, could refuse a writer starting now.
    os.walk, not rglob: a folder removed while it is listed (a sweep moving a cell's folder, a `check --update`
    swapping the references) is skipped, where rglob raises FileNotFoundError on Python 3.11."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    found = []
    for f in sorted(Path(top) / LOCK_NAME for top, _dirs, names in os.walk(folder) if LOCK_NAME in names):
        try:
            info = json.loads(f.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            continue
        if info.get("pid") not in (None, os.getpid()) and _alive(info):
            found.append((f.parent, _who(info)))
    return found


def _alive(info: dict) -> bool:
    """Whether the writer `info` names runs still (one on another host: assumed to)."""
    if info.get("host") not in (None, socket.gethostname()):
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):  # another user's process (EPERM): alive
        return True
    return True


def child_env() -> dict[str, str]:
    """Environment for child processes that write under the locks this process holds."""
    tokens = [*os.environ.get(ENV, "").split(","), *_held.values()]
    return {ENV: ",".join(t for t in tokens if t)}
