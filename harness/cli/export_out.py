"""Where `python -m harness export` writes: the --out folder checked before any model work, the export built in a
hidden sibling folder, marked with the files it wrote, and renamed onto --out in one step (`--force` replaces only
a folder this command wrote)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from harness.errors import UsageError

MARKER = ".pd-harness-export.json"  # written by export last, listing every file it wrote: only such a folder is replaced


def check_out_is_not_cwd(out: Path) -> None:
    """An export is built beside `out` and renamed onto it, so `out` cannot be the current folder or one above it."""
    full, here = out.resolve(), Path.cwd().resolve()
    if full == here or full in here.parents or out.name in ("", ".", ".."):
        raise UsageError(f"--out {out}: the current folder or one above it cannot take an export (it is written beside "
                         "the folder and renamed onto it); give a new folder, e.g. --out exports/NAME")


def prepare_out(out: Path, force: bool) -> Path:
    """Check `out` can take an export; return the temporary sibling folder to write into."""
    from harness.store.files import recover_swap
    from harness.store.folders import refuse_file
    from harness.store.references import refuse_references

    refuse_references(out, "--out")  # naming --out, not the folder beside it that the export is written into
    recover_swap(out)  # an export killed while swapping folders left the old one beside `out`
    refuse_file(out, "--out", "give a new folder (or a previous export's, with --force)")
    if out.is_dir() and os.path.ismount(out):  # it cannot be renamed, and the export is renamed onto it
        raise UsageError(f"--out {out}: a mount point, which cannot be replaced by the export's folder (it is written "
                         f"beside --out and renamed onto it); give a new folder inside it, e.g. --out {out / 'export'}")
    if out.is_dir() and any(out.iterdir()):
        _check_replaceable(out, force)  # before --force is suggested: it would be refused for a folder this command did not write
        if not force:
            raise UsageError(f"--out {out}: folder exists and is not empty; pass --force to replace a previous export, "
                             "or choose a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished export `tmp` at `out`; a folder that cannot be renamed (e.g. one on another filesystem, or
    marked immutable) is a UsageError, with `out` as it was and the temporary folder removed; an old export that cannot
    be removed once the new one is in place, a warning."""
    from harness.store.files import backup_path, recover_swap, swap_dir

    try:
        swap_dir(tmp, out)
    except OSError as e:
        if not tmp.exists() and out.is_dir():  # the export is in place: only removing the old one failed
            print(f"warning: the previous export could not be removed: {backup_path(out.resolve())} ({e.strerror or e}); "
                  "the next export removes it, or remove it yourself", file=sys.stderr)
            return
        recover_swap(out)  # a failure between the two renames: the old folder goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--out {out}: the export could not be moved there ({e.strerror or e}; it is written beside "
                         f"{out.name} and renamed onto it); give a new folder in a writable one") from None


def _check_replaceable(out: Path, force: bool) -> None:
    """`--force` replaces only a folder this command wrote: marked, and holding nothing it did not write (`force`:
    whether it was given, for what a refusal tells to do next)."""
    try:
        written = set(json.loads((out / MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--out {out}: folder exists and is not empty, and is not a previous export (no readable {MARKER}, "
                         "which python -m harness export writes; --force only replaces such exports): choose a new or empty "
                         "folder, e.g. --out exports/NAME, or remove it yourself") from None
    # a link to a folder is the user's too: it was passed over as a folder, and --force deleted it with the export
    extra = sorted(str(p.relative_to(out)) for p in out.rglob("*") if (p.is_symlink() or not p.is_dir())
                   and p.name != MARKER and str(p.relative_to(out)) not in written)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        # without --force, moving them out is not all: the export is then refused until --force is given
        then = "" if force else " and pass --force to replace the export"
        raise UsageError(f"--out {out}: holds files the export did not write ({shown}); --force would delete them: "
                         f"move them out{then}, or choose another folder")


def mark(tmp: Path) -> None:
    """The marker that lets a later `--force` replace this folder: every file written, relative to it."""
    from harness.store.files import atomic_write

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
    atomic_write(tmp / MARKER, json.dumps({"written_by": "python -m harness export", "files": files}, indent=1))
