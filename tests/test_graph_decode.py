"""The CUDA-graph decode path (GraphDecoder) on the CPU, under simulated graphs (tests/simulated_cuda_graphs.py):
first that the simulation holds a graph's rules, then that the graph path writes every step what the uncaptured
static path writes."""

from __future__ import annotations

import pytest
import torch
from simulated_cuda_graphs import NOT_PERMITTED, simulated_cuda_graphs

from harness.latency import measure as latency
from harness.pd.batching import TokenBatch
from harness.pd.kv import get_policy, policy_names
from harness.pd.plan import PruningPlan
from harness.pd.stages import StagedModel
from harness.pd.static_decode import GraphDecoder, StaticKV, decode_step


def _captured(fn):
    with simulated_cuda_graphs():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
    return g, out


def test_a_simulated_replay_reruns_the_recorded_kernels_with_the_python_values_frozen_at_capture():
    """As on a GPU: a Python number read at capture is baked in, and the static input's new contents are read."""
    x, acc, step = torch.zeros(3), torch.zeros(3), [1.0]
    g, out = _captured(lambda: acc.add_(x * step[0]) + 0)
    step[0] = 100.0  # Python is not re-run: the graph keeps 1.0
    x.copy_(torch.tensor([1.0, 2.0, 3.0]))
    g.replay()
    assert acc.tolist() == [1.0, 2.0, 3.0] and out.tolist() == [1.0, 2.0, 3.0]
    g.replay()
    assert acc.tolist() == [2.0, 4.0, 6.0] and out.tolist() == [2.0, 4.0, 6.0]


def test_a_simulated_capture_runs_nothing():
    """After the capture, a tensor it wrote holds its old contents, and a tensor it made holds garbage."""
    acc = torch.ones(2)
    g, (made, made_int) = _captured(lambda: (acc.add_(1) * 2, acc.long() + 1))
    assert acc.tolist() == [1.0, 1.0]
    assert made.isnan().all() and made_int.tolist() == [-777, -777]
    g.replay()
    assert acc.tolist() == [2.0, 2.0] and made.tolist() == [4.0, 4.0] and made_int.tolist() == [3, 3]


@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: int(t[0]), lambda t: bool(t.any()), lambda t: t[t > 0], lambda t: t.nonzero(),
    lambda t: torch.tensor([1, 2]) + t, lambda t: t.tolist(), lambda t: torch.equal(t, t), lambda t: t.cpu(),
    lambda t: t + torch.tensor(2, device=t.device), lambda t: t.__setitem__(0, 7),
    lambda t: t.__setitem__(torch.zeros(1, dtype=torch.long), 7), lambda t: t.masked_fill(t > 1, t.max()),
], ids=["item", "int", "bool", "mask-index", "nonzero", "host-tensor", "tolist", "equal", "cpu", "scalar-to-device",
        "set-one-element", "set-indexed", "masked-fill-device-value"])
def test_a_simulated_capture_refuses_what_waits_for_the_device(read):
    t = torch.arange(4)
    with pytest.raises(RuntimeError, match=NOT_PERMITTED):
        _captured(lambda: read(t))
    with torch.inference_mode(), pytest.raises(RuntimeError, match=NOT_PERMITTED):  # other op names there
        _captured(lambda: read(t))


def _set_first(t):
    r = t.clone()
    r[:1] = 7  # a slice: fill_ with the scalar, not a copy
    return r


@pytest.mark.parametrize("use", [
    lambda t: t.index_fill(0, torch.zeros(1, dtype=torch.long), 7), _set_first,
    lambda t: t.masked_fill(torch.arange(4) == 0, torch.tensor(7)), lambda t: torch.where(torch.arange(4) == 0, torch.tensor(7), t),
    lambda t: t + (torch.tensor(7) - t) * (torch.arange(4) == 0),
], ids=["scalar", "set-slice", "masked-fill-host-value", "where", "operand"])
def test_a_simulated_capture_accepts_a_python_scalar_operand(use):
    """A Python scalar, or a 0-dim host tensor made of one, is a kernel argument (read on the host, from host memory,
    at capture); only a copy of it to the device (`x[0] = 7`, `x[idx] = 7`: refused above) is not."""
    t = torch.arange(4)
    g, out = _captured(lambda: use(t))
    t.add_(1)
    g.replay()
    assert out.tolist() == [7, 2, 3, 4]


@torch.inference_mode()
def test_a_simulated_capture_restores_every_older_storage_it_wrote_under_inference_mode():
    """Views made under inference mode have no `_base`: the second view of a buffer written in one capture is of a
    storage already saved, and must be restored with it (the graph decode path captures under inference mode)."""
    buf = torch.zeros(2, 4)
    left, right = buf[:, :2], buf[:, 2:]
    g, _ = _captured(lambda: (left.add_(1), right.add_(2)))
    assert buf.tolist() == [[0, 0, 0, 0]] * 2
    g.replay()
    assert buf.tolist() == [[1, 1, 2, 2]] * 2


def test_a_failed_simulated_capture_leaves_older_tensors_as_they_were():
    acc = torch.zeros(2)
    with pytest.raises(RuntimeError, match=NOT_PERMITTED):
        _captured(lambda: acc.add_(1).sum().item())
    assert acc.tolist() == [0, 0]


def test_a_simulated_replay_refuses_a_tensor_given_other_memory_after_the_capture():
    """A graph reads the address captured: rebinding a weight's memory (`.data =`, as `module.to()` does) leaves the
    graph reading the old, perhaps freed, memory on a GPU; here the replay refuses."""
    w, x = torch.ones(3), torch.ones(3)
    g, out = _captured(lambda: x * w)
    g.replay()
    w.data = torch.full((3,), 10.0)
    with pytest.raises(RuntimeError, match="old address"):
        g.replay()


def _handed(model, plan, batch: TokenBatch):
    staged = StagedModel(model, plan)
    out = staged.prefill(batch)
    return staged.receive(staged.handoff(out)), staged.logits(out.last_hidden).argmax(-1)


@pytest.mark.parametrize("kind", policy_names())  # the registry: a new policy is covered with no edit
@torch.inference_mode()
def test_graph_decode_writes_every_step_what_the_static_path_writes(tiny, kind):
    """Step by step, the graph path's next tokens and every decode layer's K, V and positions buffers equal the
    uncaptured static path's, bit for bit: a graph that replayed a stale position, token or step column would
    differ here even where the greedy tokens happen to agree."""
    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3), get_policy(kind).example((0, 1, 3)))
    g = torch.Generator().manual_seed(1)
    batch = TokenBatch.dense(torch.randint(0, model.config.vocab_size, (3, 12), generator=g))
    steps = 5
    (dcache, tok), (dcache2, _) = _handed(model, plan, batch), _handed(model, plan, batch)
    static, graphed = StaticKV(dcache, steps), StaticKV(dcache2, steps)
    with simulated_cuda_graphs():
        decoder = GraphDecoder(model, plan.decode_layers, graphed, tok[:, None], batch.lengths[:, None].clone())
    a = b = tok
    for step in range(steps):
        pos = (batch.lengths + step)[:, None]
        a = decode_step(model, plan.decode_layers, a[:, None], pos, static)
        static.advance()
        b = decoder.step(b[:, None], pos).clone()
        assert torch.equal(a, b), f"step {step}"
        for layer in plan.decode_layers:
            for buf in ("keys", "values", "positions"):
                assert torch.equal(getattr(static, buf)[layer], getattr(graphed, buf)[layer]), f"step {step}: {buf}[{layer}]"
    assert decoder.graph.replays == steps + 1  # one at the capture (the upload, the warm-up's step again), one a step


def test_a_graph_decoder_that_does_not_copy_the_new_positions_in_is_caught(tiny, monkeypatch):
    """The comparison above sees a stale position; the greedy tokens of a latency run alone need not."""
    def stale(self, tok, pos):
        self.tok.copy_(tok)
        self.graph.replay()
        self.cache.advance()
        return self.out

    monkeypatch.setattr(GraphDecoder, "step", stale)
    with pytest.raises(AssertionError, match="step 1: keys"):
        test_graph_decode_writes_every_step_what_the_static_path_writes(tiny, "first_last")


def test_the_graph_latency_path_runs_on_simulated_graphs(tiny):
    """measure(decode_mode="graph") end to end: capture timed apart once per measured run, the eager run's tokens."""
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3), get_policy("first_last").example((0, 1, 3)))
    w = latency.Workload(prompt_tokens=12, decode_tokens=5, batch_size=2)
    eager = latency.measure(tiny.model, plan, w, warmup=0, repeats=1)
    with simulated_cuda_graphs():
        m = latency.measure(tiny.model, plan, w, warmup=1, repeats=2, decode_mode="graph")
    assert len(m.graph_capture_ms) == 2 and len(m.itl_ms) == 2 * 4 and torch.equal(m.tokens, eager.tokens)


def test_a_simulated_replay_refreshes_a_copy_made_by_an_op_that_may_return_a_view():
    """`.float()` of an integer tensor (aten.to, a view in its schema) copies: its output is refreshed on replay.
    Judged by the schema, the rotary embedding read the capture's positions on every replay."""
    pos = torch.tensor([3])
    g, out = _captured(lambda: pos.float() * 2)
    pos.fill_(5)
    g.replay()
    assert out.tolist() == [10.0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: (b)'s dtype in the device command
def test_gpu_check_takes_its_graph_branches_under_simulated_graphs(tmp_path, dtype):
    """benchmarks/gpu_check.py sections (a)-(c) with graph rows, as on a GPU: every graph row sends the eager row's
    bytes, and (a) (always fp32) finds the graph path's greedy tokens equal to the eager path's."""
    import json
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    out = tmp_path / "g.json"
    with simulated_cuda_graphs():
        rc = gpu_check.main(["--shapes", "tiny", "--sections", "a,b,c", "--prompt-tokens", "24", "--decode-tokens", "4",
                             "--batch-sizes", "1,2", "--agreement-context", "40", "--agreement-cont", "4", "--device", "cpu",
                             "--dtype", dtype, "--warmup", "1", "--repeats", "1", "--json", str(out), "--md", str(tmp_path / "g.md")])
    res = json.loads(out.read_text())
    assert rc == 0 and "errors" not in res and not any(s["step"] == "latency graph rows" for s in res["skipped"])
    graph = [r for r in res["latency"] if r["decode_mode"] == "graph"]
    assert len(graph) == 3 * 2 and all(r["kv_bytes_equal_eager"] is True and r["tpot_ms_p50"] > 0 for r in graph)
    assert [r["decode_paths_equal"] for r in res["agreement"]] == [{"static": True, "graph": True}] * 2


@torch.inference_mode()
def test_layers_handed_one_positions_tensor_share_one_buffer_and_one_mask_a_step(tiny, monkeypatch):
    """A step writes each distinct positions buffer and builds its mask once, not once per layer (on Llama-3-8B,
    1,559 -> 1,310 kernels a dense step: benchmarks/decode_step_ops.py). Layers kept whole share one; a KV policy's
    layers (keep pattern) another."""
    from harness.pd import static_decode

    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3), get_policy("first_last").example((2, 3)))
    batch = TokenBatch.dense(torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)))
    dcache, tok = _handed(model, plan, batch)
    skv = StaticKV(dcache, 3)
    assert skv.positions[0] is skv.positions[1] and skv.positions[2] is skv.positions[3]
    assert skv.positions[1] is not skv.positions[2] and skv.positions[1].shape != skv.positions[2].shape
    built, mask = [], static_decode.attention_mask
    monkeypatch.setattr(static_decode, "attention_mask", lambda *a, **k: built.append(a[0]) or mask(*a, **k))
    decode_step(model, plan.decode_layers, tok[:, None], batch.lengths[:, None], skv)
    assert len(built) == 2 and built[0] is skv.positions[0] and built[1] is skv.positions[2]
    assert skv.positions[0][:, 12].tolist() == [12, 12] and skv.positions[2][:, -3].tolist() == [12, 12]


def test_gpu_checks_small_op_floor_is_replayed_from_a_graph_where_graphs_are(monkeypatch):
    """(c)'s floor per op: one capture of n tiny ops, replayed (1 + repeats) times; eager where there are no graphs."""
    import sys

    import simulated_cuda_graphs as sim
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode_step_ops import small_kernel_s

    replays = []
    monkeypatch.setattr(sim.SimulatedGraph, "replay", lambda self: replays.append(len(self.capture.ops)))
    assert small_kernel_s(torch.device("cpu"), n=50, repeats=2) > 0 and replays == []
    with simulated_cuda_graphs():
        assert small_kernel_s(torch.device("cpu"), n=50, repeats=2) > 0
    assert replays == [50] * 3
