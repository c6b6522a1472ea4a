"""A sweep cell's files: its folder seeded with the run folder's finished records before it starts, and what it
made moved back (records, failed-cell notes, lm-eval results, --log-samples logs) once it ends (`settle`)."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from harness.cli.sweep_backends import FAILED_NOTE, Outcome
from harness.cli.sweep_plan import Cell


def seed(cell: Cell) -> None:
    """Link each finished record into the cell's folder, where the child reuses it (or rejects a different configuration).

    A record the child finished there that never reached the run folder (the sweep was killed or interrupted
    before settling it) is moved there first: it is kept, not computed again."""
    cell.workdir.mkdir(parents=True, exist_ok=True)
    cell.seeded = set()
    for record in cell.records:
        target = cell.workdir / record.name
        if not record.exists() and finished_record(target):
            os.replace(target, record)
        target.unlink(missing_ok=True)
        if not record.exists():
            continue
        cell.seeded.add(record.name)
        try:
            os.link(record, target)
        except OSError:  # a filesystem without hard links
            shutil.copy2(record, target)


def finished_record(path: Path) -> bool:
    """True when `path` is a whole, readable record. The pipeline writes a record to a temp file and renames it
    (harness/store/files.py), so a record cut off mid-write never has its final name; reading it checks the rest."""
    from harness.store import records as rec

    if not path.is_file():
        return False
    try:
        rec.load(path)
    except rec.RecordError:
        return False
    return True


def settle(cell: Cell, rc: int, tail: str, seconds: float) -> Outcome:
    """Move the cell's new records into the run folder; report ok, reused (every record was) or failed."""
    status = "ok" if rc == 0 else "failed"
    reused = [_move(cell, record) for record in cell.records]
    if rc == 0 and reused and all(reused):
        status = "reused"
    missing = [r.name for r in cell.records if not r.exists()]
    if rc == 0 and missing:
        rc, status, tail = 1, "failed", tail + f"\nthe run exited 0 but left no record {', '.join(missing)}"
    for record in cell.records:  # the pipeline's failed-cell notes, where a single-process run would have them
        note = record.with_name(record.name[: -len(".json")] + FAILED_NOTE)
        if rc == 0:
            note.unlink(missing_ok=True)
        elif (cell.workdir / note.name).exists():
            os.replace(cell.workdir / note.name, note)
    if rc == 0 and cell.records:  # a failed or interrupted cell keeps them for its resume (which looks for them there)
        _move_side_outputs(cell.workdir, cell.records[0].parent)
        shutil.rmtree(cell.workdir, ignore_errors=True)  # its summary.csv; nothing left to resume
    record = (", ".join(map(str, cell.records)) if cell.records else str(cell.workdir)) if rc == 0 else None
    return Outcome(cell.name, status, round(seconds, 2), rc, record, str(cell.log), None if rc == 0 else error_text(rc, tail))


def _move(cell: Cell, record: Path) -> bool:
    """Move the child's copy of `record` into the run folder (a finished record, even if the child failed
    afterwards); True when it is the record seeded into the cell's folder, unchanged."""
    produced = cell.workdir / record.name
    if not produced.exists():
        return False
    if record.name in cell.seeded and filecmp.cmp(produced, record, shallow=False):
        produced.unlink()
        return True
    os.replace(produced, record)
    return False


SIDE_OUTPUTS = ("lm_eval", "samples")  # a cell's lm-eval results file and --log-samples logs, one subfolder per cell


def _move_side_outputs(workdir: Path, run_out: Path) -> None:
    """Move what a finished cell wrote beside its record (`lm_eval/<cell>/`, `samples/<cell>/`) into the run folder, where
    a single-process run writes them, file by file: a same-named file is replaced, others kept (a resumed cell wrote the
    logs of the tasks it resumed; those of the tasks it kept were written before). The sweep removed them with the
    cell's folder, and with them the per-item logs --log-samples asked for."""
    for sub in SIDE_OUTPUTS:
        top = workdir / sub
        for src in sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []:
            dest = run_out / sub / src.relative_to(top)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)


def error_text(rc: int, tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if rc < 0:
        return f"killed by signal {-rc} (out of memory?)" + (f"; last output: {lines[-1]}" if lines else "")
    return "\n".join(lines[-12:]) or f"exit status {rc}, no output"
