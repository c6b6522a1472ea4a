"""Refreshing the regression check's reference records (`check --update`) without ever losing them.

A reference folder holds one subfolder per kind of run (`quality/`, `latency/`), each holding run
records and their `summary.csv`, nothing else. An update copies the records of a rerun's
subfolders into a new folder beside the references (`.<name>.new`), checks that every copy loads
and equals its source, and only then swaps it in (`files.swap_dir`): at every moment the
references are the old set or the new one. Folders that would copy the references onto
themselves, and folders that are not references, are refused before anything is touched.

Torch-free (harness.store).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.errors import UsageError
from harness.store import records as rec
from harness.store.files import recover_swap, swap_dir

SUMMARY = "summary.csv"
# In a folder `check --update` made: runs, latency runs, reports and exports refuse to write there (records among the
# references made `check` fail on two records of a cell, another model, another plan). Hidden: not a reference entry.
MARKER = ".harness-references"
MARKER_TEXT = ("This folder holds the regression check's references (python -m harness check --against THIS_FOLDER).\n"
               "They change only through: python -m harness check --against THIS_FOLDER --update\n")


def refuse_references(out: Path, flag: str) -> None:
    """UsageError when `out` is a folder of references (it holds `MARKER`) or lies in one at any depth (`check` reads
    records at any depth), its path resolved first (`..` and symbolic links, as far as the folders exist)."""
    out = Path(out).resolve()
    for folder in (out, *out.parents):
        if (folder / MARKER).is_file():
            where = "is" if folder == out else "lies inside"
            raise UsageError(f"{flag} {out}: {where} the regression check's references ({folder}); writing there would break "
                             f"`check` (two records of a cell, another run's numbers); give another folder (the references "
                             f"change only through: python -m harness check --against {folder} --update)")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _reference_file(p: Path) -> bool:
    return p.is_file() and (rec.is_record_file(p) or p.name == SUMMARY)


def not_reference_entries(folder: Path) -> list[str]:
    """What in `folder` a reference folder would not hold (empty: `folder` is one, or is empty)."""
    bad = []
    for sub in _visible(folder):
        if not sub.is_dir():
            bad.append(sub.name)
            continue
        bad += [f"{sub.name}/{p.name}" for p in _visible(sub) if not _reference_file(p)]
    return bad


KINDS = ("quality", "latency")  # the subfolders `check` reruns into (harness/cli/check.py) and references hold


def is_reference_folder(folder: Path) -> bool:
    """Laid out as `check`'s references: `quality`/`latency` subfolders of run records and summary.csv, nothing
    else (what `check --update` replaces); a folder of other run folders is not one."""
    if not folder.is_dir():
        return False
    kinds = set(record_sources(folder))
    return bool(kinds) and kinds <= set(KINDS) and not not_reference_entries(folder)


def record_sources(current: Path) -> dict[str, list[Path]]:
    """{subfolder name: its record files and summary.csv} for the subfolders of `current` that hold records."""
    out = {}
    for sub in _visible(current):
        if sub.is_dir():
            files = [p for p in _visible(sub) if _reference_file(p)]
            if any(rec.is_record_file(p) for p in files):
                out[sub.name] = files
    return out


def check_paths(reference: Path, current: Path) -> None:
    """Refuse references and a rerun folder that an update would copy onto each other, and references
    that are not a reference folder (checked before a rerun, as well as before the copy)."""
    ref, cur = reference.resolve(), current.resolve()
    if ref == cur:
        raise UsageError(f"--current {current} is the reference folder itself; give the folder of a rerun "
                         f"(e.g. results/runs/check-<time>) to refresh {reference} from")
    refuse_nested(reference, current)
    if reference.exists() and not reference.is_dir():
        raise UsageError(f"--against {reference}: exists and is not a folder of reference records")
    if reference.is_dir():
        bad = not_reference_entries(reference)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise UsageError(f"--against {reference} is not a reference folder (it holds {shown}; references are "
                             "subfolders of run records and summary.csv only); --update replaces only reference folders: "
                             "give the existing references or a new folder")


def refuse_nested(reference: Path, current: Path, flag: str = "--current", same_ok: bool = True) -> None:
    """Refuse a rerun folder inside the references or around them (or, unless `same_ok`, the references themselves):
    each would read the other's records as its own (a check compared the rerun with itself and passed)."""
    ref, cur = reference.resolve(), current.resolve()
    if cur == ref and not same_ok:
        raise UsageError(f"{flag} {current} is the reference folder itself; give a new folder for the rerun")
    if cur != ref and cur.is_relative_to(ref):
        raise UsageError(f"{flag} {current} is inside the reference folder {reference}; give a rerun folder outside it")
    if cur != ref and ref.is_relative_to(cur):
        raise UsageError(f"--against {reference} is inside {flag} {current}; keep the references outside the rerun folder")


def check_update(reference: Path, current: Path) -> dict[str, list[Path]]:
    """Refuse an update that would lose or corrupt the references; return what it copies."""
    check_paths(reference, current)
    sources = record_sources(current)
    if not sources:
        flat = any(rec.is_record_file(p) for p in _visible(current))
        raise UsageError(f"--current {current} holds no subfolders of run records"
                         + (" (its records lie directly in it: a run folder, not a check rerun)" if flat else "")
                         + "; give a rerun folder laid out like the references, e.g. DIR/quality and DIR/latency "
                           "(python -m harness check --against REF --out DIR makes one)")
    readable = _readable(sources)
    _refuse_two_of_a_cell(current, readable)
    _refuse_dropping_unfinished(reference, current)
    _refuse_dropping_missing(reference, current, sources)
    _refuse_non_finite(current, readable)
    return sources


def _readable(sources: dict[str, list[Path]]) -> list[tuple[Path, rec.RunRecord]]:
    """Each readable record among `sources`, loaded once for the refusals below (an unreadable one stops the update by
    name when it is verified, `_verify`)."""
    out = []
    for src in (p for files in sources.values() for p in files if rec.is_record_file(p)):
        try:
            out.append((src, rec.load(src)))
        except ValueError:
            continue
    return out


def _refuse_two_of_a_cell(current: Path, readable: list[tuple[Path, rec.RunRecord]]) -> None:
    """Refuse to install two records of one cell (kind, method, mode; e.g. an older copy of a run beside quality/):
    every later check failed on the references themselves ("two records under REF"), whatever the rerun held."""
    where: dict[str, Path] = {}
    for src, r in readable:
        key = rec.cell_key(r)
        if key in where:
            raise UsageError(f"--current {current}: two records of {key} ({where[key].relative_to(current)} and "
                             f"{src.relative_to(current)}), and references hold one per cell (every later check would fail "
                             "on them); give the folder of one check rerun, or move the other record out")
        where[key] = src


def _refuse_non_finite(current: Path, readable: list[tuple[Path, rec.RunRecord]]) -> None:
    """Refuse to install a NaN or infinite score or stderr: every later value would pass against it."""
    bad = [f"{src.parent.name}/{src.name}: {what}" for src, r in readable for what in rec.non_finite_scores(r)]
    if bad:
        raise UsageError(f"--current {current}: scores that are not finite numbers ({'; '.join(bad[:4])}"
                         f"{f'; and {len(bad) - 4} more' if len(bad) > 4 else ''}): as references, every later value would pass "
                         "against them; find why the run gave them (a diverged model, an empty task) and rerun")


UNFINISHED = (".failed.json", ".partial.json")  # a cell that failed, or stopped between tasks (harness/store/records.py)


def _refuse_dropping_unfinished(reference: Path, current: Path) -> None:
    """Refuse an update that would drop a reference record because its cell failed or did not finish in the
    rerun (a failed-cell note or resume state, and no record): the references would lose it silently."""
    lost = []
    for sub in (d for d in _visible(current) if d.is_dir()):
        for note in _visible(sub):
            stem = next((note.name[: -len(u)] for u in UNFINISHED if note.name.endswith(u)), None)
            if stem and (reference / sub.name / f"{stem}.json").is_file() and not (sub / f"{stem}.json").exists():
                lost.append(f"{sub.name}/{note.name}")
    if lost:
        raise UsageError(f"--current {current}: cell(s) of the rerun failed or did not finish ({', '.join(lost)}), "
                         f"so --update would drop their records from {reference}; rerun the check into a new folder "
                         f"(python -m harness check --against {reference} --update, with the --spec that made {current} "
                         f"when it was not configs/ci.toml), or remove those records from {reference} to drop them on "
                         "purpose")


def _refuse_dropping_missing(reference: Path, current: Path, sources: dict[str, list[Path]]) -> None:
    """Refuse an update that would drop reference records the rerun does not hold at all: a latency section stopped
    by Ctrl-C leaves no note, nor does a record file deleted, and the references lost them in silence."""
    lost = []
    for kind, files in record_sources(reference).items() if reference.is_dir() else ():
        here = {p.name for p in sources.get(kind, [])}
        lost += [f"{kind}/{p.name}" for p in files if rec.is_record_file(p) and p.name not in here]
    if lost:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        raise UsageError(f"--current {current} lacks {len(lost)} record(s) the references hold ({shown}), so --update "
                         f"would drop them from {reference}; rerun the check into a new folder (python -m harness check "
                         f"--against {reference} --update), or remove those records from {reference} to drop them on "
                         "purpose")


def update_references(reference: Path, current: Path) -> int:
    """Replace `reference` by the records of `current` (see the module doc); returns the number of records."""
    sources = check_update(reference, current)
    recover_swap(reference)
    staging = reference.with_name(f".{reference.name}.new")
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed update; the references themselves were never touched
    try:
        n = 0
        staging.mkdir()
        (staging / MARKER).write_text(MARKER_TEXT)
        for sub, files in sources.items():
            (staging / sub).mkdir(parents=True)
            for src in files:
                shutil.copyfile(src, staging / sub / src.name)
                n += _verify(src, staging / sub / src.name)
        swap_dir(staging, reference)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return n


def _verify(src: Path, copy: Path) -> int:
    """1 for a record copied whole and readable, 0 for summary.csv; a bad record stops the update."""
    if copy.read_bytes() != src.read_bytes():
        raise OSError(f"{copy}: the copy differs from {src}")
    if not rec.is_record_file(src):
        return 0
    try:
        rec.load(copy)
    except ValueError as e:
        raise UsageError(f"--current: {src} is not a readable run record ({e}); the references were left unchanged") from None
    return 1
