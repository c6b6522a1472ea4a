"""An interrupted (method, mode) resumes from its finished tasks; records round-trip."""

import json

import pytest

from harness.config import RunConfig
from harness.run import pipeline
from harness.store import records


def test_interrupted_run_resumes_from_finished_tasks(tiny, data_dir, tmp_path, monkeypatch):
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "boolq"), limit=4,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir), batch_size=4)
    real = pipeline.evaluate_task
    calls = []

    def flaky(lm, task, tasks, cfg):
        calls.append(task)
        if task == "boolq" and calls.count("boolq") == 1:
            raise KeyboardInterrupt
        return real(lm, task, tasks, cfg)

    monkeypatch.setattr(pipeline, "evaluate_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    assert not (tmp_path / "unpruned__disaggregated.json").exists()
    assert (tmp_path / "unpruned__disaggregated.partial.json").exists()
    (rec,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    assert calls == ["arc_easy", "boolq", "boolq"]  # arc_easy was not evaluated again
    assert set(rec.scores) == {"arc_easy", "boolq"} and not (tmp_path / "unpruned__disaggregated.partial.json").exists()
    loaded = records.load(tmp_path / "unpruned__disaggregated.json")
    assert loaded == rec


def test_record_loader_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x__y.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(ValueError, match="schema 99"):
        records.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable record"):
        records.load(bad)


def test_plans_are_reused_from_matching_records_only(tiny, data_dir, tmp_path):
    import json

    base = dict(model="random:tiny", tasks=("arc_easy",), limit=2, modes=("disaggregated",), device="cpu",
                data_dir=str(data_dir), batch_size=4)
    first = RunConfig(methods=("shortgpt",), overrides=("shortgpt.k=1",), **base)
    (a,) = pipeline.run(first, tmp_path / "a", loaded=tiny)
    # the stored plan is marked, so reuse is visible; a different k must not reuse it
    path = tmp_path / "a" / "shortgpt__disaggregated.json"
    d = json.loads(path.read_text())
    d["plan"]["info"]["marker"] = "stored"
    path.write_text(json.dumps(d))
    same = RunConfig(methods=("shortgpt",), overrides=("shortgpt.k=1",), plans_from=str(tmp_path / "a"), **base)
    (b,) = pipeline.run(same, tmp_path / "b", loaded=tiny)
    assert b.plan["info"].get("marker") == "stored" and b.config["plan_reused_from"] == str(path)
    assert b.run_key == a.run_key and b.scores == a.scores
    other = RunConfig(methods=("shortgpt",), overrides=("shortgpt.k=2",), plans_from=str(tmp_path / "a"), **base)
    (c,) = pipeline.run(other, tmp_path / "c", loaded=tiny)
    assert "marker" not in c.plan["info"] and c.config["plan_reused_from"] is None and len(c.plan["removed_decode"]) == 2


def test_a_run_into_a_folder_of_another_configuration_refuses_before_any_work(tiny, data_dir, tmp_path):
    """One refused cell used to leave the others running and writing: one folder, two configurations."""
    from harness.errors import UsageError

    base = dict(model="random:tiny", tasks=("arc_easy",), modes=("disaggregated",), device="cpu", data_dir=str(data_dir))
    pipeline.run(RunConfig(methods=("unpruned",), limit=2, **base), tmp_path / "a", loaded=tiny)
    other = RunConfig(methods=("unpruned", "tail"), overrides=("tail.k=1",), limit=3, **base)
    with pytest.raises(UsageError, match=r"holds work of a different configuration: unpruned__disaggregated.json \(run_key"):
        pipeline.run(other, tmp_path / "a", loaded=tiny)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.json")) == ["unpruned__disaggregated.json"]
    # an unfinished cell of another configuration is refused too, not silently thrown away
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tail__disaggregated.partial.json").write_text('{"run_key": "0123456789abcdef", "tasks": {}}')
    with pytest.raises(UsageError, match=r"tail__disaggregated.partial.json \(unfinished, run_key 0123456789abcdef"):
        pipeline.run(other, tmp_path / "b", loaded=tiny)
    assert (tmp_path / "b" / "tail__disaggregated.partial.json").exists()


def test_the_refusal_of_another_configuration_names_what_differs(tiny, data_dir, tmp_path):
    """Adding a task to a run (--tasks and --limit are part of every cell's key) was refused with two run keys and
    nothing about what changed: the refusal names the flags and method options that differ, and only those."""
    from harness.errors import UsageError

    base = dict(model="random:tiny", modes=("disaggregated",), device="cpu", data_dir=str(data_dir), batch_size=4,
                dtype="float32")
    pipeline.run(RunConfig(methods=("tail",), overrides=("tail.k=1",), tasks=("arc_easy",), limit=2, **base),
                 tmp_path, loaded=tiny)
    other = RunConfig(methods=("tail",), overrides=("tail.k=2",), tasks=("arc_easy", "piqa"), limit=3,
                      **{**base, "data_dir": str(data_dir) + "/"})  # the same folder typed another way: not named
    with pytest.raises(UsageError) as refused:
        pipeline.run(other, tmp_path, loaded=tiny)
    said = str(refused.value)
    assert "holds work of a different configuration: tail__disaggregated.json (run_key " in said, said
    assert "; limit=2 there, 3 here, tail.k=1 there, 2 here, tasks=['arc_easy'] there, ['arc_easy', 'piqa'] here)" \
        in said, said
    assert "methods=" not in said and "seed=" not in said and "data_dir" not in said
    # a dtype as older records stored it (`fp32`) is the same dtype: not named beside what really differs
    path = tmp_path / "tail__disaggregated.json"
    stored = json.loads(path.read_text())
    stored["config"]["dtype"] = "fp32"
    path.write_text(json.dumps(stored))
    with pytest.raises(UsageError) as refused:
        pipeline.run(other, tmp_path, loaded=tiny)
    assert "limit=2 there, 3 here" in str(refused.value) and "dtype" not in str(refused.value), str(refused.value)


def test_the_refusal_names_a_sweep_variants_options_as_set_names_them(tiny, data_dir, tmp_path):
    """A sweep's variant (`manual@n_first=1`) had its differing options named `manual@n_first=1.n_last`, which no --set
    takes: they are named by the method, `manual.n_last=0 there, 1 here`."""
    from harness.errors import UsageError

    base = dict(model="random:tiny", modes=("disaggregated",), device="cpu", data_dir=str(data_dir), tasks=("arc_easy",),
                limit=2, methods=("manual",))
    pipeline.run(RunConfig(overrides=("manual.decode_layers=0,1", "manual.n_first=1,2"), **base), tmp_path, loaded=tiny)
    other = RunConfig(overrides=("manual.decode_layers=0,1", "manual.n_first=1,2", "manual.n_last=1"), **base)
    with pytest.raises(UsageError) as refused:
        pipeline.run(other, tmp_path, loaded=tiny)
    said = str(refused.value)
    assert "manual@n_first=1__disaggregated.json (run_key " in said and "; manual.n_last=0 there, 1 here)" in said, said
    assert "manual@n_first=1." not in said, said


def test_a_plan_is_not_reused_from_a_calibration_on_other_data(tiny, data_dir, tmp_path):
    """Same calibration options, other texts (another --data-dir): another calibration, so the plan is made again."""
    import json

    base = dict(model="random:tiny", tasks=("arc_easy",), limit=2, modes=("disaggregated",), device="cpu",
                data_dir=str(data_dir), batch_size=4, overrides=("shortgpt.k=1",), methods=("shortgpt",))
    pipeline.run(RunConfig(**base), tmp_path / "a", loaded=tiny)
    path = tmp_path / "a" / "shortgpt__disaggregated.json"
    d = json.loads(path.read_text())
    d["plan"]["info"]["marker"] = "stored"
    d["calibration"]["token_sha256_16"] = "0" * 16  # as made on other data
    path.write_text(json.dumps(d))
    (b,) = pipeline.run(RunConfig(**base, plans_from=str(tmp_path / "a")), tmp_path / "b", loaded=tiny)
    assert "marker" not in b.plan["info"] and b.config["plan_reused_from"] is None


def test_a_cell_keeps_one_lm_eval_results_file_after_a_kill_before_its_record(tiny, data_dir, tmp_path):
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy",), limit=2, modes=("unified",),
                    device="cpu", data_dir=str(data_dir))
    pipeline.run(cfg, tmp_path, loaded=tiny)
    (tmp_path / "unpruned__unified.json").unlink()  # killed after lm-eval's results file, before the record
    pipeline.run(cfg, tmp_path, loaded=tiny)
    assert len(list((tmp_path / "lm_eval" / "unpruned__unified").glob("results_*.json"))) == 1


def test_ctrl_c_says_what_was_kept(cli, data_dir, tmp_path, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "build_calibration", stop)  # shortgpt's calibration: after unpruned's cell
    args = ["--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", "--set", "shortgpt.k=1"]
    res = cli(*args, "--methods", "shortgpt", "--out", tmp_path / "early", data_dir=data_dir)
    assert res.returncode == 130 and "interrupted: no cell had finished anything yet; rerun" in res.stderr, res.stderr
    res = cli(*args, "--methods", "unpruned,shortgpt", "--out", tmp_path / "late", data_dir=data_dir)
    assert res.returncode == 130 and f"1 finished record(s) kept in {tmp_path / 'late'}" in res.stderr, res.stderr
    assert (tmp_path / "late" / "unpruned__disaggregated.json").is_file()


def test_ctrl_c_mid_cell_says_its_tasks_are_kept_and_the_rerun_says_it_resumes(cli, data_dir, tmp_path, monkeypatch):
    """Only a resume state was left (one task of the cell done): the message said "finished records are kept", and
    the rerun skipped the done task without a word."""
    _ctrl_c_at_the_second_task(monkeypatch)
    run = ("--model", "random:tiny", "--methods", "unpruned", "--mode", "unified", "--tasks", "arc_easy,boolq", "--limit", "2",
           "--out", tmp_path / "o")
    res = cli(*run, data_dir=data_dir)
    assert res.returncode == 130 and f"interrupted: the finished tasks of 1 cell(s) kept in {tmp_path / 'o'}" in res.stderr
    res = cli(*run, data_dir=data_dir)
    assert res.returncode == 0 and "unpruned/unified: resuming: arc_easy kept from an interrupted run" in res.stderr


def test_a_resume_state_of_a_dtype_stored_as_typed_is_resumed(tiny, data_dir, tmp_path, monkeypatch):
    """Versions before full names kept `--dtype fp32` as "fp32" in the run key of a cell's resume state: the same
    command after the change found another configuration's work in its folder and refused it."""
    calls = _ctrl_c_at_the_second_task(monkeypatch)
    base = dict(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "boolq"), limit=2, modes=("unified",),
                device="cpu", data_dir=str(data_dir))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(RunConfig(**base, dtype="fp32"), tmp_path, loaded=tiny)  # as the earlier version stored it
    assert (tmp_path / "unpruned__unified.partial.json").is_file()
    (record,) = pipeline.run(RunConfig(**base, dtype="float32"), tmp_path, loaded=tiny)
    assert calls == ["arc_easy", "boolq", "boolq"] and set(record.scores) == {"arc_easy", "boolq"}


def _mark_plan(path):
    import json

    d = json.loads(path.read_text())
    d["plan"]["info"]["marker"] = "stored"
    path.write_text(json.dumps(d))


def test_a_plan_is_reused_from_a_sweep_siblings_record(tiny, data_dir, tmp_path):
    """`--set tail.k=1,2` stores `tail@k=2__*.json`; a later plain `tail` run with k=2 reuses that plan (the same method,
    named after its option value), not the one of k=1."""
    base = dict(model="random:tiny", tasks=("arc_easy",), limit=2, modes=("disaggregated",), device="cpu",
                data_dir=str(data_dir), methods=("tail",))
    pipeline.run(RunConfig(overrides=("tail.k=1,2",), **base), tmp_path / "a", loaded=tiny)
    sibling = tmp_path / "a" / "tail@k=2__disaggregated.json"
    _mark_plan(sibling)
    (b,) = pipeline.run(RunConfig(overrides=("tail.k=2",), plans_from=str(tmp_path / "a"), **base), tmp_path / "b", loaded=tiny)
    assert b.plan["info"].get("marker") == "stored" and b.config["plan_reused_from"] == str(sibling)
    # and back: a swept variant reuses the plain method's record
    plain = tmp_path / "b" / "tail__disaggregated.json"
    swept = pipeline.run(RunConfig(overrides=("tail.k=1,2",), plans_from=str(tmp_path / "b"), **base), tmp_path / "c",
                         loaded=tiny)
    reused = {r.method: r.config["plan_reused_from"] for r in swept}
    assert reused == {"tail@k=1": None, "tail@k=2": str(plain)}


def test_a_plan_is_not_reused_from_a_run_with_another_seed(tiny, data_dir, tmp_path):
    """--seed makes the random:* model's weights (and the calibration draw): a plan made under another seed is not reused."""
    from harness.run import reuse

    base = dict(model="random:tiny", tasks=("arc_easy",), limit=2, modes=("disaggregated",), device="cpu",
                data_dir=str(data_dir), methods=("tail",), overrides=("tail.k=1",))
    pipeline.run(RunConfig(**base), tmp_path / "a", loaded=tiny)
    _mark_plan(tmp_path / "a" / "tail__disaggregated.json")
    other = RunConfig(seed=1, plans_from=str(tmp_path / "a"), **base)
    assert reuse.why_not_reused(other, pipeline.prepare(other), "tail", "disaggregated") == \
        "tail__disaggregated.json there was made with --seed 0, not 1"
    (b,) = pipeline.run(other, tmp_path / "b", loaded=tiny)
    assert "marker" not in b.plan["info"] and b.config["plan_reused_from"] is None


def test_a_record_older_than_an_option_is_reused_only_when_its_other_options_are_this_runs(data_dir):
    """A record made before `keep_last` existed (now at its default) is this cell's; one that also had another `k`
    is not, even though its run key is what its own options give."""
    from types import SimpleNamespace

    from harness.run import reuse

    cfg = RunConfig(model="random:tiny", methods=("random",), overrides=("random.k=2",), tasks=("arc_easy",),
                    modes=("disaggregated",), data_dir=str(data_dir))
    prepared = pipeline.prepare(cfg)
    method = prepared.methods["random"]
    key, calib, tasks = pipeline.cell_identity(cfg, prepared, "random", method, "disaggregated")
    cell = ("random", "disaggregated", calib, tasks)
    for k, how in ((2, "older options"), (3, None)):
        then = {**method.options(), "k": k}
        del then["keep_last"]  # the record predates the option (its default: 1)
        old = SimpleNamespace(run_key=cfg.identity("random", "disaggregated", then, calib, tasks),
                              config={"method_options": then, "data_dir": cfg.data_dir, "model": cfg.model})
        assert reuse.kinship(cfg, method, old, key, cell) == how, k


def test_a_method_with_trained_state_plans_again_when_its_cell_resumes(tiny, data_dir, tmp_path, monkeypatch):
    """streamline's replacement network lives in the method instance, not in the stored plan: a resumed cell must plan
    again (the stored plan alone cannot be applied), and its layers must be the stored ones."""
    cfg = RunConfig(model="random:tiny", methods=("streamline",), tasks=("arc_easy", "boolq"), limit=2,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir),
                    overrides=("streamline.k=1", "streamline.replace=ffn", "streamline.replace_steps=5",
                               "calib.n_samples=4"))
    real, calls, planned = pipeline.evaluate_task, [], []

    def flaky(lm, task, tasks, cfg):
        calls.append(task)
        if task == "boolq" and calls.count("boolq") == 1:
            raise KeyboardInterrupt
        return real(lm, task, tasks, cfg)

    real_plan = pipeline._make_plan
    monkeypatch.setattr(pipeline, "_make_plan", lambda *a: planned.append(1) or real_plan(*a))
    monkeypatch.setattr(pipeline, "evaluate_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    (rec,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    assert calls == ["arc_easy", "boolq", "boolq"] and len(planned) == 2
    assert set(rec.scores) == {"arc_easy", "boolq"} and rec.plan["info"]["replacement"]["enabled"]


def test_a_record_of_device_cpu_is_reused_by_device_auto_where_auto_is_the_cpu(tiny, data_dir, tmp_path):
    """`--device cpu` and the default `auto` on a machine without a GPU score the same way, yet their run keys differ:
    the same command without `--device cpu` refused the folder as another configuration's work. So do float32 and
    `auto` on a CPU."""
    base = dict(model="random:tiny", methods=("unpruned",), tasks=("arc_easy",), limit=2, modes=("unified",),
                data_dir=str(data_dir))
    (first,) = pipeline.run(RunConfig(**base, device="cpu", dtype="float32"), tmp_path, loaded=tiny)
    said = []
    (again,) = pipeline.run(RunConfig(**base), tmp_path, loaded=tiny, on_progress=said.append)
    assert again.run_key == first.run_key and any("finished record found, reused" in s for s in said), said


def test_a_record_scored_on_another_device_under_the_same_run_key_is_refused(tiny, data_dir, tmp_path, monkeypatch):
    """`--device auto` is the CPU on one machine and a GPU on another, under one run key: a folder begun on a CPU and
    rerun on a GPU reused the CPU's float32 records beside the GPU's bfloat16 ones in one table."""
    import json

    from harness.errors import UsageError

    base = dict(model="random:tiny", methods=("unpruned",), tasks=("arc_easy",), limit=2, modes=("unified",),
                data_dir=str(data_dir))
    pipeline.run(RunConfig(**base), tmp_path, loaded=tiny)
    path = tmp_path / "unpruned__unified.json"
    d = json.loads(path.read_text())
    d["environment"]["device"] = "cuda:0"  # as a GPU machine's run of the same command writes it
    path.write_text(json.dumps(d))
    with pytest.raises(UsageError, match=r"holds work of a different configuration: unpruned__unified.json \(the same "
                                         r"run_key \w+; scored on cuda in bfloat16 there, cpu in float32 here\)"):
        pipeline.run(RunConfig(**base), tmp_path, loaded=tiny)


def test_a_resume_state_begun_on_another_device_is_refused(tiny, data_dir, tmp_path, monkeypatch):
    """An interrupted cell's finished tasks, scored with `--device auto` on a CPU, resumed on a GPU (one run key) would
    have sat beside the GPU's in one record; the resume state now says where it was scored, and the rerun refuses it."""
    import json

    from harness.errors import UsageError

    calls = _ctrl_c_at_the_second_task(monkeypatch)
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "boolq"), limit=2, modes=("unified",),
                    data_dir=str(data_dir))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    path = tmp_path / "unpruned__unified.partial.json"
    d = json.loads(path.read_text())
    assert d["made_on"] == ["cpu", "float32"] and list(d["tasks"]) == ["arc_easy"]
    path.write_text(json.dumps({**d, "made_on": ["cuda", "bfloat16"]}))  # as a GPU machine's run would have left it
    with pytest.raises(UsageError, match=r"unpruned__unified.partial.json \(unfinished, the same run_key \w+; scored on "
                                         r"cuda in bfloat16 there, cpu in float32 here\)"):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "made_on"}))  # a resume state from before: resumed
    (record,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    assert set(record.scores) == {"arc_easy", "boolq"} and len(calls) == 3


def test_a_count_too_deep_for_the_model_is_refused_before_any_cell(tiny, data_dir, tmp_path):
    """`--methods unpruned,tail --set tail.k=8` on a 4-layer model failed only tail's cell, once unpruned's had scored
    its tasks (minutes on a real run); it is refused before any cell, with the hint plan() gives."""
    from harness.errors import UsageError

    cfg = RunConfig(model="random:tiny", methods=("unpruned", "tail"), tasks=("arc_easy",), limit=2, modes=("unified",),
                    data_dir=str(data_dir), overrides=("tail.k=8",))
    with pytest.raises(UsageError, match=r"tail.k=8: must be < the model's 4 layers .*try --set tail.k=2"):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    assert not list(tmp_path.glob("*__*.json"))  # no cell ran


def test_a_count_too_deep_is_refused_before_the_weights_load(data_dir, tmp_path, monkeypatch):
    """The same refusal for a run that loads its model: from the config's depth, before the weights (an 8B model's
    minutes); before, it came once `load_model` had returned."""
    from harness.errors import UsageError
    from harness.pd import models

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(models, "load_model", no_weights)
    cfg = RunConfig(model="random:tiny", methods=("unpruned", "tail"), tasks=("arc_easy",), limit=2, modes=("unified",),
                    data_dir=str(data_dir), overrides=("tail.k=8",))
    with pytest.raises(UsageError, match=r"tail.k=8: must be < the model's 4 layers .*try --set tail.k=2"):
        pipeline.run(cfg, tmp_path)


def _ctrl_c_at_the_second_task(monkeypatch) -> list[str]:
    """Make the second task evaluated raise KeyboardInterrupt, as Ctrl-C there; the tasks evaluated, in order."""
    real, calls = pipeline._eval_task, []

    def second_stops(st, lm, task, *a, **k):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(st, lm, task, *a, **k)

    monkeypatch.setattr(pipeline, "_eval_task", second_stops)
    return calls
