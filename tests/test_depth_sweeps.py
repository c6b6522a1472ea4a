"""Depth sweeps: a list-valued option is one cell per value; ranked methods rank once for every k;
the score-vs-blocks plot draws one line per method and the score-vs-KV plot marks the Pareto front."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from harness.config import expand_sweeps, sweep_base
from harness.errors import UsageError


def test_expand_sweeps_scalar_options_only():
    import methods

    shortgpt, manual = methods.get("shortgpt").Config, methods.get("manual").Config
    assert expand_sweeps(shortgpt, "shortgpt", {"k": "4"}) == [("shortgpt", {"k": "4"})]
    assert expand_sweeps(shortgpt, "shortgpt", {"k": "2,4", "batch_size": "8"}) == [
        ("shortgpt@k=2", {"k": "2", "batch_size": "8"}), ("shortgpt@k=4", {"k": "4", "batch_size": "8"})]
    both = expand_sweeps(shortgpt, "shortgpt", {"k": "1,2", "batch_size": "4,8"})
    assert [n for n, _ in both] == ["shortgpt@k=1,batch_size=4", "shortgpt@k=1,batch_size=8",
                                     "shortgpt@k=2,batch_size=4", "shortgpt@k=2,batch_size=8"]
    # a tuple option keeps its comma-separated value as one value
    assert expand_sweeps(manual, "manual", {"prefill_layers": "0,1"}) == [("manual", {"prefill_layers": "0,1"})]
    snapkv = methods.get("snapkv").Config  # a str option holding NAME=VALUE items: one value (configs/baselines.toml)
    assert expand_sweeps(snapkv, "snapkv", {"base_options": "decode_layers=0,2 n_first=4"}) == [
        ("snapkv", {"base_options": "decode_layers=0,2 n_first=4"})]
    with pytest.raises(UsageError, match="distinct values"):
        expand_sweeps(shortgpt, "shortgpt", {"k": "2,2"})
    assert sweep_base("shortgpt@k=2") == "shortgpt" and sweep_base("stage:sleb") == "stage:sleb"


def test_pareto_front():
    from reports.plots import pareto_front

    pts = [(10, 50), (5, 45), (5, 40), (8, 52), (3, 30), (9, 51)]
    assert pareto_front(pts) == [(3, 30), (5, 45), (8, 52)]


def test_a_k_sweep_is_one_cell_per_k_from_one_ranking(tmp_path, data_dir, cli):
    out = tmp_path / "run"
    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned,shortgpt", "--set", "shortgpt.k=1,2,3",
            "--tasks", "arc_easy", "--limit", "3", "--mode", "disaggregated", "--out", out, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {k: json.loads((out / f"shortgpt@k={k}__disaggregated.json").read_text()) for k in (1, 2, 3)}
    orders = [rec["plan"]["info"]["removal_order"] for rec in recs.values()]
    assert [len(o) for o in orders] == [1, 2, 3] and orders[2][:2] == orders[1] and orders[1][:1] == orders[0]
    # one ranking served every k: the very same ranking info (its timing included) in each record
    assert len({json.dumps(rec["plan"]["info"]["work"], sort_keys=True) for rec in recs.values()}) == 1
    assert [rec["config"]["method_options"]["k"] for rec in recs.values()] == [1, 2, 3]
    assert "shortgpt@k=3" in r.stdout  # the results table lists every variant

    from reports.collect import collect
    from reports.plots import series

    col = collect([out])
    assert {series(col, r) for r in col.quality} == {"unpruned", "shortgpt"}


@pytest.mark.parametrize("name, variants", [
    ("kv", ["pdtrim@kv_pruning=true", "pdtrim@kv_pruning=false"]),
    ("stage", ["pdtrim@k_prefill=4", "pdtrim@k_prefill=8"]),
    ("d_t", ["pdtrim@d_t=0.9", "pdtrim@d_t=0.95", "pdtrim@d_t=0.97"]),
    ("first_last", [f"pdtrim@n_first={f},n_last={n}" for f in (4, 16) for n in (16, 48, 128)]),
    ("tau", [f"pdtrim@tau={t}" for t in ("0.3", "0.5", "0.7", "0.9")]),
])
def test_ablation_specs_expand_to_their_variants(name, variants, data_dir):
    """Each configs/ablation_*.toml is a valid spec whose PDTrim variants are the ablation's settings."""
    from harness.cli.run import run_config, run_parser
    from harness.cli.spec import load_spec, to_namespace
    from harness.run.pipeline import prepare

    spec = load_spec(ROOT / "configs" / f"ablation_{name}.toml")
    args = to_namespace(spec, "run", run_parser(), {"data_dir": str(data_dir)})
    prepared = prepare(run_config(args))
    assert list(prepared.methods) == ["unpruned", *variants]
    assert spec.out("report") is not None
