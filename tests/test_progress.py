"""The run's progress reporting: phase timings, the up-front statement, the ETA, and the silence tool."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.run import progress

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--tasks", "arc_easy",
            "--limit", "2", "--mode", "disaggregated"]
PART = re.compile(r"^(.+) (\d+(?:\.\d+)?) s$")


def _timing_parts(stderr: str) -> dict[str, float]:
    """The final 'time: …' line as {label: seconds} (the total under 'total')."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("time: ")]
    assert len(lines) == 1, stderr[-2000:]
    parts = {}
    for part in lines[0][len("time: "):].split(" · "):
        m = PART.match(part)
        assert m, f"unparsed timing part {part!r} in {lines[0]!r}"
        parts[m.group(1)] = float(m.group(2))
    return parts


@pytest.mark.parametrize("quiet", [False, True])
def test_tiny_run_prints_statement_and_a_timing_line_summing_to_its_wall_time(cli, data_dir, tmp_path, quiet):
    t0 = time.perf_counter()
    res = cli(*TINY_RUN, "--out", tmp_path / "run", *(["-q"] if quiet else []), data_dir=data_dir)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    parts = _timing_parts(res.stderr)
    assert {"startup", "load", "planning unpruned", "arc_easy", "report", "total"} <= set(parts)
    # the parts add up to the total (each is rounded to 0.1 s), and the total is this call's wall time
    assert abs(sum(v for k, v in parts.items() if k != "total") - parts["total"]) <= 0.06 * len(parts) + 0.01
    assert parts["total"] <= wall + 0.1 and parts["total"] >= 0.8 * wall - 0.5
    kept = json.loads((tmp_path / "run" / "unpruned__disaggregated.json").read_text())["extra"]["phases_s"]
    assert set(kept) == set(parts) - {"total", "other", "report"}  # the report is written after the record
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lm_eval", "summary.csv", "unpruned__disaggregated.json"]
    said = "this run: 1 method(s) × 1 mode(s) = 1 cell(s): unpruned/disaggregated" in res.stderr
    assert said is not quiet  # -q: only the timing line
    if not quiet:
        assert res.stderr.index("this run:") < res.stderr.index("model random:tiny")  # before any work
        assert "arc_easy: 2 items" in res.stderr
    assert "time: " not in res.stdout  # stdout keeps only the tables


def test_statement_lists_cells_tasks_and_long_task_settings(data_dir):
    from harness.cli.run import run_config, run_parser
    from harness.run import pipeline

    args = run_parser().parse_args(["--model", "random:tiny", "--methods", "unpruned,shortgpt", "--mode", "both",
                                    "--tasks", "arc_easy,piqa,pd_ppl", "--limit", "3", "--data-dir", str(data_dir),
                                    "--set", "pd_ppl.prompt_tokens=64,128"])
    cfg = run_config(args)
    work = progress.work_of(cfg, pipeline.prepare(cfg))
    text = progress.statement(work, cfg.limit)
    assert "2 method(s) × 2 mode(s) = 4 cell(s)" in text
    for cell in ("unpruned/unified", "unpruned/disaggregated", "shortgpt/unified", "shortgpt/disaggregated"):
        assert cell in text
    assert "arc_easy: 3 items" in text and "piqa: 3 items" in text
    assert re.search(r"pd_ppl: 6 items; prompt_tokens=\(64, 128\)", text)  # 3 articles × 2 prompt lengths
    assert "48 items in all" in text  # (3 + 3 + 6) × 4 cells


class _Clock:
    """A settable time.perf_counter for the tracker: phase seconds without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_count_once_and_eta_uses_rate_and_known_planning(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    work = progress.Work([("a", "disaggregated"), ("b", "disaggregated"), ("a", "unified")], {"t": 10})
    tr = progress.Tracker(work, show=False, since=95.0)
    with tr.phase("planning a"):
        clock.now += 2
        with tr.phase("calibration"):
            clock.now += 30
        clock.now += 3
    tr.planned("a", 5.0)
    assert tr.eta() == "ETA after the first task"
    with tr.phase("t"):
        clock.now += 20
    tr.task_done("t", 20.0)
    # 20 items left at 2 s each, b's planning not seen yet, a's (second cell of a) 5 s
    assert tr.eta() == "ETA 45.0 s + planning b"
    assert tr.totals() == {"startup": 5.0, "calibration": 30.0, "planning a": 5.0, "t": 20.0}
    assert tr.timing_line() == "time: startup 5.0 s · planning a 5.0 s · calibration 30.0 s · t 20.0 s · total 60.0 s" \
        or tr.timing_line() == "time: startup 5.0 s · calibration 30.0 s · planning a 5.0 s · t 20.0 s · total 60.0 s"


def test_eta_gives_each_task_its_own_rate_and_counts_down_the_running_one(monkeypatch):
    """A long-context task's items cost many short items': once it has run, the ETA uses its own rate (not the
    rate over all tasks, which left 'ETA 5.5 s' standing through a 40 s task), less what the running one has spent."""
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    work = progress.Work([("a", "disaggregated"), ("b", "disaggregated")], {"short": 10, "long": 2})
    tr = progress.Tracker(work, show=False, since=100.0)
    tr.cell(0, "a", "disaggregated")
    for task, seconds in (("short", 10.0), ("long", 40.0)):
        with tr.phase(task, "a/disaggregated"):
            clock.now += seconds
        tr.task_done(task, seconds)
    assert tr.eta() == "ETA 50.0 s + planning b"  # cell b: 10 s + 40 s, and its planning
    tr.cell(1, "b", "disaggregated")
    with tr.phase("short", "b/disaggregated"):
        clock.now += 10
    tr.task_done("short", 10.0)
    assert tr.eta() == "ETA 40.0 s"  # the rate over both tasks would say 2 items x 60/22 s = 5.5 s
    with tr.phase("long", "b/disaggregated"):
        clock.now += 15
        assert tr.eta() == "ETA 25.0 s"
        clock.now += 30  # longer than it took in cell a: nothing left to count down, never negative
        assert tr.eta() == "ETA 0.0 s"


def _after_a_first_cell(monkeypatch, cells):
    """A tracker of `cells` whose first cell's one task 't' (10 items) took 10 s, and its settable clock."""
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    tr = progress.Tracker(progress.Work(cells, {"t": 10}), show=False, since=100.0)
    tr.cell(0, *cells[0])
    with tr.phase("t", "/".join(cells[0])):
        clock.now += 10
    tr.task_done("t", 10.0)
    return tr, clock


def test_eta_names_the_planning_now_running(monkeypatch):
    """A cell's first planning (PDTrim's search: many minutes) is named after the '+' while it runs: the line said
    'ETA 56.1 s + planning shortgpt' through 20 minutes of PDTrim's search."""
    tr, clock = _after_a_first_cell(monkeypatch, [("u", "disaggregated"), ("p", "disaggregated"), ("s", "disaggregated")])
    tr.cell(1, "p", "disaggregated")
    with tr.phase("planning p", "p/disaggregated", shown="planning"):
        clock.now += 100
        assert tr.eta() == "ETA 20.0 s + planning p,s"  # 2 cells' t left; p's search and s not timed yet
    tr.planned("p", 100.0)
    assert tr.eta() == "ETA 20.0 s + planning s"


def test_eta_counts_down_a_planning_timed_before(monkeypatch):
    """A method planned again (the other PD setting) counts its earlier planning time, less what this one has run."""
    tr, clock = _after_a_first_cell(monkeypatch, [("u", "disaggregated"), ("p", "disaggregated"), ("p", "unified")])
    tr.cell(1, "p", "disaggregated")
    with tr.phase("planning p", "p/disaggregated", shown="planning"):
        clock.now += 200
    tr.planned("p", 200.0)
    assert tr.eta() == "ETA 220 s"  # 2 cells' t, and p/unified's planning at p's 200 s
    tr.cell(2, "p", "unified")
    with tr.phase("planning p", "p/unified", shown="planning"):
        clock.now += 150
        assert tr.eta() == "ETA 60.0 s"  # 200 s - 150 s of it left, and p/unified's t
        clock.now += 100  # longer than the first time: nothing left to count down, never negative
        assert tr.eta() == "ETA 10.0 s"


def test_overall_line_names_cell_task_elapsed_and_eta():
    stream = io.StringIO()
    work = progress.Work([("a", "disaggregated"), ("b", "disaggregated")], {"t1": 4, "t2": 6})
    tr = progress.Tracker(work, show=True, stream=stream, tick_s=0)
    tr.start()
    try:
        tr.cell(1, "b", "disaggregated")
        with tr.phase("t2", "b/disaggregated", shown=progress.task_label("t2", 1, ["t1", "t2"])):
            drawn = tr._bar.desc
    finally:
        tr.close()
    assert "cell 2 of 2 (b/disaggregated) · task 2 of 2 (t2) · elapsed " in drawn and "ETA after the first task" in drawn


def _silence(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "silence.py"), "--no-echo", "--json", "--", *args],
                          capture_output=True, text=True, timeout=60)


def test_silence_tool_finds_the_longest_gap_and_what_preceded_it():
    script = ("import sys, time\n"
              "for i, gap in enumerate([0.3, 0.3, 0.9, 0.3]):\n"
              "    print(f'line{i}', flush=True); time.sleep(gap)\n"
              "sys.stderr.write('end\\n'); sys.exit(3)\n")
    res = _silence(sys.executable, "-c", script)
    assert res.returncode == 3  # the command's own status
    out = json.loads(res.stdout)
    assert 0.85 <= out["longest_s"] <= 1.6, out
    assert out["before"].strip().endswith("line2")
    assert out["chunks"] >= 5 and out["exit_code"] == 3  # a print may arrive as two chunks (text, newline)
    assert sorted(out["gaps_s"])[-2] < out["longest_s"]  # one gap stands out: the 0.9 s one
    inner = out["gaps_s"][1:-1]  # between the chunks: the 0.3 s sleeps and the 0.9 s one
    assert sum(0.25 <= g <= 0.8 for g in inner) == 3


def test_silence_tool_counts_carriage_return_redraws_as_output():
    script = ("import sys, time\n"
              "for i in range(6):\n"
              "    sys.stderr.write(f'\\rbar {i}/5'); sys.stderr.flush(); time.sleep(0.3)\n")
    out = json.loads(_silence(sys.executable, "-c", script).stdout)
    assert out["chunks"] >= 6 and out["longest_s"] < 0.9  # a moving bar is not silence


def test_a_quiet_spec_with_a_latency_section_shows_no_progress_bars(tmp_path, data_dir):
    """Checking the [latency] section imports torch (and tqdm, which reads TQDM_DISABLE once) before the run starts."""
    import os

    spec = tmp_path / "spec.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["unpruned"]\ntasks = ["arc_easy"]\nlimit = 2\n'
                    f'mode = "disaggregated"\nout = "{tmp_path / "q"}"\n\n[latency]\nmodel = "random:tiny"\n'
                    f'methods = ["unpruned"]\nprompt_tokens = [16]\ndecode_tokens = [2]\nbatch_size = [1]\nrepeats = 1\n'
                    f'out = "{tmp_path / "lat"}"\n')
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    res = subprocess.run([sys.executable, "-m", "harness", "--config", str(spec), "-q"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**env, "HARNESS_DATA_DIR": str(data_dir)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "it/s]" not in res.stderr and "%|" not in res.stderr, res.stderr[-2000:]


def test_a_local_task_groups_subtasks_are_counted_up_front_from_the_registry(data_dir, tmp_path, monkeypatch):
    """The count of a group's subtasks came from a path the runner named for MMLU (`mmlu/test`); it is the task's own
    `subtasks` now, so a plug-in group is counted too, and MMLU without a data dir keeps its hub count (57)."""
    from harness.config import RunConfig
    from harness.quality import local_tasks
    from harness.quality.local_tasks.mmlu import Mmlu, mmlu_subjects

    class Pairs(Mmlu):  # a group of its own: three subtasks, whatever the data dir holds
        name = "pairs_group"

        @classmethod
        def subtasks(cls, data_dir):
            return ["a", "b", "c"]

    monkeypatch.setitem(local_tasks._REGISTRY, "pairs_group", Pairs)
    n_mmlu = len(mmlu_subjects(Path(data_dir)))
    for data, tasks, want in ((str(data_dir), ("pairs_group", "mmlu"), {"pairs_group": 3 * 4, "mmlu": n_mmlu * 4}),
                              (None, ("mmlu",), {"mmlu": 57 * 4})):
        cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=tasks, data_dir=data, limit=4)
        work = progress.work_of(cfg, type("Prepared", (), {"methods": {"unpruned": None}, "task_options": {}})())
        assert work.items == want
        assert work.notes["mmlu"] == f"{want['mmlu'] // 4} subtasks, up to 4 items each"


def test_latency_and_export_say_they_start_before_their_imports(capsys, tmp_path):
    """A run's first line says it is importing torch, transformers and lm-eval (seconds, more on a busy machine);
    `latency` and `export` printed nothing until their model had loaded (6 s on a loaded 2-core machine). Now they
    say so first, as a run does; `latency -q` keeps quiet, as `run -q` does."""
    from harness.cli import main

    tiny = ["--model", "random:tiny", "--device", "cpu"]
    for argv, first in ((["latency", *tiny, "--methods", "nope", "--out", str(tmp_path / "l")],
                         "python -m harness latency: starting (importing torch, transformers)"),
                        (["export", *tiny, "--method", "nope", "--out", str(tmp_path / "e")],
                         "python -m harness export: starting (importing torch, transformers)")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == first and "unknown method 'nope'" in err, err
    assert main(["latency", *tiny, "--methods", "nope", "--out", str(tmp_path / "l"), "-q"]) == 2
    assert "starting" not in capsys.readouterr().err


def test_the_silence_benchmark_reports_what_it_measured_after_a_ctrl_c(tmp_path):
    """benchmarks/silence.py (docs/progress.md) ended in a KeyboardInterrupt traceback from its select() on Ctrl-C; it now
    lets the command stop as on its own Ctrl-C and prints the gaps it measured."""
    import os
    import signal
    import time

    from conftest import ROOT

    child = tmp_path / "child.py"
    child.write_text("import time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                     "    print('child stopped', flush=True)\n    raise SystemExit(130)\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "silence.py"), "--", sys.executable, str(child)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "started\n"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert "child stopped" in out and "exit 130" in out + err, out + err


def test_a_long_latency_measurement_says_it_is_still_running(tmp_path, capsys, monkeypatch):
    """One latency measurement (a 4096-token prompt, batch 4, on 2 cores) ran 96 s without a line: a line every
    STILL_EVERY_S seconds now says which plan and workload it is and for how long."""
    import time

    from harness.cli import main
    from harness.run import latency_run, progress

    real = latency_run.measure
    monkeypatch.setattr(progress, "STILL_EVERY_S", 0.1)
    monkeypatch.setattr(latency_run, "measure", lambda *a, **k: time.sleep(0.45) or real(*a, **k))
    assert main(["latency", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--prompt-tokens", "8",
                 "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--out", str(tmp_path / "l"), "-q"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "still running" in x]
    assert len(lines) >= 3 and all("unpruned: latency_T8_n2_b1: still running (" in x for x in lines), lines


@pytest.mark.parametrize("argv", [["latency", "--prompt-tokens", "0"], ["run", "--limit", "0"], ["export", "--seed", "x"]])
def test_a_bad_flag_value_is_refused_before_the_starting_line_and_the_imports(capsys, argv):
    """`latency --prompt-tokens 0` printed "starting (importing torch, transformers)" and waited for the imports (~2 s)
    before argparse's one-line refusal."""
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: argument" in err and "starting" not in err, err
