"""Nothing the user has is removed or replaced by mistake (issue 14, items 1-4 and 13): each test plants
the case and checks the exit status, the message, and that every planted file is still there, unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from harness.cli import main as cli_main
from harness.store import lock
from harness.store import records as rec
from harness.store.files import TEMP_SUFFIX, atomic_write, swap_dir

REFERENCE = ROOT / "results" / "reference"
TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _refs(tmp_path: Path, name: str = "ref") -> Path:
    ref = tmp_path / name
    shutil.copytree(REFERENCE, ref)
    return ref


# --- item 1: check --update ---------------------------------------------------------------------

def _plant(case: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(references, --current, the folder whose files must survive) for one refused case."""
    if case == "current_is_reference":
        ref = _refs(tmp_path)
        return ref, ref, ref
    if case == "current_inside_reference":
        ref = _refs(tmp_path)
        return ref, ref / "quality", ref
    if case == "reference_inside_current":
        cur = _refs(tmp_path, "cur")
        ref = _refs(cur, "ref")
        return ref, cur, cur
    if case == "not_a_reference_folder":
        ref = tmp_path / "project"
        (ref / "src").mkdir(parents=True)
        (ref / "notes.txt").write_text("mine")
        (ref / "src" / "main.py").write_text("print('mine')")
        return ref, _refs(tmp_path, "cur"), ref
    if case == "flat_run_folder":
        ref, cur = _refs(tmp_path), tmp_path / "flat"
        shutil.copytree(REFERENCE / "quality", cur)
        return ref, cur, ref
    if case == "two_records_of_a_cell":  # an older copy beside quality/: every later check failed on the references
        ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
        (cur / "older").mkdir()
        shutil.copy(cur / "quality" / "shortgpt__unified.json", cur / "older")
        return ref, cur, ref
    if case == "corrupt_record":
        ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
        (cur / "latency" / "zzz__disaggregated.json").write_text('{"schema_version": 1, "method": "zz')
        return ref, cur, ref
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("current_is_reference", "is the reference folder itself"),
    ("current_inside_reference", "is inside the reference folder"),
    ("reference_inside_current", "is inside --current"),
    ("not_a_reference_folder", "is not a reference folder (it holds notes.txt, src/main.py"),
    ("flat_run_folder", "its records lie directly in it"),
    ("corrupt_record", "zzz__disaggregated.json is not a readable run record"),
    ("two_records_of_a_cell", "two records of quality/shortgpt/unified (older/shortgpt__unified.json and "
                              "quality/shortgpt__unified.json)"),
])
def test_check_update_refuses_and_keeps_the_references(case, message, tmp_path, capsys):
    ref, cur, keep = _plant(case, tmp_path)
    before = snapshot(keep)
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert snapshot(keep) == before  # nothing removed, nothing replaced
    assert sorted(p.name for p in ref.parent.iterdir() if p.name.startswith(f".{ref.name}")) == []


def test_check_update_refuses_a_bad_reference_folder_before_the_rerun(tmp_path, capsys):
    from test_regress import TINY_SPEC

    ref, spec = tmp_path / "ref", tmp_path / "tiny.toml"
    ref.mkdir()
    (ref / "notes.txt").write_text("mine")
    spec.write_text(TINY_SPEC)
    t0 = time.perf_counter()
    assert cli_main(["check", "--against", str(ref), "--spec", str(spec), "--out", str(tmp_path / "rerun"), "--update", "-q"]) == 2
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "rerun").exists()  # refused before the spec ran
    assert "is not a reference folder" in capsys.readouterr().err and (ref / "notes.txt").read_text() == "mine"


def test_check_update_swaps_in_exactly_the_reruns_records(tmp_path, capsys):
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    path = cur / "quality" / "shortgpt__unified.json"
    d = json.loads(path.read_text())
    d["scores"]["arc_easy"]["acc"]["value"] += 0.25
    path.write_text(json.dumps(d))
    (cur / "quality" / "tail__unified.failed.json").write_text("{}")  # a failure note is not a reference
    (cur / "report").mkdir()
    (cur / "report" / "report.md").write_text("a report")  # a folder without records is not copied
    (cur / "quality" / ".sweep").mkdir()
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 0
    assert "now holds the 9 record(s)" in capsys.readouterr().out
    from harness.store.references import MARKER, MARKER_TEXT

    assert snapshot(ref) == {k: v for k, v in snapshot(cur).items() if k.startswith(("quality/", "latency/"))
                             and not k.endswith(".failed.json")} | {MARKER: MARKER_TEXT.encode()}  # and what marks them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "ref"]  # no staging or old copy left behind
    new = tmp_path / "new"
    assert cli_main(["check", "--against", str(new), "--current", str(cur), "--update"]) == 0  # a new folder is fine
    assert snapshot(new) == snapshot(ref)


def test_an_update_killed_between_the_renames_is_recovered(tmp_path):
    old, new = tmp_path / "ref", tmp_path / ".ref.new"
    for folder, text in ((old, "old"), (new, "new")):
        (folder / "quality").mkdir(parents=True)
        (folder / "quality" / "summary.csv").write_text(text)
    old.rename(tmp_path / ".ref.old")  # the state after the first rename of swap_dir, before the second
    swap_dir(new, old)
    assert snapshot(old) == {"quality/summary.csv": b"new"} and sorted(os.listdir(tmp_path)) == ["ref"]


# --- item 2: latency refuses another configuration's record -------------------------------------

# tail's plan records how long its ranking took: a rerun must still find its record the same configuration
LATENCY = ["latency", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", "--prompt-tokens", "8", "--decode-tokens", "2", "--batch-size", "1",
           "--repeats", "1", "--warmup", "0"]


def test_latency_refuses_a_quality_record_of_the_same_name(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(REFERENCE / "quality" / "unpruned__disaggregated.json", out)
    before = snapshot(out)
    assert cli_main([*LATENCY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unpruned__disaggregated.json holds a unpruned/disaggregated quality record of a different configuration" in err
    assert "use another --out or remove it" in err
    assert snapshot(out) == before  # not replaced, and no summary of a half-refused run


def test_latency_refuses_its_own_record_of_another_configuration_and_reuses_the_same(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main([*LATENCY, "--out", str(out)]) == 0
    before = snapshot(out)
    assert cli_main([*LATENCY, "--out", str(out)]) == 0  # the same configuration: reused, not remeasured
    assert snapshot(out) == before
    path = out / "tail__disaggregated.json"  # a record made before `decode_modes` existed (now at its default)
    d = json.loads(path.read_text())
    del d["config"]["decode_modes"]
    path.write_text(json.dumps(d))
    before = snapshot(out)
    assert cli_main([*LATENCY, "--out", str(out)]) == 0 and snapshot(out) == before
    d["config"]["data_dir"] = "/elsewhere/data"  # made in a clone at another path: its plan is in the key
    path.write_text(json.dumps(d))
    before = snapshot(out)
    assert cli_main([*LATENCY, "--out", str(out)]) == 0 and snapshot(out) == before
    capsys.readouterr()
    assert cli_main([*LATENCY[:-4], "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 2
    assert "holds a unpruned/disaggregated latency record of a different configuration" in capsys.readouterr().err
    assert snapshot(out) == before


# --- item 3: one writer per output folder -------------------------------------------------------

def _harness(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _wait_for_holder(lock_file: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until `proc` holds `lock_file`: the file exists as soon as it is opened, and is locked and names its holder only
    after (a process stopped in between held nothing: a CI run under load let the second run through)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if json.loads(lock_file.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass  # not there yet, or not yet written
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{lock_file} never named pid {proc.pid}"
        time.sleep(0.02)


def test_a_second_run_into_the_same_out_is_refused_and_names_the_first(data_dir, tmp_path, cli):
    out = tmp_path / "out"
    run = ["run", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks", "pd_ppl", "--set", "pd_ppl.docs=1",
           "--set", "pd_ppl.prompt_tokens=32", "--set", "pd_ppl.cont_tokens=8", "--mode", "disaggregated", "--out", str(out)]
    first = _harness(*run)
    _wait_for_holder(out / lock.LOCK_NAME, first)
    os.kill(first.pid, signal.SIGSTOP)  # paused while it holds the lock: a fast machine must not finish it first
    try:
        second = cli(*run[:-1], out, "--limit", "4", data_dir=data_dir)  # in this process: the first is another
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another harness process (pid {first.pid}: python -m harness run" in second.stderr
    assert "choose another --out" in second.stderr and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert [p.name for p in sorted(out.iterdir())] == ["lm_eval", "summary.csv", "tail__disaggregated.json", "unpruned__disaggregated.json"]


HOLD = "import sys, time; from harness.store import lock\nwith lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    (tmp_path / f".x.json.abc{TEMP_SUFFIX}").write_text("half a record")  # what a writer killed mid-write leaves
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / f".q.md.abc{TEMP_SUFFIX}").write_text("half a table")
    (tmp_path / "tables" / ".editor.swp.tmp").write_text("another program's")  # in an --out such as ~ or /tmp
    deep = tmp_path.joinpath(*"abcde")  # deeper than any writer of ours: an --out of ~ is not walked to the bottom
    deep.mkdir(parents=True)
    (deep / f".y.abc{TEMP_SUFFIX}").write_text("not walked")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == holder.pid  # the stale lock file is still there
    with lock.hold(tmp_path) as took:
        assert took and json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (tmp_path / f".x.json.abc{TEMP_SUFFIX}").exists()  # its temp files are gone once the lock is ours
        assert not (tmp_path / "tables" / f".q.md.abc{TEMP_SUFFIX}").exists()
        assert (tmp_path / "tables" / ".editor.swp.tmp").read_text() == "another program's"  # not ours: kept
        assert (deep / f".y.abc{TEMP_SUFFIX}").exists()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_a_child_works_under_its_parents_lock_and_a_stranger_does_not(tmp_path):
    child = "import sys; from harness.store import lock\nwith lock.hold(sys.argv[1]) as took:\n    print('took' if took else 'inherited')"
    with lock.hold(tmp_path):
        told = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **lock.child_env()})
        assert told.returncode == 0 and told.stdout == "inherited\n", told.stderr
        stranger = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                                  env={k: v for k, v in os.environ.items() if k != lock.ENV})
        assert stranger.returncode == 1 and f"is in use by another harness process (pid {os.getpid()}" in stranger.stderr


def test_an_unwritable_out_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main(["report", str(REFERENCE), "--out", str(tmp_path / "file" / "sub"), "--no-plots"]) == 2
    assert "cannot write there" in capsys.readouterr().err


# --- item 4: export --force replaces only the harness's own exports ------------------------------

EXPORT = ["export", *TINY[:-1], "--method", "manual", "--mode", "disaggregated", "--set", "manual.prefill_layers=0,1,3",
          "--set", "manual.decode_layers=0,3"]


def test_export_force_keeps_a_folder_that_only_looks_like_an_export(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "project manifest"}')
    (out / "data.bin").write_bytes(b"\0" * 100)
    before = snapshot(out)
    assert cli_main([*EXPORT, "--out", str(out), "--force"]) == 2
    assert "not a previous export" in capsys.readouterr().err and snapshot(out) == before


def test_export_force_replaces_its_own_export_but_not_files_added_to_it(tmp_path, capsys):
    out = tmp_path / "pd"
    assert cli_main([*EXPORT, "--out", str(out)]) == 0
    (out / "decode" / "my_notes.txt").write_text("keep me")
    before = snapshot(out)
    assert cli_main([*EXPORT, "--out", str(out), "--force"]) == 2
    assert "holds files the export did not write (decode/my_notes.txt)" in capsys.readouterr().err
    assert snapshot(out) == before
    # without --force the same refusal says all that would be right: moved out, the export still needs --force
    assert cli_main([*EXPORT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files the export did not write (decode/my_notes.txt)" in err and "move them out and pass --force" in err, err
    assert snapshot(out) == before
    (out / "decode" / "my_notes.txt").unlink()
    assert cli_main([*EXPORT, "--out", str(out), "--force"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["pd"]  # no temporary, old or lock folder left beside it


# --- item 13: files get the mode the umask asks for ----------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_records_summaries_and_reports_honour_the_umask(umask, tmp_path):
    from reports.render import render_report

    old = os.umask(umask)
    try:
        r = rec.load(REFERENCE / "quality" / "unpruned__unified.json")
        written = [rec.save(r, tmp_path / "run"), rec.write_summary([r], tmp_path / "run" / "summary.csv")]
        atomic_write(tmp_path / "plain.txt", "x")
        render_report([REFERENCE], tmp_path / "report")
        written += [tmp_path / "plain.txt", *(p for p in (tmp_path / "report").rglob("*") if p.is_file())]
    finally:
        os.umask(old)
    assert len(written) > 10 and any(p.suffix == ".png" for p in written)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}


def test_check_update_refuses_to_drop_a_reference_whose_rerun_cell_failed(tmp_path, capsys):
    """--current whose shortgpt/unified cell failed (its note, no record): the update swapped in the other records
    and the references silently lost shortgpt/unified."""
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    before = snapshot(ref)
    (cur / "quality" / "shortgpt__unified.json").unlink()
    (cur / "quality" / "shortgpt__unified.failed.json").write_text("{}")
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 2
    err = capsys.readouterr().err
    assert "failed or did not finish (quality/shortgpt__unified.failed.json)" in err
    assert "with the --spec that made" in err  # the bare command reruns configs/ci.toml: another spec's references
    assert snapshot(ref) == before
    (cur / "quality" / "shortgpt__unified.failed.json").unlink()  # the note gone: still a record the rerun lacks
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 2
    assert "lacks 1 record(s) the references hold (quality/shortgpt__unified.json)" in capsys.readouterr().err
    assert snapshot(ref) == before
    (ref / "quality" / "shortgpt__unified.json").unlink()  # dropped on purpose, from the references
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 0
    assert not (ref / "quality" / "shortgpt__unified.json").exists()


def test_check_update_refuses_to_drop_references_the_rerun_does_not_hold(tmp_path, capsys):
    """A latency section stopped by Ctrl-C leaves no note, nor does a deleted record: --update swapped in what the rerun
    held and the references lost the rest in silence ("now holds the 6 record(s)")."""
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    before = snapshot(ref)
    shutil.rmtree(cur / "latency")
    (cur / "latency").mkdir()  # an empty latency folder, as a stopped section leaves it
    (cur / "quality" / "pdtrim__unified.json").unlink()
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 2
    err = capsys.readouterr().err
    lost = sorted(f"latency/{p.name}" for p in (ref / "latency").glob("*__*.json"))
    assert f"lacks {len(lost) + 1} record(s) the references hold (" in err and all(x in err for x in lost[:4]), err
    assert snapshot(ref) == before


def test_check_update_of_an_unfinished_rerun_says_a_way_to_finish_that_check_takes(tmp_path, capsys):
    """The refusal said 'rerun them to finish (the same command resumes)', but --current reruns nothing, and a check
    rerun into that folder (--out) is refused as holding an earlier run's work: the advice led to a second refusal."""
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    (cur / "quality" / "shortgpt__unified.json").unlink()
    (cur / "quality" / "shortgpt__unified.failed.json").write_text("{}")
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 2
    err = capsys.readouterr().err
    assert "the same command resumes" not in err
    assert f"python -m harness check --against {ref} --update" in err and "new folder" in err, err
    assert cli_main(["check", "--against", str(ref), "--out", str(cur), "--update"]) == 2  # the old advice: refused
    assert "holds the work of an earlier run" in capsys.readouterr().err


def test_the_write_probe_a_killed_run_left_is_removed_with_the_other_temp_files(tmp_path, monkeypatch):
    """check_writable's probe file kept the old `.tmp` suffix when atomic_write's became `.pdh.tmp`: one left by a run
    killed between its creation and removal was no longer among the files the lock's cleanup takes, and stayed."""
    from harness.store import folders as records  # check_writable lives there (records re-exports it)

    kept: list[str] = []
    real = records.tempfile.mkstemp

    def spy(**kw):
        fd, path = real(**kw)
        kept.append(path)
        return fd, path

    monkeypatch.setattr(records.tempfile, "mkstemp", spy)
    monkeypatch.setattr(records.Path, "unlink", lambda self, missing_ok=False: None)  # killed before its removal
    records.check_writable(tmp_path, "--out")
    monkeypatch.undo()
    assert Path(kept[0]).exists()
    with lock.hold(tmp_path):
        assert not Path(kept[0]).exists()


def test_a_run_stopped_by_sigterm_ends_as_on_ctrl_c(data_dir, tmp_path):
    """A scheduler's stop (SLURM, Kubernetes, `timeout`) sends SIGTERM: the run died by the signal (status -15), with
    no line saying what was kept or that a rerun goes on; it now ends as on Ctrl-C."""
    out = tmp_path / "out"
    run = _harness("run", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks", "arc_easy,hellaswag",
                   "--limit", "300", "--out", str(out), env={**os.environ, "HARNESS_DATA_DIR": str(data_dir)})
    try:
        _wait_for(out / lock.LOCK_NAME, run)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err
    assert not (out / lock.LOCK_NAME).exists()  # released on the way out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_a_library_swallowed_while_a_task_was_built_still_stops_the_run(cli, data_dir, tmp_path,
                                                                                    swallow_a_stop, sig):
    """`datasets` fingerprints a task's `process_docs` inside a bare `except:`; a stop arriving then was caught there
    (printed as "couldn't be hashed properly") and the run went on to its end, exit 0 (under torchrun, until the
    launcher's SIGKILL). It now stops once the task is built, as on Ctrl-C, before any later task or cell."""
    swallow_a_stop(sig)
    out = tmp_path / "out"
    r = cli("run", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks", "arc_easy,boolq", "--limit", 2,
            "--out", out, data_dir=data_dir)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "interrupted" in r.stderr and "rerun the same command" in r.stderr
    assert not list(out.glob("*.json"))  # stopped in the first cell's first task: nothing finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handlers are gone


def test_runs_reports_and_exports_refuse_to_write_among_the_references(tmp_path, capsys):
    """`run --out results/reference` wrote a record beside quality/ and latency/, and `check` then failed on "two records
    of one cell" and another model. A folder `check --update` made is marked, and every writer refuses it, or a folder
    inside it, before any work; a folder beside it is fine."""
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 0
    before = snapshot(ref)
    for argv in (["run", "--model", "random:tiny", "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "2", "--out", str(ref)],
                 ["run", "--model", "random:tiny", "--methods", "unpruned", "--tasks", "arc_easy", "--out", str(ref / "quality")],
                 ["latency", "--model", "random:tiny", "--methods", "unpruned", "--out", str(ref / "latency" / "x")],
                 ["report", str(cur), "--out", str(ref)]):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "the regression check's references" in err and f"--against {ref} --update" in err, (argv, err)
    assert snapshot(ref) == before
    assert cli_main(["report", str(cur), "--no-plots", "--out", str(tmp_path / "beside")]) == 0


def test_a_dangling_link_out_and_a_fifo_named_like_a_record(tmp_path, capsys):
    """A dangling symbolic link as --out was refused as "cannot write there (File exists)"; a FIFO named like a record
    made `report` and `check` wait forever on reading it."""
    from harness.store.records import run_files_under

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    assert cli_main(["report", str(_refs(tmp_path)), "--no-plots", "--out", str(link)]) == 2
    assert f"--out {link}: a symbolic link to {tmp_path / 'gone'}, which does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref" / "quality", run)
    os.mkfifo(run / "x__unified.json")
    assert sorted(p.name for p in run_files_under(run)) == sorted(p.name for p in run.glob("*.json") if p.name != "x__unified.json")


def test_a_dangling_link_on_the_way_to_out_is_refused_by_run_export_and_sweep(tmp_path, capsys):
    """Only an --out that was itself a dangling link was refused, and only where `check_writable` ran: `export` and
    `sweep` made the link's target and its parents and wrote there unasked, and `run --out LINK/sub` did too. Now each
    refuses it before any model work, naming the link, and creates nothing."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "deeper")
    spec = tmp_path / "s.toml"
    spec.write_text('[run]\nmodel = "random:tiny"\nmethods = ["unpruned"]\ntasks = ["arc_easy"]\nlimit = 2\n')
    for argv in (["export", "--model", "random:tiny", "--device", "cpu", "--method", "unpruned", "--out", str(link)],
                 ["export", "--model", "random:tiny", "--device", "cpu", "--method", "unpruned", "--out", str(link / "e")],
                 ["run", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--tasks", "arc_easy",
                  "--limit", "2", "--out", str(link / "sub")],
                 ["sweep", str(spec), "--backend", "local", "--workers", "1", "-q", "--out", str(link)]):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"a symbolic link to {tmp_path / 'gone' / 'deeper'}, which does not exist" in err, (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "s.toml"], argv  # nothing made, the target neither


def test_the_references_are_refused_at_any_depth_through_links_and_by_a_sweep(tmp_path, capsys):
    """The check read records at any depth, but only an --out two levels down was refused; `R/../beside` was refused as
    inside R and a symbolic link into R was let through; a sweep's cells, under `.sweep/`, passed their own check."""
    from harness.errors import UsageError
    from harness.store.references import refuse_references

    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 0
    for inside in (ref / "quality" / "a" / "b", ref / "quality" / ".sweep" / "x__unified"):
        with pytest.raises(UsageError, match="lies inside the regression check's references"):
            refuse_references(inside, "--out")
    (tmp_path / "link").symlink_to(ref / "quality")
    with pytest.raises(UsageError, match="lies inside"):
        refuse_references(tmp_path / "link" / "new", "--out")
    refuse_references(ref / ".." / "beside", "--out")  # beside the references: fine
    spec = tmp_path / "s.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["unpruned"]\ntasks = ["arc_easy"]\nlimit = 2\nout = "{ref / "quality"}"\n')
    capsys.readouterr()
    assert cli_main(["sweep", str(spec), "--backend", "local", "--workers", "1", "-q"]) == 2
    assert "[run] out" in capsys.readouterr().err and not (ref / "quality" / ".sweep").exists()


def test_check_update_of_current_records_reads_each_record_once(tmp_path, monkeypatch, capsys):
    """`check --current DIR --update` loaded every record of DIR twice (its refusals ran before the update and again
    inside it, under the lock): once now, besides the load of each copy that verifies it."""
    ref, cur = _refs(tmp_path), _refs(tmp_path, "cur")
    loads, real = [], rec.load
    monkeypatch.setattr(rec, "load", lambda path, *a, **k: loads.append(Path(path)) or real(path, *a, **k))
    assert cli_main(["check", "--against", str(ref), "--current", str(cur), "--update"]) == 0
    from_current = [p for p in loads if p.is_relative_to(cur)]
    assert from_current and len(from_current) == len(set(from_current)) == len(rec.record_files_under(cur))
