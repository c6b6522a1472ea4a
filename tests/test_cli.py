"""The command line: bad input exits 2 with a useful message; a real run writes records and resumes."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

import methods


def harness(*args, data_dir=None, timeout=900):
    env = dict(os.environ)
    if data_dir is not None:
        env["HARNESS_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]


@pytest.mark.parametrize(
    "args, message",
    [
        # the whole registered list (built from the registry, so a new plug-in needs no edit here)
        (["--methods", "unpruned,nope"], "unknown method 'nope'; known methods: "
                                        + ", ".join(n for n in methods.names() if ":" not in n) + "; "),
        (["--tasks", "arc_easy,nosuchtask"], "unknown task(s) nosuchtask; tasks with local data: arc_challenge"),
        # a typo gets the close name, as an unknown method does (it got only the 10-name list to search)
        (["--tasks", "arc_eazy,pqa"], "unknown task(s) arc_eazy (did you mean arc_easy?), pqa (did you mean piqa?); "
                                      "tasks with local data: arc_challenge"),
        # an outside task is unknown without its module, as an outside method is: both say where it is named
        (["--tasks", "nosuchtask"], "aliases: standard, long (a plug-in's task: name its module in "
                                    "HARNESS_PLUGINS or a spec's top-level plugins key)"),
        (["--tasks", ","], "--tasks is empty"),
        (["--limit", "-3"], "expected a positive integer, a fraction between 0 and 1 (exclusive) or 'all', got -3"),
        (["--set", "shortgpt.k"], "expected SCOPE.OPTION=VALUE"),
        (["--set", "shortgpt.q=1"], "shortgpt has no option 'q'; options: k, batch_size"),
        (["--set", "shortgpt.k=two"], "--set shortgpt.k=two: expected int (a whole number), got 'two'"),
        (["--set", "shortgpt.k="], "--set shortgpt.k=: expected int (a whole number), got ''"),
        (["--methods", "pdtrim", "--set", "pdtrim.lazy=maybe"], "--set pdtrim.lazy=maybe: expected bool (true or false)"),
        (["--methods", "pdtrim", "--set", "pdtrim.d_t=high"], "--set pdtrim.d_t=high: expected float (a number, e.g. 0.5)"),
        (["--set", "pdtrim.k=2"], "'pdtrim' is not a method or long-context task of this run nor 'calib'"),
        (["--methods", "pdtrim", "--set", "pdtrim.k_prefill=3", "--set", "pdtrim.k_decode=2"], "R_prefill ⊆ R_decode"),
        (["--set", "passkey.lengths=2048"], "'passkey' is not a method or long-context task of this run"),
        (["--tasks", "passkey", "--set", "passkey.depths=1.5"], "depths must be non-empty and within [0, 1]"),
        (["--tasks", "long", "--set", "pd_ppl.docs=x"], "--set pd_ppl.docs=x: expected int"),
        (["--methods", "shortgpt", "--set", "shortgpt.k=4"], "shortgpt.k=4: must be < the model's 4 layers"),
        (["--methods", "manual", "--set", "manual.prefill_layers=0,1", "--set", "manual.decode_layers=0,2",
          "--mode", "disaggregated"], "decode_layers must be a subset of prefill_layers"),
        (["--model", "random:huge"], "unknown random preset 'huge'; known: random:llama2-7b"),
        (["--device", "tpu"], "expected auto, cpu or cuda"),
    ],
)
def test_bad_input_exits_2(args, message, data_dir, tmp_path, cli):
    r = cli(*TINY, "--tasks", "arc_easy", "--out", str(tmp_path / "o"), *args, data_dir=data_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_unreadable_model_and_missing_data(data_dir, tmp_path, cli):
    r = cli("--model", str(tmp_path / "no-model-here"), "--tasks", "arc_easy", data_dir=data_dir)
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    r = cli("--model", str(bad), "--tasks", "arc_easy", data_dir=data_dir)
    assert r.returncode == 2 and "could not load it" in r.stderr and "Traceback" not in r.stderr
    empty_dir = tmp_path / "model-dir"
    empty_dir.mkdir()
    r = cli("--model", str(empty_dir), "--tasks", "arc_easy", data_dir=data_dir)
    assert r.returncode == 2 and "could not load it" in r.stderr
    partial = tmp_path / "data"
    shutil.copytree(data_dir / "arc_easy", partial / "arc_easy")
    r = cli(*TINY, "--tasks", "arc_easy,boolq", data_dir=partial)
    assert r.returncode == 2 and f"missing data file {partial}/boolq/dev.jsonl (needed by task boolq)" in r.stderr


def test_run_writes_records_and_summary_then_resumes(data_dir, tmp_path, cli):
    out = tmp_path / "run"
    args = [*TINY, "--methods", "unpruned,shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=16",
            "--tasks", "arc_easy,boolq", "--limit", "6", "--batch-size", "5", "--mode", "both", "--out", str(out)]
    r = cli(*args, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| **PD-disaggregated** |" in r.stdout and "| unpruned | 0 |" in r.stdout and "| shortgpt | 1 |" in r.stdout
    assert "| Method | Removed | ARC-e | BoolQ | Avg | KV × |" in r.stdout
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["shortgpt__disaggregated.json", "shortgpt__unified.json",
                     "unpruned__disaggregated.json", "unpruned__unified.json"]
    rec = json.loads((out / "shortgpt__disaggregated.json").read_text())
    for key in ("config", "plan", "environment", "calibration", "scores", "kv", "lm_eval", "model"):
        assert rec[key], key
    assert rec["environment"]["packages"]["lm_eval"] == "0.4.13"
    assert rec["calibration"]["n_samples"] == 16 and len(rec["plan"]["removed_decode"]) == 1
    assert rec["scores"]["arc_easy"]["acc"]["stderr"] is not None
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"method", "mode", "task", "metric", "value", "stderr", "kv_bytes_sent"} <= set(rows[0])
    assert len({(r["method"], r["mode"]) for r in rows}) == 4
    kv = {(r["method"], r["mode"], r["task"]): r["kv_bytes_sent"] for r in rows if r["metric"] == "acc"}
    for task in ("arc_easy", "boolq"):
        dense, pruned = int(kv[("unpruned", "disaggregated", task)]), int(kv[("shortgpt", "disaggregated", task)])
        assert pruned * 4 == dense * 3  # 1 of 4 layers removed: exactly 3/4 of the bytes
        assert kv[("unpruned", "unified", task)] == ""  # nothing handed over in unified mode
    before = {p.name: p.read_text() for p in out.glob("*__*.json")}
    again = cli(*args, data_dir=data_dir)
    assert again.returncode == 0 and again.stderr.count("finished record found, reused") == 4
    assert {p.name: p.read_text() for p in out.glob("*__*.json")} == before
    other = cli(*[a if a != "6" else "7" for a in args], data_dir=data_dir)
    assert other.returncode == 2 and "different configuration" in other.stderr
    assert "holds work of a different configuration: " in other.stderr and all(f"{n} (run_key" in other.stderr for n in before)
    assert ": planning" not in other.stderr and {p.name: p.read_text() for p in out.glob("*__*.json")} == before
    assert " loaded in " not in other.stderr  # refused before the model loads ("before any work": minutes for a large one)


def test_calibrating_method_without_data_dir_exits_2(tmp_path, cli):
    r = cli(*TINY, "--methods", "unpruned,shortgpt", "--tasks", "arc_easy", "--out", str(tmp_path), data_dir="")
    assert r.returncode == 2 and "shortgpt calibrate on PIQA + MMLU from local data: pass --data-dir" in r.stderr


def test_version(capsys):
    from harness.cli import main
    from harness.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pd-harness {__version__}\n"


def test_num_fewshot_reaches_lm_eval_and_the_run_key(data_dir, tmp_path, cli):
    """--num-fewshot N: lm-eval builds N-shot prompts (its n-shot provenance says N), the record keeps N,
    and the run key differs from the zero-shot run's, while zero-shot keys stay what they were."""
    import contextlib
    import json

    from harness.config import RunConfig
    from harness.errors import HarnessWarning

    keys = {}
    for n in (0, 2):
        out = tmp_path / f"shot{n}"
        with pytest.warns(HarnessWarning, match="few-shot examples come from") if n else contextlib.nullcontext():
            r = cli(*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "3", "--mode", "unified",
                    "--num-fewshot", str(n), "--out", str(out), data_dir=data_dir)
        assert r.returncode == 0, r.stderr[-2000:]
        rec = json.loads((out / "unpruned__unified.json").read_text())
        assert rec["config"]["num_fewshot"] == n
        assert rec["lm_eval"]["tasks"]["arc_easy"]["n-shot"]["arc_easy"] == n
        keys[n] = rec["run_key"]
    assert keys[0] != keys[2]
    # a field added with its default does not change older keys or run folders
    import dataclasses
    assert "num_fewshot" not in RunConfig()._canonical() and RunConfig(num_fewshot=1).run_id() != RunConfig().run_id()
    assert dataclasses.asdict(RunConfig())["num_fewshot"] == 0
    r = cli(*TINY, "--num-fewshot", "-1", "--tasks", "arc_easy", "--out", str(tmp_path / "bad"), data_dir=data_dir)
    assert r.returncode == 2 and "argument --num-fewshot/--num_fewshot: expected an integer >= 0, got '-1'" in r.stderr


def test_default_run_folders_are_readable_and_resume(tmp_path, monkeypatch):
    """Without --out: results/runs/<date>_<methods>_<run id>; a rerun of the same configuration finds
    that folder (or an older version's bare run-id folder) instead of making a new one."""
    import re

    from harness.cli.run import default_out
    from harness.config import RunConfig

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(methods=("unpruned", "stage:sleb"))
    first = default_out(cfg)
    assert re.fullmatch(rf"\d{{8}}-\d{{4}}_unpruned-stage-sleb_{cfg.run_id()}", first.name), first.name
    first.mkdir(parents=True)
    assert default_out(cfg) == first  # resumed, whatever the date now
    other = RunConfig(methods=("unpruned",), limit=5)
    assert default_out(other) != first and default_out(other).name.endswith(other.run_id())
    legacy = tmp_path / "results" / "runs" / other.run_id()
    legacy.mkdir()
    assert default_out(other) == legacy.relative_to(tmp_path)
    # a moved checkout or data folder: the same folder (the id counts a local data folder by kind, not path)
    here, moved = RunConfig(limit=3, data_dir="/a/data"), RunConfig(limit=3, data_dir="/b/data")
    older = Path("results") / "runs" / f"20260101-0000_unpruned-shortgpt_{here.run_id(with_paths=True)}"
    older.mkdir()  # made by a version whose id hashed the path: found by the same path
    assert default_out(here) == older and default_out(moved) != older
    older.rmdir()
    folder = default_out(here)
    folder.mkdir(parents=True)
    assert default_out(moved) == folder and default_out(RunConfig(limit=3)) != folder  # no folder: lm-eval's hub data
    from harness.run.latency_run import LatencyConfig

    lat = default_out(LatencyConfig(data_dir="/a/data"), kind="latency-")  # calibration only: the plans count
    lat.mkdir(parents=True)
    assert default_out(LatencyConfig(data_dir="/b/data"), kind="latency-") == default_out(LatencyConfig(), kind="latency-") == lat


def test_report_writes_next_to_the_records_by_default(tmp_path):
    import shutil

    from conftest import ROOT

    from harness.cli import main

    run = tmp_path / "run"
    shutil.copytree(ROOT / "results" / "reference" / "quality", run)
    assert main(["report", str(run), "--no-plots"]) == 0
    assert (run / "report" / "tables" / "quality.md").is_file() and (run / "report" / "report.html").is_file()
    assert main(["report", str(run), "--no-plots"]) == 0  # its own output is no input the second time


def test_the_default_run_evaluates_the_disaggregated_setting_only():
    """The default mode is the deployment under study (README: what the default run does and why);
    `--mode both` adds the unified comparison."""
    from harness.cli.flags import MODES
    from harness.cli.run import run_config, run_parser

    assert MODES[run_parser().parse_args([]).mode] == ("disaggregated",)
    assert run_config(run_parser().parse_args(["--mode", "both"])).modes == ("unified", "disaggregated")


def test_few_shot_examples_from_the_scored_split_never_include_the_item_itself(data_dir, tmp_path, cli):
    """ARC's local data has only its test split: the shots come from it, so each item must be left out of its own
    examples (lm-eval does that only when the few-shot split is named and equals the test split)."""
    import json
    import shutil

    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    rows = (data_dir / "arc_easy" / "ARC-Easy-test.jsonl").read_text().splitlines()[:4]
    (data / "arc_easy" / "ARC-Easy-test.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(data_dir / "README.md", data / "README.md")
    from harness.errors import HarnessWarning

    with pytest.warns(HarnessWarning, match="arc_easy's few-shot examples come from its scored test split"):
        r = cli(*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "4", "--mode", "unified",
                "--num-fewshot", "3", "--log-samples", "--data-dir", str(data), "--out", str(tmp_path / "o"), data_dir=data)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "o" / "unpruned__unified.json").read_text())
    assert rec["lm_eval"]["tasks"]["arc_easy"]["fewshot_split"] == "test"
    samples = [json.loads(x) for f in (tmp_path / "o").rglob("samples_arc_easy*.jsonl") for x in f.read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        others = [json.loads(x)["question"] for x in rows if json.loads(x)["question"] != s["doc"]["question"]]
        assert context.count(s["doc"]["question"]) == 1 and all(q in context for q in others)  # 3 shots: the other 3
    r = cli(*TINY, "--methods", "shortgpt", "--set", "shortgpt.k=2", "--tasks", "arc_easy", "--limit", "4", "--mode", "unified",
            "--num-fewshot", "4", "--data-dir", str(data), "--out", str(tmp_path / "o4"), data_dir=data)  # k fits 4 layers
    assert r.returncode == 2 and "--num-fewshot 4: arc_easy has 3 few-shot examples to draw from (its test split, less " \
                                 "the item itself); give at most 3" in r.stderr, r.stderr[-2000:]
    assert "planning" not in r.stderr and "FAILED" not in r.stderr  # refused before any cell planned


def test_a_groups_few_shot_pool_is_checked_before_any_cell_plans(data_dir, tmp_path, cli):
    """mmlu's subjects draw their shots from a 5-item dev split: more is refused up front, not after the planning."""
    r = cli(*TINY, "--methods", "shortgpt", "--set", "shortgpt.k=2", "--tasks", "mmlu", "--limit", "1", "--mode", "unified",
            "--num-fewshot", "6", "--out", str(tmp_path / "o"), data_dir=data_dir)  # k fits the 4 layers
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"--num-fewshot 6: mmlu_\w+ has 5 few-shot examples to draw from \(its dev split\); give at most 5",
                     r.stderr), r.stderr[-2000:]
    assert "planning" not in r.stderr and "FAILED" not in r.stderr


def test_a_tilde_in_data_dir_and_model_is_the_home_folder(data_dir, tmp_path, cli, monkeypatch):
    """`--data-dir=~/x` and `--model=~/x` reach the harness unexpanded (no shell word starts with ~)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").symlink_to(data_dir)
    r = cli(*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "1", "--mode", "unified",
            "--data-dir=~/data", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "m").mkdir()
    r = cli("--model=~/m", "--methods", "unpruned", "--tasks", "arc_easy", "--limit", "1", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and f"--model {tmp_path / 'm'}: could not load it: no config.json" in r.stderr, r.stderr
    from harness.cli.run import run_config, run_parser

    assert run_config(run_parser().parse_args(["--model=~/m"])).model == str(tmp_path / "m")  # the run key's, too
    args = run_parser().parse_args(["--out=~/o", "--plans-from=~/p", "--offload-folder=~/f"])
    assert (args.out, args.plans_from, args.offload_folder) == (tmp_path / "o", str(tmp_path / "p"), str(tmp_path / "f"))


def test_the_commit_recorded_is_the_harness_checkouts_only(tmp_path):
    """Installed into a project's .venv (site-packages inside another repository), `git rev-parse` found the project's
    commit and records, the HTML report and export manifests named it as the harness's."""
    from harness.run.env import git_info

    assert git_info()["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                  text=True, check=True).stdout.strip()
    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "site-packages"  # where an install puts harness/ (env.py: harness/run/)
    site.mkdir(parents=True)
    for args in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=project, check=True)
    assert git_info(site) == {"commit": None, "dirty": None}


def test_the_small_limit_note_gives_lm_evals_largest_standard_error_and_the_tables_noise_threshold(capsys):
    from harness.cli.run import warn_small_limit

    warn_small_limit(30)
    half = np.array([0.0, 1.0] * 15)  # p = 0.5: the largest standard error of an accuracy over 30 items
    se = 100 * half.std(ddof=1) / np.sqrt(len(half))  # lm-eval's mean_stderr
    err = capsys.readouterr().err
    assert f"up to {se:.1f} points" in err and f"within about {1.96 * np.sqrt(2) * se:.0f} points" in err
    warn_small_limit(1000)
    assert capsys.readouterr().err == ""  # 1.6 points: below the threshold
    for tiny in (1, 2, 3):  # 139, 139 and 98 points: a threshold past 100 points says so, not "within 139 points"
        warn_small_limit(tiny)
        err = capsys.readouterr().err
        assert "points are noise" in err if tiny == 3 else "even a 100-point difference between two methods is within the noise" in err
        assert "139" not in err


def test_the_small_limit_note_is_for_runs_with_an_accuracy(tmp_path, capsys, monkeypatch, data_dir):
    """A run of long-context tasks only (perplexity, passkey) printed the accuracies' standard-error note."""
    from harness.cli import main
    from harness.run import pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", stop)
    for tasks, noted in (("pd_ppl", False), ("pd_ppl,arc_easy", True)):
        assert main(["--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--tasks", tasks, "--limit", "5",
                     "--data-dir", str(data_dir), "--out", str(tmp_path / tasks.replace(",", "_")), "-q"]) == 130
        assert ("each accuracy has a standard error" in capsys.readouterr().err) == noted, tasks
