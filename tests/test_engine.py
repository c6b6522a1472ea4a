"""The PD engine against plain HF forwards and against byte arithmetic, on a tiny random Llama."""

import math

import pytest
import torch
from conftest import random_requests, reference_loglikelihood

from harness.pd import arch
from harness.pd.engine import expected_kv_bytes, make_handoff
from harness.pd.plan import KVPolicy, PruningPlan
from harness.quality import scoring
from harness.quality.scoring import Scorer

TOL = 1e-4


def score(tiny, plan, mode, reqs, batch_size=4):
    s = Scorer(tiny.model, plan, mode, max_length=4096, batch_size=batch_size)
    return s.loglikelihood(reqs), s.tally


def absdiff(a, b):
    return max(abs((x[0] if isinstance(x, tuple) else x) - (y[0] if isinstance(y, tuple) else y)) for x, y in zip(a, b))


def test_dense_modes_equal_plain_forward(tiny):
    reqs = random_requests(25, 256, seed=1)
    ref = reference_loglikelihood(tiny.model, reqs)
    uni, _ = score(tiny, PruningPlan.dense("unpruned", 4), "unified", reqs)
    dis, tally = score(tiny, PruningPlan.dense("unpruned", 4), "disaggregated", reqs)
    assert absdiff(uni, ref) <= TOL
    assert absdiff(dis, ref) <= TOL
    assert [g for _, g in uni] == [g for _, g in dis]
    assert tally.handoffs == len(reqs)


def test_pruned_unified_equals_disaggregated_and_swapped_forward(tiny):
    reqs = random_requests(20, 256, seed=2)
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 1, 3))
    uni, _ = score(tiny, plan, "unified", reqs)
    dis, _ = score(tiny, plan, "disaggregated", reqs)
    with arch.layers_swapped(tiny.model, (0, 1, 3)):
        ref = reference_loglikelihood(tiny.model, reqs)
    assert absdiff(uni, ref) <= TOL and absdiff(dis, ref) <= TOL


def test_scores_do_not_depend_on_batch_size(tiny):
    reqs = random_requests(20, 256, seed=3)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), KVPolicy(2, 3, (2,)))
    a, ta = score(tiny, plan, "disaggregated", reqs, batch_size=1)
    b, tb = score(tiny, plan, "disaggregated", reqs, batch_size=7)
    assert absdiff(a, b) <= TOL
    assert ta.as_dict() == tb.as_dict()


def recorded_decode_shapes(scorer: Scorer, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, width) of every decode-stage forward the scorer runs from now on."""
    shapes, decode = [], scorer.staged.decode

    def recording(cache, batch, **kw):
        shapes.append(tuple(batch.ids.shape))
        return decode(cache, batch, **kw)

    monkeypatch.setattr(scorer.staged, "decode", recording)
    return shapes


@pytest.mark.parametrize("policy", [None, KVPolicy(2, 3, (2,))])
def test_continuations_decoded_in_groups_of_like_length_score_as_one_padded_batch(tiny, policy, monkeypatch):
    # answers of 1 to 30 tokens, as HellaSwag and PIQA have: in one padded forward most decode tokens are padding
    reqs = random_requests(16, 256, seed=5, max_cont=30)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), *([policy] if policy else []))
    runs = {}
    for name, forward_tokens in (("one", math.inf), ("grouped", 8.0)):
        s = Scorer(tiny.model, plan, "disaggregated", max_length=4096, batch_size=16)
        s.forward_tokens = forward_tokens
        shapes = recorded_decode_shapes(s, monkeypatch)
        runs[name] = s.loglikelihood(reqs), s.tally.as_dict(), shapes
    (one, tally_one, shapes_one), (grouped, tally_grouped, shapes_grouped) = runs["one"], runs["grouped"]
    assert absdiff(one, grouped) <= TOL and [g for _, g in one] == [g for _, g in grouped]
    assert tally_one == tally_grouped  # the handoff is the batch's either way
    needed = sum(len(x) - 1 for _, x in reqs)
    padded = {name: sum(r * w for r, w in shapes) for name, (_, _, shapes) in runs.items()}
    assert len(shapes_grouped) > len(shapes_one) and needed <= padded["grouped"] < padded["one"]
    assert sum(r for r, _ in shapes_grouped) == sum(len(x) > 1 for _, x in reqs)  # one-token answers need no decode


def recorded_row_blocks(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, width) of every prompt block the scorers pad from now on (prefill, or a unified forward)."""
    blocks, pad = [], scoring.pad_tokens

    def recording(rows, device, **kw):
        batch = pad(rows, device, **kw)
        if kw.get("start") is None:  # continuations extend a prompt: they start after it
            blocks.append(tuple(batch.ids.shape))
        return batch

    monkeypatch.setattr(scoring, "pad_tokens", recording)
    return blocks


@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_batches_cut_where_padding_costs_more_than_a_forward_score_as_full_batches(tiny, mode, monkeypatch):
    # prompts of 1 to 120 tokens, several answers to some: a batch of 8 pads its short prompts to the longest
    reqs = random_requests(24, 256, seed=7, max_ctx=120)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), KVPolicy(2, 3, (2,))) if mode == "disaggregated" \
        else PruningPlan("x", 4, (0, 1, 3), (0, 1, 3))
    blocks = recorded_row_blocks(monkeypatch)
    runs = {}
    for name, forward_tokens in (("full", math.inf), ("cut", 16.0)):
        s = Scorer(tiny.model, plan, mode, max_length=4096, batch_size=8)
        s.forward_tokens = forward_tokens
        start = len(blocks)
        runs[name] = s.loglikelihood(reqs), s.tally.as_dict(), blocks[start:], s.sizes_used
    (full, tally_full, blocks_full, sizes_full), (cut, tally_cut, blocks_cut, sizes_cut) = runs["full"], runs["cut"]
    assert absdiff(full, cut) <= TOL and [g for _, g in full] == [g for _, g in cut]
    assert tally_full == tally_cut and sizes_full == sizes_cut == [8]  # the same handoffs; the size is a cap
    assert len(blocks_full) == math.ceil(len(reqs) / 8)  # no measured forward cost: batches of 8, as before
    padded = {name: sum(r * w for r, w in b) for name, (_, _, b, _) in runs.items()}
    assert len(blocks_cut) > len(blocks_full) and padded["cut"] < padded["full"]


@pytest.mark.parametrize("decode", [(0, 1, 2, 3), (0, 1, 3), (1,)])
def test_kv_bytes_equal_arithmetic(tiny, decode):
    reqs = random_requests(15, 256, seed=4)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), decode)
    _, tally = score(tiny, plan, "disaggregated", reqs)
    cfg, dt = tiny.model.config, torch.float32
    assert tally.kv_bytes == sum(expected_kv_bytes(cfg, len(decode), len(c), dt) for c, _ in reqs)
    assert tally.kv_bytes_paged == sum(expected_kv_bytes(cfg, len(decode), 16 * math.ceil(len(c) / 16), dt) for c, _ in reqs)
    dense = sum(expected_kv_bytes(cfg, 4, len(c), dt) for c, _ in reqs)
    assert tally.kv_bytes * 4 == dense * len(decode)  # exactly |K_D| / L of the dense bytes


def test_kv_policy_bytes_equal_arithmetic(tiny):
    reqs = random_requests(15, 256, seed=5, max_ctx=60)
    nf, nl, selected, decode = 3, 5, (1, 3), (0, 1, 3)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), decode, KVPolicy(nf, nl, selected))
    _, tally = score(tiny, plan, "disaggregated", reqs)
    kv_heads, head_dim = arch.kv_heads_and_dim(tiny.model.config)
    per_token = 2 * kv_heads * head_dim * 4
    expect = sum(per_token * ((len(decode) - len(selected)) * len(c) + len(selected) * min(len(c), nf + nl)) for c, _ in reqs)
    assert tally.kv_bytes == expect
    assert tally.kv_bytes < sum(expected_kv_bytes(tiny.model.config, 3, len(c), torch.float32) for c, _ in reqs)


def test_dropped_positions_are_invisible_to_decode(tiny):
    """KV pruning in every layer == a full forward whose continuation queries cannot see dropped columns."""
    nf, nl = 2, 3
    reqs = [r for r in random_requests(20, 256, seed=6, max_ctx=30, max_cont=6) if len(r[0]) > nf + nl]
    assert len(reqs) >= 10

    def mask_fn(t_ctx, n_cont):
        n = t_ctx + n_cont - 1
        allowed = torch.ones(n, n).tril().bool()
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[nf : t_ctx - nl] = True
        allowed[t_ctx:, :] &= ~dropped  # decode queries (positions >= T) lose the dropped prompt columns
        return allowed[None, None]

    ref = reference_loglikelihood(tiny.model, reqs, mask_fn)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3), KVPolicy(nf, nl, (0, 1, 2, 3)))
    got, _ = score(tiny, plan, "disaggregated", reqs)
    assert absdiff(got, ref) <= TOL
    full, _ = score(tiny, PruningPlan.dense("u", 4), "disaggregated", reqs)
    assert absdiff(got, full) > 1e-3  # the policy really changed what decode saw


def test_handoff_sends_kept_positions_of_decode_layers_only(tiny):
    reqs = random_requests(6, 256, seed=7, max_ctx=40, shared=1)
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (1, 2), KVPolicy(2, 4, (2,)))
    s = Scorer(tiny.model, plan, "disaggregated", max_length=4096)
    prompts = [c for c, _ in reqs]
    out = s._prefill(prompts)
    cache, lengths = out.cache, out.lengths
    sent = make_handoff(cache, plan, lengths)
    assert sorted(sent.keys) == [1, 2]
    dec = sent.to_cache()
    for r, c in enumerate(prompts):
        t = len(c)
        full_pos = [p for p in dec.positions[1][r].tolist() if p >= 0]
        kept_pos = [p for p in dec.positions[2][r].tolist() if p >= 0]
        assert full_pos == list(range(t))
        assert kept_pos == sorted(set(range(min(2, t))) | set(range(max(0, t - 4), t)))
        # the K handed over is the prefill K at those positions, unchanged
        k_dec = dec.keys[2][r][:, : len(kept_pos)]
        assert torch.equal(k_dec, cache.keys[2][r][:, kept_pos])


def test_policy_covering_whole_prompt_changes_nothing(tiny):
    reqs = random_requests(15, 256, seed=8, max_ctx=8)
    plan_kv = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), KVPolicy(4, 4, (0, 2, 3)))
    plan_all = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3))
    a, ta = score(tiny, plan_kv, "disaggregated", reqs)
    b, tb = score(tiny, plan_all, "disaggregated", reqs)
    assert a == b
    assert ta.as_dict() == tb.as_dict()


def test_generation_modes_agree_with_hf_generate(tiny):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 17, 9)]
    dense = PruningPlan.dense("u", 4)
    uni = Scorer(tiny.model, dense, "unified", max_length=4096).generate(prompts, 12)
    dis = Scorer(tiny.model, dense, "disaggregated", max_length=4096).generate(prompts, 12)
    assert uni == dis
    for p, g in zip(prompts, uni):
        ref = tiny.model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert g == ref
    scorer = Scorer(tiny.model, dense, "disaggregated", max_length=4096)
    assert scorer.generate(prompts, 0) == [[], [], []] and [len(g) for g in scorer.generate(prompts, 1)] == [1, 1, 1]
    with pytest.raises(ValueError, match="context 1 is empty"):  # no last token to continue from
        scorer.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="is for a 3-layer model, this model has 4"):  # would skip block 3 silently
        Scorer(tiny.model, PruningPlan.dense("u", 3), "disaggregated", max_length=4096)


def test_swapping_layers_copies_nothing_and_undoes_exactly(tiny):
    model = tiny.model
    ids = torch.randint(0, 256, (2, 11))
    with torch.inference_mode():
        before = model(ids).logits.clone()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    layers_obj = arch.decoder_layers(model)
    with arch.layers_swapped(model, (0, 3)):
        assert len(arch.decoder_layers(model)) == 2
        assert arch.decoder_layers(model)[1] is layers_obj[3]
        with torch.inference_mode():
            assert not torch.equal(model(ids).logits, before)
    assert arch.decoder_layers(model) is layers_obj
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


def test_engine_leaves_model_untouched(tiny):
    model = tiny.model
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        before = model(ids).logits.clone()
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    score(tiny, PruningPlan("x", 4, (0, 2, 3), (3,), KVPolicy(1, 1, (3,))), "disaggregated", random_requests(5, 256))
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_mask_per_kv_head_and_for_padding_queries(impl):
    """Query head h reads KV head h // groups (repeat_kv's order); a query sees keys 0 <= pos <= its own; a padding
    query sees every key (no empty row). Against loops over heads, queries and keys."""
    from harness.pd.engine import attention_mask

    per_head = torch.tensor([[[0, 2, 5, -1], [1, 3, 4, 5]]])  # (batch 1, 2 KV heads, 4 columns)
    qpos, qvalid, groups = torch.tensor([[4, 6, -1]]), torch.tensor([[True, True, False]]), 2
    for kpos, heads in ((per_head, 2 * groups), (per_head[:, 0], 1)):
        got = attention_mask(kpos, qpos, qvalid, torch.float32, impl, groups if kpos.dim() == 3 else 1)
        assert tuple(got.shape) == (1, heads, 3, 4)
        for h in range(heads):
            cols = (kpos[0, h // groups] if kpos.dim() == 3 else kpos[0]).tolist()
            for q in range(3):
                want = [not qvalid[0, q] or 0 <= c <= qpos[0, q] for c in cols]
                row = got[0, h, q].tolist()
                assert (row if impl == "sdpa" else [x == 0 for x in row]) == want, (h, q)
                assert impl == "sdpa" or all(x in (0, torch.finfo(torch.float32).min) for x in row)


def test_per_head_packing_takes_each_heads_own_columns_and_refuses_unequal_counts():
    """K/V (N, H, d) and positions (N, H): request by request, head h's j-th kept column in position order."""
    from harness.pd.engine import _pack_per_head

    keep = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]], [[0, 0, 1, 0], [1, 0, 0, 0]]], dtype=torch.bool)  # (2, 2, 4)
    pos, k = torch.tensor([[0, 1, 2, 3], [0, 1, 2, -1]]), torch.tensor([2, 1])
    key, value = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    K, V, P = _pack_per_head(keep, pos, k, key, value)
    cols = [[[0, 2], [1, 3]], [[2], [0]]]  # [request][head] -> kept columns
    assert P.tolist() == [[0, 1], [2, 3], [2, 0]]
    row = 0
    for r in range(2):
        for j in range(int(k[r])):
            for h in range(2):
                assert torch.equal(K[row, h], key[r, h, cols[r][h][j]]) and torch.equal(V[row, h], value[r, h, cols[r][h][j]])
            row += 1
    uneven = keep.clone()
    uneven[0, 1, 3] = False  # head 1 of request 0 keeps one column, head 0 two
    with pytest.raises(RuntimeError, match="same number of positions in every head"):
        _pack_per_head(uneven, pos, k, key, value)


def test_a_frozen_cache_sees_each_steps_own_positions_and_counts_k_and_v_bytes():
    """A frozen view read by two decode steps: each step's key positions are the prompt's plus that step's (not the
    first step's again); kv_bytes counts K and V: 2 · batch · kv_heads · columns · head_dim · element size."""
    from harness.pd.cache import PDCache

    cache = PDCache()
    cache.begin_step(torch.tensor([[0, 1, 2], [0, 1, -1]]))
    k = torch.zeros(2, 3, 3, 5, dtype=torch.bfloat16)  # (batch, kv_heads, columns, head_dim)
    cache.update(k, k.clone(), 4)
    assert cache.kv_bytes() == 2 * 2 * 3 * 3 * 5 * 2
    view = cache.frozen()
    for step in ([[3], [2]], [[3, 4], [2, 3]]):
        view.begin_step(torch.tensor(step))
        assert view.layer_positions(4).tolist() == [[0, 1, 2, *step[0]], [0, 1, -1, *step[1]]]
        q = len(step[0])
        view.update(torch.zeros(2, 3, q, 5, dtype=torch.bfloat16), torch.zeros(2, 3, q, 5, dtype=torch.bfloat16), 4)
    assert cache.positions[4].tolist() == [[0, 1, 2], [0, 1, -1]] and cache.kv_bytes() == 2 * 2 * 3 * 3 * 5 * 2


def test_truncation_keeps_exactly_max_length_plus_one_tokens_and_per_request_sums():
    """lm-eval's rule len(ctx) + len(cont) - 1 <= max_length keeps the last max_length + 1 - len(cont) context tokens;
    a request's score is the sum of its tokens' log-probs, greedy only when every token is."""
    ctx, cont = list(range(10)), [100, 101]
    assert scoring.truncate(ctx, cont, 8) == (list(range(3, 10)), cont)  # 7 + 2 - 1 = 8
    assert scoring.truncate(ctx, cont, 11) == (ctx, cont)  # 10 + 2 - 1 = 11: nothing cut
    got = Scorer._per_request(torch.tensor([-1.0, -2.0, -3.0, -0.5]), torch.tensor([True, False, True, True]), [2, 1, 1])
    assert got == [(-3.0, False), (-3.0, True), (-0.5, True)]


def test_kv_tally_since_a_snapshot_counts_only_what_came_after():
    tally = scoring.KVTally()
    tally.add(1000, 1024, 2, 30)
    before = tally.as_dict()
    tally.add(500, 512, 1, 12)
    assert tally.since(before) == {"kv_bytes": 500, "kv_bytes_paged": 512, "handoffs": 1, "prompt_tokens": 12}
    assert tally.as_dict() == {"kv_bytes": 1500, "kv_bytes_paged": 1536, "handoffs": 3, "prompt_tokens": 42}


def test_generation_feeds_each_token_at_its_position_and_truncates_for_the_new_tokens(tiny, monkeypatch):
    """The prefill predicts the token at position T; decode step s feeds the token generated at T + s - 1. A context
    longer than max_length - max_new_tokens generates as its last max_length - max_new_tokens tokens do."""
    from harness.pd.stages import StagedModel

    dense = PruningPlan.dense("u", 4)
    fed, step = [], StagedModel.step

    def spy(self, cache, tokens, positions, valid=None):
        fed.append(positions.tolist())
        return step(self, cache, tokens, positions, valid)

    monkeypatch.setattr(StagedModel, "step", spy)
    Scorer(tiny.model, dense, "disaggregated", max_length=4096).generate([[5, 6, 7], [8, 9, 10, 11, 12]], 4)
    assert fed == [[5, 3], [6, 4], [7, 5]]  # rows longest first: T = 5 and 3
    monkeypatch.setattr(StagedModel, "step", step)
    rng = torch.Generator().manual_seed(3)
    ctxs = [torch.randint(0, 256, (20,), generator=rng).tolist() for _ in range(4)]
    short = Scorer(tiny.model, dense, "disaggregated", max_length=12).generate(ctxs, 4)
    assert short == Scorer(tiny.model, dense, "disaggregated", max_length=4096).generate([c[-8:] for c in ctxs], 4)
