"""`python -m harness sweep` on a folder that already holds work: what the sweep's own process refuses before any
cell starts, as `run` refuses it, rather than each cell after its start-up and model load; and what it skips, as `run`
skips it, rather than failing once every cell has run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_long_tasks import _WithBos
from tests.test_sweep import write_spec

# one cheap cell with a long-context task: the tiny random model, one WikiText-2 article at a 64-token prompt
RUN = {"model": "random:tiny", "device": "cpu", "methods": ["unpruned"], "tasks": ["pd_ppl"], "limit": 1,
       "mode": "disaggregated", "set": ["pd_ppl.docs=1", "pd_ppl.prompt_tokens=64"]}


def _run_once(cli, run: dict, out: Path, data_dir) -> Path:
    """`python -m harness run` with the spec section `run` into `out`; the path of its one record."""
    argv = [x for k, v in run.items() if k != "set" for x in (f"--{k}", ",".join(v) if isinstance(v, list) else v)]
    res = cli("run", *argv, *[x for s in run["set"] for x in ("--set", s)], "--out", out, "-q", data_dir=data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "unpruned__disaggregated.json"


@pytest.fixture
def old_pd_ppl_record(tmp_path, cli, data_dir) -> Path:
    """A run folder whose record holds pd_ppl results of version 2 of the task (before the prompts began with the
    tokenizer's prefix): still valid for a tokenizer that prepends nothing, stale for one that prepends a BOS."""
    out = tmp_path / "q"
    path = _run_once(cli, RUN, out, data_dir)
    doc = json.loads(path.read_text())
    doc["lm_eval"]["tasks"]["pd_ppl"]["harness_task"]["version"] = 2
    path.write_text(json.dumps(doc))
    return out


def test_a_stale_long_context_record_is_refused_before_any_cell_for_a_bos_adding_tokenizer(
        tmp_path, old_pd_ppl_record, monkeypatch):
    """The sweep checked the folder's long-context results without the tokenizer's prefix, so results that lack a BOS
    this tokenizer prepends passed its check and every cell refused them after its start-up and model load."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError
    from harness.pd import models

    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "out": str(old_pd_ppl_record)})
    expand(spec, None)  # the byte tokenizer prepends nothing: the old results still hold
    real = models.tokenizer_and_config

    def with_bos(*args, **kwargs):
        tokenizer, config = real(*args, **kwargs)
        return _WithBos(tokenizer, tokenizer.encode("a", add_special_tokens=False)[0] + 1), config

    monkeypatch.setattr(models, "tokenizer_and_config", with_bos)
    with pytest.raises(UsageError, match=r"unpruned__disaggregated\.json \(pd_ppl results made by version 2 of the task, "
                                         r"which is version 3 now \(its prompts lacked this tokenizer's prefix \[\d+\]\)"):
        expand(spec, None)
    assert not (old_pd_ppl_record / ".sweep").exists()  # no cell started


def test_a_long_context_prompt_over_the_context_is_refused_before_any_cell(tmp_path):
    """As `run` refuses it before the weights load: the sweep left it to each cell, which exited 2 after its start-up."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "tasks": ["passkey"], "set": ["passkey.lengths=8192"],
                                                   "out": str(tmp_path / "q")})
    with pytest.raises(UsageError, match=r"passkey: 8192 \+ 10 tokens exceed max_length 4096; give --set passkey.lengths=4086"):
        expand(spec, None)
    assert not (tmp_path / "q" / ".sweep").exists()


def test_a_count_too_deep_for_the_model_is_refused_before_any_cell(tmp_path):
    """`tail.k=2,8` on 4 layers: the sweep left k=8 to its cell, which exited 2 after its start-up (and k=2's work)."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    spec = write_spec(tmp_path / "spec.toml", run={**RUN, "methods": ["unpruned", "tail"], "set": ["tail.k=2,8"],
                                                   "out": str(tmp_path / "q")})
    with pytest.raises(UsageError, match=r"tail.k=8: must be < the model's 4 layers \(at least one must stay\)"):
        expand(spec, None)
    assert not (tmp_path / "q" / ".sweep").exists()


def test_an_unreadable_file_beside_the_cells_records_does_not_end_the_sweep_without_its_summary(tmp_path, capsys):
    """The sweep's summary read every `*__*.json` of the run folder strictly: one that is none of the spec's cells and
    cannot be read (a record of a method since dropped from the spec, cut off by a copy) ended the sweep with exit 2
    after every cell had run, with neither its table nor sweep.json. It is skipped with a warning, as `run` does."""
    from argparse import Namespace

    from harness.cli import sweep
    from harness.cli.sweep_backends import Outcome
    from harness.cli.sweep_plan import Plan
    from harness.store import records as rec
    from tests.test_sweep import _record

    rec.save(_record("unpruned", "unified"), tmp_path)
    (tmp_path / "shortgpt__unified.json").write_text('{"method": "shortgpt", "mo')
    outcomes = [Outcome("unpruned/unified", "ok", 1.0, 0, str(tmp_path / "unpruned__unified.json"))]
    rc = sweep._finish(Namespace(spec=tmp_path / "spec.toml"), Plan(tmp_path, []), outcomes, {"backend": "local", "workers": 1},
                       0.0, interrupted=False)
    out, err = capsys.readouterr()
    assert rc == 0 and "unpruned/unified" in out, out + err
    assert "shortgpt__unified.json" in err and "unreadable record" in err
    assert [c["status"] for c in json.loads((tmp_path / "sweep.json").read_text())["cells"]] == ["ok"]
    assert "unpruned" in (tmp_path / "summary.csv").read_text()


def test_records_scored_on_a_ray_clusters_gpus_are_not_refused_by_its_driver(tmp_path, cli, data_dir, monkeypatch):
    """On the Ray cluster at RAY_ADDRESS the cells run on its nodes, and its driver (often without a GPU) checked the
    folder by its own device: the cluster's `--device auto` records, scored on cuda in bfloat16, were refused as
    another configuration's ('cpu in float32 here') before any cell, so a sweep could not be rerun to finish. Each
    cell checks where a record was scored on its own machine; without RAY_ADDRESS the sweep's process still does."""
    from harness.cli.sweep_plan import expand
    from harness.errors import UsageError

    run = {k: v for k, v in RUN.items() if k != "device"}  # `auto`: the CPU here, a GPU on the cluster's nodes
    out = tmp_path / "q"
    path = _run_once(cli, run, out, data_dir)
    doc = json.loads(path.read_text())
    doc["environment"]["device"] = "cuda:0"  # as the cluster's GPU node wrote it
    path.write_text(json.dumps(doc))
    spec = write_spec(tmp_path / "spec.toml", run={**run, "out": str(out)})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match=r"scored on cuda in bfloat16 there, cpu in float32 here"):
        expand(spec, None)  # cells on this machine: refused before any of them starts
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    plan = expand(spec, None)
    assert [c.name for c in plan.cells] == ["unpruned/disaggregated"]
