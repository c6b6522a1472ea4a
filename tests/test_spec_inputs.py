"""Spec input handling shared by `--config`, `sweep` and `check --spec`: every section is checked before
the first one runs, `[report] results` may be one folder, check's errors name `--spec`, a sweep cell with a
depth sweep settles each variant's record. In-process and without model work (the commands are stand-ins
where a section would run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.cli.spec import load_spec, run_spec
from harness.cli.sweep_cells import seed, settle
from harness.cli.sweep_plan import expand
from harness.errors import UsageError

RUN = {"model": "random:tiny", "device": "cpu", "methods": ["tail"], "tasks": ["arc_easy"], "limit": 2, "set": ["tail.k=1"]}
LATENCY = {"model": "random:tiny", "device": "cpu", "methods": ["tail"], "set": ["tail.k=1"], "prompt_tokens": [8]}


def spec(tmp_path: Path, **sections: dict) -> Path:
    """A spec file of `sections` (strings, numbers, booleans and lists of them; JSON spells them as TOML does)."""
    path = tmp_path / "spec.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items())
                            for name, body in sections.items()))
    return path


def run_recorded(path: Path) -> tuple[list[str], object]:
    """Run a spec with stand-in commands: (the sections that ran, in order; the error or the exit status)."""
    ran: list[str] = []
    commands = {name: (lambda ns, name=name: ran.append(name) or 0) for name in ("run", "latency", "report")}
    try:
        return ran, run_spec(load_spec(path), commands)
    except UsageError as e:
        return ran, e


@pytest.mark.parametrize("section, body, message", [
    ("report", {"bandwith": 5}, "[report]: unknown key 'bandwith' (did you mean bandwidth?); known keys: bandwidth"),
    ("report", {"metric_convention": "accc"}, "[report] metric_convention: expected one of paper"),
    ("latency", {**LATENCY, "prompt_tokenz": [8]}, "[latency]: unknown key 'prompt_tokenz'"),
    ("latency", {**LATENCY, "decode_mode": "bogus"}, "[latency]: --decode-mode bogus: expected any of eager"),
    ("latency", {**LATENCY, "methods": ["tail", "nosuch"]}, "[latency]: unknown method"),
    # replaying the run's plans, a methods value of another type was a TypeError traceback ('bool' is not iterable)
    ("latency", {**LATENCY, "methods": True, "plans_from": "run"}, "[latency] methods must be a number, a string or a list"),
    ("run", {**RUN, "set": 1.5}, "--set '1.5': expected SCOPE.OPTION=VALUE"),  # so was [run] set = 1.5 ('float' object...)
    # a list for a path was joined with commas: the report went into a new folder named "a,b" in the current folder
    ("report", {"out": ["a", "b"]}, "[report] out: expected a path in quotes, got ['a', 'b']"),
    ("run", {**RUN, "plans_from": ["a"]}, "[run] plans_from: expected a path in quotes, got ['a']"),
    # a number was taken as a hub id ("1.5"): under sweep every cell then failed after ~50 s of the hub's retries
    ("run", {**RUN, "model": 1.5}, "[run] model: expected a model name or path in quotes, got 1.5"),
    ("latency", {**LATENCY, "model": 7}, "[latency] model: expected a model name or path in quotes, got 7"),
    # found after the whole [run] (an hour for configs/main_table.toml), and the message named neither spec nor section
    ("latency", {**LATENCY, "plans_from": "runn"}, "[latency]: plans_from runn: not a folder of run records"),
    # the latency section then refused the run's own records as "a different configuration", after the whole [run]
    ("latency", {**LATENCY, "out": "SAME"}, "is [run]'s out too: a folder holds one run's"),
])
def test_config_checks_every_section_before_the_run(tmp_path, section, body, message):
    sections = {"run": {**RUN, "out": str(tmp_path / "q")}, section: {"out": str(tmp_path / "o"), **body}}
    if body.get("out") == "SAME":
        sections[section]["out"] = str(tmp_path / "q")
    if section == "run":  # with a [latency] section replaying the run's plans, which inherits the run's set
        sections["latency"] = {**LATENCY, "set": [], "plans_from": "run", "out": str(tmp_path / "l")}
    path = spec(tmp_path, **sections)
    ran, err = run_recorded(path)
    assert isinstance(err, UsageError) and message in str(err) and str(path) in str(err)
    assert ran == []  # found before the [run] section ran, not after its minutes


def test_config_exits_2_before_the_run(tmp_path, cli):
    path = spec(tmp_path, run={**RUN, "out": str(tmp_path / "q")}, report={"bandwith": 5})
    r = cli("--config", path, "-q")
    assert r.returncode == 2 and "unknown key 'bandwith'" in r.stderr
    assert not (tmp_path / "q").exists()


def test_sweep_checks_latency_values_before_any_cell(tmp_path):
    path = spec(tmp_path, run={**RUN, "out": str(tmp_path / "q")},
                latency={**LATENCY, "decode_mode": "bogus", "out": str(tmp_path / "l")})
    with pytest.raises(UsageError, match=r"\[latency\]: --decode-mode bogus: expected any of eager"):
        expand(path, None)


def test_report_results_string_is_one_folder(tmp_path):
    folder = str(tmp_path / "records")
    path = spec(tmp_path, run={**RUN, "out": str(tmp_path / "q")}, report={"results": folder, "out": str(tmp_path / "r")})
    seen = []
    commands = {"run": lambda ns: 0, "report": lambda ns: seen.append(ns.results) or 0}
    assert run_spec(load_spec(path), commands) == 0
    assert seen == [[Path(folder)]]
    assert expand(path, None).report_argv[:2] == [folder, "--out"]  # the sweep's report: the same one folder
    bad = spec(tmp_path, run={**RUN, "out": str(tmp_path / "q")}, report={"results": [folder, 3]})
    for attempt in (lambda: run_spec(load_spec(bad), commands), lambda: expand(bad, None)):
        with pytest.raises(UsageError, match=r"\[report\] results: expected a folder or a list of folders"):
            attempt()


def test_check_spec_errors_name_spec_and_exit_2(tmp_path, cli):
    ref = Path("results") / "reference"
    for path, message in [(tmp_path / "none.toml", "no such file"), (tmp_path / "bad.toml", "not a readable TOML file")]:
        if path.name == "bad.toml":
            path.write_text("[run\n")
        r = cli("check", "--against", ref, "--spec", path, "--out", tmp_path / "rerun")
        assert r.returncode == 2 and f"--spec {path}: {message}" in r.stderr and "--config" not in r.stderr
    only_report = spec(tmp_path, report={"results": [str(ref)]})
    r = cli("check", "--against", ref, "--spec", only_report, "--out", tmp_path / "rerun")
    assert r.returncode == 2 and "no [run] or [latency] section, so nothing to rerun" in r.stderr
    assert "FAILED" not in r.stdout and not (tmp_path / "rerun").exists()


def test_sweep_cell_with_a_depth_sweep_settles_every_variant(tmp_path):
    path = spec(tmp_path, run={**RUN, "set": ["tail.k=1,2"], "out": str(tmp_path / "q")})
    (cell,) = expand(path, None).cells
    out = (tmp_path / "q").resolve()
    assert cell.name == "tail/disaggregated" and cell.workdir == out / ".sweep" / "tail__disaggregated"
    assert cell.records == [out / "tail@k=1__disaggregated.json", out / "tail@k=2__disaggregated.json"]

    seed(cell)
    for r in cell.records:  # what the child writes into its folder
        (cell.workdir / r.name).write_text(r.name)
    o = settle(cell, 0, "", 1.0)
    assert (o.status, o.returncode) == ("ok", 0) and all(r.read_text() == r.name for r in cell.records)
    assert not cell.workdir.exists()  # nothing stranded in .sweep/

    seed(cell)  # a rerun: both finished records are linked in, and the child leaves them as they are
    assert cell.seeded == {r.name for r in cell.records}
    assert settle(cell, 0, "", 1.0).status == "reused"

    cell.records[1].unlink()
    seed(cell)
    o = settle(cell, 0, "", 1.0)  # a variant's record missing although the child exited 0
    assert o.status == "failed" and "left no record tail@k=2__disaggregated.json" in o.error


def test_sweep_run_section_errors_name_the_spec_as_config_does(tmp_path):
    for run, message in [({**RUN, "limit": 0}, "[run] limit: expected a positive integer"),
                         ({**{k: v for k, v in RUN.items() if k != "set"}, "overrides": ["tail.k=1"]},
                          "[run]: unknown key 'overrides'")]:
        path = spec(tmp_path, run={**run, "out": str(tmp_path / "q")})
        with pytest.raises(UsageError) as sweep_err:
            expand(path, None)
        ran, config_err = run_recorded(path)
        assert message in str(sweep_err.value) and str(path) in str(sweep_err.value)
        assert isinstance(config_err, UsageError) and message in str(config_err) and ran == []


def _committed_run_outs() -> list[str]:
    """configs/*.toml whose [run] `out` is a folder of committed records (the spec is meant to only render them)."""
    from conftest import ROOT

    found = []
    for path in sorted((ROOT / "configs").glob("*.toml")):
        out = load_spec(path).out("run")
        if out is not None and (ROOT / out).is_dir() and any((ROOT / out).glob("*__*.json")):
            found.append(path.name)
    return found


@pytest.mark.parametrize("where", ["here", "elsewhere"])
@pytest.mark.parametrize("config", _committed_run_outs())
def test_a_spec_matches_its_committed_records(config, where, data_dir, tmp_path, monkeypatch):
    """Every cell of the spec has its record in `out`, made by this configuration, so rerunning the spec reuses
    them; a changed default of a method or task option breaks this, until the spec pins it. `elsewhere`: with the
    data folder at another path, as in CI's clone (run keys hold the path: CI refused every committed record)."""
    import shutil

    from conftest import ROOT

    from harness.cli.run import run_config
    from harness.cli.spec import spec_options
    from harness.run import inputs, pipeline, reuse
    from harness.store import records

    monkeypatch.chdir(ROOT)
    if where == "elsewhere":
        shutil.copytree(data_dir, tmp_path / "check" / "shared" / "data")
        monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "check" / "shared" / "data"))
    spec = load_spec(ROOT / "configs" / config)
    ((_, ns),) = spec_options(spec, ["run"])
    cfg = run_config(ns)
    assert (cfg.data_dir == str(data_dir.resolve())) == (where == "here")
    prepared = pipeline.prepare(cfg)
    for name, method in prepared.methods.items():
        for mode in cfg.modes:
            key, calib, tasks = pipeline.cell_identity(cfg, prepared, name, method, mode)
            path = Path(ns.out) / records.record_filename(name, mode)
            stored = records.load(path)
            # the run's own test: equal run keys, or options added since at their defaults
            assert not reuse.foreign(cfg, method, stored, key, (name, mode, calib, tasks)), (config, name, mode)
            # and its long-context results still hold (task versions, passkey's sample rule)
            doc = json.loads(path.read_text(encoding="utf-8"))
            assert inputs.stale_results(doc, True, cfg, prepared.task_options) == [], (config, name, mode)


def test_a_latency_section_replaying_the_run_takes_the_runs_options_for_its_methods(tmp_path):
    from harness.cli.spec import Spec, from_run

    run = {"methods": ["unpruned", "tail", "shortgpt"], "set": ["tail.k=1", "pd_ppl.docs=2", "calib.n_samples=8", "shortgpt.k=2"]}
    spec = Spec(tmp_path / "s.toml", {"run": run, "latency": {"methods": ["unpruned", "tail"], "plans_from": "run"}})
    assert from_run(spec, tmp_path / "q") == {"plans_from": str(tmp_path / "q"), "set": ["tail.k=1", "calib.n_samples=8"]}
    del spec.sections["latency"]["methods"]  # latency's default methods, unpruned and shortgpt: not [run]'s
    assert from_run(spec, tmp_path / "q")["set"] == ["calib.n_samples=8", "shortgpt.k=2"]
    spec.sections["latency"]["methods"] = "unpruned, tail"  # a string, as the flag takes it
    assert from_run(spec, tmp_path / "q")["set"] == ["tail.k=1", "calib.n_samples=8"]
    spec.sections["latency"]["set"] = ["tail.k=1"]  # its own set wins, as written
    assert from_run(spec, tmp_path / "q") == {"plans_from": str(tmp_path / "q")}
    spec.sections["latency"]["plans_from"] = "elsewhere"
    assert from_run(spec, tmp_path / "q") == {}
    with pytest.raises(UsageError, match=r"plans_from = \"run\" needs a \[run\] section"):
        from_run(Spec(tmp_path / "s.toml", {"latency": {"plans_from": "run"}}), None)


def test_a_spec_run_from_another_folder_than_its_records_is_refused(tmp_path, monkeypatch):
    """`cd docs && --config ../configs/main_table.toml` read `out` from docs/ and began the whole run there (and `cd configs
    && --config main_table.toml` into configs/); a relative folder missing here but present beside the spec's folder
    is refused, naming where to run; --out still works."""
    from harness.cli.spec import spec_options

    (tmp_path / "configs").mkdir()
    (tmp_path / "res" / "x").mkdir(parents=True)
    path = spec(tmp_path / "configs", run={**RUN, "out": "res/x"}, latency={**LATENCY, "out": "res/y"})
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path / "docs")
    with pytest.raises(UsageError, match=re.escape(f"[run] out = 'res/x': no such folder in the current folder "
                                                   f"({tmp_path / 'docs'}), but {tmp_path / 'res' / 'x'} exists")) as e:
        spec_options(load_spec(path), ["run", "latency"])
    assert f"run from {tmp_path}, or for a new run here give the spec an absolute out" in str(e.value)
    monkeypatch.chdir(tmp_path / "configs")  # the spec's own folder (`cd configs`): the same trap, an hour-long run there
    assert [s for s, _ in spec_options(load_spec(path), ["run", "latency"])] == ["run", "latency"]  # only once it holds work
    (tmp_path / "res" / "x" / "unpruned__unified.json").write_text("{}")
    with pytest.raises(UsageError, match=re.escape(f"but {tmp_path / 'res' / 'x'} exists")):
        spec_options(load_spec(path), ["run", "latency"])
    (tmp_path / "configs" / "res" / "x").mkdir(parents=True)  # a folder of its own there: meant
    assert [s for s, _ in spec_options(load_spec(path), ["run", "latency"])] == ["run", "latency"]
    assert [s for s, _ in spec_options(load_spec(path), ["run", "latency"], {"run": tmp_path / "n", "latency": tmp_path / "m"})] == \
        ["run", "latency"]
    monkeypatch.chdir(tmp_path)
    assert [s for s, _ in spec_options(load_spec(path), ["run", "latency"])] == ["run", "latency"]


def test_a_spec_run_from_its_own_folder_is_not_refused_for_an_unrelated_folder_one_level_up(tmp_path, monkeypatch):
    """~/exp/spec.toml with out = "runs/a", run from ~/exp for a new run there, was refused because some ~/runs/a exists
    (another project's, empty): from the spec's own folder the one above is the trap (configs/ of a checkout) only when
    the folder there holds a run's records."""
    from harness.cli.spec import spec_options

    (tmp_path / "exp").mkdir()
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "notes.txt").write_text("not a run")
    path = spec(tmp_path / "exp", run={**RUN, "out": "runs/a"})
    monkeypatch.chdir(tmp_path / "exp")
    assert [s for s, _ in spec_options(load_spec(path), ["run"])] == ["run"]


def test_each_sweep_cell_has_the_run_key_the_whole_run_gives_that_cell(tmp_path, data_dir, monkeypatch):
    """A cell runs one method but every calibration and long-context task option of the [run] section: without them its
    records had other run keys than a single run of the spec makes (and another calibration or task workload)."""
    from harness.cli.run import run_config, run_parser
    from harness.run import pipeline

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    run = {**RUN, "methods": ["unpruned", "shortgpt"], "tasks": ["arc_easy", "passkey"], "mode": "both",
           "set": ["shortgpt.k=1,2", "calib.n_samples=8", "passkey.lengths=400", "passkey.repeats=1"],
           "out": str(tmp_path / "q")}
    plan = expand(spec(tmp_path, run=run), None)
    assert [c.name for c in plan.cells] == ["unpruned/unified", "unpruned/disaggregated", "shortgpt/unified",
                                           "shortgpt/disaggregated"]
    whole = run_config(run_parser().parse_args(
        ["--methods", "unpruned,shortgpt", "--tasks", "arc_easy,passkey", "--limit", "2", "--model", "random:tiny",
         "--device", "cpu", "--data-dir", str(data_dir), *[x for s in run["set"] for x in ("--set", s)]]))
    whole_prep = pipeline.prepare(whole)
    for cell in plan.cells:
        ns = run_parser().parse_args(cell.argv[1:])
        cfg = run_config(ns)
        prepared = pipeline.prepare(cfg)
        mode = cell.name.split("/")[1]
        for variant, method in prepared.methods.items():
            assert pipeline.cell_identity(cfg, prepared, variant, method, mode)[0] == \
                pipeline.cell_identity(whole, whole_prep, variant, whole_prep.methods[variant], mode)[0], (cell.name, variant)
