"""The padding helper and `StagedModel`, against the engine sequence written out by hand (tiny random Llama).

The hand-written sequence here is the one scoring, latency and the attention probe each spelled
out before `harness.pd.stages` existed; the staged API must give bit-identical tensors and bytes.
"""

import pytest
import torch
from conftest import random_requests

from harness.pd.batching import TokenBatch, pad_tokens
from harness.pd.cache import PDCache
from harness.pd.engine import final_logits, make_handoff, run_layers
from harness.pd.kv_select import observe_prefill
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan
from harness.pd.stages import StagedModel

SNAPKV = KVPolicy(kind="snapkv", budget=KVBudget(tokens=6), window=4, kernel=3)
PLANS = {
    "first_last": PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3), KVPolicy(2, 3, (1, 3))),
    "snapkv": PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), SNAPKV),
    "streaming": PruningPlan("x", 4, (0, 1, 3), (1, 3), KVPolicy(kind="streaming", budget=KVBudget(tokens=5), n_sink=2)),
}


def test_pad_tokens_right_width_start():
    rows = [[5, 6, 7], [8], []]
    b = pad_tokens(rows, "cpu")
    assert b.ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert b.lengths.tolist() == [3, 1, 0]
    assert b.valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert b.positions.tolist() == [[0, 1, 2]] * 3
    w = pad_tokens(rows, "cpu", width=5, start=torch.tensor([10, 20, 30]))
    assert w.ids.shape == (3, 5) and w.positions[:, :2].tolist() == [[10, 11], [20, 21], [30, 31]]
    assert w.valid.sum(1).tolist() == [3, 1, 0]
    assert pad_tokens([[], []], "cpu").ids.shape == (2, 0)
    with pytest.raises(ValueError, match="shorter than the longest row"):
        pad_tokens(rows, "cpu", width=2)


def test_dense_batch():
    ids = torch.arange(6).view(2, 3)
    b = TokenBatch.dense(ids)
    assert b.positions.tolist() == [[0, 1, 2]] * 2 and bool(b.valid.all()) and b.lengths.tolist() == [3, 3]


def _by_hand(model, plan, prompts, rows, conts):
    """The engine sequence as the callers spelled it out: (last hidden, handoff, decode hidden, step logits)."""
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    pos = torch.arange(width)[None, :].expand(len(prompts), width)
    cache = PDCache(retain=plan.decode_layers)
    with torch.inference_mode():
        with observe_prefill(model, plan, cache, lengths):
            h = run_layers(model, plan.prefill_layers, ids, pos, pos < lengths[:, None], cache)
        last = h[torch.arange(len(prompts)), lengths - 1]
        sent = make_handoff(cache, plan, lengths, rows)
        dcache = sent.to_cache()
        steps = max(len(x) for x in conts)
        dids = torch.zeros((len(conts), steps), dtype=torch.long)
        for i, x in enumerate(conts):
            dids[i, : len(x)] = torch.tensor(x)
        req_len = lengths.index_select(0, rows)
        ar = torch.arange(steps)[None, :]
        valid = ar < torch.tensor([len(x) for x in conts])[:, None]
        hd = run_layers(model, plan.decode_layers, dids, req_len[:, None] + ar, valid, dcache)
        tok = final_logits(model, hd[:, -1]).argmax(-1)
        ones = torch.ones((len(conts), 1), dtype=torch.bool)
        step = final_logits(model, run_layers(model, plan.decode_layers, tok[:, None], (req_len + steps)[:, None], ones, dcache)[:, 0])
    return last, sent, hd, step


@pytest.mark.parametrize("name", sorted(PLANS))
def test_staged_model_matches_engine_sequence(tiny, name):
    plan = PLANS[name]
    reqs = random_requests(5, 256, seed=3, max_ctx=20, max_cont=5, shared=2)
    prompts = list(dict.fromkeys(tuple(c) for c, _ in reqs))
    rows = torch.tensor([prompts.index(tuple(c)) for c, _ in reqs])
    conts = [x for _, x in reqs]
    last, sent, hd, step = _by_hand(tiny.model, plan, [list(p) for p in prompts], rows, conts)

    staged = StagedModel(tiny.model, plan)
    out = staged.prefill(pad_tokens(prompts, "cpu"))
    assert torch.equal(out.last_hidden, last)
    got = staged.handoff(out, rows)
    assert got.kv_bytes == sent.kv_bytes and got.kv_bytes_paged() == sent.kv_bytes_paged()
    for layer in sent.keys:
        assert torch.equal(got.keys[layer], sent.keys[layer]) and torch.equal(got.positions[layer], sent.positions[layer])
    cache = staged.receive(got)
    req_len = out.lengths.index_select(0, rows)
    h = staged.decode(cache, pad_tokens(conts, "cpu", start=req_len))
    assert torch.equal(h, hd)
    tok = staged.logits(h[:, -1]).argmax(-1)
    assert torch.equal(staged.step(cache, tok, req_len + h.shape[1]), step)


def test_snapkv_prefill_records_window_scores(tiny):
    batch = pad_tokens([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]], "cpu")
    out = StagedModel(tiny.model, PLANS["snapkv"]).prefill(batch, keep_hidden=True)
    assert sorted(out.cache.window_scores) == [0, 2, 3]  # the decode layers, observed automatically
    dense = StagedModel(tiny.model, PLANS["snapkv"].replace(kv_policy=KVPolicy())).prefill(batch)
    assert dense.hidden is None and not dense.cache.window_scores  # only kept when asked for; nothing to observe
    assert torch.equal(dense.last_hidden, out.last_hidden)  # observing changes no output
    assert torch.equal(out.hidden[torch.arange(2), batch.lengths - 1], out.last_hidden)


def test_decode_resumes_from_a_layer_input(tiny):
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3))
    staged = StagedModel(tiny.model, plan)
    out = staged.prefill(pad_tokens([[1, 2, 3, 4], [5, 6]], "cpu"))
    cont = pad_tokens([[7, 8, 9], [10]], "cpu", start=out.lengths)
    inputs: dict = {}
    full = staged.decode(out.cache.frozen(), cont, collect=inputs)
    assert sorted(inputs) == [0, 1, 2, 3]
    assert torch.equal(staged.decode(out.cache.frozen(), cont, start=2, hidden=inputs[2]), full)
    assert out.cache.keys[0].shape[2] == 4  # frozen: the prompt cache was not extended


def test_prefill_cache_holds_only_the_decode_layers_kv(tiny):
    """Only the decode layers' prompt KV is ever sent, so the prefill cache keeps nothing else:
    2 · |decode layers| · B · kv_heads · T · head_dim · 4 bytes (float32)."""
    from harness.pd import arch

    plan = PruningPlan("x", 4, (0, 1, 2, 3), (1, 3))
    out = StagedModel(tiny.model, plan).prefill(TokenBatch.dense(torch.randint(0, 256, (2, 9))))
    kv_heads, head_dim = arch.kv_heads_and_dim(tiny.model.config)
    assert out.cache.layers == [1, 3] and out.cache.kv_bytes() == 2 * 2 * 2 * kv_heads * 9 * head_dim * 4
