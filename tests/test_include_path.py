"""lm-eval task YAMLs of the user's own (`--include-path DIR`, lm-eval's `--include_path`): a multiple-choice YAML on a
JSON-lines file runs offline in both PD settings, with and without --data-dir, and reports; an edit of the YAML, its
`!function` module or its data refuses the old records; bad folders, unknown names and names the harness runs itself
exit 2 naming them; a run without the option keeps its run key and record shape."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.errors import HarnessWarning, UsageError
from harness.store import records

TASK = "my_mc"
ROWS = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7), str(i)], "answer": i % 3}
        for i in range(6)]


def _yaml(data, task=TASK, extra=""):
    return textwrap.dedent(f"""\
        task: {task}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        process_docs: !function utils.process_docs
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """) + extra


@pytest.fixture
def own(tmp_path):
    """A folder holding one task YAML, its `!function` module and its data file (named by absolute path)."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    data = folder / "my_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "my_mc.yaml").write_text(_yaml(data))
    (folder / "utils.py").write_text("def process_docs(dataset):\n    return dataset\n")
    return folder


def _run(cli, own, out, *extra, data_dir=None):
    return cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", TASK, "--limit", 4, "--include-path", own,
               "--out", out, "-q", *extra, data_dir=data_dir)


def test_own_yaml_task_runs_offline_in_both_pd_settings_and_reports(cli, own, tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)  # lm-eval's own index plus the folder (the hub path)
    out = tmp_path / "run"
    r = _run(cli, own, out, "--mode", "both")
    assert r.returncode == 0, r.stderr[-3000:]
    by_mode = {rec.mode: rec for rec in records.load_dir(out)}
    assert set(by_mode) == {"unified", "disaggregated"}
    for rec in by_mode.values():
        assert rec.n_samples == {TASK: 4} and "acc" in rec.scores[TASK]
        assert rec.config["include_path"] == [str(own)]
        assert set(rec.extra["inputs"]["include"][str(own)]) == {"files", "data"}
    assert by_mode["disaggregated"].kv[TASK]["kv_bytes"] > 0 and not by_mode["unified"].kv
    # the unpruned model scores every item alike in both settings (the handoff is exact)
    assert by_mode["unified"].extra["items"][TASK] == by_mode["disaggregated"].extra["items"][TASK]
    rep = cli("report", out, "--no-plots")
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert f"| {TASK} |" in (out / "report" / "tables" / "quality.md").read_text()


@pytest.mark.parametrize("edit, what", [
    (lambda f: (f / "my_mc.yaml").write_text((f / "my_mc.yaml").read_text().replace("Answer:", "A:")),
     "the task YAMLs and Python files under --include-path"),
    (lambda f: (f / "utils.py").write_text((f / "utils.py").read_text() + "# edited\n"),
     "the task YAMLs and Python files under --include-path"),
    (lambda f: (f / "my_mc.jsonl").write_text((f / "my_mc.jsonl").read_text().replace("plus", "and")),
     "the data files named by the task YAMLs under --include-path"),
], ids=["yaml", "function-module", "data"])
def test_an_edit_under_the_include_path_refuses_the_old_records(cli, own, tmp_path, data_dir, edit, what):
    out = tmp_path / "run"
    assert _run(cli, own, out, data_dir=data_dir).returncode == 0
    again = _run(cli, own, out, data_dir=data_dir)
    assert again.returncode == 0 and "finished record found, reused" in again.stderr  # unchanged: reused
    edit(own)
    refused = _run(cli, own, out, data_dir=data_dir)
    assert refused.returncode == 2 and f"{what} {own} changed" in refused.stderr, refused.stderr[-2000:]


def test_a_copied_include_folder_reuses_the_records_and_an_edit_there_refuses_them(cli, own, tmp_path, data_dir,
                                                                                    monkeypatch):
    """Run keys hold the folders' paths, so a copy elsewhere (a clone of the repository, a moved folder) refused every
    record as another configuration and found no default --out; the path alone no longer decides: the digests of
    what the folders hold do, folder by folder in the order given."""
    from harness.cli.run import default_out, run_config, run_parser
    from harness.run import pipeline

    out = tmp_path / "run"
    assert _run(cli, own, out, "--mode", "both", data_dir=data_dir).returncode == 0
    copy = tmp_path / "clone" / "my_tasks"
    shutil.copytree(own, copy)
    evaluated, real = [], pipeline._eval_task
    monkeypatch.setattr(pipeline, "_eval_task", lambda st, *a: evaluated.append(a[1]) or real(st, *a))
    again = _run(cli, copy, out, "--mode", "both", data_dir=data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert evaluated == []  # nothing evaluated again
    for mode in ("unified", "disaggregated"):
        assert f"unpruned/{mode}: record made with --include-path {own}; reused" in again.stderr
    configs = [run_config(run_parser().parse_args(["--tasks", TASK, "--include-path", str(f)])) for f in (own, copy)]
    assert configs[0].include_path != configs[1].include_path and configs[0].run_id() == configs[1].run_id()
    earlier = tmp_path / "runs" / f"20260101-0000_unpruned_{configs[0].run_id(include_paths=True)}"
    earlier.mkdir(parents=True)  # named by a version whose id hashed the include folders' paths: found again
    assert default_out(configs[0], tmp_path / "runs") == earlier
    # reports take a record made from the copy for one of the same configuration, unless the copy held other files
    import dataclasses

    from reports.collect import same_configuration

    made = records.load(out / records.record_filename("unpruned", "unified"))
    held = made.inputs()["include"][str(own)]
    there = [dataclasses.replace(made, config={**made.config, "include_path": [str(copy)]},
                                 extra={**made.extra, "inputs": {**made.inputs(), "include": {str(copy): h}}})
             for h in (held, {**held, "files": "0" * 16})]
    assert same_configuration(made, there[0]) and not same_configuration(made, there[1])
    (copy / "my_mc.yaml").write_text((copy / "my_mc.yaml").read_text().replace("Answer:", "A:"))
    refused = _run(cli, copy, out, "--mode", "both", data_dir=data_dir)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"unpruned__unified.json (the task YAMLs and Python files under --include-path {copy} changed" in refused.stderr
    assert evaluated == []


def test_an_interrupted_cell_resumes_from_a_copied_include_folder(cli, own, tmp_path, data_dir, monkeypatch):
    """A resume state records the folders, as it does the data folder: the task done before the interruption is kept."""
    from harness.run import pipeline

    evaluated, real = [], pipeline._eval_task

    def interrupted(st, lm, task, name, mode):
        evaluated.append(task)
        if task == "arc_easy" and evaluated.count("arc_easy") == 1:
            raise KeyboardInterrupt
        return real(st, lm, task, name, mode)

    monkeypatch.setattr(pipeline, "_eval_task", interrupted)
    out = tmp_path / "run"
    assert _run(cli, own, out, "--tasks", f"{TASK},arc_easy", data_dir=data_dir).returncode == 130  # Ctrl-C
    assert evaluated == [TASK, "arc_easy"] and (out / "unpruned__disaggregated.partial.json").exists()
    copy = tmp_path / "clone" / "my_tasks"
    shutil.copytree(own, copy)
    resumed = _run(cli, copy, out, "--tasks", f"{TASK},arc_easy", data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert evaluated == [TASK, "arc_easy", "arc_easy"]  # my_mc came from the resume state
    (rec,) = records.load_dir(out)
    assert set(rec.scores) == {TASK, "arc_easy"} and rec.config["include_path"] == [str(copy)]


def test_bad_include_folders_and_unknown_names_exit_2_naming_them(cli, own, tmp_path, data_dir):
    out = tmp_path / "run"
    r = _run(cli, tmp_path / "missing", out, data_dir=data_dir)
    assert r.returncode == 2 and f"--include-path {tmp_path / 'missing'}: no such folder" in r.stderr
    yml = tmp_path / "yml_only"
    yml.mkdir()
    (yml / "t.yml").write_text(_yaml(own / "my_mc.jsonl"))
    r = _run(cli, yml, out, data_dir=data_dir)
    assert r.returncode == 2 and f"--include-path {yml}: holds no task YAML (its .yml files are not read" in r.stderr
    r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", "my_mcq", "--include_path", own, "--out", out,
            data_dir=data_dir)
    assert r.returncode == 2 and "unknown task(s) my_mcq" in r.stderr and f"--include-path {own} define: {TASK}" in r.stderr
    r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", "my_mcq", "--out", out, data_dir=data_dir)
    assert r.returncode == 2 and "a task YAML of your own: --include-path DIR" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name, which", [("passkey", "long-context task"), ("arc_easy", "lm-eval task on local data")])
def test_a_yaml_defining_a_task_the_harness_runs_itself_is_refused(cli, own, tmp_path, data_dir, name, which):
    (own / "clash.yaml").write_text(_yaml(own / "my_mc.jsonl", task=name))
    r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", name, "--include-path", own,
            "--out", tmp_path / "run", data_dir=data_dir)
    assert r.returncode == 2 and f"task {name} is defined by {own / 'clash.yaml'} and is the harness's own {which}" in r.stderr


def test_a_group_of_the_folder_is_a_task_name_too(cli, own, tmp_path, data_dir):
    (own / "group.yaml").write_text("group: my_group\ntask:\n  - my_mc\naggregate_metric_list:\n"
                                    "  - metric: acc\n    weight_by_size: true\n")
    out = tmp_path / "run"
    r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", "my_group", "--limit", 3, "--include-path", own,
            "--out", out, "-q", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records.load_dir(out)
    assert rec.n_samples == {"my_group": 3} and "acc" in rec.scores["my_group"]


def test_a_generation_task_of_ones_own_shows_its_own_metric(cli, own, tmp_path, data_dir):
    (own / "gen.jsonl").write_text("".join(json.dumps({"q": r["question"], "a": r["choices"][0]}) + "\n" for r in ROWS))
    (own / "gen.yaml").write_text(textwrap.dedent(f"""\
        task: my_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {own / "gen.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{q}}}}\\nA:"
        doc_to_target: "{{{{a}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 3
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    out = tmp_path / "run"
    r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", f"my_gen,{TASK}", "--limit", 2, "--include-path",
            own, "--out", out, "-q", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records.load_dir(out)
    assert "acc" not in rec.scores["my_gen"] and "exact_match" in rec.scores["my_gen"]
    assert rec.lm_eval["metric_convention"] == {"my_gen": "exact_match", TASK: "acc"}  # a task with acc keeps acc
    assert "exact_match for my_gen" in cli("report", out, "--no-plots").stdout + (out / "report" / "tables" /
                                                                                  "quality.md").read_text()


def test_with_a_data_dir_the_task_manager_indexes_the_include_folders_and_the_local_tasks_only(own, data_dir, tmp_path):
    from harness.quality.tasks import task_manager

    work = tmp_path / "work"
    work.mkdir()
    tm = task_manager(["arc_easy", TASK], data_dir, work, include_path=[own])
    assert {"arc_easy", TASK} <= set(tm.all_tasks) and "hellaswag" not in tm.all_tasks
    assert len(tm.load([TASK])["tasks"][TASK].eval_docs) == len(ROWS)


def test_without_a_data_dir_own_tasks_are_built_without_indexing_lm_evals_yamls(own, tmp_path):
    """The run's tasks, all defined in the folders: an index of the folders alone (the whole one took ~12 s a run),
    whose task is built as before: its rows, its metric."""
    from harness.quality.tasks import task_manager

    tm = task_manager([TASK, "pd_ppl"], None, include_path=[own])  # a long-context task needs no lm-eval YAML
    assert set(tm.all_tasks) == {TASK}
    built = tm.load([TASK])["tasks"][TASK]
    assert len(built.eval_docs) == len(ROWS) and [m["metric"] for m in built.config.metric_list] == ["acc"]


@pytest.mark.parametrize(("wanted", "extra"), [
    ([TASK, "arc_easy"], ""),  # a hub task beside the folder's
    (["my_group"], ""),  # a group, whose members may be lm-eval's
    (["my_tag"], "tag: my_tag\n"),  # a tag, which gathers tasks of every folder
])
def test_without_a_data_dir_any_other_task_keeps_lm_evals_whole_index(own, monkeypatch, wanted, extra):
    import lm_eval.tasks

    from harness.quality.tasks import task_manager

    (own / "my_mc.yaml").write_text((own / "my_mc.yaml").read_text() + extra)
    (own / "my_group.yaml").write_text(f"group: my_group\ntask:\n  - {TASK}\n  - arc_easy\n")
    made, real = [], lm_eval.tasks.TaskManager

    def manager(**kwargs):  # the folder's own index is real (it decides); lm-eval's whole one is only recorded
        made.append(kwargs)
        return real(**kwargs) if not kwargs["include_defaults"] else None

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)
    task_manager(wanted, None, include_path=[own])
    assert made == [{"include_path": [str(own)], "include_defaults": False}, {"include_path": [str(own)], "include_defaults": True}]


def test_a_run_without_include_path_keeps_its_run_key_and_record_shape():
    plain = RunConfig(model="random:tiny", tasks=("arc_easy",))
    own = RunConfig(model="random:tiny", tasks=("arc_easy",), include_path=("/somewhere",))
    assert "include_path" not in plain._canonical() and "include_path" not in plain.recorded()
    assert own.recorded()["include_path"] == ("/somewhere",)
    assert plain.identity("unpruned", "unified", {}, None) != own.identity("unpruned", "unified", {}, None)
    assert plain.run_id() != own.run_id()
    from harness.run.inputs import digests

    assert "include" not in digests(plain) and set(digests(own)["include"]) == {"/somewhere"}


def test_the_files_digested_follow_includes_and_lm_evals_data_file_rules(tmp_path, monkeypatch):
    from harness.quality import include_tasks

    folder, shared, data = tmp_path / "tasks", tmp_path / "shared", tmp_path / "data"
    for d in (folder / "sub", shared, data / "parts"):
        d.mkdir(parents=True)
    (shared / "base.yaml").write_text(f"dataset_path: json\ndataset_kwargs:\n  data_dir: {data}\n"
                                      "  data_files: {test: 'parts/*.jsonl'}\n")
    (folder / "sub" / "t.yaml").write_text("include: ../../shared/base.yaml\ntask: t\n")
    (folder / "u.yaml").write_text("task: u\ndataset_path: json\ndataset_kwargs:\n  data_files: rel.jsonl\n")
    for f in (data / "parts" / "a.jsonl", data / "parts" / "b.jsonl", tmp_path / "rel.jsonl"):
        f.write_text("{}\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.yaml").write_text("task: cached\n")
    monkeypatch.chdir(tmp_path)  # a relative data_files path is read from the current folder, as `datasets` does
    assert include_tasks.code_files(folder) == [folder / "sub" / "t.yaml", folder / "u.yaml", shared / "base.yaml"]
    assert include_tasks.data_files(folder) == [data / "parts" / "a.jsonl", data / "parts" / "b.jsonl",
                                                tmp_path / "rel.jsonl"]
    assert set(include_tasks.defined_names([folder])) == {"t", "u"}


def test_a_data_file_the_yaml_names_that_is_not_there_is_refused_before_the_model_loads(own, tmp_path, monkeypatch):
    """A relative data_files path is read from the current folder: from elsewhere the run loaded the model and failed
    each cell with `datasets`' "Unable to find '/cwd/my_mc.jsonl'" (exit 1), naming neither the YAML nor the rule."""
    from harness.cli.check_tasks import check_tasks

    (own / "my_mc.yaml").write_text(_yaml("my_mc.jsonl"))  # relative to the YAML's folder, as one writes it first
    (own / "group.yaml").write_text("group: my_group\ntask:\n  - my_mc\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in (TASK, "my_group"):
        with pytest.raises(UsageError) as e:
            check_tasks((name,), None, (str(own),))
        assert str(e.value) == (f"task {TASK} ({own / 'my_mc.yaml'}): dataset_kwargs.data_files 'my_mc.jsonl' matches no "
                                f"file: a relative path is read from the current folder ({elsewhere}), not from the "
                                f"YAML's folder; {own / 'my_mc.jsonl'} exists: give that absolute path")
    (own / "my_mc.yaml").write_text(_yaml(tmp_path / "gone.jsonl"))
    with pytest.raises(UsageError, match=f"data_files '{tmp_path / 'gone.jsonl'}' matches no file$"):
        check_tasks((TASK,), None, (str(own),))
    (own / "my_mc.yaml").write_text(_yaml("my_mc.jsonl"))
    monkeypatch.chdir(own)  # run from the folder the path is relative to: it is found
    check_tasks((TASK, "my_group"), None, (str(own),))


def test_an_unknown_task_names_the_yamls_lm_eval_could_not_read(own, tmp_path):
    """lm-eval's index skips a YAML it cannot parse with a debug-level log line: the run only said the task was
    unknown and that the folder defines "none"."""
    from harness.cli.check_tasks import check_tasks

    (own / "broken.yaml").write_text(_yaml(own / "my_mc.jsonl", task="br_mc").replace("output_type: multiple_choice",
                                                                                       "output_type: [multiple_choice"))
    with pytest.raises(UsageError) as e:
        check_tasks(("br_mc",), None, (str(own),))
    msg = str(e.value)
    assert msg.startswith("unknown task(s) br_mc;") and f"--include-path {own} define: {TASK};" in msg
    assert f"lm-eval skips 1 YAML(s) there it cannot read: {own / 'broken.yaml'} (ParserError: while parsing" in msg
    assert "line 7" in msg and "\n" not in msg  # where in the file, on the one line


def test_rows_lacking_a_field_the_template_reads_name_the_task_and_its_yaml(own, data_dir):
    from harness.quality.evaluate import TaskCache

    (own / "my_mc.jsonl").write_text("".join(json.dumps({"q": r["question"], "choices": r["choices"],
                                                         "answer": r["answer"]}) + "\n" for r in ROWS))
    tasks = TaskCache([TASK], data_dir, (str(own),))
    try:
        with pytest.raises(UsageError) as e:
            tasks.get(TASK)
    finally:
        tasks.close()
    assert str(e.value).startswith(f"task {TASK} ({own / 'my_mc.yaml'}): its template reads a field that its data's "
                                   "rows lack ('question' is undefined)")


def test_rows_lacking_a_field_are_refused_before_the_model_loads(cli, own, tmp_path, monkeypatch):
    """lm-eval renders the first row while building the task: that was once the model had loaded, in each cell."""
    import harness.pd.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the task's rows were checked")

    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    monkeypatch.setattr(harness.pd.models, "load_model", no_model)
    (own / "my_mc.jsonl").write_text("".join(json.dumps({"q": r["question"], "choices": r["choices"],
                                                         "answer": r["answer"]}) + "\n" for r in ROWS))
    out = tmp_path / "run"
    r = _run(cli, own, out, "--mode", "both")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count(f"task {TASK} ({own / 'my_mc.yaml'}): its template reads a field that its data's rows lack "
                          "('question' is undefined)") == 1, r.stderr[-3000:]
    assert not list(out.glob("*.json"))  # no cell ran


def test_specs_take_include_path_as_a_list_of_folders(tmp_path):
    from harness.cli.run import run_parser
    from harness.cli.spec import Spec, to_namespace

    parser = run_parser()
    ns = to_namespace(Spec(tmp_path / "s.toml", {"run": {"include_path": ["a", "b"]}}), "run", parser)
    assert ns.include_path == [Path("a"), Path("b")]
    with pytest.raises(UsageError, match="include_path.*expected a path in quotes"):
        to_namespace(Spec(tmp_path / "s.toml", {"run": {"include_path": [3]}}), "run", parser)


def test_own_yaml_named_like_a_local_task_plugin_keeps_neither_its_title_nor_its_metric(cli, own, tmp_path, monkeypatch):
    """Without --data-dir a YAML of yours replaces lm-eval's task of its name, the one a local-data plug-in of that name
    would have run: the record shows your YAML's acc under its name, not the plug-in's table metric and title."""
    from harness.quality import local_tasks
    from harness.quality.local_tasks.base import LocalTask

    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    name = "pd_harness_shadowed_mc"
    both = "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    (own / "shadow.yaml").write_text(_yaml(own / "my_mc.jsonl", task=name, extra=both))

    class Shadowed(LocalTask):
        files, splits, upstream, table_metric, title = ("x.jsonl",), ("test",), "sciq/sciq.yaml", "acc_norm", "Shadowed"

        @classmethod
        def load(cls, data_dir, subtask=None):
            raise AssertionError("an --include-path YAML of its name runs instead")

    Shadowed.name = name
    local_tasks.register_task(Shadowed)
    try:
        out = tmp_path / "run"
        r = cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", name, "--limit", 3, "--include-path", own,
                "--out", out, "-q")
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        local_tasks.unregister_task(name)
    (rec,) = records.load_dir(out)
    assert {"acc", "acc_norm"} <= set(rec.scores[name])
    assert rec.lm_eval["metric_convention"] == {name: "acc"} and "task_titles" not in rec.lm_eval


def test_a_yaml_named_like_a_local_group_is_not_counted_as_the_groups_subtasks(own, tmp_path):
    """Without a data dir an --include-path YAML named `mmlu` is the YAML's task (one test split of 6 rows), but the
    up-front count said 57 subtasks (MMLU's hub count): the run's statement and ETA were off by 57x."""
    from harness.run import progress

    (own / "my_mc.yaml").write_text(_yaml(own / "my_mc.jsonl", task="mmlu"))
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("mmlu",), data_dir=None, limit=4,
                    include_path=(str(own),))
    work = progress.work_of(cfg, type("Prepared", (), {"methods": {"unpruned": None}, "task_options": {}})())
    assert work.items == {"mmlu": None} and "subtasks" not in work.notes["mmlu"]
    plain = progress.work_of(RunConfig(model="random:tiny", methods=("unpruned",), tasks=("mmlu",), data_dir=None,
                                       limit=4), type("Prepared", (), {"methods": {"unpruned": None}, "task_options": {}})())
    assert plain.items == {"mmlu": 57 * 4}  # the group itself keeps its count


def test_every_form_of_local_data_a_yaml_names_is_digested(tmp_path, monkeypatch):
    """The files behind each way a YAML names local data are in the folder's data digest, so an edit of any of them
    refuses the old records: a list of data_files, a data_dir without data_files, a local dataset_path, a group's
    inline task config, and a YAML included by an included YAML (two levels down, outside the folder)."""
    from harness.quality import include_tasks

    folder, lib, data = tmp_path / "tasks", tmp_path / "lib", tmp_path / "data"
    for d in (folder, lib, data / "only_dir", data / "local_ds"):
        d.mkdir(parents=True)
    files = {n: data / n for n in ("l1.jsonl", "l2.jsonl", "only_dir/x.jsonl", "local_ds/y.jsonl", "inline.jsonl",
                                   "deep.jsonl")}
    for f in files.values():
        f.write_text("{}\n")
    (folder / "list.yaml").write_text(f"task: l\ndataset_path: json\ndataset_kwargs:\n  data_files: "
                                      f"[{files['l1.jsonl']}, {files['l2.jsonl']}]\n")
    (folder / "dir.yaml").write_text(f"task: d\ndataset_path: json\ndataset_kwargs:\n  data_dir: {data / 'only_dir'}\n")
    (folder / "path.yaml").write_text(f"task: p\ndataset_path: {data / 'local_ds'}\n")
    (folder / "group.yaml").write_text(f"group: g\ntask:\n  - task: g_inline\n    dataset_path: json\n"
                                       f"    dataset_kwargs:\n      data_files: {files['inline.jsonl']}\n")
    (lib / "deep.yaml").write_text(f"dataset_path: json\ndataset_kwargs:\n  data_files: {files['deep.jsonl']}\n")
    (lib / "mid.yaml").write_text("include: deep.yaml\n")
    (folder / "chain.yaml").write_text(f"include: {lib / 'mid.yaml'}\ntask: c\n")
    (folder / "hub.yaml").write_text("task: h\ndataset_path: json\ndataset_kwargs:\n  data_files: hf://datasets/a/b.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert include_tasks.data_files(folder) == sorted([files["l1.jsonl"], files["l2.jsonl"], data / "only_dir",
                                                       data / "local_ds", files["inline.jsonl"], files["deep.jsonl"]])
    own = [folder / n for n in ("chain.yaml", "dir.yaml", "group.yaml", "hub.yaml", "list.yaml", "path.yaml")]
    assert include_tasks.code_files(folder) == own + [lib / "deep.yaml", lib / "mid.yaml"]


def test_the_include_data_digest_tells_which_file_holds_which_bytes(tmp_path, monkeypatch):
    """Two files a glob names whose bytes move from one to the other (the same bytes in the same order): another
    digest, so the moved rows refuse the old records (a digest of the bytes alone would not see it)."""
    from harness.run.inputs import include_digests

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text(f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: {folder}/part*.jsonl\n")
    (folder / "part1.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (folder / "part2.jsonl").write_text('{"a": 3}\n')
    monkeypatch.chdir(tmp_path)
    before = include_digests([str(folder)])[str(folder)]
    (folder / "part1.jsonl").write_text('{"a": 1}\n')
    (folder / "part2.jsonl").write_text('{"a": 2}\n{"a": 3}\n')
    after = include_digests([str(folder)])[str(folder)]
    assert after["files"] == before["files"] and after["data"] != before["data"]


def test_the_data_file_check_reads_data_dir_group_configs_and_leaves_hub_paths_alone(tmp_path, monkeypatch):
    """check_data_files: a path relative to dataset_kwargs.data_dir is found there (not in the current folder), a
    missing one is named with that folder; an inline task config of a group is checked; hf:// and URLs are not
    local files and are never refused."""
    from harness.quality import include_tasks

    folder, data = tmp_path / "tasks", tmp_path / "data"
    folder.mkdir()
    data.mkdir()
    (data / "rows.jsonl").write_text("{}\n")
    (folder / "dir.yaml").write_text(f"task: d\ndataset_path: json\ndataset_kwargs:\n  data_dir: {data}\n"
                                     "  data_files: rows.jsonl\n")
    (folder / "hub.yaml").write_text("task: h\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     "    test: [hf://datasets/a/b.jsonl, https://example.com/c.jsonl]\n")
    (folder / "group.yaml").write_text("group: g\ntask:\n  - task: g_inline\n    dataset_path: json\n"
                                       "    dataset_kwargs:\n      data_files: gone.jsonl\n")
    monkeypatch.chdir(tmp_path)  # no rows.jsonl here: only data_dir has it
    defined = include_tasks.defined_names([folder])
    include_tasks.check_data_files(["d", "h"], defined)
    (folder / "dir.yaml").write_text((folder / "dir.yaml").read_text().replace("rows.jsonl", "other.jsonl"))
    with pytest.raises(UsageError) as e:
        include_tasks.check_data_files(["d"], defined)
    assert str(e.value) == (f"task d ({folder / 'dir.yaml'}): dataset_kwargs.data_files 'other.jsonl' matches no file "
                            f"in dataset_kwargs.data_dir {str(data)!r} ({data})")
    with pytest.raises(UsageError, match=r"^task g_inline \(.*group.yaml\): dataset_kwargs.data_files 'gone.jsonl' matches no "
                                         r"file: a relative path is read from the current folder"):
        include_tasks.check_data_files(["g"], defined)


def test_num_fewshot_0_is_zero_shot_for_a_yaml_with_its_own_num_fewshot(cli, own, tmp_path):
    """A YAML of one's own with `num_fewshot: 2`: `--num-fewshot 0` (lm-eval's `--num_fewshot 0`) gave each item its 2
    examples, since 0 reached lm-eval as None (the task's own default), while the record said num_fewshot 0."""
    (own / "my_mc.yaml").write_text(_yaml(own / "my_mc.jsonl", extra="fewshot_split: test\nnum_fewshot: 2\n"))
    for shots in (0, 1):
        out = tmp_path / f"run{shots}"
        r = _run(cli, own, out, "--num-fewshot", shots, "--log-samples")
        assert r.returncode == 0, r.stderr[-3000:]
        (rec,) = records.load_dir(out)
        assert rec.config["num_fewshot"] == shots and rec.lm_eval["tasks"][TASK]["n-shot"] == {TASK: shots}
        prompts = [json.loads(line)["arguments"]["gen_args_0"]["arg_0"]
                   for line in (out / "samples" / "unpruned__disaggregated" / f"samples_{TASK}.jsonl").open()]
        assert len(prompts) == 4 and all(p.count("Question:") == 1 + shots for p in prompts)


def test_num_fewshot_given_to_a_yaml_that_fixes_zero_shots_warns_that_it_is_zero_shot(cli, own, tmp_path):
    """lm-eval keeps a YAML's `num_fewshot: 0` over `--num_fewshot N` (an info line in its log): the items were scored
    zero-shot while the record's configuration said N, without a word on the terminal."""
    (own / "my_mc.yaml").write_text(_yaml(own / "my_mc.jsonl", extra="fewshot_split: test\nnum_fewshot: 0\n"))
    out = tmp_path / "run"
    with pytest.warns(HarnessWarning, match=f"--num-fewshot 1: {TASK} set num_fewshot: 0 in its YAML, which lm-eval keeps"):
        r = _run(cli, own, out, "--num-fewshot", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records.load_dir(out)
    assert rec.lm_eval["tasks"][TASK]["n-shot"] == {TASK: 0}
