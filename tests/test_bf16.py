"""GPU readiness on CPU: the whole pipeline in bfloat16, and no tensor made on a default device or dtype.

A GPU run is bf16 on CUDA; here the same code runs bf16 on the CPU. The records must say bf16,
the KV bytes must be exactly half of fp32's (2 bytes an element), and scores must be finite and
close to fp32. Tolerance (random-weight tiny model, whose log-probs sit near -log(320)): 1%, for
each request's log-likelihood (relative to fp32's) and for perplexity. bf16 keeps 8 significant
bits (0.4% a rounding), and sums over tokens average the roundings out: measured, 0.04% at most
on the scoring test's requests, 0.014% on the quality run's perplexity.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_requests
from method_contract import make
from test_methods import EXERCISE

import methods
from harness.cli import main as cli_main
from harness.pd.models import load_model
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan
from harness.quality.scoring import Scorer
from harness.store import records

TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]
REL_TOL = 0.01


@pytest.fixture(scope="module")
def tiny_bf16():
    return load_model("random:tiny", device="cpu", dtype="bfloat16", seed=0)


def by_cell(folder):
    return {(r.method, r.mode): r for r in records.load_dir(folder)}


@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_scores_in_bfloat16_are_close_to_float32(tiny, tiny_bf16, mode):
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 1, 3)) if mode == "unified" else \
        PruningPlan("x", 4, (0, 1, 2, 3), (0, 3), KVPolicy(2, 3, (3,)))
    reqs = random_requests(10, 320, max_ctx=30)
    got = {}
    for name, loaded in (("fp32", tiny), ("bf16", tiny_bf16)):
        s = Scorer(loaded.model, plan, mode, max_length=64, batch_size=4)
        got[name] = ([ll for ll, _ in s.loglikelihood(reqs)], s.tally.kv_bytes)
    for a, b in zip(got["fp32"][0], got["bf16"][0]):
        assert math.isfinite(b) and abs(a - b) <= REL_TOL * abs(a), (a, b)
    assert got["bf16"][0] != got["fp32"][0]  # the bf16 model really computed in bf16
    assert got["bf16"][1] * 2 == got["fp32"][1] and (mode == "unified") == (got["fp32"][1] == 0)


def test_quality_run_in_bfloat16_both_modes(data_dir, tmp_path):
    """`python -m harness --dtype bfloat16`: records say bf16, each handoff sends 2 bytes an element (half of
    fp32's bytes on the same prompts), PPL within 1% of fp32's. The fp32 run needs only pd_ppl."""
    runs = {}
    for dtype, tasks in (("float32", "pd_ppl"), ("bfloat16", "arc_easy,pd_ppl")):
        out = tmp_path / dtype
        assert cli_main([*TINY, "--dtype", dtype, "--methods", "tail", "--set", "tail.k=1", "--tasks", tasks, "--limit", "4",
                         "--set", "pd_ppl.prompt_tokens=48", "--set", "pd_ppl.cont_tokens=8", "--set", "pd_ppl.docs=2",
                         "--mode", "both", "--data-dir", str(data_dir), "--out", str(out)]) == 0
        runs[dtype] = by_cell(out)
    assert set(runs["bfloat16"]) == {("tail", "unified"), ("tail", "disaggregated")}
    per_token = 3 * 2 * 2 * 16 * 2  # decode layers · (K, V) · kv_heads · head_dim · 2 bytes (bf16)
    for cell, rec in runs["bfloat16"].items():
        ref = runs["float32"][cell]
        assert rec.model["dtype"] == "bfloat16" and ref.model["dtype"] == "float32" and rec.config["dtype"] == "bfloat16"
        assert 0 <= rec.scores["arc_easy"]["acc"]["value"] <= 1
        ppl, ppl_ref = rec.scores["pd_ppl"]["ppl"]["value"], ref.scores["pd_ppl"]["ppl"]["value"]
        assert math.isfinite(ppl) and ppl != ppl_ref and abs(ppl / ppl_ref - 1) <= REL_TOL, (cell, ppl, ppl_ref)
        if cell[1] == "unified":  # one deployment: nothing is sent
            assert not any(kv["kv_bytes"] for kv in rec.kv.values())
            continue
        assert set(rec.kv) == {"arc_easy", "pd_ppl"}
        for task, kv in rec.kv.items():
            assert kv["kv_bytes"] == per_token * kv["prompt_tokens"] > 0, task
        assert rec.kv["pd_ppl"]["kv_bytes"] * 2 == ref.kv["pd_ppl"]["kv_bytes"]


def test_latency_loads_the_model_with_its_model_args(tmp_path):
    """`latency` had no --model-args: a model needing trust_remote_code could not be timed, and a hub revision was
    timed at main. They reach the load and are recorded; the default's identity and folder id stay as they were."""
    out = tmp_path / "o"
    assert cli_main(["latency", *TINY, "--model-args", "attn_implementation=eager", "--prompt-tokens", "16",
                     "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--methods", "unpruned",
                     "--out", str(out)]) == 0
    rec = by_cell(out)[("unpruned", "disaggregated")]
    assert rec.model["model_args"] == {"attn_implementation": "eager"}
    assert rec.config["model_args"] == "attn_implementation=eager"


def test_latency_in_bfloat16_eager_and_static(tmp_path):
    """`latency --dtype bfloat16`, eager and static decode (after a warm-up run): 2 bytes an element, the same
    bytes in both paths, half of fp32's."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli_main(["latency", *TINY, "--dtype", dtype, "--prompt-tokens", "40", "--decode-tokens", "4", "--batch-size", "2",
                         "--repeats", "1", "--decode-mode", "eager,static", "--methods", "manual",
                         "--set", "manual.decode_layers=0,3", "--set", "manual.kv_layers=3", "--set", "manual.n_first=2",
                         "--set", "manual.n_last=4", "--out", str(out)]) == 0
        runs[dtype] = by_cell(out)
    rec, ref = runs["bfloat16"][("manual", "disaggregated")], runs["float32"][("manual", "disaggregated")]
    assert rec.model["dtype"] == "bfloat16" and ref.model["dtype"] == "float32"
    per_token = 2 * 2 * 16 * 2  # one layer: (K, V) · kv_heads · head_dim · 2 bytes
    assert rec.kv["latency_T40_n4_b2"]["kv_bytes"] == 2 * (40 + 2 + 4) * per_token  # layer 0 whole, layer 3 first 2 + last 4
    assert rec.kv["latency_T40_n4_b2"]["kv_bytes"] == rec.kv["latency_T40_n4_b2_static"]["kv_bytes"]
    for label, kv in ref.kv.items():
        assert rec.kv[label]["kv_bytes"] * 2 == kv["kv_bytes"]
        figures = rec.latency[label].figures  # the typed latency field
        assert all(math.isfinite(v) and v >= 0 for v in figures.values()) and figures["ttft_ms_p50"] > 0


def test_export_in_bfloat16_writes_bf16_checkpoints(tiny_bf16, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "ck"
    assert cli_main(["export", *TINY[:-1], "--dtype", "bfloat16", "--method", "manual", "--mode", "disaggregated",
                     "--set", "manual.prefill_layers=0,1,3", "--set", "manual.decode_layers=0,3", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    src = dict(tiny_bf16.model.named_parameters())
    for stage, layers in (("prefill", (0, 1, 3)), ("decode", (0, 3))):
        assert json.loads((out / stage / "config.json").read_text())["dtype"] == "bfloat16"
        with safe_open(str(out / stage / "model.safetensors"), "pt") as f:
            names = list(f.keys())
            assert names and all(f.get_tensor(n).dtype == torch.bfloat16 for n in names)
            for i, source in enumerate(layers):  # renumbered layers hold the source model's bf16 weights, bit for bit
                w = f.get_tensor(f"model.layers.{i}.self_attn.q_proj.weight")
                assert torch.equal(w, src[f"model.layers.{source}.self_attn.q_proj.weight"])
    assert manifest["source_model"]["dtype"] == "bfloat16" and manifest["decode_kv_from_prefill"] == [0, 2]


PLANS = [PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3), KVPolicy(2, 3, (1, 3))),
         PruningPlan("s", 4, (0, 1, 3), (0, 3), KVPolicy(kind="snapkv", budget=KVBudget(tokens=6), window=4, kernel=3))]


def test_no_tensor_is_made_on_the_default_device_or_dtype(tiny, data_dir):
    """With the default device `meta` and the default dtype float64, a tensor made without device= or dtype=
    cannot meet the CPU fp32 model's tensors: latency (eager, static), scoring (both modes), generation and every
    method's planning run as usual. (The host-side accumulators of calibration statistics used to be
    made on the default device; a GPU run mixed them with CUDA tensors.)"""
    from harness.latency.measure import Workload, measure
    from harness.quality.calibration import CalibConfig, build_calibration

    calib = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=6, max_tokens=32, seed=0))
    reqs = random_requests(6, 320, max_ctx=20)
    reference = {}
    for plan in PLANS:
        reference[plan.method] = measure(tiny.model, plan, Workload(12, 4, 2), warmup=1, repeats=1).kv_bytes
    torch.set_default_device("meta")
    torch.set_default_dtype(torch.float64)
    try:
        for plan in PLANS:
            for mode in ("eager", "static"):
                m = measure(tiny.model, plan, Workload(12, 4, 2), warmup=1, repeats=1, decode_mode=mode)
                assert m.kv_bytes == reference[plan.method]
            scorer = Scorer(tiny.model, plan, "disaggregated", max_length=64)
            assert all(math.isfinite(ll) for ll, _ in scorer.loglikelihood(reqs))
            assert [len(g) for g in scorer.generate([c for c, _ in reqs[:3]], 4)] == [4, 4, 4]
        assert Scorer(tiny.model, PruningPlan.dense("d", 4), "unified", max_length=64).loglikelihood(reqs[:2])
        for name in methods.names():
            plan = make(name, 4, EXERCISE.get(name)).plan(tiny.model, calib, "disaggregated")
            assert set(plan.decode_layers) <= set(plan.prefill_layers), name
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)


def test_healing_trains_under_a_meta_default_device(tiny):
    """PDTrim's healing steps Adam like streamline does (`methods.base.optimizer_step`): under torch < 2.13
    a plain `opt.step()` made Adam's step counter on the default device, here `meta`."""
    from methods.pdtrim.healing import heal

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long))]
    torch.set_default_device("meta")
    try:
        healed, report = heal(tiny.model, batches, [((1,), 2)], steps=2, lr=1e-3, seed=0)
    finally:
        torch.set_default_device(None)
    assert set(healed) == {2} and all(p.device.type == "cpu" for p in healed[2].parameters())
    assert math.isfinite(report["2"]["mse_before"]) and math.isfinite(report["2"]["mse_after"])
