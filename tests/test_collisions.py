"""Two harness processes at once: each gets a folder of its own, or is told which process has it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from harness.cli import main

# one unified passkey cell of the random tiny model: seconds
SPEC = """
[run]
model = "random:tiny"
device = "cpu"
methods = ["unpruned"]
tasks = ["passkey"]
limit = 2
mode = "unified"
set = ["passkey.lengths=384", "passkey.depths=0.5", "passkey.repeats=1"]
out = "unused"
"""
HOLD = "import sys, time; from harness.store import lock\nwith lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a run writing it does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_two_checks_started_in_the_same_second_rerun_into_two_folders(tmp_path, monkeypatch, capsys, data_dir):
    import harness.cli.check as check

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))  # CI's is relative to the checkout
    (tmp_path / "s.toml").write_text(SPEC)
    assert main(["check", "--against", "ref", "--spec", "s.toml", "--out", "r0", "--update", "-q"]) == 0
    monkeypatch.setattr(check.time, "strftime", lambda fmt: "20250101-000000")  # the second of the other check
    first = tmp_path / "results" / "runs" / "check-20250101-000000"
    holder = _hold(first / "quality")  # the other check, rerunning
    try:
        rc = main(["check", "--against", "ref", "--spec", "s.toml", "-q"])
    finally:
        holder.kill()
        holder.wait()
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "regression check passed: 1 record(s) of results/runs/check-20250101-000000-2 compared with ref" in out
    assert [p.name for p in (first.parent / "check-20250101-000000-2" / "quality").glob("*.json")] == ["unpruned__unified.json"]


def test_a_refused_check_leaves_no_rerun_folder(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))  # CI's is relative to the checkout
    (tmp_path / "s.toml").write_text(SPEC)
    assert main(["check", "--against", "ref", "--spec", "s.toml", "--out", "r0", "--update", "-q"]) == 0
    (tmp_path / "s.toml").write_text(SPEC.replace('"unpruned"]', '"unprned"]'))  # refused as its [run] section starts
    assert main(["check", "--against", "ref", "--spec", "s.toml", "-q"]) == 2
    assert "unknown method 'unprned'" in capsys.readouterr().err
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or not list(runs.iterdir())


def test_a_report_on_a_folder_being_written_says_so(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ROOT / "results" / "reference" / "quality", run)
    holder = _hold(run)  # a run writing it: its other cells are still to come
    try:
        rc = main(["report", str(run), "--no-plots", "--out", str(tmp_path / "rep")])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert f"note: {run} is being written by another harness process (pid {holder.pid}: python -m harness " in err
    assert "this report holds the records it had finished, so rerun the report when that process ends" in err
    assert main(["report", str(run), "--no-plots", "--out", str(tmp_path / "rep")]) == 0  # the killed writer's lock file
    assert "being written" not in capsys.readouterr().err


class _Listed:
    """A folder's entries as listed before its subfolder went away (what os.scandir gave a reader racing a remover)."""

    def __init__(self, entries):
        self._it = iter(entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        pass


def test_a_folder_removed_while_the_report_looks_for_writers_is_skipped(tmp_path, monkeypatch):
    """A folder removed while the report looks for live writers' lock files (a sweep moving a finished cell's folder, a
    `check --update` swapping the references in) ended a finished report with rglob's FileNotFoundError (Python 3.11);
    it is skipped, as `records.run_files_under` skips it, and the live writer elsewhere is still named."""
    import os
    import shutil

    from harness.store import lock

    run, gone = tmp_path / "run", tmp_path / "run" / ".sweep" / "cell"
    gone.mkdir(parents=True)
    real = os.scandir

    def scandir(p="."):
        if not isinstance(p, (str, os.PathLike)) or Path(p) != gone.parent or not gone.exists():  # rmtree lists by fd
            return real(p)
        with real(p) as it:
            entries = list(it)
        shutil.rmtree(gone)  # listed, then removed before it is itself listed
        return _Listed(entries)

    holder = _hold(run)
    try:
        monkeypatch.setattr(os, "scandir", scandir)
        found = lock.writers_under(run)
    finally:
        monkeypatch.undo()
        holder.kill()
        holder.wait()
    assert not gone.exists()
    assert [(folder, who.split(":")[0]) for folder, who in found] == [(run, f"pid {holder.pid}")]
