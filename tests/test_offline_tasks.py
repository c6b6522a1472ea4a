"""Local data reaches lm-eval's own task definitions in the upstream field layout."""

import shutil
import subprocess

import pytest

from harness.errors import UsageError
from harness.quality.tasks import check_files, local_rows, mmlu_subjects, task_manager, wikitext_pages

COUNTS = {"arc_easy": ("test", 2376), "arc_challenge": ("test", 1172), "hellaswag": ("validation", 10042),
          "piqa": ("validation", 1838), "winogrande": ("validation", 1267), "boolq": ("validation", 3270),
          "openbookqa": ("test", 500), "wikitext": ("test", 62), "lambada_openai": ("test", 5153)}


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_row_counts(task, data_dir):
    split, n = COUNTS[task]
    assert len(local_rows(task, data_dir)[split]) == n


def test_bridges(data_dir):
    boolq = local_rows("boolq", data_dir)["validation"][0]
    assert boolq["passage"].startswith("Ethanol fuel -- All biomass goes through") and boolq["label"] == 0
    piqa = local_rows("piqa", data_dir)["validation"]
    assert {r["label"] for r in piqa} == {0, 1}
    obqa = local_rows("openbookqa", data_dir)["test"][0]
    assert obqa["question_stem"].startswith("A person wants to start saving money") and obqa["choices"]["label"] == list("ABCD")
    subjects = mmlu_subjects(data_dir)
    assert len(subjects) == 57
    assert sum(len(local_rows("mmlu", data_dir, s)["test"]) for s in subjects) == 14042
    row = local_rows("mmlu", data_dir, "anatomy")["validation"][0]
    assert row["answer"] == 3 and row["choices"][3] == "Homeostasis" and row["subject"] == "anatomy"


def test_wikitext_pages_partition_the_file(data_dir):
    raw = (data_dir / "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    pages = wikitext_pages(raw)
    assert len(pages) == 62 and pages[0].startswith(" = Robert Boulter = \n")
    assert all(p.split("\n", 1)[0].startswith(" = ") for p in pages)
    start = raw.index(" = Robert Boulter = ")
    assert "\n".join(pages) == raw[start:]  # nothing lost or added but the leading blank line


def test_lm_eval_tasks_keep_upstream_prompts(data_dir):
    tm = task_manager(["arc_easy", "boolq", "piqa", "mmlu"], data_dir)
    tasks = tm.load(["arc_easy", "boolq", "piqa", "mmlu_anatomy"])["tasks"]
    arc = tasks["arc_easy"]
    doc = next(iter(arc.eval_docs))
    assert arc.doc_to_text(doc).startswith("Question: Which statement best explains why photosynthesis")
    assert arc.doc_to_text(doc).endswith("\nAnswer:")
    assert arc.config.test_split == "test" and [m["metric"] for m in arc.config.metric_list] == ["acc", "acc_norm"]
    boolq = tasks["boolq"]
    bdoc = next(iter(boolq.eval_docs))
    assert boolq.doc_to_text(bdoc).startswith("Ethanol fuel -- All biomass") and boolq.doc_to_choice(bdoc) == ["no", "yes"]
    assert len(list(tasks["piqa"].eval_docs)) == 1838
    mm = tasks["mmlu_anatomy"]
    mdoc = next(iter(mm.eval_docs))
    assert mm.doc_to_text(mdoc).endswith("\nAnswer:") and "\nA. " in mm.doc_to_text(mdoc)
    assert len(list(mm.eval_docs)) == 135


def test_task_manager_indexes_only_the_requested_tasks_and_mmlu_keeps_its_groups(data_dir):
    """Indexing every lm-eval YAML cost ~8 s per run; only the requested tasks' folders are indexed,
    and MMLU's group, its four category groups and its 57 subjects (local data) still load."""
    assert "hellaswag" not in task_manager(["arc_easy"], data_dir).all_tasks
    tm = task_manager(["arc_easy", "mmlu"], data_dir)
    assert len(tm.all_tasks) < 200 and {"arc_easy", "mmlu", "mmlu_stem", "mmlu_anatomy"} <= set(tm.all_tasks)
    mmlu = tm.load(["mmlu"])
    assert len(mmlu["tasks"]) == 57 and "mmlu" in mmlu["groups"]
    assert all(t.config.dataset_kwargs["harness_task"] == "mmlu" for t in mmlu["tasks"].values())


def test_lm_eval_env_report_is_skipped_inside_the_block_only(monkeypatch):
    """lm-eval's `add_env_info` (torch's env report: `pip list` and more, seconds per evaluate) is skipped."""
    import lm_eval.evaluator as ev

    from harness.quality.tasks import without_env_report

    calls = []
    monkeypatch.setattr(ev, "add_env_info", lambda results: calls.append(results))
    monkeypatch.setattr(ev, "get_git_commit_hash", lambda: calls.append("git") or "abc")
    with without_env_report():
        ev.add_env_info({})
        assert ev.get_git_commit_hash() is None
    assert calls == []
    ev.add_env_info({})
    assert calls == [{}] and ev.get_git_commit_hash() == "abc" and calls == [{}, "git"]


def test_a_run_outside_a_git_repository_prints_no_git_error(data_dir, tmp_path, monkeypatch, capfd):
    """lm-eval ran `git describe` in the current folder for every task: outside a repository, git's
    "fatal: not a git repository" reached the terminal past -q, once per task."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode != 0  # no repository
    assert main(["--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned", "--mode", "unified",
                 "--tasks", "arc_easy,boolq", "--limit", "2", "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]) == 0
    assert "not a git repository" not in capfd.readouterr().err


def test_missing_file_is_named(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir / "piqa", copy / "piqa")
    (copy / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(UsageError, match=r"missing data file .*piqa/valid-labels.lst \(needed by task piqa\)"):
        check_files(["piqa"], copy)
    with pytest.raises(UsageError, match="no such directory"):
        check_files(["piqa"], tmp_path / "nope")


def test_piqa_rows_carry_the_label_of_their_own_line(data_dir):
    """PIQA keeps its answers in a separate file, one per line: row i gets line i's label, as it is written there
    (0: sol1, 1: sol2), read here from the files themselves."""
    import json

    rows = local_rows("piqa", data_dir)["validation"]
    goals = [json.loads(line)["goal"] for line in (data_dir / "piqa/valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (data_dir / "piqa/valid-labels.lst").read_text().split()]
    assert [r["goal"] for r in rows] == goals and [r["label"] for r in rows] == labels
    assert rows[0]["goal"].startswith("How do I ready a guinea pig cage") and labels[:3] == [0, 1, 1]


@pytest.mark.parametrize("keep", [slice(None, -1), slice(None, None)], ids=["a-label-short", "a-label-over"])
def test_piqa_labels_one_short_or_over_are_refused(keep, data_dir, tmp_path):
    """A label file one line short would pair the rows with the labels up to the last one and drop it unsaid; one
    line over pairs them with labels of another file: both refused, with the two counts."""
    shutil.copytree(data_dir / "piqa", tmp_path / "piqa")
    labels = (tmp_path / "piqa/valid-labels.lst").read_text().split()[keep]
    if keep.stop is None:
        labels.append("0")
    (tmp_path / "piqa/valid-labels.lst").write_text("\n".join(labels) + "\n")
    with pytest.raises(UsageError, match=f"valid.jsonl has 1838 rows but valid-labels.lst has {len(labels)}$"):
        local_rows("piqa", tmp_path)
