"""benchmarks/gpu_compare.py: the GPU run's verdicts and its side-by-side with ../shared/GPU_REFERENCE.md."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_compare  # noqa: E402

# ../shared/GPU_REFERENCE.md's table and the prose figures the script reads, verbatim (CI has ../shared/data only)
REFERENCE = """# Reference GPU figures

Measured on one NVIDIA H100 80GB HBM3 with PyTorch 2.11 (CUDA 13) and transformers 5.17: bf16,
sdpa attention, batch 1, random weights (latency and KV bytes do not depend on weight values),
prompt of 2048 tokens, 32 decode steps, HF eager forward with a dynamic cache, CUDA events,
median of 8 runs. Pruned rows drop a contiguous deep block and keep the last layer.

| shape | layers | TTFT ms | TPOT ms | prompt KV MiB |
|---|---|---|---|---|
| Llama-3-8B | 32 → 24 | 63.4 → 47.6 (−25.0%) | 25.2 → 20.0 (−20.7%) | 256 → 192 |
| Llama-2-7B | 32 → 24 | 64.4 → 48.5 (−24.6%) | 23.5 → 19.2 (−18.2%) | 1024 → 768 |
| SmolLM2-135M | 30 → 22 | 19.4 → 14.8 (−23.9%) | 29.8 → 15.2 (noisy) | 45 → 33 |

- Copy bandwidth on that card: device-to-device ≈ 2.9 TB/s (read + write); device-to-host and
  host-to-device ≈ 50–55 GB/s (pinned host memory).
- The memory-bandwidth bound of one decode step of Llama-3-8B (16.06 GB of bf16 weights) is
  ≈ 5.5 ms, so HF eager decode sits about 4.6× above it.
"""


def test_the_reference_parses_and_our_kv_arithmetic_gives_its_prompt_kv():
    """The reference's prompt KV MiB is what our count gives on our presets of its shapes, in bf16 at its 2048
    tokens (the engine's measured bytes equal `expected_kv_bytes`: tests/test_latency.py), dense and pruned:
    a preset that drifted from the reference's shape (its KV heads, head size or layers) fails here, on a CPU."""
    from harness.pd.engine import expected_kv_bytes
    from harness.pd.models import preset_config

    ref = gpu_compare.parse_reference(REFERENCE)
    assert (ref["prompt_tokens"], ref["decode_tokens"], ref["batch"], ref["bf16"]) == (2048, 32, 1, True)
    assert ref["copy_bandwidth_bytes_per_s"] == 2.9e12 and ref["bound"] == {"shape": "llama38b", "weights_gb": 16.06, "ms": 5.5}
    rows = ref["rows"]
    assert sorted(rows) == ["llama27b", "llama38b", "smollm2135m"]
    assert rows["llama38b"]["ttft_ms"] == (63.4, 47.6) and rows["llama27b"]["tpot_ms"] == (23.5, 19.2)
    for preset in ("llama3-8b", "llama2-7b", "smollm2-135m"):
        r, config = rows[gpu_compare.norm(preset)], preset_config(preset)
        assert r["layers"][0] == config.num_hidden_layers
        for layers, mib in zip(r["layers"], r["kv_mib"]):
            assert expected_kv_bytes(config, int(layers), ref["prompt_tokens"], torch.bfloat16) / 2**20 == mib, (preset, layers)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """gpu_check.py's (b) on the tiny shape in bfloat16 on the CPU, and a reference of the tiny shape at its
    workload whose layers and KV MiB are arithmetic (its times made up)."""
    import gpu_check

    from harness.pd.engine import expected_kv_bytes
    from harness.pd.models import preset_config

    d = tmp_path_factory.mktemp("gpu_compare")
    assert gpu_check.main(["--shapes", "tiny", "--sections", "b", "--prompt-tokens", "64", "--decode-tokens", "4", "--batch-sizes", "1",
                           "--device", "cpu", "--dtype", "bfloat16", "--warmup", "0", "--repeats", "1",
                           "--json", str(d / "g.json"), "--md", str(d / "g.md")]) == 0
    mib = [expected_kv_bytes(preset_config("tiny"), n, 64, torch.bfloat16) / 2**20 for n in (4, 3)]
    ref = REFERENCE.replace("prompt of 2048 tokens, 32 decode steps", "prompt of 64 tokens, 4 decode steps").replace(
        "| SmolLM2-135M | 30 → 22 |", f"| Tiny | 4 → 3 | 10.0 → 7.5 (−25%) | 5.0 → 4.0 | {mib[0]!r} → {mib[1]!r} |\n| SmolLM2-135M | 30 → 22 |")
    return d, json.loads((d / "g.json").read_text()), ref


def _compare(tmp_path, res: dict, ref: str) -> tuple[int, str]:
    (tmp_path / "r.json").write_text(json.dumps(res))
    (tmp_path / "ref.md").write_text(ref)
    rc = gpu_compare.main([str(tmp_path / "r.json"), "--reference", str(tmp_path / "ref.md"), "--md", str(tmp_path / "c.md")])
    return rc, (tmp_path / "c.md").read_text()


def test_a_cpu_run_matches_the_arithmetic_of_a_reference_of_its_shape(tiny_run, tmp_path):
    _, res, ref = tiny_run
    rc, md = _compare(tmp_path, res, ref)
    assert rc == 0, md
    for q in ("layers (dense)", "layers (pruned)", "prompt KV MiB (dense)", "prompt KV MiB (pruned)"):
        assert f"| Tiny | {q} |" in md and md.split(f"| Tiny | {q} |")[1].split("\n")[0].endswith("| pass |"), q
    assert "| Tiny | TTFT ms (dense) | 10 |" in md and "| Llama-3-8B | (not in this run's latency shapes) |" in md
    assert "(b) static and graph rows send the eager rows' bytes | 3 of 3 rows | pass |" in md  # static rows only, on a CPU


@pytest.mark.parametrize("planted,row", [(("| 4 → 3 |", "| 4 → 2 |"), "| Tiny | layers (pruned) | 2 |"),
                                         (("7.5 (−25%) | 5.0 → 4.0 | 0.03125", "7.5 (−25%) | 5.0 → 4.0 | 0.0625"),
                                          "| Tiny | prompt KV MiB (dense) | 0.0625 |")])
def test_a_layer_count_or_prompt_kv_unlike_the_reference_fails(tiny_run, tmp_path, planted, row):
    _, res, ref = tiny_run
    assert planted[0] in ref
    rc, md = _compare(tmp_path, res, ref.replace(*planted))
    assert rc == 1 and row in md and md.split(row)[1].split("\n")[0].endswith("| **FAIL** |")


def test_a_gpu_runs_timing_verdicts_and_failed_steps(tiny_run, tmp_path):
    """Off a GPU the TTFT cut is not judged; on one, a pruned row whose cut is over 5 points from the removed
    prefill fraction fails, as do a static row that sent other bytes, (c)'s verdict and a failed step."""
    _, res, ref = tiny_run
    res = copy.deepcopy(res)
    res["args"]["device"] = "cuda"
    cut = {r["plan"]: r for r in res["latency"] if r["decode_mode"] == "eager"}
    cut["shortgpt-like"]["ttft_reduction"], cut["pdtrim-like"]["ttft_reduction"] = 0.22, 0.06  # removed 25% and 0%
    rc, md = _compare(tmp_path, res, ref)
    assert "tiny shortgpt-like B=1 | cut 22.0% vs removed 25.0% (3.0 points) | pass |" in md
    assert "tiny pdtrim-like B=1 | cut 6.0% vs removed 0.0% (6.0 points) | **FAIL** |" in md and rc == 1
    cut["pdtrim-like"]["ttft_reduction"] = 0.04
    static = next(r for r in res["latency"] if r["decode_mode"] == "static" and r["plan"] == "pdtrim-like")
    static["kv_bytes_equal_eager"] = False
    rc, md = _compare(tmp_path, res, ref)
    assert rc == 1 and "2 of 3 rows; not: tiny pdtrim-like B=1 static | **FAIL** |" in md
    static["kv_bytes_equal_eager"] = True
    assert _compare(tmp_path, res, ref)[0] == 0
    res["hbm_bound"] = {"rows": [], "check": {"row": "tiny dense B=1", "tpot_over_bound": 3.0, "tpot_over_expected": 1.5, "limit": 1.2,
                                              "pass": False}}
    res["errors"] = [{"step": "ipc handoff", "error": "RuntimeError: CUDA IPC refused"}]
    rc, md = _compare(tmp_path, res, ref)
    assert rc == 1 and "TPOT / (bound + floor) = 1.50, TPOT / bound = 3.00 | **FAIL** |" in md
    assert "| step ran: ipc handoff | RuntimeError: CUDA IPC refused | **FAIL** |" in md


def test_the_bound_verdict_is_also_given_as_the_issue_words_it(tiny_run, tmp_path):
    """Issue 16 asks for graph TPOT ≤ 1.2 × the measured HBM bound; the run judges TPOT ≤ 1.2 × (bound + small-op
    floor). A TPOT within the second and over the first passes one line and fails the other (the run fails: the
    closing note cannot read the looser line as the issue's); on CPU (static stands in) neither is judged."""
    _, res, ref = tiny_run
    res = copy.deepcopy(res)
    res["args"]["device"] = "cuda"
    for r in res["latency"]:
        if r["plan"] != "dense" and r["decode_mode"] == "eager":
            r["ttft_reduction"] = r["removed_prefill_fraction"]  # the TTFT lines pass: only (c) is judged here
    check = {"row": "tiny dense B=1", "tpot_over_bound": 1.6, "tpot_over_expected": 1.1, "limit": 1.2, "pass": True}
    res["hbm_bound"] = {"rows": [], "decode_mode": "graph", "check": check}
    rc, md = _compare(tmp_path, res, ref)
    assert "TPOT / (bound + floor) = 1.10, TPOT / bound = 1.60 | pass |" in md
    assert "| (c) graph TPOT ≤ 1.2 × bound, as issue 16 words it, tiny dense B=1 | TPOT / bound = 1.60 | **FAIL** |" in md and rc == 1
    check["tpot_over_bound"] = 1.15
    rc, md = _compare(tmp_path, res, ref)
    assert "as issue 16 words it, tiny dense B=1 | TPOT / bound = 1.15 | pass |" in md and rc == 0
    res["hbm_bound"]["decode_mode"], check["pass"] = "static", None
    assert "as issue 16 words it, tiny dense B=1 | TPOT / bound = 1.15 | — |" in _compare(tmp_path, res, ref)[1]


def test_input_that_is_not_a_gpu_check_json_is_refused(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"rows": []}')
    assert gpu_compare.main([str(tmp_path / "x.json")]) == 2
    assert gpu_compare.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "not a gpu_check.py JSON" in err and "missing.json" in err
