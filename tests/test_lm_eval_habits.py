"""lm-eval's habits: its flag spellings, --batch-size auto, fractional --limit, --apply_chat_template,
--model_args, and each cell's results also in lm-eval's results-file schema."""

import json
import math

import pytest
import torch
from conftest import random_requests

from harness.config import RunConfig
from harness.pd.plan import KVPolicy, PruningPlan
from harness.quality import autobatch
from harness.quality.scoring import Scorer

TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]
ONE = [*TINY, "--methods", "unpruned", "--tasks", "arc_easy", "--mode", "unified"]


def test_lm_eval_spellings_are_aliases_of_ours_and_help_names_them(cli):
    from harness.cli.run import run_parser

    ours = run_parser().parse_args(["--batch-size", "3", "--out", "o", "--num-fewshot", "2", "--log-samples",
                                    "--model-args", "revision=main", "--apply-chat-template"])
    theirs = run_parser().parse_args(["--batch_size", "3", "--output_path", "o", "--num_fewshot", "2", "--log_samples",
                                      "--model_args", "revision=main", "--apply_chat_template"])
    assert vars(ours) == vars(theirs)
    assert (ours.batch_size, str(ours.out), ours.num_fewshot, ours.log_samples, ours.apply_chat_template) == (3, "o", 2, True, True)
    assert run_parser().parse_args(["--apply_chat_template", "chatml"]).apply_chat_template == "chatml"
    r = cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for flag in ("--output_path", "--batch_size", "--num_fewshot", "--log_samples", "--model_args", "--apply_chat_template"):
        assert flag in text, flag
    for said in ("--output_path is lm-eval's name", "as lm-eval's --batch_size", "lm-eval as its --num_fewshot",
                 "--log_samples is lm-eval's name", "as lm-eval's --model_args", "as lm-eval's --apply_chat_template",
                 "lm-eval's --limit 0.1"):
        assert said in text, said


def test_spec_keys_stay_our_names():
    from harness.cli.run import run_parser
    from harness.cli.spec import _spec_actions

    keys = set(_spec_actions(run_parser()))
    assert {"out", "batch_size", "num_fewshot", "log_samples", "model_args", "apply_chat_template"} <= keys
    assert "output_path" not in keys
    from pathlib import Path

    from harness.cli.spec import Spec, to_argv, to_namespace

    spec = Spec(Path("s.toml"), {"run": {"apply_chat_template": True, "batch_size": "auto:2", "limit": 0.5,
                                         "model_args": "revision=main", "out": "o"}})
    ns = to_namespace(spec, "run", run_parser())
    assert (ns.apply_chat_template, ns.batch_size, ns.limit, ns.model_args, str(ns.out)) == (True, "auto:2", 0.5, "revision=main", "o")
    assert vars(run_parser().parse_args(to_argv(spec, "run", run_parser()))) == vars(ns)
    off = Spec(Path("s.toml"), {"run": {"apply_chat_template": False}})
    assert to_namespace(off, "run", run_parser()).apply_chat_template is False and to_argv(off, "run", run_parser()) == []


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "argument --limit: expected a positive integer, a fraction between 0 and 1 (exclusive) or 'all', got 0"),
    (["--limit", "1.5"], "expected a positive integer, a fraction between 0 and 1 (exclusive) or 'all', got 1.5"),
    (["--batch-size", "auto:0"], "expected auto:N with N a positive integer, got 'auto:0'"),
    (["--batch_size", "big"], "expected a positive integer, 'auto' or 'auto:N', got 'big'"),
    (["--model_args", "foo=1"], "--model_args: unknown key 'foo'; accepted keys: revision (str), attn_implementation (str), "
                                "trust_remote_code (bool)"),
    (["--model_args", "trust_remote_code=maybe"], "--model_args trust_remote_code=maybe: expected true or false"),
    (["--model_args", "attn_implementation=fast"], "attn_implementation=fast: expected one of eager, sdpa"),
    (["--model_args", "revision"], "expected key=value,... items"),
    (["--model_args", "revision=main"], "--model_args revision: a random:<preset> model is built from a config"),
])
def test_bad_lm_eval_style_input_exits_2(args, message, cli, data_dir, tmp_path):
    r = cli(*ONE, "--out", tmp_path / "o", *args, data_dir=data_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_new_fields_enter_run_keys_only_when_set():
    # these two values are what main computed before the fields existed: stored keys do not move
    assert RunConfig().run_id() == "af3a65baeb35"
    assert RunConfig(limit=2, batch_size=5).identity("unpruned", "unified", {}, None) == "6e5733fa82196734"
    # a run without long-context tasks has no task options ({} from pipeline.cell_identity): the same key
    assert RunConfig(limit=2, batch_size=5).identity("unpruned", "unified", {}, None, {}) == "6e5733fa82196734"
    base = RunConfig().run_id()
    assert RunConfig(apply_chat_template=True).run_id() != base
    assert RunConfig(model_args="attn_implementation=eager").run_id() != base
    assert RunConfig(limit=0.5).run_id() != base and RunConfig(batch_size="auto").run_id() != base


def _fits(limit, start=64):
    """The size accelerate's search (lm-eval's too) settles on when sizes above `limit` run out of memory."""
    tried = []

    def probe(n):
        tried.append(n)
        if n > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    return autobatch.fit_batch_size(probe, start), tried


def test_fit_batch_size_shrinks_on_out_of_memory_like_lm_eval():
    size, tried = _fits(5)
    assert size == tried[-1] <= 5 < min(tried[:-1]) and tried[0] == 64  # the first size at or under the limit
    assert tried == sorted(tried, reverse=True) and len(set(tried)) == len(tried)
    assert _fits(100) == (64, [64])
    assert autobatch.fit_batch_size(lambda n: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")), 8) == 1
    with pytest.raises(ValueError, match="other"):  # any other error is not a size problem
        autobatch.fit_batch_size(lambda n: (_ for _ in ()).throw(ValueError("other")), 8)
    assert autobatch.search_points(10, 1) == [0] and autobatch.search_points(10, 3) == [0, 4, 8]
    assert autobatch.parse("auto", "cpu") == (autobatch.CPU_AUTO_BATCH, 0)
    assert autobatch.parse("auto:3", "cuda") == (autobatch.AUTO_MAX_BATCH, 3) and autobatch.parse(7, "cuda") == (7, 0)


def test_the_search_frees_each_attempt_s_garbage_and_unfreezes_the_heap():
    """The heap is frozen during the search (accelerate's collection before each attempt skips the old objects),
    yet the reference cycles out-of-memory attempts leave are collected during it, and the freeze ends after."""
    import gc
    import weakref

    class Cycle:
        pass

    frozen, left = [], []

    def probe(n):
        frozen.append(gc.get_freeze_count() > 0)
        # collected before this attempt: every earlier attempt's cycle but the last one's, which accelerate's
        # collection cannot free (it runs inside its `except`, whose exception still holds that attempt's frame)
        assert all(ref() is None for ref in left[:-1])
        if n > 40:
            garbage = Cycle()
            garbage.me = garbage
            left.append(weakref.ref(garbage))
            raise RuntimeError("CUDA out of memory.")

    assert autobatch.fit_batch_size(probe, 64) <= 40 and len(left) >= 3 and all(frozen)
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_auto_batch_size_changes_neither_scores_nor_bytes(tiny, mode, monkeypatch):
    """auto:3 as on a GPU whose memory holds 5 requests: the search settles at <= 5, three times, through the
    real scoring path (its probes' handoffs not counted), and scores and KV bytes equal batch size 1's."""
    reqs = random_requests(20, 256, seed=3)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), KVPolicy(2, 3, (2,))) if mode == "disaggregated" \
        else PruningPlan("x", 4, (0, 1, 3), (0, 1, 3))
    fixed = Scorer(tiny.model, plan, mode, max_length=4096, batch_size=1)
    ref = fixed.loglikelihood(reqs)
    auto = Scorer(tiny.model, plan, mode, max_length=4096, batch_size="auto:3")
    auto.batch_size, auto.auto_times = 64, 3  # what autobatch.parse gives on a GPU
    probe, probed = auto._probe, []

    def small_memory(ctx, cont, n):
        probed.append(n)
        if n > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        probe(ctx, cont, n)

    monkeypatch.setattr(auto, "_probe", small_memory)
    got = auto.loglikelihood(reqs)
    fit = _fits(5)[0]
    assert auto.sizes_used == [fit] and probed.count(fit) == 3  # searched again at each third of the requests
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) <= 1e-4 and [g for _, g in got] == [g for _, g in ref]
    assert auto.tally.as_dict() == fixed.tally.as_dict()


def _record(out, cell="unpruned__unified"):
    return json.loads((out / f"{cell}.json").read_text())


def test_run_with_lm_eval_flags_writes_lm_eval_results_json(cli, data_dir, tmp_path):
    """One run with lm-eval's spellings: the record keeps auto's size, the chat template and model args;
    lm_eval/<cell>/results_<timestamp>.json loads, renders with lm-eval's make_table, and holds the record's score."""
    from lm_eval.utils import make_table

    out = tmp_path / "run"
    r = cli(*ONE, "--limit", "2", "--batch_size", "auto", "--apply_chat_template", "--model_args", "attn_implementation=eager",
            "--log_samples", "--output_path", out, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = _record(out)
    cfg = rec["config"]
    assert (cfg["batch_size"], cfg["batch_sizes_used"]) == ("auto", {"arc_easy": [autobatch.CPU_AUTO_BATCH]})
    assert cfg["apply_chat_template"] is True and cfg["model_args"] == "attn_implementation=eager"
    assert rec["model"]["model_args"] == {"attn_implementation": "eager"}
    prompt = json.loads((out / "samples" / "unpruned__unified" / "samples_arc_easy.jsonl").read_text().splitlines()[0])
    assert prompt["arguments"]["gen_args_0"]["arg_0"].startswith("<|im_start|>user\n")  # the chat template reached lm-eval
    files = list((out / "lm_eval" / "unpruned__unified").glob("results_*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "date", "model_name", "chat_template", "total_evaluation_time_seconds"):
        assert key in doc, key
    assert doc["results"]["arc_easy"]["acc,none"] == rec["scores"]["arc_easy"]["acc"]["value"]
    assert doc["n-samples"]["arc_easy"]["effective"] == rec["n_samples"]["arc_easy"] == 2
    assert doc["config"]["harness"]["run_key"] == rec["run_key"] and doc["chat_template"].startswith("{% for m in messages")
    table = make_table(doc)
    cells = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("|arc_easy")).split("|")]
    assert cells[5] == "acc" and abs(float(cells[7]) - rec["scores"]["arc_easy"]["acc"]["value"]) < 5e-5  # shown to 4 places


def test_fractional_limit_is_lm_eval_s_share_of_each_task(cli, data_dir, tmp_path):
    out = tmp_path / "frac"
    r = cli(*TINY, "--methods", "unpruned", "--tasks", "arc_easy,passkey", "--mode", "disaggregated", "--limit", "0.001",
            "--set", "passkey.lengths=400", "--out", out, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = _record(out, "unpruned__disaggregated")
    n_docs = len((data_dir / "arc_easy" / "ARC-Easy-test.jsonl").read_text().splitlines())
    assert rec["n_samples"]["arc_easy"] == math.ceil(n_docs * 0.001) == 3
    assert rec["config"]["limit"] == 0.001 and rec["lm_eval"]["limit"] == 0.001
    from harness.quality.long_tasks.base import capped

    assert rec["n_samples"]["passkey"] == capped(5, 0.001) == 1  # 1 repeat x 5 depths at one length: ceil(5 x 0.001)
    assert capped(10, None) == 10 and capped(10, 3) == 3 and capped(10, 0.25) == 3 and capped(2, 5) == 2


def test_help_lists_the_accepted_model_args_without_importing_torch():
    from harness.cli.run import MODEL_ARG_NAMES
    from harness.pd.models import MODEL_ARGS

    assert tuple(MODEL_ARGS) == MODEL_ARG_NAMES


def test_flattened_results_pair_each_metric_with_its_own_stderr():
    from harness.quality.evaluate import flatten_results

    got = flatten_results({"alias": "boolq", "acc,none": 0.625, "acc_stderr,none": 0.0484, "acc_norm,none": 0.5,
                           "acc_norm_stderr,none": "N/A", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1})
    assert got == {"acc": {"value": 0.625, "stderr": 0.0484}, "acc_norm": {"value": 0.5, "stderr": None},
                   "exact_match/strict-match": {"value": 0.25, "stderr": 0.1}}


def test_few_shot_split_is_chosen_as_lm_eval_chooses_it():
    """lm-eval draws shots from `fewshot_split` when a YAML names one, else training, validation, test; it scores the
    test split, else validation. The pool loses the item itself only when shots come from the scored split."""
    from types import SimpleNamespace

    from harness.errors import HarnessWarning, UsageError
    from harness.quality.evaluate import fewshot_split

    def task(fewshot=None, train=None, val=None, test=None, sizes=None):
        cfg = SimpleNamespace(fewshot_split=fewshot, training_split=train, validation_split=val, test_split=test)
        return SimpleNamespace(config=cfg, dataset={name: [{}] * n for name, n in sizes.items()})

    sizes = {"train": 50, "validation": 3, "test": 10}
    assert fewshot_split(task("validation", "train", "validation", "test", sizes), "t", set(), 3) == "validation"
    assert fewshot_split(task(None, "train", "validation", "test", sizes), "t", set(), 5) == "train"
    # shots from validation, items from test: all 3 validation rows are shots (no warning, nothing left out)
    assert fewshot_split(task(None, None, "validation", "test", sizes), "t", set(), 3) == "validation"
    with pytest.warns(HarnessWarning, match="from its scored validation split"):
        assert fewshot_split(task(None, None, "validation", None, sizes), "t", set(), 2) == "validation"
    with pytest.raises(UsageError, match="t has 2 few-shot examples"):
        fewshot_split(task(None, None, "validation", None, sizes), "t", set(), 3)


def test_a_chat_template_name_must_name_one_of_the_tokenizers_templates(cli):
    """`--apply_chat_template NAME` was recorded and keyed but selected nothing on a tokenizer of one template (lm-eval
    only warns): now refused before any cell, as is a name a tokenizer of several templates lacks (lm-eval's ValueError)."""
    from types import SimpleNamespace

    from harness.errors import UsageError
    from harness.run.task_check import check_chat_template as _check_chat_template

    r = cli(*ONE, "--limit", "2", "--apply_chat_template", "nonexistent_tmpl")
    assert r.returncode == 2 and "--apply_chat_template nonexistent_tmpl: the tokenizer of random:tiny has one chat template" in r.stderr
    several = SimpleNamespace(chat_template={"default": "{{ messages }}", "tool_use": "{{ tools }}"})
    _check_chat_template(RunConfig(model="m", apply_chat_template="tool_use"), several)
    _check_chat_template(RunConfig(model="m", apply_chat_template=True), several)
    with pytest.raises(UsageError, match="no such template in the tokenizer of m; its templates: default, tool_use"):
        _check_chat_template(RunConfig(model="m", apply_chat_template="chatml"), several)
    with pytest.raises(UsageError, match="has no chat template"):
        _check_chat_template(RunConfig(model="m", apply_chat_template=True), SimpleNamespace(chat_template=None))


def test_the_chat_template_warning_for_long_tasks_comes_once(data_dir, tmp_path):
    """The run checks the tokenizer's options before the weights load and again with the loaded model; the
    `--apply_chat_template` warning for long-context tasks came from both checks, so it showed twice. (A process of
    its own: the in-process CLI's warnings go to pytest's capture, which shows each one.)"""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "harness", *ONE, "--tasks", "arc_easy,passkey", "--limit", "1",
                        "--apply_chat_template", "--set", "passkey.lengths=400", "--set", "passkey.depths=0.5",
                        "--data-dir", str(data_dir), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "HARNESS_DATA_DIR": str(data_dir)}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("does not apply to the long-context tasks passkey") == 1, r.stderr[-3000:]
