"""`harness.evaluate` / `load_results`: the call's own rows, Python tuples as lists, NaN for a missing
value, None as an option's default, lm-eval's keyword names, a refused or failed cell named with its
reason, Ctrl-C as KeyboardInterrupt, one unreadable record skipped with a warning, real `help`."""

import argparse
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness.errors import HarnessWarning, UsageError
from harness.store.records import RecordError

TINY = dict(model="random:tiny", device="cpu", tasks="arc_easy", mode="disaggregated", quiet=True)


@pytest.fixture
def common(data_dir) -> dict:
    return {**TINY, "data_dir": str(data_dir)}


def test_evaluate_returns_its_own_rows_only(tmp_path, common):
    first = harness.evaluate(methods=("unpruned", "tail"), set="tail.k=1", limit=2, out=str(tmp_path / "a"), **common)
    assert sorted(first["method"].unique()) == ["tail", "unpruned"]  # a tuple of methods, as a list would be
    assert first["stderr"].dtype == "float64" and first["value"].dtype == "float64"  # 2 items: stderr may be missing
    shutil.copytree(tmp_path / "a", tmp_path / "b" / "earlier")  # another run below the next call's out
    again = harness.evaluate(methods=["unpruned"], limit=3, out=str(tmp_path / "b"), **common)
    assert len(again) == len(first[first["method"] == "unpruned"]) and set(again["n_samples"]) == {3}
    with pytest.warns(HarnessWarning, match="have records in several folders"):  # b's run and b/earlier's
        assert len(harness.load_results(tmp_path / "b")) == len(again) + len(first)  # load_results searches below
    # out holds another configuration's record: bad input, and the error says so (not only stderr)
    with pytest.raises(UsageError, match=r"holds work of a different configuration: unpruned__disaggregated.json"):
        harness.evaluate(methods=["unpruned"], limit=4, out=str(tmp_path / "b"), **common)


def _options(monkeypatch, **options) -> argparse.Namespace:
    """The options `evaluate(**options)` hands the command, without running it."""
    import harness.cli.run

    class Ran(Exception):
        pass

    def cmd_run(args):
        raise Ran(args)

    monkeypatch.setattr(harness.cli.run, "cmd_run", cmd_run)
    with pytest.raises(Ran) as ran:
        harness.evaluate(**options)
    return ran.value.args[0]


def test_none_is_the_options_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    plain = vars(_options(monkeypatch, **TINY))
    nones = vars(_options(monkeypatch, **TINY, **dict.fromkeys(
        ["out", "data_dir", "apply_chat_template", "max_length", "plans_from", "device_map", "model_args", "set"])))
    assert nones["out"].parts[:2] == ("results", "runs")  # not ./None
    assert {k: v for k, v in nones.items() if k != "out"} == {k: v for k, v in plain.items() if k != "out"}
    assert _options(monkeypatch, **TINY, limit=None).limit is None  # limit=None: all items, as --limit all


def test_lm_eval_names_are_keywords_too(monkeypatch, tmp_path):
    assert _options(monkeypatch, **TINY, output_path=str(tmp_path / "x")).out == tmp_path / "x"  # lm-eval's --output_path
    with pytest.raises(UsageError, match="output_path is another name of out"):
        harness.evaluate(**TINY, out="a", output_path="b")


def test_a_crashed_cell_is_named_with_its_error(tmp_path, common, monkeypatch):
    import harness.run.pipeline as pipeline

    real = pipeline._run_cell

    def run_cell(st, name, method, mode):
        if name == "tail":
            raise RuntimeError("boom")
        return real(st, name, method, mode)

    monkeypatch.setattr(pipeline, "_run_cell", run_cell)
    with pytest.raises(RuntimeError, match=r"1 of 2 cells failed \(exit status 1\).*\n  tail/disaggregated: "
                                           r"RuntimeError: boom$"):
        harness.evaluate(methods=["unpruned", "tail"], set="tail.k=1", limit=2, out=str(tmp_path / "o"), **common)


def test_ctrl_c_during_a_run_is_a_keyboard_interrupt(tmp_path, common, monkeypatch):
    import harness.run.pipeline as pipeline

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run_cell", interrupt)  # after the model loaded: cmd_run returns 130
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "o"), **common)


def test_a_ctrl_c_a_library_swallowed_while_a_task_was_built_still_stops_the_call(tmp_path, common, swallow_a_stop):
    """A notebook's interrupt arriving while `datasets` fingerprinted a task (its bare `except:`) was lost: the call
    ran on to its end. It now raises KeyboardInterrupt once the task is built, and Python's Ctrl-C handler is back."""
    import signal

    swallow_a_stop(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(methods=["unpruned", "tail"], set=["tail.k=1"], limit=2, out=str(tmp_path / "o"), **common)
    assert not list((tmp_path / "o").glob("*.json"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_load_results_skips_an_unreadable_record_with_a_warning(tmp_path, common):
    harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "run"), **common)
    good = harness.load_results(tmp_path / "run")
    bad = tmp_path / "run" / "older" / "tail__disaggregated.json"
    bad.parent.mkdir()
    bad.write_text("{truncated")
    with pytest.warns(HarnessWarning, match=r"older/tail__disaggregated\.json: unreadable record .*; skipped"):
        assert harness.load_results(tmp_path / "run").equals(good)
    with pytest.raises(RecordError, match="unreadable record"):  # the file itself: nothing else to read
        harness.load_results(bad)
    with pytest.raises(UsageError, match=r"summary.csv'\): not a record .*give the run folder: load_results\('"):
        harness.load_results(tmp_path / "run" / "summary.csv")


def test_load_results_names_each_rows_record_and_warns_of_runs_mixed_under_one_parent(tmp_path, common):
    """Two runs under one parent were merged without a word: grouped by method, the KV sums of both runs made a
    ratio of 0.204 for 0.5, and a pivot averaged their accuracies. Each row now names its record file (`source`),
    the mix is a HarnessWarning, and a renamed copy beside a record is skipped as `report` skips it."""
    harness.evaluate(methods=["unpruned", "tail"], set="tail.k=2", limit=2, out=str(tmp_path / "p" / "a"), **common)
    harness.evaluate(methods=["unpruned"], limit=3, out=str(tmp_path / "p" / "b"), **common)
    one = harness.load_results(tmp_path / "p" / "a")
    assert set(one["source"]) == {str(tmp_path / "p" / "a" / f) for f in ("unpruned__disaggregated.json",
                                                                           "tail__disaggregated.json")}
    with pytest.warns(HarnessWarning, match=r"1 method/mode pair\(s\) have records in several folders \(e.g. "
                                            r"unpruned/disaggregated in .*: rows of separate runs; tell them apart by "
                                            r"the `source` column"):
        both = harness.load_results(tmp_path / "p")
    assert both.groupby("source").size().to_dict() == {
        str(tmp_path / "p" / "a" / "tail__disaggregated.json"): 2, str(tmp_path / "p" / "a" / "unpruned__disaggregated.json"): 2,
        str(tmp_path / "p" / "b" / "unpruned__disaggregated.json"): 2}  # arc_easy's acc and acc_norm each
    copy = tmp_path / "p" / "a" / "unpruned__disaggregated (copy).json"
    shutil.copy(tmp_path / "p" / "a" / "unpruned__disaggregated.json", copy)
    with pytest.warns(HarnessWarning, match=r"copy\)\.json: a second record of unpruned/disaggregated in its folder, "
                                            r"beside unpruned__disaggregated\.json .*; skipped"):
        again = harness.load_results(tmp_path / "p" / "a")
    assert again.equals(one)  # not doubled


def test_load_results_refuses_what_is_not_a_run_folder_or_record_naming_what_to_give(tmp_path, common):
    """"" read every record below the current folder (934 rows of mixed models in the repository); None and 3 were
    pathlib's TypeError; a per-item log or lm-eval's results file was sent to its own folder, which holds no record."""
    harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "run"), log_samples=True, **common)
    for bad, said in (("", "got an empty string"), (None, "got NoneType"), (3, "got int"), (["x"], "got list")):
        with pytest.raises(UsageError, match=r"expected the path of a run folder or of a METHOD__MODE\.json record "
                                             r"\(a str or pathlib\.Path\), " + said):
            harness.load_results(bad)
    logs = list((tmp_path / "run" / "samples").rglob("*.jsonl")) + list((tmp_path / "run" / "lm_eval").rglob("*.json"))
    assert len(logs) == 2, logs
    for f in logs:
        with pytest.raises(UsageError, match=r"not a record .*; give the run folder: load_results\('"
                                             + str(tmp_path / "run") + r"'\)$"):
            harness.load_results(f)


def test_load_results_of_a_folder_without_records_warns(tmp_path):
    """An existing folder with no records (a typo'd run name, a run not finished) gave an empty table in silence,
    where `python -m harness report` exits 2 saying there are no run records."""
    (tmp_path / "run").mkdir()
    with pytest.warns(HarnessWarning, match=r"no run records \(<method>__<mode>\.json\) under it; an empty table"):
        assert harness.load_results(tmp_path / "run").empty


def test_help_shows_the_api_functions_own_docs_and_import_stays_light():
    import harness.api

    for name in ("evaluate", "load_results"):
        assert getattr(harness, name) is getattr(harness.api, name)  # help(): its docstring and signature
    assert "path: 'str | Path'" in str(inspect.signature(harness.load_results))
    code = "import sys, harness; assert not {'harness.api', 'pandas', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_leaves_the_sessions_warnings_logs_and_environment_as_they_were(tmp_path, common, monkeypatch):
    """A run silences every warning, the libraries' logs and tqdm (TQDM_DISABLE) for the process: after one
    evaluate() a notebook showed none of its own warnings (numpy's, pandas', its own) for the rest of the session."""
    import logging
    import os
    import warnings

    import datasets  # noqa: F401 - imported by the notebook before the run: their levels are the notebook's
    import transformers  # noqa: F401

    loggers = ("lm_eval", "transformers", "datasets", "accelerate", "huggingface_hub")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    filters, levels = list(warnings.filters), {n: logging.getLogger(n).level for n in loggers}
    harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "o"), **common)  # quiet: TQDM_DISABLE too
    assert list(warnings.filters) == filters
    assert {n: logging.getLogger(n).level for n in loggers} == levels
    assert "TQDM_DISABLE" not in os.environ
    with pytest.warns(UserWarning, match="the notebook's own"):
        warnings.warn("the notebook's own", UserWarning, stacklevel=1)


def test_a_folder_without_records_gives_the_same_columns_and_dtypes(tmp_path):
    """With no rows, `primary` was object (not bool) and the text columns object: concatenated with a filled
    frame, they became object columns."""
    filled = harness.load_results(Path(__file__).resolve().parent.parent / "results" / "reference" / "quality")
    with pytest.warns(HarnessWarning, match="no run records"):
        empty = harness.load_results(tmp_path)
    assert len(filled) and empty.empty
    assert dict(empty.dtypes) == dict(filled.dtypes)


def test_nothing_of_a_run_keeps_its_model_alive_after_the_call(tmp_path, common):
    """PDTrim's search state (the model, its teacher, every layer's input) stayed in a module-level memo after
    evaluate() returned: a notebook kept the run's model in accelerator memory, and loaded the next one beside it."""
    from methods.pdtrim import search

    search._SHARED_STATES["a state of an earlier run"] = object()
    harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "o"), **common)
    assert search._SHARED_STATES == {}


def test_a_path_object_is_a_path(monkeypatch, tmp_path):
    """`out=tmp_path / "x"` (a pathlib.Path, as a notebook writes paths) was refused: 'expected a path in quotes'."""
    args = _options(monkeypatch, **{**TINY, "model": tmp_path}, out=tmp_path / "x", data_dir=tmp_path, plans_from=tmp_path)
    assert (args.out, args.data_dir, args.model, args.plans_from) == (tmp_path / "x", str(tmp_path), str(tmp_path), str(tmp_path))


def test_quiet_turns_the_bars_off_where_tqdm_was_imported_before(tmp_path, common, capfd, monkeypatch):
    """quiet=True set TQDM_DISABLE, which tqdm reads once, at import: in a notebook (tqdm imported with torch before
    the first run) lm-eval's and the planning bars still drew."""
    import tqdm  # noqa: F401 - imported before the run, as in a notebook

    from methods import bars

    harness.evaluate(methods=["unpruned"], limit=2, out=str(tmp_path / "o"), **common)  # quiet=True
    assert "it/s" not in capfd.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what -q sets during a run
    assert bars.progress(range(2), "planning").disable and bars.SearchBars("search", 2).steps.disable


def test_load_results_expands_the_home_folder_as_evaluate_does(tmp_path, monkeypatch):
    """evaluate(out="~/runs/x") writes under the home folder (its flags expand `~`); load_results("~/runs/x") said
    'no such file or folder'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(Path(__file__).resolve().parent.parent / "results" / "reference" / "quality", tmp_path / "runs")
    assert harness.load_results("~/runs").equals(harness.load_results(tmp_path / "runs"))


def test_a_library_imported_before_the_run_gets_the_notebooks_own_log_level_back(monkeypatch):
    """Only transformers and datasets counted as imported before the run: huggingface_hub (imported with them, and a
    logger `kept` restores) got its library default (WARNING) back, not the DEBUG a notebook had set to see downloads."""
    import logging

    import huggingface_hub  # noqa: F401 - imported by the notebook before the run

    from harness.run.quiet import kept, quiet_libraries

    hub = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub, "level", logging.DEBUG)
    with kept():
        quiet_libraries()
    assert hub.level == logging.DEBUG


def test_a_kv_policy_registered_in_a_notebook_cell_gets_its_method_in_evaluate(tmp_path, common):
    """A cell that registers a policy after `methods` was imported (any earlier `evaluate` imports it): its KV-baseline
    method was unknown to the next `evaluate`, whose error pointed at HARNESS_PLUGINS, not at `methods.load_plugins`."""
    import dataclasses

    import methods
    from harness.pd import kv
    from harness.pd.kv.base import TokenSelection
    from methods import registry

    @dataclasses.dataclass(frozen=True)
    class CellRecent(TokenSelection):
        """The most recent positions (a notebook cell's policy).

        - `budget`: the budget.
        """

        name, method_name, method_summary = "pd_test_cell_recent", "pd_test_cell_recent_kv", "most recent (test)"

        def keep(self, layer, positions, lengths, k, observed):
            return (positions >= 0) & (positions >= (lengths - k)[:, None])

    before = dict(kv._POLICIES)
    kv.register_policy(CellRecent)
    try:
        assert "pd_test_cell_recent_kv" not in methods.names()
        df = harness.evaluate(methods=["pd_test_cell_recent_kv"], limit=2, out=tmp_path / "o", **common,
                              set=["pd_test_cell_recent_kv.base=tail", "pd_test_cell_recent_kv.base_options=k=1",
                                   "pd_test_cell_recent_kv.keep_tokens=3"])
        assert set(df["method"]) == {"pd_test_cell_recent_kv"}
    finally:
        if registry.registered("pd_test_cell_recent_kv"):
            registry.unregister("pd_test_cell_recent_kv")
        kv._POLICIES.clear()
        kv._POLICIES.update(before)
