"""Records keep digests of the files behind --model and --data-dir (run keys name them by path only): a rerun
after those files changed refuses the old records instead of reusing them, and --plans-from does not replay
a plan made on other weights."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from harness.quality import long_tasks
from harness.quality.long_tasks.base import LongTask
from harness.store import records
from harness.store.task_names import TaskPresentation

ARC = ["--methods", "unpruned", "--mode", "unified", "--tasks", "arc_easy", "--limit", "2", "-q", "--device", "cpu"]


def _model_folder(path, seed: int):
    from harness.pd.models import load_model

    loaded = load_model("random:tiny", device="cpu", dtype="float32", seed=seed)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_changed_data_behind_the_same_data_dir_is_not_reused(cli, data_dir, tmp_path):
    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    shutil.copy(data_dir / "arc_easy" / "ARC-Easy-test.jsonl", data / "arc_easy")
    args = ["--model", "random:tiny", *ARC, "--data-dir", data, "--out", tmp_path / "o"]
    assert cli(*args).returncode == 0
    (rec,) = records.load_dir(tmp_path / "o")
    assert set(rec.extra["inputs"]["data"]) == {"arc_easy"} and rec.extra["inputs"]["model"]
    again = cli(*args)
    assert again.returncode == 0 and "finished record found, reused" in again.stderr  # unchanged: reused
    path = data / "arc_easy" / "ARC-Easy-test.jsonl"
    rows = path.read_text().splitlines()
    first = json.loads(rows[0])
    first["answerKey"] = next(x for x in first["choices"]["label"] if x != first["answerKey"])
    path.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    changed = cli(*args)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "holds work made from other inputs than this run's: unpruned__unified.json (the data files of " \
           "arc_easy changed)" in changed.stderr


def test_a_moved_data_folder_reuses_its_records_and_still_checks_their_files(cli, data_dir, tmp_path, monkeypatch):
    """Run keys hold --data-dir's path, so a clone elsewhere (CI's checkout of the committed records) refused every
    record as another configuration; the path alone no longer decides: the files' digests do."""
    from harness.cli.run import run_config, run_parser
    from harness.run import reuse

    data = tmp_path / "a" / "data"
    (data / "arc_easy").mkdir(parents=True)
    shutil.copy(data_dir / "arc_easy" / "ARC-Easy-test.jsonl", data / "arc_easy")
    args = ["--model", "random:tiny", *ARC, "--out", tmp_path / "o"]
    assert cli(*args, "--data-dir", data).returncode == 0
    moved = tmp_path / "b" / "data"
    shutil.move(tmp_path / "a", tmp_path / "b")
    again = cli(*args, "--data-dir", moved)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"unpruned/unified: record made with the data folder at {data}; reused" in again.stderr
    path = moved / "arc_easy" / "ARC-Easy-test.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))  # one item fewer
    edited = cli(*args, "--data-dir", moved)
    assert edited.returncode == 2 and "(the data files of arc_easy changed)" in edited.stderr, edited.stderr[-2000:]
    record = tmp_path / "o" / records.record_filename("unpruned", "unified")
    doc = json.loads(record.read_text())
    del doc["extra"]["inputs"]  # a record made before input digests: reused as before, saying so
    record.write_text(json.dumps(doc))
    old = cli(*args, "--data-dir", moved)
    assert old.returncode == 0 and "(made before input digests: its data files unchecked); reused" in old.stderr
    # without a local folder the data is lm-eval's hub datasets: another source, not a moved folder
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    hub = run_config(run_parser().parse_args([str(a) for a in args]))
    assert hub.data_dir is None and reuse.relocated(hub, records.load(record).config["data_dir"]) is None


def test_an_interrupted_cell_resumes_after_its_data_folder_moved(cli, data_dir, tmp_path, monkeypatch):
    """Finished records survive a moved data folder; so does a resume state: arc_easy, done before the interruption,
    is not evaluated again. Resume states of other data files are still refused."""
    from harness.run import pipeline

    data = tmp_path / "a" / "data"
    for task, name in (("arc_easy", "ARC-Easy-test.jsonl"), ("boolq", "dev.jsonl")):
        (data / task).mkdir(parents=True)
        shutil.copy(data_dir / task / name, data / task)
    args = ["--model", "random:tiny", *ARC[:-7], "--tasks", "arc_easy,boolq", "--limit", "2", "-q", "--device", "cpu",
            "--out", tmp_path / "o"]
    evaluated, real = [], pipeline._eval_task

    def interrupted(st, lm, task, name, mode):
        if task == "boolq" and not evaluated.count("boolq"):
            evaluated.append(task)
            raise KeyboardInterrupt
        evaluated.append(task)
        return real(st, lm, task, name, mode)

    monkeypatch.setattr(pipeline, "_eval_task", interrupted)
    assert cli(*args, "--data-dir", data).returncode == 130  # Ctrl-C
    assert evaluated == ["arc_easy", "boolq"] and (tmp_path / "o" / "unpruned__unified.partial.json").exists()
    shutil.move(tmp_path / "a", tmp_path / "b")
    arc = tmp_path / "b" / "data" / "arc_easy" / "ARC-Easy-test.jsonl"
    kept = arc.read_text()
    arc.write_text("".join(kept.splitlines(keepends=True)[1:]))
    edited = cli(*args, "--data-dir", tmp_path / "b" / "data")
    assert edited.returncode == 2 and "unpruned__unified.partial.json (the data files of arc_easy changed)" in edited.stderr
    arc.write_text(kept)
    resumed = cli(*args, "--data-dir", tmp_path / "b" / "data")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert evaluated == ["arc_easy", "boolq", "boolq"]  # arc_easy came from the resume state
    (rec,) = records.load_dir(tmp_path / "o")
    assert set(rec.scores) == {"arc_easy", "boolq"} and rec.config["data_dir"] == str(tmp_path / "b" / "data")


def test_changed_weights_behind_the_same_model_folder_are_not_reused_nor_their_plans(cli, data_dir, tmp_path):
    model = _model_folder(tmp_path / "m", seed=0)
    args = ["--model", model, "--data-dir", data_dir, "--tasks", "arc_easy", "--limit", "2", "-q", "--device", "cpu",
            "--mode", "disaggregated", "--methods", "shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=4"]
    assert cli(*args, "--out", tmp_path / "a").returncode == 0
    _model_folder(model, seed=7)  # other weights, same path and configuration
    changed = cli(*args, "--out", tmp_path / "a")
    assert changed.returncode == 2 and "shortgpt__disaggregated.json (the model's weights (model digest " in changed.stderr
    fresh = cli(*args, "--plans-from", tmp_path / "a", "--out", tmp_path / "b")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    (rec,) = records.load_dir(tmp_path / "b")
    assert rec.config["plan_reused_from"] is None  # planned on these weights, not replayed from the old ones


def test_a_model_folder_typed_another_way_is_the_same_model(cli, data_dir, tmp_path, monkeypatch):
    """`--model m` from its parent folder and its absolute path from elsewhere are one model: --plans-from replayed
    nothing (for PDTrim, its whole search again), since run configurations keep the path as typed."""
    _model_folder(tmp_path / "m", seed=0)
    args = ["--data-dir", data_dir, "--tasks", "arc_easy", "--limit", "2", "-q", "--device", "cpu", "--mode", "disaggregated",
            "--methods", "shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=4"]
    monkeypatch.chdir(tmp_path)
    assert cli("--model", "m", *args, "--out", tmp_path / "a").returncode == 0
    monkeypatch.chdir(data_dir)
    again = cli("--model", tmp_path / "m", *args, "--plans-from", tmp_path / "a", "--out", tmp_path / "b")
    assert again.returncode == 0 and "planning" not in again.stderr, again.stderr[-2000:]
    (rec,) = records.load_dir(tmp_path / "b")
    assert rec.config["plan_reused_from"] == str(tmp_path / "a" / "shortgpt__disaggregated.json")
    _model_folder(tmp_path / "n", seed=0)  # the same weights in another folder: not taken for the same model
    other = cli("--model", tmp_path / "n", *args, "--plans-from", tmp_path / "a", "--out", tmp_path / "c")
    assert other.returncode == 0 and "shortgpt/disaggregated: planning" in other.stderr
    # and its finished records are this configuration's, not another's
    reused = cli("--model", tmp_path / "m", *args, "--out", tmp_path / "a")
    assert reused.returncode == 0 and "record made with --model m (the same model folder); reused" in reused.stderr
    refused = cli("--model", tmp_path / "n", *args, "--out", tmp_path / "a")
    assert refused.returncode == 2 and "holds work of a different configuration" in refused.stderr


def test_a_moved_data_folder_with_other_calibration_data_is_not_reused(cli, data_dir, tmp_path):
    """The calibration's PIQA and MMLU files are inputs of a calibrating method's record even when no task scores
    them: a moved copy whose PIQA differs gave a plan calibrated on the old texts under the new folder."""
    data = tmp_path / "a" / "data"
    for part in ("arc_easy", "piqa", "mmlu"):
        shutil.copytree(data_dir / part, data / part)
    args = ["--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", "--device", "cpu", "--mode", "unified",
            "--methods", "unpruned,shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=4", "--out", tmp_path / "o"]
    assert cli(*args, "--data-dir", data).returncode == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    piqa = tmp_path / "b" / "data" / "piqa" / "valid.jsonl"
    rows = piqa.read_text().splitlines(keepends=True)
    piqa.write_text("".join(rows[1:] + rows[:1]))  # the same rows in another order: other calibration samples
    moved = cli(*args, "--data-dir", tmp_path / "b" / "data")
    assert moved.returncode == 2, moved.stderr[-2000:]
    assert "shortgpt__unified.json (the calibration data (piqa) changed)" in moved.stderr
    assert "unpruned__unified.json" not in moved.stderr  # it calibrates on nothing


def test_the_weights_fingerprint_ignores_where_the_files_lie_and_the_load_dtype(tmp_path):
    from harness.pd.models import load_model
    from harness.run.inputs import weights_fingerprint

    a, b = _model_folder(tmp_path / "a", seed=0), _model_folder(tmp_path / "b", seed=0)
    fp = {weights_fingerprint(load_model(str(p), device="cpu", dtype=dt).model) for p in (a, b) for dt in ("float32", "bfloat16")}
    assert len(fp) == 1
    assert weights_fingerprint(load_model(str(_model_folder(tmp_path / "c", seed=1)), device="cpu", dtype="float32").model) not in fp


def test_a_changed_config_or_an_edit_inside_a_tensor_is_seen(cli, tmp_path):
    from harness.pd.models import load_model
    from harness.run.inputs import model_digests

    model = _model_folder(tmp_path / "m", seed=0)
    before = model_digests(load_model(str(model), device="cpu", dtype="float32"))
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    after = model_digests(load_model(str(model), device="cpu", dtype="float32"))
    assert after["config"] != before["config"] and after["model"] == before["model"]
    loaded = load_model(str(_model_folder(tmp_path / "n", seed=0)), device="cpu", dtype="float32")
    first = model_digests(loaded)["model"]
    weight = next(p for name, p in loaded.model.named_parameters() if p.numel() > 4096)
    with __import__("torch").no_grad():
        weight.view(-1)[weight.numel() // 2: weight.numel() // 2 + 64] *= 2  # the middle of a tensor, not its ends
    assert model_digests(loaded)["model"] != first


def _positional_passkey_ids(path):
    """Rewrite a record's passkey item ids as versions before content ids wrote them (`passkey/0`, ...)."""
    doc = json.loads(path.read_text())
    doc["extra"]["items"]["passkey"]["ids"] = [f"passkey/{i}" for i in range(len(doc["extra"]["items"]["passkey"]["ids"]))]
    path.write_text(json.dumps(doc))


def test_passkey_records_of_the_older_limit_rule_are_not_reused(cli, tmp_path):
    args = ["--model", "random:tiny", "--methods", "unpruned", "--mode", "unified", "--tasks", "passkey", "--limit", "2", "-q",
            "--set", "passkey.lengths=384,448", "--set", "passkey.depths=0.5", "--set", "passkey.repeats=1"]
    assert cli(*args, "--out", tmp_path / "o").returncode == 0
    _positional_passkey_ids(tmp_path / "o" / "unpruned__unified.json")
    again = cli(*args, "--out", tmp_path / "o")
    assert again.returncode == 0  # the limit keeps the whole grid here: the same samples, reused
    one = [*args[:-6], "--set", "passkey.lengths=384,448,512", *args[-4:]]  # 3 cells, limit 2: cut
    assert cli(*one, "--out", tmp_path / "p").returncode == 0
    _positional_passkey_ids(tmp_path / "p" / "unpruned__unified.json")
    stale = cli(*one, "--out", tmp_path / "p")
    assert stale.returncode == 2 and "(passkey's items have positional ids, from a version whose --limit" in stale.stderr


def test_a_sweep_refuses_work_from_changed_data_before_any_cell(cli, data_dir, tmp_path):
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    shutil.copy(data_dir / "arc_easy" / "ARC-Easy-test.jsonl", data / "arc_easy")
    assert cli("--model", "random:tiny", *ARC, "--data-dir", data, "--out", tmp_path / "q").returncode == 0
    spec = tmp_path / "s.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["unpruned"]\nmode = "unified"\ntasks = ["arc_easy"]\n'
                    f'limit = 2\ndevice = "cpu"\ndata_dir = "{data}"\nout = "{tmp_path / "q"}"\n')
    assert expand(spec, None).cells  # unchanged: the sweep would reuse the record
    (data / "arc_easy" / "ARC-Easy-test.jsonl").write_text("".join(
        (data_dir / "arc_easy" / "ARC-Easy-test.jsonl").read_text().splitlines(True)[1:]))
    with pytest.raises(UsageError, match=re.escape("unpruned__unified.json (the data files of arc_easy changed)")):
        expand(spec, None)


def test_a_sweep_refuses_a_few_shot_pool_too_small_before_any_cell(data_dir, tmp_path):
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    spec = tmp_path / "s.toml"
    spec.write_text(f'[run]\nmodel = "random:tiny"\nmethods = ["unpruned"]\ntasks = ["arc_easy"]\nlimit = 2\n'
                    f'num_fewshot = 100000\ndata_dir = "{data_dir}"\nout = "{tmp_path / "q"}"\n')
    with pytest.raises(UsageError, match=re.escape("--num-fewshot 100000: arc_easy has 2375 few-shot examples")):
        expand(spec, None)


def test_a_spec_out_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    from harness.cli.spec import Spec

    monkeypatch.setenv("HOME", str(tmp_path))
    assert Spec(tmp_path / "s.toml", {"run": {"out": "~/runs/x"}}).out("run") == tmp_path / "runs" / "x"


def test_with_a_device_map_the_config_and_tokenizer_are_still_digested(tmp_path):
    from types import SimpleNamespace

    from harness.pd.models import load_model
    from harness.run.inputs import digests

    loaded = load_model("random:tiny", device="cpu", dtype="float32")
    cfg = SimpleNamespace(data_dir=None, tasks=(), device_map="auto")
    d = digests(cfg, loaded)
    assert d["model"] is None and d["config"] and d["tokenizer"]  # offloaded weights are not all in memory; the rest is


def test_few_shot_under_data_parallelism_is_refused(monkeypatch):
    from harness.errors import UsageError
    from harness.quality import distributed

    monkeypatch.setattr(distributed, "launched_world_size", lambda: 2)
    distributed.check_items_per_rank(4, ["arc_easy"], 0)  # zero-shot: fine
    with pytest.raises(UsageError, match=re.escape("--num-fewshot 2 with 2 data-parallel ranks: each rank would draw other few-shot examples")):
        distributed.check_items_per_rank(4, ["arc_easy"], 2)


@dataclasses.dataclass(frozen=True)
class _FileOptions:
    file: str = ""  # the user's own text file, named by an option: outside any data dir


class _FileTask(LongTask):
    """Log-likelihood of a file's second line after its first: a task whose input an option names."""

    name, Config = "pd_test_own_file", _FileOptions
    presentation = TaskPresentation(title="F", setting_prefix="f_N", primary_metric="f", metric_format="decimal")

    @classmethod
    def input_files(cls, data_dir, options):
        return [Path(options.file)]

    def evaluate(self, scorer, tokenizer, data_dir, options, limit, progress=False):
        first, second = (tokenizer.encode(x, add_special_tokens=False) for x in Path(options.file).read_text().splitlines())
        (lp, _), = scorer.loglikelihood([(first, second)])
        return {"scores": {"f": {"value": lp, "stderr": None}}, "n_samples": 1, "kv_by": {}, "details": {}}


def test_a_changed_file_that_a_task_option_names_is_not_reused(cli, tmp_path):
    """Run keys name the option's path only: before `LongTask.input_files`, a task could declare only `data_files`
    inside the data dir, so an edited file of its own (a local JSONL of prompts) was reused silently."""
    own = tmp_path / "mine.txt"
    own.write_text("one two three\nfour five\n")
    args = ["--model", "random:tiny", "--methods", "unpruned", "--mode", "unified", "--tasks", "pd_test_own_file",
            "--set", f"pd_test_own_file.file={own}", "-q", "--out", tmp_path / "o"]
    long_tasks.register_task(_FileTask)
    try:
        assert cli(*args).returncode == 0
        assert "finished record found, reused" in cli(*args).stderr  # unchanged: reused
        own.write_text("one two three\nfour six\n")
        changed = cli(*args)
    finally:
        long_tasks.unregister_task("pd_test_own_file")
    assert changed.returncode == 2 and "unpruned__unified.json (the data files of pd_test_own_file changed)" in changed.stderr
