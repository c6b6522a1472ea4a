"""Runs survive faults: kill -9 loses no finished record, a failing cell does not stop the others,
the same seed gives the same plans and scores."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from harness.config import RunConfig
from harness.run import pipeline
from harness.store import records as rec

TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness", *TINY, "--methods", "unpruned,random,tail,shortgpt", "--set", "random.k=1",
            "--set", "tail.k=1", "--set", "shortgpt.k=2", "--tasks", "arc_easy,boolq,piqa", "--limit", "12",
            "--mode", "both", "--out", str(out), *extra]


def _finished(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*__*.json") if rec.is_record_file(p))


def test_kill_9_mid_run_loses_no_finished_record_and_the_rerun_resumes(data_dir, tmp_path, cli):
    out = tmp_path / "run"
    # without the TQDM_DISABLE the `cli` fixture sets: -q alone must silence every progress bar
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "HARNESS_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(_finished(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read()
    assert "it/s]" not in err and "Tokenizing inputs" not in err, err[-2000:]  # -q: no bar of ours, lm-eval's or torch's
    survivors = {p.name: p.read_bytes() for p in _finished(out)}
    assert 2 <= len(survivors) < 8
    for name in survivors:  # every finished record is whole and readable
        assert rec.load(out / name).method in ("unpruned", "random", "tail", "shortgpt")

    again = cli(*_cmd(out)[3:], data_dir=data_dir)  # the rerun, in this process
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_finished(out)) == 8 and not list(out.glob("*.partial.json"))
    for name, data in survivors.items():
        method, mode = name[: -len(".json")].split("__")
        assert f"{method}/{mode}: finished record found, reused" in again.stderr
        assert (out / name).read_bytes() == data  # not recomputed, not rewritten
    assert again.stderr.count(": planning\n") + len(survivors) <= 8  # finished cells were not planned again


def test_a_rerun_tidies_up_after_a_kill_between_saving_a_record_and_removing_its_resume_state(data_dir, tmp_path, cli):
    """The record is written last (after lm-eval's results file): a run killed just after it leaves the cell's
    `.partial.json` (and maybe an older failure note); the rerun reuses the record and removes both."""
    out = tmp_path / "run"
    args = [*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "2", "--mode", "disaggregated", "--out", out]
    assert cli(*args, data_dir=data_dir).returncode == 0
    record = (out / "unpruned__disaggregated.json").read_bytes()
    (results,) = (out / "lm_eval" / "unpruned__disaggregated").glob("results_*.json")
    assert results.stat().st_mtime_ns <= (out / "unpruned__disaggregated.json").stat().st_mtime_ns
    (out / "unpruned__disaggregated.partial.json").write_text(json.dumps({"run_key": "?", "tasks": {}}))
    (out / "unpruned__disaggregated.failed.json").write_text("{}")
    again = cli(*args, data_dir=data_dir)
    assert again.returncode == 0 and "unpruned/disaggregated: finished record found, reused" in again.stderr
    assert sorted(p.name for p in out.glob("*.json")) == ["unpruned__disaggregated.json"]
    assert (out / "unpruned__disaggregated.json").read_bytes() == record


def test_a_failing_cell_is_recorded_and_the_other_cells_finish(data_dir, tmp_path, cli):
    out = tmp_path / "run"
    # decode layer 9 does not exist in the 4-layer model: only known once the model is loaded, in the cell
    bad = [*TINY, "--methods", "unpruned,manual,tail", "--tasks", "arc_easy",
           "--limit", "4", "--mode", "disaggregated", "--set", "manual.prefill_layers=0,1,2,3",
           "--set", "manual.decode_layers=0,9", "--set", "tail.k=1", "--out", str(out)]
    r = cli(*bad, data_dir=data_dir)
    assert r.returncode == 2, r.stderr[-2000:]  # bad input for one method: 2, and the message says what is wrong
    assert "1 of 3 cells FAILED" in r.stdout and "manual/disaggregated" in r.stdout
    assert "Traceback" not in r.stderr
    assert [p.name for p in _finished(out)] == ["tail__disaggregated.json", "unpruned__disaggregated.json"]
    (note,) = rec.load_failures(out)
    assert note["method"] == "manual" and note["error_type"] == "UsageError" and "9" in note["error"]
    assert "traceback" in note and note["run_key"] != "?"
    summary = (out / "summary.csv").read_text()
    assert "unpruned" in summary and "manual" not in summary

    fixed = [a if a != "manual.decode_layers=0,9" else "manual.decode_layers=0,3" for a in bad]
    r = cli(*fixed, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unpruned/disaggregated: finished record found, reused" in r.stderr
    assert len(_finished(out)) == 3 and rec.load_failures(out) == []  # the note is gone once the cell succeeded


def test_a_crashing_cell_exits_1_and_names_the_error(tiny, data_dir, tmp_path, monkeypatch):
    import methods

    cls = methods.get("tail")

    def out_of_memory(self, model, calib, mode):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cls, "plan", out_of_memory)
    cfg = RunConfig(model="random:tiny", methods=("unpruned", "tail"), tasks=("arc_easy",), limit=3,  # k fits 4 layers
                    modes=("unified", "disaggregated"), device="cpu", data_dir=str(data_dir), overrides=("tail.k=1",))
    with pytest.raises(pipeline.CellsFailed) as info:
        pipeline.run(cfg, tmp_path, loaded=tiny)
    fails = info.value.failures
    assert [(f.method, f.mode) for f in fails] == [("tail", "unified"), ("tail", "disaggregated")]
    assert not any(f.bad_input for f in fails) and "RuntimeError: CUDA out of memory" in fails[0].line()
    assert [r.method for r in info.value.records] == ["unpruned", "unpruned"]
    assert len(rec.load_failures(tmp_path)) == 2 and len(rec.load_dir(tmp_path)) == 2


def test_the_same_seed_gives_the_same_plans_and_scores(tiny, data_dir, tmp_path):
    base = RunConfig(model="random:tiny", methods=("random", "shortgpt"), tasks=("arc_easy", "boolq"), limit=6,
                     modes=("disaggregated",), device="cpu", data_dir=str(data_dir), seed=3,
                     overrides=("random.k=2", "shortgpt.k=2", "calib.n_samples=16", "calib.max_tokens=64"))
    a = pipeline.run(base, tmp_path / "a", loaded=tiny)
    b = pipeline.run(base, tmp_path / "b", loaded=tiny)
    other = dataclasses.replace(base, seed=4, overrides=(*base.overrides, "random.seed=1"))  # random draws with its own seed
    c = pipeline.run(other, tmp_path / "c", loaded=tiny)
    for x, y in zip(a, b):
        assert (x.plan["prefill_layers"], x.plan["decode_layers"]) == (y.plan["prefill_layers"], y.plan["decode_layers"])
        assert x.scores == y.scores and x.kv == y.kv and x.run_key == y.run_key
        assert json.dumps(x.calibration, sort_keys=True) == json.dumps(y.calibration, sort_keys=True)
    # other seeds draw another calibration set and another random order
    assert a[0].plan["info"]["permutation"] != c[0].plan["info"]["permutation"]
    assert a[1].calibration != c[1].calibration


@pytest.mark.parametrize("text", ['{"run_key": "abc", "tas', "[]", '{"tasks": {}}'])
def test_an_unreadable_resume_state_is_replaced_not_a_failure_on_every_rerun(data_dir, tmp_path, cli, text):
    """A `.partial.json` that does not parse as a resume state (torn by a copy, edited, not an object) failed its
    cell with a JSONDecodeError on every rerun, though 'rerun the same command' was the advice."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "unpruned__unified.partial.json").write_text(text)
    r = cli(*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "2", "--mode", "unified", "--out", out,
            data_dir=data_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "unpruned__unified.json").exists() and not (out / "unpruned__unified.partial.json").exists()


@pytest.mark.parametrize("edit", ["depth", "huge depth", "not a plan", "tasks a list"])
def test_a_resume_state_of_the_cell_with_a_plan_for_another_model_starts_the_cell_afresh(data_dir, tmp_path, cli, edit):
    """The cell's own `.partial.json` (its run key) with a hand-edited plan: a plan for another depth failed the cell
    as a crash on every rerun, and n_layers = 1e308 hung the run while the plan listed its layers."""
    out = tmp_path / "run"
    args = [*TINY, "--methods", "tail", "--set", "tail.k=1", "--tasks", "arc_easy", "--limit", "2", "--mode", "disaggregated",
            "--out", out]
    assert cli(*args, data_dir=data_dir).returncode == 0
    record = json.loads((out / "tail__disaggregated.json").read_text())
    state = {"run_key": record["run_key"], "tasks": {}, "plan": dict(record["plan"]), "plan_s": 0.0, "calibration": None}
    if edit == "depth":
        state["plan"]["n_layers"] = 8
    elif edit == "huge depth":
        state["plan"]["n_layers"] = 1e308
    elif edit == "not a plan":
        state["plan"] = "3 4"
    else:
        state["tasks"] = []
    (out / "tail__disaggregated.json").unlink()
    (out / "tail__disaggregated.partial.json").write_text(json.dumps(state))
    again = cli(*args, data_dir=data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "tail__disaggregated.partial.json " in again.stderr and "; the cell starts afresh" in again.stderr
    assert json.loads((out / "tail__disaggregated.json").read_text())["plan"] == record["plan"]
