"""Bad input and faults, in process (no 4 s of imports per case): exit 2 with one line naming what is
wrong, a skipped-with-a-warning file where the rest of the work is good, nothing left behind.

The sibling of tests/test_cli.py's `test_bad_input_exits_2` (subprocesses) for issue 14's cases."""

from __future__ import annotations

import csv
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from harness.cli import main

TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]
# one cell on a small synthetic task (no lm-eval task index to build: seconds, not tens of them)
ONE_CELL = [*TINY, "--methods", "unpruned", "--mode", "unified", "--tasks", "passkey", "--limit", "2",
            "--set", "passkey.lengths=384", "--set", "passkey.depths=0.5", "--set", "passkey.repeats=1"]
ARC_CELL = [*TINY, "--methods", "unpruned", "--mode", "unified", "--tasks", "arc_easy", "--limit", "2"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # cmd_run sets it for -q; keep it from leaking into other tests


def call(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except KeyboardInterrupt:  # must not reach pytest, which would stop the session
        pytest.fail("KeyboardInterrupt escaped harness.cli.main")
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A finished one-cell run (unpruned/unified on 2 ARC-Easy items) to copy and damage."""
    out = tmp_path_factory.mktemp("run") / "o"
    assert main([*ONE_CELL, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return out


def _arc_data(tmp: Path, data_dir: Path, edit) -> Path:
    """A data dir holding only ARC-Easy, its test file rewritten by `edit(lines) -> lines`."""
    root = tmp / "data"
    (root / "arc_easy").mkdir(parents=True)
    src = (data_dir / "arc_easy" / "ARC-Easy-test.jsonl").read_text().splitlines()[:5]
    (root / "arc_easy" / "ARC-Easy-test.jsonl").write_text("\n".join(edit(src)) + "\n")
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _renamed_field(lines):
    row = json.loads(lines[2])
    row["query"] = row.pop("question")
    return [*lines[:2], json.dumps(row), *lines[3:]]


def _spec(tmp: Path, text: str) -> Path:
    (tmp / "s.toml").write_text(text)
    return tmp / "s.toml"


def _record_copy(tmp: Path, run: Path, edit, name: str = "unpruned__unified.json") -> Path:
    """A copy of `run` whose record was rewritten by `edit(dict) -> JSON value`, saved as `name`."""
    dst = tmp / "copy"
    shutil.copytree(run, dst)
    path = dst / "unpruned__unified.json"
    (dst / name).write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


def _paired_copy(tmp: Path, run: Path, edit) -> Path:
    """A copy of `run` beside a second record, method x's, made from its record by `edit(dict) -> dict` (the paired
    table compares x's per-item results with unpruned's)."""
    dst = _record_copy(tmp, run, lambda d: d)
    d = json.loads((dst / "unpruned__unified.json").read_text())
    (dst / "x__unified.json").write_text(json.dumps(edit({**d, "method": "x"})))
    return dst


def _text_items(d):
    """`d` with text in place of its per-item passkey accuracies."""
    items = d["extra"]["items"]["passkey"]
    return _with(d, extra={**d["extra"], "items": {"passkey": {**items, "metrics": {"acc": ["x"] * len(items["ids"])}}}})


def _with(d, **changes):
    return {**d, **changes}


def _bad_plan(d):
    return _with(d, plan={**d["plan"], "decode_layers": [7], "prefill_layers": [7]})


# (id, argv builder (tmp, data_dir, tiny_run) -> argv, what stderr must say); every case exits 2
CASES = [
    # item 6: a bad --out is found before the model loads
    ("out-is-a-file", lambda t, d, r: [*ONE_CELL, "--out", r / "summary.csv"], "summary.csv: exists and is not a folder"),
    ("out-unwritable", lambda t, d, r: [*ONE_CELL, "--out", "/dev/null/o"], "--out /dev/null/o: cannot write there"),
    ("latency-out-is-a-file", lambda t, d, r: ["latency", *TINY, "--methods", "unpruned", "--out", r / "summary.csv"],
     "exists and is not a folder"),
    # item 7
    ("report-out-is-a-file", lambda t, d, r: ["report", r, "--no-plots", "--out", r / "summary.csv"],
     "--out " + "{run}/summary.csv: exists and is not a folder"),
    ("export-out-dot", lambda t, d, r: ["export", *TINY[:4], "--method", "unpruned", "--out", "."],
     "--out .: the current folder or one above it cannot take an export"),
    # item 8: data files (the other kinds of damage: test_damaged_data_files_name_file_line_and_field)
    ("data-bad-json-line", lambda t, d, r: [*ARC_CELL, "--data-dir", _arc_data(t, d, lambda x: [x[0], "{oops", *x[2:]]),
                                            "--out", t / "o"], "ARC-Easy-test.jsonl, line 2: not valid JSON"),
    # item 9
    ("max-length-too-small", lambda t, d, r: [*ARC_CELL, "--max-length", "1", "--out", t / "o"],
     "tokens exceeds the context length max_length=1; give --max-length"),
    ("plans-from-corrupt", lambda t, d, r: [*ONE_CELL, "--plans-from", _record_copy(t, r, lambda x: [x]), "--out", t / "o"],
     "--plans-from: " + "{tmp}/copy/unpruned__unified.json: not a run record (a JSON list"),
    ("plans-from-invalid-plan", lambda t, d, r: [*ONE_CELL, "--plans-from", _record_copy(t, r, _bad_plan), "--out", t / "o"],
     "unpruned__unified.json: its plan is not valid"),
    # the record latency would replay (its disaggregated plan); another cell's is skipped (test_latency.py)
    ("latency-plans-from-corrupt", lambda t, d, r: ["latency", *TINY, "--methods", "unpruned", "--plans-from",
                                                    _record_copy(t, r, lambda x: "x", "unpruned__disaggregated.json"),
                                                    "--out", t / "o"],
     "unpruned__disaggregated.json: not a run record (a JSON str"),
    # item 10: non-finite floats and ranges
    ("d_t-nan", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.d_t=nan"],
     "--set pdtrim.d_t=nan: expected a finite number"),
    ("heal_lr-inf", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.heal_lr=inf"],
     "--set pdtrim.heal_lr=inf: expected a finite number"),
    ("d_t-out-of-range", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.d_t=1.5"],
     "pdtrim.d_t=1.5: must be within [-1, 1]"),
    # "need 0 <= k_prefill <= k_decode, got 4, 2" said what was wrong, not which option fixes it
    ("pdtrim-k_decode-below-k_prefill", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.k_decode=2"],
     "pdtrim: need 0 <= k_prefill <= k_decode (R_prefill ⊆ R_decode), got k_prefill=4, k_decode=2; set "
     "pdtrim.k_prefill=2 or less too, or pdtrim.prefill_ratio (k_prefill = floor(ratio · k_decode), e.g. "
     "pdtrim.prefill_ratio=0.5, which fits every k_decode of a depth sweep)"),
    ("stage-k_decode-below-k_prefill", lambda t, d, r: [*ONE_CELL, "--methods", "stage:tail", "--set", "stage:tail.k_decode=1"],
     "stage:tail: need 0 <= k_prefill <= k_decode (R_prefill ⊆ R_decode), got k_prefill=4, k_decode=1; set "
     "stage:tail.k_prefill=1 or less too, or stage:tail.prefill_ratio"),
    ("stage-k_unified-negative", lambda t, d, r: [*ONE_CELL, "--methods", "stage:tail", "--set", "stage:tail.k_unified=-1"],
     "stage:tail.k_unified=-1: must be >= 0"),
    ("probe_steps-zero", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.probe_steps=0"],
     "pdtrim: need probe_prompts, probe_tokens, probe_steps >= 1 (got 8, 512, 0), or kv_pruning=false"),
    ("probe_prompts-negative", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.probe_prompts=-1"],
     "need probe_prompts, probe_tokens, probe_steps >= 1 (got -1, "),
    # found by exploratory testing of the API and flags: each silently did something else
    ("set-twice", lambda t, d, r: [*ONE_CELL, "--set", "passkey.repeats=2"],
     "--set passkey.repeats is given twice ('1' and '2'); give it once (a scalar option of a method sweeps values given "
     "in one --set: passkey.repeats=1,2; a task's options do not sweep)"),
    ("sweep-trailing-comma", lambda t, d, r: [*ONE_CELL, "--methods", "tail", "--set", "tail.k=1,"],
     "--set tail.k=1,: a sweep needs distinct values, none empty"),
    # one value typed two ways made two cells of one plan under two names (a PDTrim search run twice)
    ("sweep-one-value-typed-twice", lambda t, d, r: [*ONE_CELL, "--methods", "tail", "--set", "tail.k=02,2"],
     "--set tail.k=02,2: 02 and 2 are the same value, which would be measured twice under two names; give each value once"),
    ("sweep-one-float-typed-twice", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.prefill_ratio=0.5,.5"],
     "--set pdtrim.prefill_ratio=0.5,.5: 0.5 and .5 are the same value"),
    ("option-typo", lambda t, d, r: [*ONE_CELL, "--methods", "shortgpt", "--set", "shortgpt.batchsize=4"],
     "shortgpt has no option 'batchsize' (did you mean batch_size?); options: k, batch_size"),
    ("passkey-depths-that-print-alike", lambda t, d, r: [*ONE_CELL[:-6], "--set", "passkey.depths=0.1234561,0.1234562"],
     "passkey: each of lengths and depths must be given once"),
    ("passkey-length-twice", lambda t, d, r: [*ONE_CELL[:-6], "--set", "passkey.lengths=384,384"],
     "passkey: each of lengths and depths must be given once"),
    ("pd_ppl-prompt-twice", lambda t, d, r: [*TINY, "--methods", "unpruned", "--tasks", "pd_ppl", "--set",
                                             "pd_ppl.prompt_tokens=64,64"], "pd_ppl: each prompt_tokens value must be given once"),
    ("unknown-command", lambda t, d, r: ["reprot", r], "unknown command 'reprot' (did you mean report?); commands: run, "),
    ("methods-command", lambda t, d, r: ["methods"], "the methods and their options are listed by python -m harness --help"),
    ("spec-same-option-twice", lambda t, d, r: ["--config", _write(t / "s.toml", '[run]\nout = "o"\nbatch-size = 4\nbatch_size = 8\n')],
     "[run]: 'batch-size' and 'batch_size' name the same option; keep one"),
    ("calib-source-twice", lambda t, d, r: [*ONE_CELL, "--methods", "shortgpt", "--set", "calib.sources=piqa,piqa"],
     "calib.sources=piqa,piqa: give one or more of piqa, mmlu, each once"),
    ("spec-out-not-a-string", lambda t, d, r: ["--config", _write(t / "s.toml", '[run]\nout = 5\n')],
     "[run] out: expected a folder path in quotes, got 5"),
    ("spec-report-out-not-a-string", lambda t, d, r: ["--config", _write(
        t / "s.toml", '[run]\nout = "o"\nmodel = "random:tiny"\nmethods = "unpruned"\n[report]\nout = 5\n')],
     "[report] out: expected a path in quotes, got 5"),
    ("spec-latency-options-not-the-runs", lambda t, d, r: ["--config", _write(
        t / "s.toml", f'[run]\nout = "{t}/q"\nmodel = "random:tiny"\nmethods = ["tail"]\ntasks = ["arc_easy"]\nset = ["tail.k=1"]\n'
        f'[latency]\nout = "{t}/l"\nmodel = "random:tiny"\nmethods = ["tail"]\nplans_from = "run"\nset = ["tail.k=2"]\n')],
     "[latency]: tail's options differ from [run]'s (k=1 in [run], 2 here); plans_from = \"run\" replays"),
    ("spec-key-typo", lambda t, d, r: ["--config", _write(t / "s.toml", '[run]\nout = "o"\nmethod = "unpruned"\n')],
     "[run]: unknown key 'method' (did you mean methods?)"),
    ("spec-report-baseline-typo-before-any-cell", lambda t, d, r: ["--config", _write(
        t / "s.toml", '[run]\nout = "o"\nmodel = "random:tiny"\ndevice = "cpu"\nmethods = "unpruned"\ntasks = "passkey"\n'
        '[report]\nbaseline = "unprund"\n')], "[report] baseline 'unprund': not a method of this spec's runs (did you mean "
                                                "unpruned?); its methods: unpruned"),
    ("tau-inf", lambda t, d, r: [*ONE_CELL, "--methods", "pdtrim", "--set", "pdtrim.tau=-inf"], "expected a finite number"),
    ("streamline-lr-nan", lambda t, d, r: [*ONE_CELL, "--methods", "streamline", "--set", "streamline.replace_lr=nan"],
     "streamline.replace_lr=nan: expected a finite number"),
    ("report-bandwidth-nan", lambda t, d, r: ["report", r, "--bandwidth", "nan"], "expected a finite number, got 'nan'"),
    ("latency-model-args-unknown", lambda t, d, r: ["latency", *TINY, "--model-args", "revison=x", "--out", t / "o"],
     "--model_args: unknown key 'revison'"),
    ("latency-bandwidths-inf", lambda t, d, r: ["latency", *TINY, "--bandwidths", "100,inf"], "expected positive numbers"),
    # found by exploratory testing: each crashed after the model loaded, or measured nothing and exited 0
    ("latency-methods-empty", lambda t, d, r: ["latency", *TINY, "--methods", "", "--out", t / "o"],
     "--methods is empty; known methods: "),
    ("latency-decode-mode-empty", lambda t, d, r: ["latency", *TINY, "--decode-mode", "", "--out", t / "o"],
     "--decode-mode '': expected any of eager, static, graph"),
    ("latency-prompt-tokens-twice", lambda t, d, r: ["latency", *TINY, "--prompt-tokens", "16,16", "--out", t / "o"],
     "--prompt-tokens 16,16: 16 is given twice; give each value once"),
    # a comma-separated list silently dropped an empty item and ran a repeated name once
    ("latency-prompt-tokens-empty-item", lambda t, d, r: ["latency", *TINY, "--prompt-tokens", "64,,", "--out", t / "o"],
     "argument --prompt-tokens: '64,,' has an empty item (two commas in a row, or one at an end)"),
    ("latency-bandwidths-empty-item", lambda t, d, r: ["latency", *TINY, "--bandwidths", ",100", "--out", t / "o"],
     "argument --bandwidths: ',100' has an empty item"),
    ("latency-decode-mode-empty-item", lambda t, d, r: ["latency", *TINY, "--decode-mode", "eager,,static", "--out", t / "o"],
     "argument --decode-mode: 'eager,,static' has an empty item"),
    ("methods-empty-item", lambda t, d, r: [*ONE_CELL, "--methods", "unpruned,,tail", "--out", t / "o"],
     "argument --methods: 'unpruned,,tail' has an empty item"),
    ("methods-twice", lambda t, d, r: [*ONE_CELL, "--methods", "unpruned,unpruned", "--out", t / "o"],
     "argument --methods: unpruned is given twice in 'unpruned,unpruned'; give each item once"),
    ("tasks-empty-item", lambda t, d, r: [*ONE_CELL, "--tasks", "passkey,,pd_ppl", "--out", t / "o"],
     "argument --tasks: 'passkey,,pd_ppl' has an empty item"),
    ("tasks-twice", lambda t, d, r: [*ONE_CELL, "--tasks", "passkey,passkey", "--out", t / "o"],
     "argument --tasks: passkey is given twice in 'passkey,passkey'"),
    ("spec-methods-twice", lambda t, d, r: ["--config", _spec(t, '[run]\nout = "o"\nmodel = "random:tiny"\nmethods = ["tail", "tail"]\n')],
     "s.toml [run] methods: tail is given twice in 'tail,tail'; give each item once"),
    ("latency-warmup-not-a-number", lambda t, d, r: ["latency", *TINY, "--warmup", "x", "--out", t / "o"],
     "argument --warmup: expected an integer >= 0"),
    ("latency-data-dir-missing", lambda t, d, r: ["latency", *TINY, "--methods", "shortgpt", "--data-dir", t / "nodata",
                                                  "--out", t / "o"], "--data-dir {tmp}/nodata: no such directory"),
    ("latency-graph-on-cpu", lambda t, d, r: ["latency", *TINY, "--decode-mode", "eager,graph", "--out", t / "o"],
     "--decode-mode graph: CUDA graphs need a CUDA device, this run is on cpu"),
    ("latency-graph-spread", lambda t, d, r: ["latency", *TINY, "--device-map", "auto", "--decode-mode", "graph", "--out", t / "o"],
     "--decode-mode graph with --device-map: a CUDA graph captures one GPU's stream"),
    ("latency-max-memory-alone", lambda t, d, r: ["latency", *TINY, "--max-memory", "0=1GiB", "--out", t / "o"],
     "--max-memory and --offload-folder place a model with --device-map; add --device-map auto"),
    ("passkey-too-short-before-any-cell", lambda t, d, r: [*ARC_CELL[:-4], "--tasks", "arc_easy,passkey", "--limit", "2",
                                                           "--set", "passkey.lengths=64", "--out", t / "o"],
     "passkey: length 64 leaves no room for filler; use lengths >= "),
    ("count-too-deep-before-the-weights", lambda t, d, r: [*ARC_CELL, "--methods", "unpruned,tail", "--set", "tail.k=8",
                                                           "--out", t / "o"],
     "tail.k=8: must be < the model's 4 layers (at least one must stay); for 4 layers try --set tail.k=2"),
    ("export-shard-size", lambda t, d, r: ["export", *TINY[:4], "--method", "unpruned", "--max-shard-size", "bogus",
                                           "--out", t / "e"], "expected a positive size with a unit TB, GB, MB or KB"),
    # a value starting with a minus and a digit was taken for a flag: "argument --max-shard-size: expected one argument"
    ("export-shard-size-negative", lambda t, d, r: ["export", *TINY[:4], "--method", "unpruned", "--max-shard-size", "-1GB",
                                                    "--out", t / "e"],
     "argument --max-shard-size: expected a positive size with a unit TB, GB, MB or KB (e.g. 5GB, 500MB), got '-1GB'"),
    ("latency-bandwidths-negative", lambda t, d, r: ["latency", *TINY, "--bandwidths", "-100,200", "--out", t / "o"],
     "argument --bandwidths: expected positive numbers, got -100,200"),
    ("check-tolerance-nan", lambda t, d, r: ["check", "--against", r, "--current", r, "--latency-tolerance", "nan"],
     "expected a finite number"),
    ("seed-negative", lambda t, d, r: [*ONE_CELL, "--seed=-1"], "--seed: expected an integer from 0 to 4294967295"),
    # refused when the flags are read, not after seconds of imports, in every command that loads a model
    ("device-typo", lambda t, d, r: [*ONE_CELL, "--device", "gpu"], "argument --device: expected auto, cpu or cuda[:N]"),
    ("latency-device-typo", lambda t, d, r: ["latency", "--device", "cuda:x"], "argument --device: expected auto, cpu or"),
    ("export-device-typo", lambda t, d, r: ["export", "--method", "unpruned", "--device", "mps", "--out", t / "e"],
     "argument --device: expected auto, cpu or cuda[:N] (e.g. cuda:1), got 'mps'"),
    ("latency-seed-too-big", lambda t, d, r: ["latency", *TINY, "--seed", str(2**32)], "from 0 to 4294967295 (numpy's"),
    # refused when read (it used to fail the build, or, with flash-attn installed, take the engine's 4-D masks as 2-D)
    ("flash-attention-refused", lambda t, d, r: [*ONE_CELL, "--model-args", "attn_implementation=flash_attention_2",
                                                 "--out", t / "o"],
     "--model_args attn_implementation=flash_attention_2: not supported; the PD engine hands each layer a (batch, heads"),
    ("max-memory-size", lambda t, d, r: [*ONE_CELL, "--device-map", "auto", "--max-memory", "cpu=abc"],
     "--max-memory 'cpu=abc': size 'abc' is not a size such as 20GiB"),
    ("max-memory-terabytes", lambda t, d, r: [*ONE_CELL, "--device-map", "auto", "--max-memory", "cpu=1TB"],
     "--max-memory 'cpu=1TB': size '1TB' is not a size such as 20GiB"),
    ("offload-folder-is-a-file", lambda t, d, r: [*ONE_CELL, "--device-map", "auto", "--offload-folder", _write(t / "f", "")],
     "--offload-folder " + "{tmp}/f: exists and is not a folder"),
    # item 12
    ("bootstrap-negative", lambda t, d, r: [*ONE_CELL, "--bootstrap-iters", "-5"], "expected an integer >= 0, got '-5'"),
    ("model-dir-no-config", lambda t, d, r: [*ONE_CELL[5:], "--model", (t / "m").mkdir() or t / "m", "--device", "cpu"],
     "could not load it: no config.json in that folder"),
    ("spec-run-config-key", lambda t, d, r: ["--config", _spec(t, '[run]\nconfig = "x.toml"\nout = "o"\n')],
     "[run]: unknown key 'config' (a spec cannot name another spec); known keys: apply_chat_template, batch_size"),
    ("spec-unknown-key-lists-set", lambda t, d, r: ["--config", _spec(t, '[run]\nmetods = ["a"]\nout = "o"\n')],
     "quiet, seed, set, tasks"),
    # item 5: report validates records on load (the only record being bad leaves nothing to report)
    ("report-record-not-object", lambda t, d, r: ["report", _record_copy(t, r, lambda x: [1]), "--out", t / "rep"],
     "unpruned__unified.json: not a run record (a JSON list, expected an object)"),
    ("report-field-wrong-type", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(x, scores=[])), "--out", t / "rep"],
     "unpruned__unified.json: field 'scores' is a JSON list, expected an object"),
    ("report-score-wrong-type", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(
        x, scores={"arc_easy": {"acc": {"value": "high"}}})), "--out", t / "rep"], "scores['arc_easy']['acc'] must be"),
    # fields below the top level, edited by hand, were tracebacks from deep inside the tables (harness/store/record_shape.py)
    ("report-nested-packages", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(
        x, environment={**x["environment"], "packages": []})), "--out", t / "rep"], "environment.packages is a JSON list"),
    ("report-nested-kv-policy", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(
        x, plan={**x["plan"], "kv_policy": 5})), "--out", t / "rep"], "plan.kv_policy is a JSON int, expected an object"),
    ("report-nested-fewshot", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(
        x, config={**x["config"], "num_fewshot": [5]})), "--out", t / "rep"], "config.num_fewshot must be an integer or null"),
    ("report-nested-limit", lambda t, d, r: ["report", _record_copy(t, r, lambda x: _with(
        x, config={**x["config"], "limit": "all"})), "--out", t / "rep"], "config.limit must be a number or null"),
    # an unset shell variable: the run wrote its records into the current folder, check compared every record under it
    ("out-empty", lambda t, d, r: [*ONE_CELL, "--out", ""], "argument --out/--output_path: an empty path (an unset shell"),
    ("check-against-empty", lambda t, d, r: ["check", "--against", "", "--current", r], "argument --against: an empty path"),
    # each ran as if the flag were not given (hub datasets, plans made afresh) or read the current folder as a spec
    ("data-dir-empty", lambda t, d, r: [*ONE_CELL, "--data-dir", "", "--out", t / "o"],
     "argument --data-dir: an empty path (an unset shell variable?); give a file or folder, or leave the flag out"),
    ("plans-from-empty", lambda t, d, r: [*ONE_CELL, "--plans-from", " ", "--out", t / "o"], "argument --plans-from: an empty path"),
    ("latency-data-dir-empty", lambda t, d, r: ["latency", *TINY, "--data-dir", "", "--out", t / "o"],
     "argument --data-dir: an empty path"),
    ("latency-plans-from-empty", lambda t, d, r: ["latency", *TINY, "--plans-from", "", "--out", t / "o"],
     "argument --plans-from: an empty path"),
    ("export-data-dir-empty", lambda t, d, r: ["export", *TINY[:4], "--method", "unpruned", "--data-dir", "", "--out", t / "e"],
     "argument --data-dir: an empty path"),
    ("config-empty", lambda t, d, r: ["--config", ""], "--config: an empty path (an unset shell variable?); give a spec file"),
    # a file or folder of the wrong kind was said not to exist ("create it with --update" for a file)
    ("check-against-a-file", lambda t, d, r: ["check", "--against", r / "summary.csv", "--current", r],
     "--against " + "{run}/summary.csv: a file, not a folder of reference records; give the references' folder"),
    ("check-current-a-file", lambda t, d, r: ["check", "--against", r, "--current", r / "summary.csv"],
     "--current " + "{run}/summary.csv: a file, not a folder of run records"),
    ("sweep-spec-a-folder", lambda t, d, r: ["sweep", r], "{run}: a folder, not a spec file"),
    ("sweep-spec-empty", lambda t, d, r: ["sweep", ""], "argument SPEC.toml: an empty path"),
    # `--model ""` read the current folder as a model folder: "--model : could not load it: no config.json in that folder"
    ("model-empty", lambda t, d, r: [*ONE_CELL, "--model", ""], "argument --model: an empty model (an unset shell variable?)"),
    ("latency-model-empty", lambda t, d, r: ["latency", *TINY, "--model", " "], "argument --model: an empty model"),
    ("dtype-unknown", lambda t, d, r: [*ONE_CELL, "--dtype", "half"], "--dtype: expected auto, float32 (fp32), bfloat16 (bf16)"),
    ("latency-dtype-unknown", lambda t, d, r: ["latency", *TINY, "--dtype", "f32"], "--dtype: expected auto, float32 (fp32)"),
]


@pytest.mark.parametrize("name, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process_exits_2(name, build, message, tmp_path, data_dir, tiny_run, capsys, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # item 14: failed runs leave no task folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    import harness.pd.models

    real_load, loads = harness.pd.models.load_model, []
    monkeypatch.setattr(harness.pd.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    try:
        rc, _, err = call(capsys, *build(tmp_path, data_dir, tiny_run))
    except SystemExit as e:  # argparse's own errors
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert message.format(run=tiny_run, tmp=tmp_path) in err, err[-2000:]
    assert "Traceback" not in err
    if name.startswith(("out-", "latency-out", "latency-methods", "latency-decode", "latency-graph", "latency-prompt", "export-shard",
                            "passkey-too-short", "count-too-deep")):
        assert not loads, "the output folder, the options the tokenizer rules out and the depth: before the model loads"
    assert not list((tmp_path / "tmp").glob("harness-tasks-*"))
    if name.endswith("before-any-cell"):
        assert not list(tmp_path.glob("o/*.json")), "refused before any cell ran (no record, no failure note)"


# every command that writes into --out, with --out a file: (command, argv before --out)
OUT_COMMANDS = [
    ("run", ONE_CELL),
    ("latency", ["latency", *TINY, "--methods", "unpruned"]),
    ("sweep", ["sweep", ROOT / "configs" / "ci.toml", "--backend", "local"]),
    ("report", ["report", ROOT / "results" / "reference", "--no-plots"]),
    ("export", ["export", *TINY[:4], "--method", "unpruned"]),
    ("check", ["check", "--against", ROOT / "results" / "reference", "--spec", ROOT / "configs" / "ci.toml", "-q"]),
]


@pytest.mark.parametrize("command, argv", OUT_COMMANDS, ids=[c[0] for c in OUT_COMMANDS])
def test_an_out_that_is_a_file_is_one_line_naming_it_before_any_work(command, argv, tmp_path, capsys, monkeypatch,
                                                                     data_dir):
    """Every command said so, exit 2, but `check` only once its spec's run section had started (naming OUT/quality:
    "cannot write there"), `sweep` once its spec was read (naming "[run] out OUT/quality"), and `export` without
    saying what to give: one message now, naming --out and the file and saying a folder is expected."""
    import harness.pd.models

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir.resolve()))  # CI's is relative (../shared/data): not after chdir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.pd.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(harness.pd.models, "_without_weights", lambda *a, **k: pytest.fail("the model's files were read"))
    (tmp_path / "afile").write_text("mine")
    rc, _, err = call(capsys, *argv, "--out", "afile")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and errors == [errors[0]], err[-2000:]
    assert errors[0].startswith("error: --out afile: exists and is not a folder; give a ") and "folder" in \
        errors[0].split("; give ", 1)[1], err[-2000:]
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_empty_data_dir_variable_is_no_data_dir(monkeypatch):
    """HARNESS_DATA_DIR set but empty is unset (hub datasets), as before: only an empty --data-dir typed is refused."""
    from harness.cli.export import parser as export_parser
    from harness.cli.latency import latency_parser
    from harness.cli.run import run_parser

    monkeypatch.setenv("HARNESS_DATA_DIR", "")
    for make in (run_parser, latency_parser, export_parser):
        assert make().parse_args(["--out", "o"] if make is export_parser else []).data_dir is None


def test_a_blank_data_dir_variable_is_no_data_dir_in_flags_and_specs(monkeypatch, tmp_path):
    """HARNESS_DATA_DIR of spaces (`export HARNESS_DATA_DIR=" "`) is unset as an empty one is: the flag's refusal of an
    empty path told the user to leave out a flag they had not given, and a spec's section ended in a traceback."""
    from harness.cli.export import parser as export_parser
    from harness.cli.latency import latency_parser
    from harness.cli.run import run_parser
    from harness.cli.spec import load_spec, to_namespace

    monkeypatch.setenv("HARNESS_DATA_DIR", "  ")
    for make in (run_parser, latency_parser, export_parser):
        assert make().parse_args(["--out", "o"] if make is export_parser else []).data_dir is None
    spec = load_spec(_write(tmp_path / "s.toml", '[run]\nout = "o"\nmodel = "random:tiny"\nmethods = ["unpruned"]\n'))
    assert to_namespace(spec, "run", run_parser()).data_dir is None


def _drop(key):
    def edit(lines):
        row = json.loads(lines[1])
        del row[key]
        return [lines[0], json.dumps(row), *lines[2:]]
    return edit


# (task, file under the data dir, edit(lines) -> lines, message); all through the loaders lm-eval calls
DATA_CASES = [
    ("arc_easy", "arc_easy/ARC-Easy-test.jsonl", lambda x: [*x[:4], x[4][:30]], "ARC-Easy-test.jsonl, line 5: not valid JSON"),
    ("arc_easy", "arc_easy/ARC-Easy-test.jsonl", _drop("question"), "ARC-Easy-test.jsonl, line 2: missing field 'question'"),
    ("arc_easy", "arc_easy/ARC-Easy-test.jsonl", lambda x: [x[0], "[1, 2]"], "line 2: missing field '(a JSON object)'"),
    ("boolq", "boolq/dev.jsonl", _drop("title"), "dev.jsonl, line 2: missing field 'title'"),
    ("hellaswag", "hellaswag/hellaswag_validation.jsonl", _drop("endings"), "line 2: missing field 'endings'"),
    ("winogrande", "winogrande/dev.jsonl", _drop("option2"), "dev.jsonl, line 2: missing field 'option2'"),
    ("lambada_openai", "lambada/lambada_test.jsonl", lambda x: [x[0], '{"txt": "a"}'], "line 2: missing field 'text'"),
    ("piqa", "piqa/valid-labels.lst", lambda x: ["0", "yes"], "valid-labels.lst: expected one 0/1 label per line"),
    ("openbookqa", "openbookqa/test.jsonl", lambda x: [x[0], '{"id": "1", "question": {}, "answerKey": "A"}'],
     "test.jsonl, row 2: missing field 'stem'"),
    ("mmlu", "mmlu/test/anatomy_test.csv", lambda x: [x[0], "q,a,b"], "anatomy_test.csv, line 2: expected 6 columns"),
    ("mmlu", "mmlu/test/anatomy_test.csv", lambda x: ["q,a,b,c,d,E"], "line 1: expected 6 columns (question, 4 choices, "
                                                                     "answer A-D), got 6 column(s) ending in 'E'"),
    # found by exploratory testing: each crashed inside lm-eval or the loader (exit 1) without naming the file
    ("arc_easy", "arc_easy/ARC-Easy-test.jsonl", lambda x: [], "ARC-Easy-test.jsonl); restore them (the task folder's README.md names their source)"),
    ("wikitext", "wikitext2/wiki.test.raw", lambda x: [], "task wikitext: its test split has no rows (data: "),
    ("wikitext", "wikitext2/wiki.test.raw", "\xff\xfe", "wiki.test.raw: unreadable ('utf-8' codec can't decode"),
    ("mmlu", "mmlu/test/anatomy_test.csv", "\xff", "anatomy_test.csv: unreadable ('utf-8' codec can't decode"),
    ("piqa", "piqa/valid-labels.lst", lambda x: ["0", "2"], "valid-labels.lst: expected one 0/1 label per line (label 2)"),
    ("arc_easy", "arc_easy/ARC-Easy-test.jsonl", lambda x: [x[0].replace('"answerKey":"', '"answerKey":"Z')],
     "row 1: answerKey 'Z"),
    ("hellaswag", "hellaswag/hellaswag_validation.jsonl", lambda x: [x[0].replace('"label": "', '"label": "9')],
     "hellaswag_validation.jsonl, row 1: label must index its endings"),
    ("winogrande", "winogrande/dev.jsonl", lambda x: [x[0].replace('"answer": "', '"answer": "3')],
     "dev.jsonl, row 1: answer must be the string '1' or '2'"),
    ("winogrande", "winogrande/dev.jsonl", lambda x: [x[0].replace('"answer": "2"', '"answer": 2')],
     "dev.jsonl, row 1: answer must be the string '1' or '2'"),
    ("hellaswag", "hellaswag/hellaswag_validation.jsonl", lambda x: [x[0].replace('"label": "', '"label": "\u00b2')],
     "hellaswag_validation.jsonl, row 1: label must index its endings"),
    ("openbookqa", "openbookqa/test.jsonl", lambda x: [x[0].replace('"answerKey": "', '"answerKey": "Z')],
     "test.jsonl, row 1: answerKey must be one of its choice labels"),
]


@pytest.mark.parametrize("task, rel, edit, message", DATA_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DATA_CASES)])
def test_damaged_data_files_name_file_line_and_field(task, rel, edit, message, data_dir, tmp_path):
    """Item 8: bad JSON lines, truncated files and renamed fields are a UsageError naming file, line and field."""
    from harness.errors import UsageError
    from harness.quality import local_tasks
    from harness.quality.tasks import local_rows

    for need in local_tasks.get(task).files:  # a data dir with this task's files only
        src, dst = data_dir / need, tmp_path / need
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    target = tmp_path / rel
    if isinstance(edit, str):  # bytes that are not UTF-8, after the first lines
        target.write_bytes(target.read_bytes()[:2000] + edit.encode("latin-1"))
    else:
        target.write_text("\n".join(edit(target.read_text().splitlines()[:5])) + "\n")
    with pytest.raises(UsageError) as e:
        local_rows(task, tmp_path, "anatomy" if task == "mmlu" else None)
    assert message in str(e.value) and str(target) in str(e.value)


def test_corrupt_record_in_out_is_skipped_and_summary_refreshed(tiny_run, data_dir, tmp_path, capsys):
    """Item 5: a damaged record of another cell must not stop the summary of the cells that ran."""
    out = tmp_path / "o"
    shutil.copytree(tiny_run, out)
    (out / "stray__unified.json").write_text('{"schema_version": 1, "method": "stray"')  # truncated
    (out / "future__unified.json").write_text(json.dumps({"schema_version": 99}))
    rc, stdout, err = call(capsys, *ONE_CELL, "--methods", "unpruned,tail", "--set", "tail.k=1", "--data-dir", data_dir,
                           "--out", out)
    assert rc == 0, err[-2000:]
    assert f"warning: {out}/stray__unified.json: unreadable record" in err
    assert f"warning: {out}/future__unified.json: record schema 99, this harness reads 1, 2; skipped" in err
    with (out / "summary.csv").open() as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"unpruned", "tail"}
    assert "| tail |" in stdout


def test_latency_skips_a_corrupt_record_of_another_method(tmp_path, capsys):
    out = tmp_path / "lat"
    out.mkdir()
    (out / "other__disaggregated.json").write_text("[]")
    rc, _, err = call(capsys, "latency", *TINY, "--methods", "unpruned", "--prompt-tokens", "8", "--decode-tokens", "2",
                      "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--out", out)
    assert rc == 0, err[-2000:]
    assert "other__disaggregated.json: not a run record (a JSON list, expected an object); skipped" in err
    assert "unpruned" in (out / "summary.csv").read_text()


def test_corrupt_record_of_the_cell_itself_is_refused_not_replaced(tiny_run, tmp_path, capsys, data_dir):
    out = tmp_path / "o"
    shutil.copytree(tiny_run, out)
    (out / "unpruned__unified.json").write_text("{trunc")
    rc, _, err = call(capsys, *ONE_CELL, "--data-dir", data_dir, "--out", out)
    assert rc == 2 and "unpruned__unified.json: unreadable record" in err and "move it away" in err
    assert (out / "unpruned__unified.json").read_text() == "{trunc"


def test_report_skips_a_bad_record_next_to_good_ones(tiny_run, tmp_path, capsys):
    src = tmp_path / "runs"
    shutil.copytree(tiny_run, src)
    (src / "x__unified.json").write_text(json.dumps({"schema_version": 1, "method": 3}))
    rc, stdout, err = call(capsys, "report", src, "--no-plots", "--out", tmp_path / "rep")
    assert rc == 0, err[-2000:]
    assert "x__unified.json: not a run record (missing" in err and "| unpruned |" in stdout
    assert "x__unified.json" in (tmp_path / "rep" / "report.html").read_text()


def test_check_ignores_failure_notes_and_fails_on_an_unreadable_record(tiny_run, tmp_path, capsys):
    ref, cur = tmp_path / "ref" / "quality", tmp_path / "cur" / "quality"
    shutil.copytree(tiny_run, ref)
    shutil.copytree(tiny_run, cur)
    note = json.dumps({"kind": "failed_cell", "method": "tail"})
    (cur / "tail__unified.failed.json").write_text(note)  # a failed-cell note is not a record
    rc, stdout, err = call(capsys, "check", "--against", ref.parent, "--current", cur.parent)
    assert rc == 0 and "regression check passed: 1 record(s)" in stdout, stdout + err
    (ref / "tail__unified.failed.json").write_text(note)  # but references with a cell that failed are incomplete
    rc, stdout, err = call(capsys, "check", "--against", ref.parent, "--current", cur.parent)
    assert rc == 1 and "the references hold cells that failed or did not finish (quality/tail__unified.failed.json)" in stdout
    (ref / "tail__unified.failed.json").unlink()
    (cur / "unpruned__unified.json").write_text("{")
    rc, stdout, err = call(capsys, "check", "--against", ref.parent, "--current", cur.parent)
    assert rc == 1 and f"FAIL  {cur}/unpruned__unified.json: unreadable record" in stdout, stdout + err


def test_refused_run_prints_no_other_configurations_scores(tiny_run, tmp_path, capsys, data_dir):
    """Item 11: the results table holds this configuration's records only."""
    out = tmp_path / "o"
    shutil.copytree(tiny_run, out)
    rc, stdout, err = call(capsys, *[a if a != "2" else "3" for a in ONE_CELL], "--data-dir", data_dir, "--out", out)
    assert rc == 2 and "different configuration" in err
    assert "|" not in stdout, stdout  # no results table: the record there is another configuration's


def test_full_disk_failure_note_is_best_effort(tmp_path, data_dir, monkeypatch):
    """Item 6: a note that cannot be written must not stop the remaining cells."""
    from harness.config import RunConfig
    from harness.run import pipeline
    from harness.store import records

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "save_failure", full)
    cfg = RunConfig(model="random:tiny", methods=("manual", "unpruned"), tasks=("passkey",), limit=1,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir),
                    overrides=("manual.prefill_layers=0,1", "manual.decode_layers=0,2", "passkey.lengths=384",
                               "passkey.depths=0.5", "passkey.repeats=1"))
    said = []
    with pytest.raises(pipeline.CellsFailed) as e:
        pipeline.run(cfg, tmp_path, on_progress=said.append)
    assert [f.method for f in e.value.failures] == ["manual"] and [r.method for r in e.value.records] == ["unpruned"]
    assert (tmp_path / "unpruned__disaggregated.json").exists()
    assert any("could not write manual__disaggregated.failed.json (No space left on device)" in m for m in said)


def test_full_disk_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import os

    real_write = os.write

    def write(fd, data):
        if data == b"probe":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    rc, _, err = call(capsys, *ONE_CELL, "--out", tmp_path / "o")
    assert rc == 2 and f"--out {tmp_path}/o: cannot write there (No space left on device)" in err
    assert not list(tmp_path.iterdir())  # the probe left nothing, not even the folder


def test_ctrl_c_during_imports_or_model_load_exits_130_with_one_line(capsys, monkeypatch, tmp_path):
    """Item 7: KeyboardInterrupt before the pipeline starts (imports, model load)."""
    import harness.cli.run
    import harness.pd.models

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.pd.models, "load_model", interrupt)
    rc, _, err = call(capsys, *ONE_CELL, "--out", tmp_path / "o")
    said = [ln for ln in err.strip().splitlines() if ln and not ln.startswith("note: ")]  # notes come before the model loads
    assert rc == 130 and len(said) == 1 and "interrupted (Ctrl-C)" in err
    monkeypatch.setattr(harness.cli.run, "quiet_libraries", interrupt)  # the first heavy imports follow it
    rc, _, err = call(capsys, *ONE_CELL, "--out", tmp_path / "o")
    assert rc == 130 and len([ln for ln in err.strip().splitlines() if ln and not ln.startswith("note: ")]) == 1
    # `python -m harness` interrupted while importing the CLI itself
    hook = ("import builtins, runpy; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'harness.cli': raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp; runpy.run_module('harness', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", hook], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr.strip() == "interrupted (Ctrl-C)", r.stderr


def test_ctrl_c_during_latency_rounds_says_what_is_not_kept(capsys, monkeypatch, tmp_path):
    """A latency record is written after all its rounds: the interrupted run must not claim its work is kept."""
    import harness.run.latency_run

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.run.latency_run, "measure", interrupt)
    rc, _, err = call(capsys, "latency", *TINY, "--methods", "unpruned", "--prompt-tokens", "16", "--decode-tokens", "2",
                      "--batch-size", "1", "--out", tmp_path / "o")
    assert rc == 130 and "the rounds measured so far are not kept" in err and "interrupted (Ctrl-C)" in err, err
    assert not list(tmp_path.glob("o/*.json"))


def test_a_run_names_its_layers_and_leaves_no_task_folder(capsys, tmp_path, data_dir, monkeypatch):
    """Item 15: the load line and the record's model description give the layer count. Item 14: the
    lm-eval task folder is removed after the run (failed runs: the table above)."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rc, _, err = call(capsys, *ARC_CELL, "--data-dir", data_dir, "--out", tmp_path / "o")
    assert rc == 0 and "model random:tiny (4 layers) loaded" in err
    assert not list((tmp_path / "tmp").glob("harness-tasks-*"))
    rec = json.loads((tmp_path / "o" / "unpruned__unified.json").read_text())
    assert rec["model"]["n_layers"] == 4 and rec["model"]["class"] == "LlamaForCausalLM"


def test_log_samples_on_work_done_without_it_says_what_has_no_log(capsys, tmp_path, data_dir, monkeypatch):
    """--log-samples given to a rerun whose cell was finished without it: said, not silently skipped."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    cell = [a for a in ONE_CELL if a != "-q"]  # the note is a progress line, which -q keeps
    assert call(capsys, *cell, "--out", tmp_path / "o")[0] == 0
    rc, _, err = call(capsys, *cell, "--out", tmp_path / "o", "--log-samples")
    assert rc == 0 and "unpruned/unified: --log-samples: no per-sample log of passkey" in err, err
    assert not (tmp_path / "o" / "samples").exists()
    rc, _, err = call(capsys, *cell, "--out", tmp_path / "n", "--log-samples")
    assert rc == 0 and (tmp_path / "n" / "samples" / "unpruned__unified" / "samples_passkey.jsonl").exists()
    rc, _, err = call(capsys, *cell, "--out", tmp_path / "n", "--log-samples")  # reused, but its log exists
    assert rc == 0 and "finished record found" in err and "--log-samples" not in err, err


def test_a_dtype_typed_short_is_stored_by_its_full_name(tmp_path, data_dir, capsys, monkeypatch):
    """`--dtype fp32` stored "fp32" in the record's configuration: a rerun with `--dtype float32`, the same dtype, was
    refused as another configuration (and the reverse)."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    run = [*ONE_CELL, "--out", str(tmp_path / "o")]
    assert main([*run, "--dtype", "fp32"]) == 0
    record = json.loads(next((tmp_path / "o").glob("*__*.json")).read_text())
    assert record["config"]["dtype"] == "float32"
    capsys.readouterr()
    assert main([*run, "--dtype", "float32"]) == 0 and "finished record found, reused" in capsys.readouterr().err


def test_a_record_of_a_dtype_typed_short_before_full_names_is_still_reused(tmp_path, data_dir, capsys, monkeypatch):
    """Versions before full names stored `--dtype fp32` as "fp32" (its run key hashes it): the same command after
    the change stored float32 and refused that folder's records as another configuration."""
    import harness.cli.flags as flags

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    run = [*ONE_CELL, "--out", str(tmp_path / "o"), "--dtype", "fp32"]
    with monkeypatch.context() as m:  # the earlier version: the dtype kept as typed
        m.setattr(flags, "DTYPES", {k: k for k in flags.DTYPES})
        assert main(run) == 0
    assert json.loads(next((tmp_path / "o").glob("*__*.json")).read_text())["config"]["dtype"] == "fp32"
    capsys.readouterr()
    assert main(run) == 0 and "finished record found, reused" in capsys.readouterr().err


def test_a_latency_record_of_a_dtype_typed_short_before_full_names_is_still_reused(tmp_path, capsys, monkeypatch):
    """The latency records of an earlier version keep `--dtype fp32` as typed: compared field by field with this run's
    float32, the same command refused its own measurements as another configuration's."""
    import harness.cli.flags as flags

    run = ["latency", *TINY, "--methods", "unpruned", "--prompt-tokens", "8", "--decode-tokens", "2", "--repeats", "1",
           "--warmup", "0", "--out", str(tmp_path / "lat"), "--dtype", "fp32"]
    with monkeypatch.context() as m:
        m.setattr(flags, "DTYPES", {k: k for k in flags.DTYPES})
        assert main(run) == 0
    assert json.loads(next((tmp_path / "lat").glob("*__*.json")).read_text())["config"]["dtype"] == "fp32"
    capsys.readouterr()
    assert main(run) == 0, capsys.readouterr().err


def test_a_default_folder_of_a_dtype_typed_short_before_full_names_is_found_again(tmp_path, data_dir, capsys,
                                                                                   monkeypatch):
    """The default folder's id hashes the configuration: with "fp32" stored as "float32" the same command, given no
    --out, began a new folder beside the earlier version's instead of resuming it."""
    import harness.cli.flags as flags

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(flags, "DTYPES", {k: k for k in flags.DTYPES})
        assert main([*ONE_CELL, "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main([*ONE_CELL, "--dtype", "fp32"]) == 0 and "finished record found, reused" in capsys.readouterr().err
    assert len(list((tmp_path / "results" / "runs").iterdir())) == 1


def test_a_record_with_malformed_per_item_results_is_skipped_by_report_with_a_note(tiny_run, tmp_path, capsys):
    """A second record whose per-item accuracies are text (edited by hand) crashed the paired table with a traceback
    (ValueError: could not convert string to float); report now skips it, naming the field, and renders the rest."""
    folder = _paired_copy(tmp_path, tiny_run, _text_items)
    rc, _, err = call(capsys, "report", folder, "--no-plots", "--out", tmp_path / "rep")
    assert rc == 0, err[-2000:]
    assert "x__unified.json: extra.items['passkey'].metrics['acc'] must be a list of " in err and "; skipped" in err
