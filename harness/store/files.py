"""Writing files and folders so that a reader (or a kill -9) only ever sees an old or a new complete version.

- `atomic_write` / `atomic_file`: a temp file in the same folder, fsync, then `os.replace`; the
  file gets the mode an ordinary `open()` would give it (0666 minus the umask), not mkstemp's 0600.
- `swap_dir`: replace a whole folder by a complete one built beside it. The old folder is first
  renamed to `.<name>.old`, the new one renamed into place, then the old one removed; a process
  killed between the two renames leaves the old folder at `.<name>.old`, and `recover_swap` (run
  by every writer before it touches the folder) puts it back.
- `remove_stale_temps`: the temp files a killed writer left (called under the folder's lock).

Torch-free (harness.store).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# atomic_write's temp files: .<name>.<random>.pdh.tmp; our own suffix, so that the cleanup after a killed writer
# (`remove_stale_temps`) never takes another program's `.*.tmp` in an --out such as ~ or /tmp
TEMP_SUFFIX = ".pdh.tmp"
TEMP_DEPTH = 4  # the deepest a writer of ours puts files below a locked folder (out/.sweep/<cell>/lm_eval/<cell>)


def _umask() -> int:
    """The process umask, read without changing it where /proc says (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file to write `path`'s new content into; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; records are shared (other users, other ranks)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and an atomic rename."""
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def remove_stale_temps(folder: Path, lock_name: str = ".harness.lock", depth: int = TEMP_DEPTH) -> list[Path]:
    """Delete the temp files writers killed mid-write left in `folder` and its subfolders down to `depth` levels
    (call only while holding its lock); a subfolder with a lock file of its own (a sweep cell's) is its own
    writer's business. Only our own temp files (`TEMP_SUFFIX`), and no deeper than we write: an --out of ~ is
    not walked to the bottom."""
    gone = []
    for p in sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    for sub in sorted(Path(folder).iterdir()) if depth > 0 else ():
        if sub.is_dir() and not sub.is_symlink() and not (sub / lock_name).exists():
            gone += remove_stale_temps(sub, lock_name, depth - 1)
    return gone


def backup_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_swap(target: Path) -> None:
    """Finish or undo a `swap_dir` that a killed process left half done."""
    target = Path(target).resolve()
    old = backup_path(target)
    if not old.exists():
        return
    if target.exists():  # the new folder is in place: only the removal of the old one was left
        shutil.rmtree(old)
    else:  # killed between the two renames: the old folder goes back
        old.rename(target)


def swap_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`, replacing what is there; never a moment without one of them."""
    new, target = Path(new), Path(target).resolve()
    recover_swap(target)
    old = backup_path(target)
    if target.exists():
        target.rename(old)
    new.rename(target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a power cut after this keeps them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
