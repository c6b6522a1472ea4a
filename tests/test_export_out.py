"""`python -m harness export`'s --out and --plans-from where they cannot be used: a mount point, a folder the
finished export cannot be renamed onto, and a run folder whose cell failed or did not finish."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.store import records as rec

TINY = ["--model", "random:tiny", "--device", "cpu"]
MANUAL = ["export", *TINY, "--method", "manual", "--set", "manual.prefill_layers=0,1,3"]


def test_a_mount_point_out_is_refused_before_any_model_work(tmp_path, capsys, monkeypatch):
    import harness.pd.models as models

    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr("harness.cli.export_out.os.path.ismount", lambda p: Path(p) == out)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli_main([*MANUAL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a mount point" in err and f"--out {out / 'export'}" in err and "Traceback" not in err
    assert out.is_dir() and not any(out.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


@pytest.mark.parametrize("fails", ["old_out_aside", "new_export_in"])
def test_an_out_the_export_cannot_be_renamed_onto_exits_2_and_keeps_the_old_one(tmp_path, capsys, monkeypatch, fails):
    out = tmp_path / "e"
    assert cli_main([*MANUAL, "--set", "manual.decode_layers=0,1,3", "--out", str(out)]) == 0  # a previous export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.rename

    def rename(self, target):  # EBUSY/EXDEV/EPERM as a mount point, another filesystem or an immutable folder give
        moving_out, moving_new_in = Path(self) == out.resolve(), Path(self).name == ".e.partial"
        if (fails == "old_out_aside" and moving_out) or (fails == "new_export_in" and moving_new_in):
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    capsys.readouterr()
    assert cli_main([*MANUAL, "--set", "manual.decode_layers=0,3", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the export could not be moved there (Device or resource busy" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no .e.partial (a whole checkpoint) nor .e.old left


@pytest.mark.parametrize("how, why", [
    ("failed", "(that cell failed there: {runs}/tail__unified.failed.json; rerun it to make its plan)"),
    ("partial", "(that cell did not finish there: rerun its command to finish it)"),
])
def test_plans_from_a_run_whose_cell_failed_or_did_not_finish_says_so(tmp_path, capsys, how, why):
    runs = tmp_path / "run"
    record = rec.RunRecord(method="unpruned", mode="unified", run_key="k", plan={}, environment={},
                           config={"model": "random:tiny", "seed": 0}, model={}, calibration=None, scores={}, kv={},
                           n_samples={}, lm_eval={}, timing_s={}, created="")
    rec.save(record, runs)
    name = rec.failure_filename if how == "failed" else rec.partial_filename
    (runs / name("tail", "unified")).write_text(json.dumps({"kind": "failed_cell", "error": "tail.k=8: too deep"}))
    assert cli_main(["export", "--method", "tail", "--plans-from", str(runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    # the note or resume state is named as what it is, not listed among the records
    assert f"no record tail__unified.json {why.format(runs=runs)}; records there: unpruned__unified.json\n" in err
    assert not (tmp_path / "o").exists()


def test_a_set_the_replayed_record_differs_from_names_the_sweep_variant_made_with_it(tmp_path, capsys):
    """`--plans-from RUN --method tail --set tail.k=2` finds tail__disaggregated.json (k=1) and refuses it; the run's
    sweep variant tail@k=2__disaggregated.json was made with k=2, and the refusal names it."""
    runs = tmp_path / "run"
    for k, name in ((1, "tail"), (2, "tail@k=2"), (3, "tail@k=3")):
        out = tmp_path / f"k{k}"
        assert cli_main(["export", *TINY, "--method", "tail", "--mode", "disaggregated", "--set", f"tail.k={k}",
                         "--out", str(out)]) == 0
        manifest = json.loads((out / "harness_export.json").read_text())  # a unified plan: one checkpoint
        rec.save(rec.RunRecord(method=name, mode="disaggregated", run_key="k", plan=manifest["plan"], environment={},
                               config={"model": "random:tiny", "seed": 0, "method_options": manifest["method_options"]},
                               model={}, calibration=None, scores={}, kv={}, n_samples={}, lm_eval={}, timing_s={},
                               created=""), runs)
    capsys.readouterr()
    variant = runs / rec.record_filename("tail@k=2", "disaggregated")
    args = ["export", *TINY, "--method", "tail", "--mode", "disaggregated", "--plans-from", str(runs)]
    assert cli_main([*args, "--set", "tail.k=2", "--out", str(tmp_path / "o")]) == 2
    assert f"was made with them: pass --record {variant}" in capsys.readouterr().err
    assert cli_main([*args, "--set", "tail.k=4", "--out", str(tmp_path / "o")]) == 2  # none made with k=4: no hint
    assert "made with them" not in capsys.readouterr().err
    assert cli_main(["export", "--device", "cpu", "--record", str(variant), "--set", "tail.k=2",
                     "--out", str(tmp_path / "o")]) == 0
    exported = json.loads((tmp_path / "o" / "harness_export.json").read_text())
    assert exported["plan_replayed_from"] == str(variant) and exported["plan"]["removed_decode"] == [1, 2]


def test_an_old_export_that_cannot_be_removed_after_the_swap_leaves_the_new_one_in_place(tmp_path, capsys,
                                                                                         monkeypatch):
    """swap_dir removes the old folder after the new one is in place; a failure there (a file of it held open on NFS)
    was reported as 'the export could not be moved there' (exit 2) with the new export at --out, or a traceback."""
    import shutil

    out = tmp_path / "e"
    assert cli_main([*MANUAL, "--set", "manual.decode_layers=0,1,3", "--out", str(out)]) == 0
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == ".e.old":
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    capsys.readouterr()
    assert cli_main([*MANUAL, "--set", "manual.decode_layers=0,3", "--out", str(out), "--force"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"the previous export could not be removed: {tmp_path / '.e.old'}" in err, err
    assert json.loads((out / "config.json").read_text()) and not (tmp_path / ".e.partial").exists()


def test_a_second_export_into_one_out_is_refused_naming_the_first(tmp_path, capsys):
    """Another process exporting into the same --out holds it: this one exits 2 naming that process, says what
    would go wrong (not "records", which an export does not write) and that another --out works."""
    from conftest import lock_holder

    out = tmp_path / "e"
    with lock_holder(out, beside=True) as holder:
        assert cli_main([*MANUAL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another harness process (pid {holder.pid}" in err, err
    assert "undo each other's work" in err and "choose another --out" in err and "records" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("how", ["refused", "interrupted"])
def test_an_export_that_writes_nothing_leaves_no_folders_it_made(tmp_path, capsys, monkeypatch, how):
    """`--out a/b/e` made a/b/ to hold the lock file beside e; an export refused after taking the lock (a plan the model
    cannot take) or stopped by Ctrl-C left those empty folders behind. A folder that was there is kept."""
    import harness.pd.models as models

    (tmp_path / "keep").mkdir()
    out = tmp_path / "keep" / "a" / "b" / "e"
    if how == "interrupted":
        monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["export", *TINY, "--method", "manual", "--set", "manual.prefill_layers=0,9"] if how == "refused" else MANUAL
    assert cli_main([*argv, "--out", str(out)]) == (2 if how == "refused" else 130)
    assert how != "refused" or "manual plan: prefill_layers=[0, 9]: need sorted, unique layer indices in [0, 4)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"] and not any((tmp_path / "keep").iterdir())


def test_force_keeps_an_export_holding_a_link_to_a_folder_the_user_added(tmp_path, capsys):
    """A symbolic link to a folder put into an earlier export was passed over as a folder, not a file export did not
    write, so --force replaced the export and the link was gone; it is refused like any file the user added."""
    out, data = tmp_path / "e", tmp_path / "data"
    assert cli_main([*MANUAL, "--out", str(out)]) == 0
    data.mkdir()
    (out / "my-data").symlink_to(data)
    capsys.readouterr()
    assert cli_main([*MANUAL, "--out", str(out), "--force"]) == 2
    assert "holds files the export did not write (my-data); --force would delete them" in capsys.readouterr().err
    assert (out / "my-data").is_symlink() and data.is_dir()


def test_an_out_inside_the_references_is_refused_naming_that_out(tmp_path, capsys):
    """`--out REF/quality/e` was refused as "--out REF/quality: lies inside the regression check's references": the
    folder the export is written beside, not the one given."""
    from harness.store.references import MARKER

    (tmp_path / "ref" / "quality").mkdir(parents=True)
    (tmp_path / "ref" / MARKER).write_text("references")
    out = tmp_path / "ref" / "quality" / "e"
    assert cli_main([*MANUAL, "--out", str(out)]) == 2
    assert f"--out {out}: lies inside the regression check's references ({tmp_path / 'ref'})" in capsys.readouterr().err
    assert not out.exists()
