"""`--device-map` over two GPUs, on a CPU: the tiny model spread over two virtual GPUs (tests/virtual_gpus.py) gives
the unsplit model's scores, generations, KV bytes and plans, for every KV policy kind and every method that does
not need gradients (streamline's replacement and PDTrim's healing with 0 training steps). Before, a model whose
layers sat on two GPUs failed in the handoff (K/V of a later GPU indexed with rows made on the first), in the
scorer, and in the calibration of shortgpt, sleb, shortened_ppl, streamline (its replacement too), PDTrim and its
healing; each such place is now named by a failing case here. On one virtual GPU it also runs `latency` (eager and
static decode) and benchmarks/gpu_check.py's GPU branches, which the CPU runs of both do not take.

The two-GPU side runs in a process of its own (a registered device type lasts for the process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import two_gpu_cases as cases
from virtual_gpus import DEVICE_MAP, in_own_process

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_gpus(data_dir, tmp_path_factory) -> Path:
    import torch.utils.backend_registration as backends

    if not hasattr(backends, "_setup_privateuseone_for_python_backend"):  # torch 2.13 (CI's) has it
        pytest.skip(f"torch {torch.__version__} cannot register a device from Python (virtual GPUs)")
    return in_own_process("cases", tmp_path_factory.mktemp("two-gpus"), data_dir)


def test_the_virtual_gpus_refuse_mixed_devices_as_a_gpu_does(two_gpus):
    facts = json.loads((two_gpus / "facts.json").read_text())
    assert "Expected all tensors to be on the same device" in facts["refused"] and "vgpu:0, vgpu:1" in facts["refused"]
    assert facts["moved_device"] == "vgpu:1" and facts["moved_values"] == [[0.0, 0.0], [0.0, 0.0]]
    assert facts["scalar_added"] == [[2.0, 2.0]] * 3  # a CPU scalar in an elementwise op, as CUDA allows
    assert "vgpu:1" in facts["scalar_refused"] and "cpu" in facts["scalar_refused"]  # not as an index: CUDA refuses
    assert "for generator but found 'cpu'" in facts["generator_refused"]


def test_handed_over_kv_stays_on_its_layers_gpu_and_bookkeeping_beside_the_inputs(two_gpus):
    """K and V of each decode layer are sent from that layer's GPU (layer 1 sits on vgpu:1); positions and counts
    stay where the inputs are, so the decode side builds its masks without a copy per layer."""
    handoff = _ok(json.loads((two_gpus / "facts.json").read_text())["handoff"])
    layer_device = {l: DEVICE_MAP[f"model.layers.{l}"] for l in (0, 1, 3)}
    assert layer_device[1] == "vgpu:1" != layer_device[0]
    assert {int(l): d for l, d in handoff.items()} == {l: [dev, dev, "vgpu:0", "vgpu:0"] for l, dev in layer_device.items()}


@pytest.mark.parametrize("batching", ["cpu", "gpu"])
@pytest.mark.parametrize("case", list(cases.PLANS))
def test_scores_generations_and_bytes_equal_the_unsplit_models(two_gpus, case, batching, monkeypatch):
    """Batched as on the CPU (decode groups of like length, row copies) and as on a GPU (one padded forward)."""
    from harness.quality import scoring

    split = _ok(json.loads((two_gpus / ("scorer.json" if batching == "cpu" else "scorer_gpu_batching.json")).read_text())[case])
    if batching == "gpu":
        monkeypatch.delitem(scoring.FORWARD_TOKENS, "cpu")  # the unsplit side batched the same way
    one = cases.score_all(cases.eager_tiny().model, only=case)[case]
    assert split["ll"] == one["ll"]
    assert split["gen"] == one["gen"]
    assert split["tally"] == one["tally"]
    if case != "unified":
        assert one["tally"]["kv_bytes"] > 0


def test_copies_that_methods_train_take_their_data_across_gpus(two_gpus):
    """streamline's replacement for a run on either side of a device boundary (its data and its output installed)
    and PDTrim's healed blocks: the unsplit model's numbers. The replacement took its input from one GPU and its
    MLP's output from another, and indexed a later GPU's states with a mask made on the first."""
    split = _ok(json.loads((two_gpus / "trained.json").read_text()))
    assert split == json.loads(json.dumps(cases.trained_copies(cases.eager_tiny().model)))


@pytest.mark.parametrize("case", list(cases.PLANS))
def test_latency_on_one_gpu_hands_over_the_cpus_bytes_and_tokens(two_gpus, case):
    """`latency` with the model on vgpu:1, eager and static decode: every tensor its steps make is on the model's
    device (a stray CPU tensor would be refused), and the bytes and greedy tokens are the CPU run's."""
    on_gpu = _ok(json.loads((two_gpus / "latency.json").read_text())[case])
    assert on_gpu == cases.latency_all(cases.eager_tiny().model, case)


@pytest.mark.parametrize("case", list(cases.PLANS))
def test_latency_of_the_model_over_two_gpus_hands_over_the_cpus_bytes_and_tokens(two_gpus, case):
    """`latency --device-map`: eager and static decode of the model spread over vgpu:0 and vgpu:1 give the unsplit
    model's bytes and greedy tokens. The static path's step column was computed on the last layer's GPU and added
    to each layer's own (refused, as CUDA refuses it, before the column was moved to each tensor's device)."""
    split = _ok(json.loads((two_gpus / "latency_split.json").read_text())[case])
    assert split == cases.latency_all(cases.eager_tiny().model, case)


def _ok(value):
    """A two-GPU result, or the test fails with the traceback the two-GPU process caught."""
    if isinstance(value, dict) and "error" in value:
        pytest.fail(value["error"], pytrace=False)
    return value


def test_the_gpu_script_runs_its_gpu_branches_on_a_virtual_gpu(two_gpus):
    """benchmarks/gpu_check.py, sections (a)-(c), with the device `vgpu:0`: every tensor it makes is on the right device
    (the CPU smoke takes the CPU branches), (a) compares the device's float32 with the CPU's at identical KV bytes, and
    (b)'s static rows send the eager rows' bytes. (d) needs a second process with the device; not run here."""
    assert _ok(json.loads((two_gpus / "gpu_check_rc.json").read_text())) == 0
    result = json.loads((two_gpus / "gpu_check.json").read_text())
    assert not result.get("errors"), result.get("errors")
    assert [(r["candidate"], r["kv_compared"], r["pass"]) for r in result["agreement"]] == \
        [("vgpu:0 float32", "bytes", True)] * 2
    static = [r for r in result["latency"] if r["decode_mode"] == "static"]
    assert len(static) == 6 and all(r["kv_bytes_equal_eager"] for r in static)  # 3 plans x batch 1, 3
    assert result["hbm_bound"]["rows"]
