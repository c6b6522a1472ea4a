"""Records keep digests of the files behind --model and --data-dir (run keys name them by path only): a rerun
after those files changed refuses the old records instead of reusing them, and --plans-from does not replay
a plan made on other weights."""

from __future__ import annotations

import json
import shutil

from harness.store import records

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
    assert "holds work made from other files behind the same paths: unpruned__unified.json (the data files of " \
           "arc_easy changed)" in changed.stderr


def test_changed_weights_behind_the_same_model_folder_are_not_reused_nor_their_plans(cli, data_dir, tmp_path):
    model = _model_folder(tmp_path / "m", seed=0)
    args = ["--model", model, "--data-dir", data_dir, "--tasks", "arc_easy", "--limit", "2", "-q", "--device", "cpu",
            "--mode", "disaggregated", "--methods", "shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=4"]
    assert cli(*args, "--out", tmp_path / "a").returncode == 0
    _model_folder(model, seed=7)  # other weights, same path and configuration
    changed = cli(*args, "--out", tmp_path / "a")
    assert changed.returncode == 2 and "shortgpt__disaggregated.json (the model's weights (fingerprint " in changed.stderr
    fresh = cli(*args, "--plans-from", tmp_path / "a", "--out", tmp_path / "b")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    (rec,) = records.load_dir(tmp_path / "b")
    assert rec.config["plan_reused_from"] is None  # planned on these weights, not replayed from the old ones


def test_the_weights_fingerprint_ignores_where_the_files_lie_and_the_load_dtype(tmp_path):
    from harness.pd.models import load_model
    from harness.run.inputs import weights_fingerprint

    a, b = _model_folder(tmp_path / "a", seed=0), _model_folder(tmp_path / "b", seed=0)
    fp = {weights_fingerprint(load_model(str(p), device="cpu", dtype=dt).model) for p in (a, b) for dt in ("float32", "bfloat16")}
    assert len(fp) == 1
    assert weights_fingerprint(load_model(str(_model_folder(tmp_path / "c", seed=1)), device="cpu", dtype="float32").model) not in fp
