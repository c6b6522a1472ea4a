"""`python -m harness sweep`: a spec's cells in their own processes (local pool, local Ray instance)
give the same records as one `python -m harness run`; a failing cell fails alone; bad input exits 2;
Ctrl-C stops it at once and loses nothing a cell finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.store.records import load

ROOT = Path(__file__).resolve().parent.parent
RUN = {  # four cells: two methods × two modes, on the tiny random model (each cell is a process start, ~10 s of
    # CPU; a seeded method's plan across processes: tests/test_distributed.py's two ranks run `random`)
    "model": "random:tiny", "device": "cpu", "methods": ["unpruned", "tail"], "tasks": ["arc_easy"], "limit": 4,
    "mode": "both", "set": ["tail.k=1"],
}
CELLS = [f"{m}__{x}.json" for m in RUN["methods"] for x in ("unified", "disaggregated")]


def toml(sections: dict[str, dict]) -> str:
    """A spec file's text (strings, numbers, booleans and lists of them are all a spec needs)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    return "\n".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items()) for name, body in sections.items())


def write_spec(path: Path, **sections: dict) -> Path:
    path.write_text(toml(sections))
    return path


def harness(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def records_in(folder: Path) -> list[Path]:
    """Finished record files (not the pipeline's `.failed.json` notes or `.partial.json` state)."""
    return sorted(p for p in folder.glob("*__*.json") if not p.name.endswith((".failed.json", ".partial.json")))


def comparable(path: Path) -> dict:
    """What must not depend on how cells were scheduled: run key, plan (without its timings, and without
    the mark of a ranking another process computed and the calibration cache handed over), scores, KV bytes."""
    def untimed(x):
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items() if not k.endswith("seconds") and k != "reused_from_cache"}
        return x

    r = load(path)
    return {"run_key": r.run_key, "plan": untimed(r.plan), "scores": r.scores, "kv": r.kv, "n_samples": r.n_samples}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir) -> Path:
    """The same [run] section as one single-process `python -m harness run` (in this process: one start-up fewer)."""
    out = tmp_path_factory.mktemp("single")
    argv = ["run", "--model", RUN["model"], "--device", "cpu", "--methods", ",".join(RUN["methods"]), "--tasks", "arc_easy",
            "--limit", "4", "--mode", "both", *[x for s in RUN["set"] for x in ("--set", s)], "--out", str(out), "-q"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HARNESS_DATA_DIR", str(data_dir))
        env.setenv("HARNESS_CALIBRATION_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(argv) == 0
    return out


def assert_same_records(sweep_out: Path, single_out: Path, cells: list[str] = CELLS) -> None:
    """The sweep's records of `cells` equal the single run's (a cell's run key ignores which other cells ran)."""
    assert sorted(p.name for p in records_in(sweep_out)) == sorted(cells)
    for name in cells:
        assert comparable(sweep_out / name) == comparable(single_out / name), name
    assert not (sweep_out / ".sweep").exists() or not list((sweep_out / ".sweep").glob("*/*__*.json"))  # nothing left behind
    if cells == CELLS:
        assert len((sweep_out / "summary.csv").read_text().splitlines()) == len((single_out / "summary.csv").read_text().splitlines())


def test_local_pool_equals_single_process_then_latency_and_report(tmp_path, single, data_dir, cli):
    spec = write_spec(
        tmp_path / "spec.toml", run={**RUN, "out": str(tmp_path / "q"), "log_samples": True},
        latency={"model": "random:tiny", "device": "cpu", "methods": ["unpruned", "tail"], "plans_from": "run",
                 "prompt_tokens": [16], "decode_tokens": [2], "batch_size": [1], "warmup": 0, "repeats": 1,
                 "out": str(tmp_path / "lat")},
        report={"out": str(tmp_path / "report"), "no_plots": True})
    # the sweep itself in this process (one start-up fewer): its cells, latency and report are still processes
    res = cli("sweep", str(spec), "--backend", "local", "--workers", "2", "-q")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert_same_records(tmp_path / "q", single)
    sweep = json.loads((tmp_path / "q" / "sweep.json").read_text())
    assert (sweep["backend"], sweep["workers"], sweep["threads_per_cell"]) == ("local", 2, max(1, len(os.sched_getaffinity(0)) // 2))
    status = {c["cell"]: c["status"] for c in sweep["cells"]}
    assert status == {**{f"{m}/{x}": "ok" for m in RUN["methods"] for x in ("unified", "disaggregated")},
                      "latency": "ok", "report": "ok"}
    assert sweep["wall_s"] > 0 and all(c["seconds"] > 0 for c in sweep["cells"])
    assert sorted(p.name for p in (tmp_path / "lat").glob("*__*.json")) == ["tail__disaggregated.json", "unpruned__disaggregated.json"]
    assert (tmp_path / "report" / "report.html").is_file()
    for cell in (c[: -len(".json")] for c in CELLS):  # what a single-process run writes beside its records (the sweep
        assert len(list((tmp_path / "q" / "lm_eval" / cell).glob("results_*.json"))) == 1, cell  # removed them)
        assert (tmp_path / "q" / "samples" / cell / "samples_arc_easy.jsonl").is_file(), cell


def test_ray_local_instance_equals_single_process(tmp_path, single, data_dir):
    pytest.importorskip("ray")
    # two of the four cells, one per Ray worker (a cell's process start dominates on 2 cores): the local-pool
    # test above covers all four; this one covers scheduling through a local Ray instance
    run = {**RUN, "methods": ["tail"], "set": ["tail.k=1"], "out": "unused"}
    spec = write_spec(tmp_path / "spec.toml", run=run)
    res = harness("sweep", str(spec), "--backend", "ray", "--workers", "2", "--out", str(tmp_path / "sweep"), "-q")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert_same_records(tmp_path / "sweep" / "quality", single, ["tail__unified.json", "tail__disaggregated.json"])
    sweep = json.loads((tmp_path / "sweep" / "quality" / "sweep.json").read_text())
    assert (sweep["backend"], sweep["workers"], sweep["ray_address"], sweep["gpus_per_cell"]) == ("ray", 2, "local instance", 0)
    assert [c["status"] for c in sweep["cells"]] == ["ok"] * 2


def test_failing_cell_fails_alone_and_a_rerun_reuses_the_finished_one(tmp_path, data_dir, cli):
    # valid when parsed, failing inside the child: a decode layer the 4-layer model lacks (unified mode ignores it)
    run = {**RUN, "methods": ["manual"], "set": ["manual.decode_layers=0,1,9"], "out": str(tmp_path / "q")}
    spec = write_spec(tmp_path / "spec.toml", run=run, report={"out": str(tmp_path / "rep")})
    res = cli("sweep", str(spec), "--backend", "local", "--workers", "2", "-q")  # in this process; its cells are not
    assert res.returncode == 2, res.stdout + res.stderr[-3000:]  # the cell refused its option (exit 2): bad input
    assert "\n1 of 3 ok in " in res.stdout  # the report was skipped: not ok
    out = tmp_path / "q"
    assert [p.name for p in records_in(out)] == ["manual__unified.json"]
    cells = {c["cell"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells["manual/disaggregated"]["status"] == "failed" and cells["manual/disaggregated"]["returncode"] == 2
    assert "decode_layers=[0, 1, 9]" in cells["manual/disaggregated"]["error"]
    assert "FAILED" in res.stdout and "decode_layers" in res.stdout
    assert cells["manual/unified"]["status"] == "ok" and cells["manual/unified"]["record"] == str(out / "manual__unified.json")
    log = (out / ".sweep" / "manual__disaggregated.log").read_text().strip()
    assert log.splitlines()[-1] == cells["manual/disaggregated"]["error"].splitlines()[-1]  # the error is the log's tail
    assert not list((out / ".sweep").glob("*/*.failed.json"))  # a pipeline failure note, if any, sits next to the records
    metrics = sum(len(m) for p in records_in(out) for m in load(p).scores.values())
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + metrics  # over the finished record
    before = {p.name: p.read_bytes() for p in records_in(out)}

    res = cli("sweep", str(spec), "--backend", "local", "--workers", "2", "-q")
    assert res.returncode == 2
    cells = {c["cell"]: c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells == {"manual/unified": "reused", "manual/disaggregated": "failed", "report": "skipped"}
    assert {p.name: p.read_bytes() for p in records_in(out)} == before
    assert "manual/unified: reused" in res.stderr and "\n1 of 3 ok in " in res.stdout  # a reused cell is ok


def test_the_exit_status_is_2_only_when_every_failed_cell_refused_its_input():
    """A cell refusing an option of the spec exits 2, as `run` would; the sweep said 1, as for a crash."""
    from harness.cli.sweep import exit_status
    from harness.cli.sweep_backends import Outcome

    refused, crashed = Outcome("a/unified", "failed", returncode=2), Outcome("b/unified", "failed", returncode=1)
    report = Outcome("report", "failed", returncode=2)  # as `_report` makes it: it fails only on a refusal (UsageError)
    assert exit_status([]) == 0 and exit_status([refused]) == 2 and exit_status([refused, refused]) == 2
    assert exit_status([refused, crashed]) == 1 and exit_status([crashed]) == 1 and exit_status([report]) == 2


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys, data_dir):
    good = write_spec(tmp_path / "good.toml", run={**RUN, "out": str(tmp_path / "q")})
    assert _exit(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "no such spec file" in capsys.readouterr().err
    assert _exit(["sweep", str(good), "--backend", "slurm"]) == 2
    assert _exit(["sweep", str(good), "--workers", "0"]) == 2
    no_run = write_spec(tmp_path / "no_run.toml", latency={"model": "random:tiny", "out": str(tmp_path / "l")})
    assert _exit(["sweep", str(no_run)]) == 2
    assert "needs a [run] section" in capsys.readouterr().err
    bad_method = write_spec(tmp_path / "bad.toml", run={**RUN, "methods": ["unpruned", "nosuch"], "out": str(tmp_path / "q")})
    assert _exit(["sweep", str(bad_method)]) == 2
    bad_scope = write_spec(tmp_path / "scope.toml", run={**RUN, "set": ["shortgpt.k=1"], "out": str(tmp_path / "q")})
    assert _exit(["sweep", str(bad_scope)]) == 2  # a --set for a method not in the run: rejected before any cell starts
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert _exit(["sweep", str(good), "--backend", "ray"]) == 2
    assert "pip install ray" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # nothing ran


def test_a_killed_cell_reports_the_signal():
    from harness.cli.sweep_cells import error_text as _error

    assert _error(-9, "loading model\n").startswith("killed by signal 9 (out of memory?)")
    assert _error(3, "") == "exit status 3, no output"


# --- Ctrl-C -------------------------------------------------------------------------------------

def _cell_processes(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (a cell's --out lies under it, whichever process started it)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # ended while we looked
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("backend, sig", [("local", signal.SIGINT), ("ray", signal.SIGINT), ("local", signal.SIGTERM),
                                          ("ray", signal.SIGTERM)])
def test_ctrl_c_stops_the_sweep_and_starts_no_queued_cell(tmp_path, data_dir, backend, sig):
    """SIGTERM (a scheduler's or `timeout`'s stop) as Ctrl-C: it killed the sweep alone, and its cells ran on as
    orphans, holding their folders, so a rerun's cells failed with 'in use by another harness process'."""
    if backend == "ray":
        pytest.importorskip("ray")
    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "out": str(tmp_path / "q")})
    cells = tmp_path / "q" / ".sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(spec), "--backend", backend, "--workers", "1", "-q"],
                             cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _cell_processes(f"{cells}/") and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = _cell_processes(f"{cells}/")
        assert len(running) == 1, "the first cell's process never started"
        sweep.send_signal(sig)  # to the sweep only, as `kill -INT`; a terminal's Ctrl-C would reach the cell too
        t0 = time.monotonic()
        out, err = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    took = time.monotonic() - t0
    # what a failure needs to be understood (it has failed once under load, on Ray, and passed when rerun)
    said = f"stopped in {took:.1f} s; sweep stdout: {out[-1500:]}\nstderr: {err[-3000:]}\ncell logs: " + "; ".join(
        f"{p.name}: {p.read_text(errors='replace')[-800:]}" for p in sorted(cells.glob("*.log")))
    assert sweep.returncode == 130, said
    assert took < 30, said  # the cell stopped on its SIGINT, not killed after the grace time (STOP_GRACE_S)
    assert not _cell_processes(f"{cells}/"), said  # no cell process left behind
    assert [p.name for p in cells.glob("*.log")] == ["unpruned__unified.log"], said  # the queued cells never started
    status = {c["cell"]: c["status"] for c in json.loads((tmp_path / "q" / "sweep.json").read_text())["cells"]}
    assert status == {"unpruned/unified": "interrupted", "unpruned/disaggregated": "skipped", "tail/unified": "skipped",
                      "tail/disaggregated": "skipped"}, said
    assert "interrupted (Ctrl-C)" in err and "rerun the same command" in err and "not started" in out, said


def _record(method: str, mode: str):
    from harness.store.records import RunRecord

    return RunRecord(method=method, mode=mode, run_key=method + mode, config={"model": "m", "seed": 0}, environment={}, plan={},
                     model={"name": "m"}, calibration=None, scores={"arc_easy": {"acc": {"value": 0.5, "stderr": 0.1}}},
                     kv={}, n_samples={"arc_easy": 4}, lm_eval={}, timing_s={}, created="")


def _cell(run_out: Path, stem: str, variants: list[str]):
    from harness.cli.sweep_plan import Cell

    mode = stem.rsplit("__", 1)[1]
    return Cell(stem.replace("__", "/"), ["run"], run_out / ".sweep" / stem, run_out / ".sweep" / f"{stem}.log",
                [run_out / f"{v}__{mode}.json" for v in variants])


def test_a_rerun_adopts_a_record_a_child_finished_but_the_sweep_never_moved(tmp_path):
    """A sweep killed or interrupted before it settled a cell: the record the child finished is kept, not recomputed;
    a cut-off one is not taken, and a record already in the run folder is the one that counts."""
    from harness.cli.sweep_cells import seed, settle
    from harness.store import records as rec

    cell = _cell(tmp_path, "tail__unified", ["tail@k=1", "tail@k=2", "tail@k=3"])
    done, cut, kept = cell.records
    rec.save(_record("tail@k=1", "unified"), cell.workdir)  # finished by the child, never moved
    (cell.workdir / cut.name).write_text(_record("tail@k=2", "unified").to_json()[:100])  # cut off (a non-atomic copy)
    rec.save(_record("tail@k=3", "unified"), tmp_path)  # already in the run folder ...
    other = _record("tail@k=3", "unified")
    other.created = "a finished record of its own"
    rec.save(other, cell.workdir)  # ... and another finished record under its name in the cell's folder
    before = kept.read_bytes()
    seed(cell)
    assert rec.load(done).run_key == "tail@k=1unified" and cell.seeded == {done.name, kept.name}
    assert not cut.exists() and not (cell.workdir / cut.name).exists()  # the child computes it again
    assert kept.read_bytes() == before == (cell.workdir / kept.name).read_bytes()
    rec.save(_record("tail@k=2", "unified"), cell.workdir)  # the rerun's child reuses two records and computes the third
    outcome = settle(cell, 0, "", 1.0)
    assert outcome.status == "ok" and all(r.exists() for r in cell.records) and not cell.workdir.exists()


def test_an_interrupt_settles_what_the_stopped_cells_finished(tmp_path):
    """Ctrl-C while cells run: the one that ended is settled as usual; the stopped ones' finished records move into
    the run folder (an unfinished variant stays to resume; a cell stopped after its last record is done); a queued
    one is reported as not started."""
    from harness.cli import sweep
    from harness.store import records as rec

    first, stopped = _cell(tmp_path, "unpruned__unified", ["unpruned"]), _cell(tmp_path, "tail__unified", ["tail@k=1", "tail@k=2"])
    late, queued = _cell(tmp_path, "unpruned__disaggregated", ["unpruned"]), _cell(tmp_path, "tail__disaggregated", ["tail@k=1"])

    class Backend:  # two workers: the first cell ends, then Ctrl-C while the next two run
        def map(self, cells, cwd, env):
            rec.save(_record("unpruned", "unified"), first.workdir)
            yield first, (0, "", 1.0)
            rec.save(_record("tail@k=1", "unified"), stopped.workdir)  # one of its two records
            (stopped.workdir / "tail@k=2__unified.partial.json").write_text("{}")
            rec.save(_record("unpruned", "disaggregated"), late.workdir)  # its only record, just before the Ctrl-C
            raise KeyboardInterrupt

        def stop(self):
            return {stopped.name: (130, "interrupted (Ctrl-C)", 2.0), late.name: (130, "", 2.0)}

    with pytest.raises(sweep.Interrupted) as caught:
        sweep._run_cells(Backend(), [first, stopped, late, queued], ".", {}, quiet=True, settle=True)
    outcomes = caught.value.outcomes
    assert [(o.cell, o.status) for o in outcomes] == [
        ("unpruned/unified", "ok"), ("tail/unified", "interrupted"), ("unpruned/disaggregated", "ok"), ("tail/disaggregated", "skipped")]
    assert rec.load(stopped.records[0]).method == "tail@k=1" and not stopped.records[1].exists()
    assert outcomes[1].record == str(stopped.records[0])
    assert (stopped.workdir / "tail@k=2__unified.partial.json").exists()  # what a rerun resumes from
    assert rec.load(late.records[0]).mode == "disaggregated"
    assert not queued.log.exists() and not queued.records[0].exists()


def test_a_sweep_into_another_configurations_folder_is_refused_before_any_cell(tmp_path, single, cli):
    shutil.copytree(single, tmp_path / "q")
    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "limit": 3, "out": str(tmp_path / "q")})
    res = cli("sweep", str(spec), "--backend", "local", "--workers", "2", "-q")
    assert res.returncode == 2, res.stdout + res.stderr[-3000:]
    assert f"error: {tmp_path / 'q'} holds work of a different configuration: unpruned__unified.json" in res.stderr
    assert not (tmp_path / "q" / ".sweep").exists()  # no cell started


def test_another_configurations_record_left_in_a_cells_folder_is_refused_not_moved_into_the_run(tmp_path):
    """A record a killed sweep's cell finished but never moved, and the spec changed since: the next sweep's cell
    start moved it into the run folder (then the cell refused it, naming a file no longer there), leaving another
    configuration's record among the run's records and in its summary.csv."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError
    from harness.store.records import save

    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "out": str(tmp_path / "q")})
    cell_dir = (tmp_path / "q").resolve() / ".sweep" / "tail__unified"
    save(_record("tail", "unified"), cell_dir)
    with pytest.raises(UsageError, match=r"\.sweep/tail__unified holds work of a different configuration: tail__unified"):
        expand(spec, None)
    assert not (tmp_path / "q" / "tail__unified.json").exists() and (cell_dir / "tail__unified.json").exists()


def test_sigterm_still_stops_a_ray_sweep_as_ctrl_c_after_ray_starts():
    """`ray.init` installs its own SIGTERM handler (sys.exit), replacing the sweep's: a SIGTERM to a Ray sweep ended it
    with SystemExit, not as Ctrl-C, so its running cells were never told to stop and no summary came."""
    pytest.importorskip("ray")
    from harness.cli.interrupt import sigterm_as_ctrl_c
    from harness.cli.sweep_backends import RayBackend

    with sigterm_as_ctrl_c():
        ours = signal.getsignal(signal.SIGTERM)
        backend = RayBackend(1, want_gpus=False)
        try:
            assert signal.getsignal(signal.SIGTERM) is ours
        finally:
            backend.ray.shutdown()


def test_cells_get_the_sweeps_plugins_even_on_a_cluster_node(monkeypatch):
    """The spec is checked with this process's HARNESS_PLUGINS; a Ray cluster's node runs a cell in its own
    environment, which lacked them, so each cell failed on an unknown method after the checks had passed."""
    from harness.cli.sweep import cell_env

    monkeypatch.setenv("HARNESS_PLUGINS", "my_plugins.kv,my_plugins.tasks")
    assert cell_env(2)["HARNESS_PLUGINS"] == "my_plugins.kv,my_plugins.tasks" and cell_env(2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("HARNESS_PLUGINS")
    assert "HARNESS_PLUGINS" not in cell_env(2)


def _stopped_while_the_pool_starts(tmp_path, monkeypatch, interrupted_pool) -> dict:
    """What the local backend's stop() reports after a Ctrl-C raised inside the pool, by the ThreadPoolExecutor
    subclass `interrupted_pool(running)` returns, once the one cell's (60 s) process runs (`running` set)."""
    import threading

    from harness.cli import sweep_backends
    from harness.cli.sweep_backends import LocalBackend

    backend, running = LocalBackend(1, []), threading.Event()

    def slow_cell(argv, **kwargs):
        proc = LocalBackend._popen(backend, [sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        running.set()
        return proc

    backend._popen = slow_cell
    monkeypatch.setattr(sweep_backends.cf, "ThreadPoolExecutor", interrupted_pool(running))
    with pytest.raises(KeyboardInterrupt):
        list(backend.map([_cell(tmp_path, "unpruned__unified", ["unpruned"])], str(tmp_path), {}))
    return backend.stop()


def _reports_the_cell_stopped(ran: dict) -> None:
    assert list(ran) == ["unpruned/unified"], ran
    rc, _, seconds = ran["unpruned/unified"]
    assert rc != 0 and seconds < 20  # stopped by its SIGINT, not left to run its 60 s


def test_a_ctrl_c_between_starting_a_cell_and_storing_its_future_still_reports_the_cell(tmp_path, monkeypatch):
    """The Ctrl-C the main thread takes may land after the pool took a cell but before `map` stored its future: stop()
    read the cells that ran from those futures, so a started (and stopped) cell was reported 'not started', a
    KeyError here (seen once beside a busy suite)."""
    import concurrent.futures as cf

    def interrupted_pool(running):
        class Pool(cf.ThreadPoolExecutor):
            def submit(self, *args, **kwargs):  # the signal, taken just after the cell's process started
                super().submit(*args, **kwargs)
                assert running.wait(30)
                raise KeyboardInterrupt
        return Pool

    _reports_the_cell_stopped(_stopped_while_the_pool_starts(tmp_path, monkeypatch, interrupted_pool))


def test_a_ctrl_c_taken_while_the_pool_starts_its_thread_still_reports_the_running_cell(tmp_path, monkeypatch):
    """ThreadPoolExecutor starts a worker thread, then adds it to the threads its shutdown(wait=True) joins. A Ctrl-C
    the main thread took in between (a starved main thread under load, while the new thread already ran its cell)
    left that thread unjoined: stop() read the finished cells before it had recorded its own, and the running (then
    stopped) cell was reported 'not started', a KeyError here (twice in fresh-clone CIs, in this test's neighbour
    and in test_ctrl_c_stops_the_sweep_and_starts_no_queued_cell[local-2])."""
    import concurrent.futures as cf

    def interrupted_pool(running):
        class Pool(cf.ThreadPoolExecutor):
            def _adjust_thread_count(self):  # the thread started; the signal lands before the pool records it
                super()._adjust_thread_count()
                self._threads.clear()
                assert running.wait(30)
                raise KeyboardInterrupt
        return Pool

    _reports_the_cell_stopped(_stopped_while_the_pool_starts(tmp_path, monkeypatch, interrupted_pool))


def test_a_ctrl_c_the_kernel_hands_a_pool_thread_still_stops_the_local_sweep(tmp_path):
    """Beside a busy test suite the sweep let its running cell finish, or ran every queued one, after a SIGINT:
    the kernel had handed the signal to a pool thread, and the main thread slept in an untimed wait until the cell
    ended. Here the signal goes to the pool thread itself; the main thread must raise within a few seconds."""
    import threading

    from harness.cli.sweep_backends import LocalBackend

    backend, waiting = LocalBackend(1, []), threading.Event()
    pool_thread = []

    def slow_cell(argv, **kwargs):  # the cell's process, started as the backend starts one (so stop() knows it)
        proc = LocalBackend._popen(backend, [sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        pool_thread.append(threading.get_ident())
        waiting.set()  # the signal only once the process runs: before, stop() rightly reports the cell as not started
        return proc

    backend._popen = slow_cell
    threading.Timer(0.0, lambda: waiting.wait(30) and signal.pthread_kill(pool_thread[0], signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(backend.map([_cell(tmp_path, "unpruned__unified", ["unpruned"])], str(tmp_path), {}))
    assert time.monotonic() - t0 < 10  # not the cell's 60 s
    rc, _, seconds = backend.stop()["unpruned/unified"]
    assert rc != 0 and seconds < 20  # the running cell was stopped by its SIGINT, not left to finish


def test_a_ray_cancel_taken_just_as_a_cells_process_started_stops_and_reports_that_process(tmp_path):
    """Ray cancels a running task with a simulated SIGINT (`_thread.interrupt_main`). Taken inside `popen`, after the
    cell's process had started but before run_cell held it, the interrupt left run_cell: the process ran on unstopped
    and the cell was reported 'not started' (test_ctrl_c_stops_the_sweep_and_starts_no_queued_cell[ray-15] under a
    CPU burner). run_cell runs a Ray task in its worker's main thread, as here."""
    import _thread

    from harness.cli.sweep_backends import run_cell

    started: list[subprocess.Popen] = []

    def popen(argv, **kwargs):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        _thread.interrupt_main()  # Ray's cancel, arriving as popen returns
        return started[0]

    t0 = time.monotonic()
    try:
        rc, _, seconds = run_cell(["run"], str(tmp_path), {}, str(tmp_path / "cell.log"), popen=popen)
    except KeyboardInterrupt:
        pytest.fail("the interrupt left run_cell with its process still running")
    finally:
        for p in started:
            p.kill()
            p.wait()
    assert started and rc != 0 and rc is not None  # stopped by its SIGINT, reported with its exit status
    assert time.monotonic() - t0 < 20 and seconds < 20  # not left to run its 60 s


class _FinishingBackend:
    """Runs no process: each cell's child 'writes' its records, the cells finishing in reverse order."""

    name = "local"

    def __init__(self) -> None:
        self.env = None

    def map(self, cells, cwd, env):
        from harness.store import records as rec

        self.env = env
        for c in reversed(cells):
            for r in c.records:
                method, mode = r.name[: -len(".json")].split("__")
                rec.save(_record(method, mode), c.workdir)
            yield c, (0, "", 1.0)

    def close(self) -> None:
        pass


def test_outcomes_are_in_the_specs_cell_order_not_the_order_cells_finished(tmp_path):
    from harness.cli import sweep

    cells = [_cell(tmp_path, "unpruned__unified", ["unpruned"]), _cell(tmp_path, "tail__unified", ["tail"])]
    outcomes = sweep._run_cells(_FinishingBackend(), cells, ".", {}, quiet=True, settle=True)
    assert [(o.cell, o.status) for o in outcomes] == [("unpruned/unified", "ok"), ("tail/unified", "ok")]


def test_fewer_cells_than_workers_share_every_core(tmp_path, monkeypatch, cli):
    """One cell on 4 workers of 8 cores: its process gets all 8 threads, not the 2 of a full pool's cell."""
    from harness.cli import sweep

    backend = _FinishingBackend()
    monkeypatch.setattr(sweep, "cores", lambda: 8)
    monkeypatch.setattr(sweep, "make_backend", lambda *a: backend)
    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "methods": ["tail"], "mode": "unified", "out": str(tmp_path / "q")})
    res = cli("sweep", str(spec), "--backend", "local", "--workers", "4", "-q")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert backend.env["OMP_NUM_THREADS"] == "8"
    assert json.loads((tmp_path / "q" / "sweep.json").read_text())["threads_per_cell"] == 8


PARENT = """import os, subprocess, sys
env = dict(os.environ)
if sys.argv[1] == "sweep":
    env["HARNESS_SWEEP_PARENT"] = str(os.getpid())
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
child.wait()
"""
CELL = ("from harness.cli.lifeline import end_with_parent, PARENT_ENV; import os, time; took = end_with_parent(); "
        "print(took, PARENT_ENV in os.environ, flush=True); time.sleep(120)")


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X"):
                return True  # a zombie: ended, not yet reaped by its new parent
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_cell_ends_with_a_sweep_killed_by_sigkill_and_only_then():
    """A sweep killed with SIGKILL left its cells running for their whole length (and a rerun failed them as in use):
    a cell started with the runner's pid in HARNESS_SWEEP_PARENT now gets SIGTERM (a run's Ctrl-C) when it dies, and
    removes the variable so its own children do not apply it; a process started otherwise runs on."""
    from harness.cli.sweep_backends import run_cell

    for kind in ("sweep", "plain"):
        parent = subprocess.Popen([sys.executable, "-c", PARENT, kind, CELL], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        pid, took, inherited = parent.stdout.readline().split()
        assert (took, inherited) == (("True" if kind == "sweep" else "False"), "False")
        parent.kill()
        parent.wait()
        try:
            assert _gone(int(pid), 10.0 if kind == "sweep" else 2.0) == (kind == "sweep"), kind
        finally:
            if kind == "plain":
                os.kill(int(pid), signal.SIGKILL)
    seen = {}
    run_cell(["--version"], str(ROOT), {}, str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cell-{os.getpid()}.log"),
             popen=lambda *a, **k: seen.update(k["env"]) or subprocess.Popen(*a, **k))
    assert seen["HARNESS_SWEEP_PARENT"] == str(os.getpid())


def test_an_interrupted_sweep_counts_the_cells_its_progress_bar_counted(tmp_path, capsys):
    """The Ctrl-C line counted the latency job and the report as cells: '3 of 8 cells finished' beside a bar of 6."""
    from types import SimpleNamespace

    from harness.cli.sweep import _finish
    from harness.cli.sweep_backends import Outcome

    plan = SimpleNamespace(run_out=tmp_path, report_argv=["report"])
    outcomes = [Outcome("a/unified", "ok"), Outcome("b/unified", "reused"), Outcome("c/unified", "interrupted"),
                Outcome("latency", "skipped", error="not run: the sweep was interrupted (Ctrl-C)")]
    rc = _finish(SimpleNamespace(spec="s.toml"), plan, outcomes, {"backend": "local", "workers": 1}, time.perf_counter(), True)
    assert rc == 130 and "interrupted (Ctrl-C): 2 of 3 cells finished" in capsys.readouterr().err


def test_a_resumed_cell_keeps_the_logs_of_the_tasks_it_kept(tmp_path):
    """An interrupted cell's per-item logs stay in its folder for the resume (which looks for them there); the resumed
    cell's settle brings every task's log into the run folder, file by file, keeping an earlier run's other files.
    Moving the interrupted cell's logs out and then replacing the folder with the resumed cell's lost the logs of the
    tasks it had finished (boolq), and the resume said they were never logged."""
    from harness.cli.sweep_cells import seed, settle
    from harness.store import records as rec

    cell = _cell(tmp_path, "unpruned__unified", ["unpruned"])
    logs, out = cell.workdir / "samples" / "unpruned__unified", tmp_path / "samples" / "unpruned__unified"
    out.mkdir(parents=True)
    (out / "samples_piqa.jsonl").write_text("an earlier run's\n")
    seed(cell)
    logs.mkdir(parents=True)
    (logs / "samples_boolq.jsonl").write_text("boolq\n")  # the first run: boolq finished, then Ctrl-C
    assert settle(cell, 130, "interrupted", 1.0).status == "failed"
    assert (logs / "samples_boolq.jsonl").is_file() and not (out / "samples_boolq.jsonl").exists()
    seed(cell)
    (logs / "samples_arc_easy.jsonl").write_text("arc_easy\n")  # the resume: boolq kept, arc_easy evaluated
    (cell.workdir / "lm_eval" / "unpruned__unified").mkdir(parents=True)
    (cell.workdir / "lm_eval" / "unpruned__unified" / "results_1.json").write_text("{}")
    rec.save(_record("unpruned", "unified"), cell.workdir)
    assert settle(cell, 0, "", 1.0).status == "ok" and not cell.workdir.exists()
    assert sorted(p.name for p in out.iterdir()) == ["samples_arc_easy.jsonl", "samples_boolq.jsonl", "samples_piqa.jsonl"]
    assert (tmp_path / "lm_eval" / "unpruned__unified" / "results_1.json").is_file()
