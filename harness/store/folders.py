"""Output folders checked before any work: one this process can write into, and no symbolic link to nothing on the
way to it. Torch-free, as `records` (which re-exports both)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.errors import UsageError
from harness.store.files import TEMP_SUFFIX


def refuse_dangling_link(folder: Path, flag: str) -> None:
    """UsageError when `folder`, or a folder above it that does not exist, is a symbolic link to nothing: writing there
    failed as "cannot write there (File exists)", or (export, sweep) made the link's target and its parents unasked."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        if path.is_symlink():
            where = "" if path == Path(folder).absolute() else f"{path} is "
            raise UsageError(f"{flag} {folder}: {where}a symbolic link to {os.readlink(path)}, which does not exist; "
                             "create that folder, or give another folder")
        path = path.parent


def refuse_file(folder: Path, flag: str, give: str = "give a folder (new or holding earlier output)") -> None:
    """UsageError when `folder` exists and is not a folder (a file): every output flag's one message for it, `give`
    saying which folder the command takes."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder; {give}")


def check_writable(folder: Path, flag: str) -> None:
    """UsageError unless `folder` is (or can be made) a folder this process can write a file into; called
    before any model work so that a bad output folder (a file, read-only, a full disk) fails in a second."""
    from harness.store.references import refuse_references  # (references imports this module)

    folder = Path(folder)
    refuse_file(folder, flag)
    refuse_dangling_link(folder, flag)
    refuse_references(folder, flag)
    existing = folder.absolute()
    while not existing.exists():  # probe the folder, or the nearest one that exists: nothing is created here
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: cannot write there ({existing} is not a folder); give a writable folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe.", suffix=TEMP_SUFFIX)  # a kill leaves one the cleanup takes
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write there ({e.strerror or e}); give a writable folder") from None
