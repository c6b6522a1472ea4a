"""An lm-eval task on local data is a plug-in: a SciQ task defined in a temporary module outside the repository, on a
JSON-lines file of its own, runs through `python -m harness` with HARNESS_PLUGINS and no edit to any harness file;
the report shows its own table metric from the record alone; an edit of the plug-in refuses the old records; a
clashing or incomplete one is refused naming its module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from plugin_contract import check_local_task_contract

import methods
from harness.errors import UsageError
from harness.quality import local_tasks, long_tasks

MODULE = "pd_harness_test_local_sciq"
PLUGIN = textwrap.dedent('''
    """`sciq`: SciQ's test split from a local JSON-lines file, scored by lm-eval's own sciq YAML."""

    from pathlib import Path

    from harness.quality.local_tasks import register_task
    from harness.quality.local_tasks.base import LocalTask, jsonl


    @register_task
    class {cls}(LocalTask):
        name = "{name}"
        files = ("sciq/test.jsonl",)  # relative to --data-dir
        splits = ("test",)
        upstream = "sciq/sciq.yaml"  # relative to lm_eval/tasks: prompt, choices, target and metrics unchanged
        table_metric = "acc_norm"
        title = "SciQ"  # its column in the report's tables (default: its name)

        @classmethod
        def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
            fields = ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer")
            return {{"test": jsonl(cls.path(data_dir), fields)}}

        {extra}
''')
FACTS = [("Water boils at 100 degrees at sea level.", "At what temperature does water boil?", "50", "0", "200", "100"),
         ("Plants make food by photosynthesis.", "How do plants make food?", "respiration", "digestion", "rust",
          "photosynthesis"),
         ("The heart pumps blood.", "Which organ pumps blood?", "lung", "liver", "kidney", "heart"),
         ("Iron is a metal.", "Which of these is a metal?", "oxygen", "carbon", "neon", "iron"),
         ("The Earth orbits the Sun.", "What does the Earth orbit?", "the Moon", "Mars", "Jupiter", "the Sun"),
         ("Ice is frozen water.", "What is ice?", "frozen air", "liquid rock", "hot gas", "frozen water")]
KEYS = ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer")


def _write_plugin(folder, name="sciq", module=MODULE, extra=""):
    """The plug-in module, `extra` (one line) ending its class body."""
    (folder / f"{module}.py").write_text(PLUGIN.format(name=name, cls="SciQ", extra=extra))


@pytest.fixture
def outside(tmp_path):
    """A plug-in module and a data dir holding only its file, both outside the repository."""
    _write_plugin(tmp_path)
    data = tmp_path / "data"
    (data / "sciq").mkdir(parents=True)
    (data / "sciq" / "test.jsonl").write_text("".join(json.dumps(dict(zip(KEYS, f))) + "\n" for f in FACTS))
    return tmp_path, data


def _harness(folder, *args):
    env = {**os.environ, "HARNESS_PLUGINS": MODULE, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


def test_an_outside_local_task_runs_and_reports_its_own_metric_from_the_record(outside, cli):
    from harness.store import records
    from reports.collect import metric_for
    from reports.formats import to_markdown
    from reports.tables import quality_table

    folder, data = outside
    out = folder / "run"
    run = ("--methods", "unpruned", "--tasks", "sciq", "--limit", 5, "--model", "random:tiny", "--data-dir", data,
           "--out", out, "-q")
    r = _harness(folder, *run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not local_tasks.is_local_task("sciq")  # this process never loaded the plug-in: what follows reads records
    (rec,) = records.load_dir(out)
    assert rec.n_samples["sciq"] == 5 and set(rec.scores["sciq"]) >= {"acc", "acc_norm"}
    assert rec.lm_eval["metric_convention"] == {"sciq": "acc_norm"} and rec.lm_eval["task_titles"] == {"sciq": "SciQ"}
    inputs = rec.extra["inputs"]
    assert inputs["code"]["tasks"]["sciq"].keys() == {MODULE} and inputs["data"]["sciq"]
    # acc and acc_norm of 5 items may agree: set them apart, then the table must show acc_norm
    rec.scores["sciq"] = {"acc": {"value": 0.2, "stderr": 0.1}, "acc_norm": {"value": 0.8, "stderr": 0.1}}
    assert metric_for("sciq", rec.scores["sciq"], "paper", rec) == "acc_norm"
    assert metric_for("sciq", rec.scores["sciq"], "acc", rec) == "acc"
    md = to_markdown(quality_table([rec]))
    assert "| unpruned | 0 | 80.0 ± 10.0 |" in md and "acc elsewhere; acc_norm for SciQ (the task's own)" in md
    assert "| Method | Removed | SciQ | Avg | KV × |" in md  # its declared title, from the record
    assert {row["metric"] for row in records.summary_rows([rec]) if row["primary"]} == {"acc_norm"}
    # the report in this process, which never loaded the plug-in (asserted above) and has no HARNESS_PLUGINS
    assert "HARNESS_PLUGINS" not in os.environ
    rep = cli("report", out, "--no-plots")
    assert not local_tasks.is_local_task("sciq")
    assert rep.returncode == 0 and "acc_norm for SciQ" in (out / "report" / "tables" / "quality.md").read_text(), rep.stderr

    # an edited plug-in: its records are not reused, the refusal names the task and the module
    _write_plugin(folder, extra="# edited")
    again = _harness(folder, *run)
    assert again.returncode == 2 and f"the code of plug-in task sciq ({MODULE})" in again.stderr, again.stderr[-2000:]


def test_the_outside_task_honours_the_contract_and_stays_out_of_the_standard_alias(outside, monkeypatch):
    from harness.cli.run import check_tasks
    from harness.config import RunConfig, expand_tasks
    from harness.run import pipeline
    from harness.run.progress import work_of
    from harness.store.task_names import STANDARD_TASKS

    folder, data = outside
    monkeypatch.syspath_prepend(str(folder))
    try:
        methods.load_plugins(MODULE)
        check_local_task_contract("sciq", data)
        check_tasks(("arc_easy", "sciq"), str(data))
        assert expand_tasks(["standard"]) == STANDARD_TASKS  # the paper's set: a plug-in task runs when named
        cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("sciq",), data_dir=str(data), limit=4)
        assert work_of(cfg, pipeline.prepare(cfg)).items == {"sciq": 4}  # its JSON lines counted up front
    finally:
        local_tasks.unregister_task("sciq")
        sys.modules.pop(MODULE, None)


@pytest.fixture
def registries():
    saved = dict(local_tasks._REGISTRY), dict(long_tasks._REGISTRY)
    yield
    for live, old in zip((local_tasks._REGISTRY, long_tasks._REGISTRY), saved):
        live.clear()
        live.update(old)


@pytest.mark.parametrize("name, extra, says", [
    ("arc_easy", "", "lm-eval task on local data 'arc_easy' is already registered by harness.quality.local_tasks.arc.ArcEasy"),
    ("passkey", "", "'passkey' (pd_harness_test_clash): the name is a long-context task, an MMLU subtask or a --tasks alias"),
    ("standard", "", "'standard' (pd_harness_test_clash): the name is a long-context task"),
    ("mmlu_anatomy", "", "'mmlu_anatomy' (pd_harness_test_clash): the name is a long-context task, an MMLU subtask"),
    ("sci/q", "", "lm-eval task on local data name 'sci/q' is not usable; a name is 1-200 letters"),
    ("sci,q", "", "lm-eval task on local data name 'sci,q' is not usable; a name is 1-200 letters"),
    ("sciq", "files = ()", "`files` must be a non-empty tuple of paths relative to the data dir"),
    ("sciq", "splits = ('test', 'tset')", "`splits` must be a non-empty tuple of train, validation, test, dev"),
    ("sciq", "upstream = 'sciq'", "`upstream` must be lm-eval's task YAML relative to lm_eval/tasks"),
    ("sciq", "upstream = '/x/sciq.yaml'", "`upstream` must be lm-eval's task YAML relative to lm_eval/tasks"),
    ("sciq", "load = None", "`load(cls, data_dir, subtask=None)` must be a classmethod of its own"),
    ("sciq", "title = ' '", "`title` must be the text of its column in the report's tables, e.g. 'SciQ', or None"),
    ("sciq", "title = ('SciQ',)", "`title` must be the text of its column in the report's tables"),
])
def test_a_clashing_or_incomplete_local_task_is_refused_naming_its_module(name, extra, says, tmp_path, monkeypatch,
                                                                           registries):
    _write_plugin(tmp_path, name, "pd_harness_test_clash", extra)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UsageError) as e:
            methods.load_plugins("pd_harness_test_clash")
    finally:
        sys.modules.pop("pd_harness_test_clash", None)
    assert str(e.value).startswith("HARNESS_PLUGINS names 'pd_harness_test_clash', which failed to load: ValueError: ")
    assert says in str(e.value), str(e.value)
    assert local_tasks.get("arc_easy").__module__ == "harness.quality.local_tasks.arc"
    assert all(local_tasks.get(n).__module__ != "pd_harness_test_clash" for n in local_tasks.names())


def test_a_long_context_task_cannot_take_a_plugin_local_tasks_name(outside, monkeypatch, registries):
    from harness.quality.long_tasks.passkey import Passkey

    folder, _ = outside
    monkeypatch.syspath_prepend(str(folder))
    try:
        methods.load_plugins(MODULE)
        with pytest.raises(ValueError, match="'sciq': the name is an lm-eval task with local data"):
            long_tasks.register_task(type("SciqPasskey", (Passkey,), {"name": "sciq"}))
    finally:
        sys.modules.pop(MODULE, None)


def test_the_builtin_tasks_table_metrics_are_the_fallback_older_records_get():
    """Records without `metric_convention` render with records.PRIMARY_METRIC: today it equals the tasks' own."""
    from harness.store.records import PRIMARY_METRIC

    assert set(PRIMARY_METRIC) <= set(local_tasks.names())
    assert {n: local_tasks.get(n).table_metric for n in local_tasks.names()} == \
        {n: PRIMARY_METRIC.get(n, "acc") for n in local_tasks.names()}


def test_the_documented_sciq_task_is_the_tested_one_and_plugs_in(outside, monkeypatch):
    """docs/adding.md's SciQ block, as an outside module: the same code this file runs end to end, honouring the
    contract on the outside data."""
    import re

    folder, data = outside
    text = (ROOT / "docs" / "adding.md").read_text()
    code = re.search(r"## An lm-eval task on local data.*?```python\n(.*?)```", text, re.S).group(1)
    assert code.strip() == PLUGIN.format(name="sciq", cls="SciQ", extra="").strip()
    (folder / "pd_harness_doc_sciq.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    try:
        methods.load_plugins("pd_harness_doc_sciq")
        check_local_task_contract("sciq", data)
        assert len(local_tasks.get("sciq").load(data)["test"]) == len(FACTS)
    finally:
        local_tasks.unregister_task("sciq")
        sys.modules.pop("pd_harness_doc_sciq", None)


DROP_SUPPORT = ("load = classmethod(lambda cls, data_dir, subtask=None: {'test': [{k: v for k, v in r.items() if k "
                "!= 'support'} for r in jsonl(cls.path(data_dir))]})")


# the scored split whole, and a training split (few-shot examples only) lacking `support`
SHOTS_LACK_SUPPORT = ("splits = ('test', 'train')\n    load = classmethod(lambda cls, data_dir, subtask=None: {'test': "
                      "jsonl(cls.path(data_dir)), 'train': [{k: v for k, v in r.items() if k != 'support'} for r in "
                      "jsonl(cls.path(data_dir))]})")


@pytest.mark.parametrize("shots, extra", [(0, DROP_SUPPORT), (1, SHOTS_LACK_SUPPORT)])
def test_a_loader_whose_rows_lack_a_field_is_refused_before_the_model_loads(outside, monkeypatch, registries, cli,
                                                                            shots, extra):
    """The missing field was found only once the model had loaded (and each cell had planned), once per cell (a
    failed-cell note each; in the few-shot split jinja2's bare error, exit 1): the run builds the tasks on local data
    first, renders the first row of each split it uses, and exits 2 without loading the model."""
    import harness.pd.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the task's rows were checked")

    folder, data = outside
    _write_plugin(folder, module="pd_harness_test_no_support_run", extra=extra)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(harness.pd.models, "load_model", no_model)
    out = folder / "run"
    try:
        methods.load_plugins("pd_harness_test_no_support_run")
        r = cli("--methods", "unpruned", "--mode", "both", "--tasks", "sciq", "--limit", 3, "--model", "random:tiny",
                "--data-dir", data, "--out", out, "--num-fewshot", shots, "-q")
    finally:
        sys.modules.pop("pd_harness_test_no_support_run", None)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("task sciq: lm-eval's sciq/sciq.yaml reads a field that the rows of "
                          "pd_harness_test_no_support_run.SciQ.load lack ('support' is undefined)") == 1, r.stderr[-3000:]
    assert not list(out.glob("*.json"))  # no cell ran: no record, resume state or failed-cell note


def test_a_loader_whose_rows_lack_a_field_the_upstream_yaml_reads_is_named(outside, monkeypatch, registries):
    """lm-eval's sciq YAML reads `support`; a loader that drops it failed each cell with jinja2's bare "'support' is
    undefined" (exit 1, naming neither the task nor the plug-in), and the contract check passed it."""
    from harness.errors import PluginContractError
    from harness.quality.evaluate import TaskCache

    folder, data = outside
    _write_plugin(folder, module="pd_harness_test_no_support", extra=DROP_SUPPORT)
    monkeypatch.syspath_prepend(str(folder))
    try:
        methods.load_plugins("pd_harness_test_no_support")
        tasks = TaskCache(["sciq"], data)
        try:
            with pytest.raises(PluginContractError) as e:
                tasks.get("sciq")
        finally:
            tasks.close()
        assert str(e.value).startswith("task sciq: lm-eval's sciq/sciq.yaml reads a field that the rows of "
                                       "pd_harness_test_no_support.SciQ.load lack ('support' is undefined)")
        assert "\n" not in str(e.value)
        with pytest.raises(PluginContractError, match="pd_harness_test_no_support.SciQ.load lack"):
            check_local_task_contract("sciq", data)
    finally:
        sys.modules.pop("pd_harness_test_no_support", None)


@pytest.mark.parametrize("name", ["bertaqa_en_mt_latxa-7b-v1.1", "egymmlu_arabic_language_(general)", "1.5", "null",
                                  "arabic_leaderboard_arabic_mmlu_high_school_government_and_politics_light"])
def test_a_local_task_takes_the_name_lm_eval_gives_its_task(name, tmp_path, monkeypatch, registries):
    from lm_eval.tasks._yaml_loader import load_yaml

    from harness.quality.tasks import write_overrides

    """A plug-in is named as lm-eval names the task (its hub task without --data-dir): lm-eval 0.4.13 has names with
    '.', parentheses and more than 64 characters, which the methods' name rule (a record's file name) refuses."""
    _write_plugin(tmp_path, name, "pd_harness_test_lm_eval_name")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        methods.load_plugins("pd_harness_test_lm_eval_name")
        assert local_tasks.get(name).__module__ == "pd_harness_test_lm_eval_name"
        (tmp_path / "yamls").mkdir()
        assert write_overrides([name], tmp_path, tmp_path / "yamls", {name: tmp_path / "sciq.yaml"}) == [name]
        written = load_yaml(tmp_path / "yamls" / f"{name}.yaml", resolve_func=False, recursive=False)
        assert written["task"] == name and written["dataset_kwargs"]["harness_task"] == name
    finally:
        sys.modules.pop("pd_harness_test_lm_eval_name", None)


def test_a_plugin_tasks_missing_file_says_where_to_put_it_not_the_shared_layout(outside, monkeypatch, registries):
    """'--data-dir must be laid out like ../shared/data' was said for a plug-in's own file, and when no --data-dir
    was given ($HARNESS_DATA_DIR): it names the plug-in class that reads the file and both places the dir comes from."""
    from harness.quality.tasks import check_files

    folder, data = outside
    monkeypatch.syspath_prepend(str(folder))
    try:
        methods.load_plugins(MODULE)
        (data / "sciq" / "test.jsonl").unlink()
        with pytest.raises(UsageError) as e:
            check_files(["sciq"], data)
    finally:
        sys.modules.pop(MODULE, None)
    assert f"missing data file {data}/sciq/test.jsonl (needed by task sciq); put it there: {MODULE}.SciQ reads it " \
           "relative to the data dir (--data-dir, else $HARNESS_DATA_DIR)" == str(e.value)
    with pytest.raises(UsageError, match=r"\(needed by task piqa\); the data dir \(--data-dir, else \$HARNESS_DATA_DIR\) "
                                         r"must be laid out like \.\./shared/data"):
        check_files(["piqa"], data)


def test_the_recorded_table_metric_falls_back_to_an_own_yamls_first_metric_only_where_it_lacks_the_usual_one():
    """task_record.primary_metric: an --include-path task (`own`) keeps lm-eval's usual metric when its scores hold it,
    whatever its metric_list's order; its first metric only when they lack it; a task that is not `own` keeps its
    usual metric (a local task's table_metric) whatever its scores hold."""
    from harness.run.task_record import primary_metric

    assert primary_metric("my_t", {"acc_norm": 0.5, "acc": 0.4}, own={"my_t"}) == "acc"
    assert primary_metric("my_t", {"exact_match": 0.5, "bleu": 3.0}, own={"my_t"}) == "exact_match"
    assert primary_metric("arc_challenge", {"acc": 0.3}, own=()) == "acc_norm"  # the plug-in's table_metric
    assert primary_metric("arc_challenge", {"acc": 0.3}, own={"arc_challenge"}) == "acc"  # an own YAML of that name
    assert primary_metric("arc_easy", {"exact_match": 0.5}, own=()) == "acc"
