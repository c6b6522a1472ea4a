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


def test_two_checks_started_in_the_same_second_rerun_into_two_folders(tmp_path, monkeypatch, capsys):
    import harness.cli.check as check

    monkeypatch.chdir(tmp_path)
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


def test_a_refused_check_leaves_no_rerun_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(SPEC)
    assert main(["check", "--against", "ref", "--spec", "s.toml", "--out", "r0", "--update", "-q"]) == 0
    (tmp_path / "s.toml").write_text(SPEC.replace('"unpruned"]', '"unprned"]'))  # refused as its [run] section starts
    assert main(["check", "--against", "ref", "--spec", "s.toml", "-q"]) == 2
    assert "unknown method 'unprned'" in capsys.readouterr().err
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or not list(runs.iterdir())
