"""KV token-policy baselines (StreamingLLM-, SnapKV-style) at the handoff, on the tiny random Llama.

Bytes against arithmetic and against PDTrim's first/last policy on the same plan; SnapKV's
selection against an independent computation of its criterion from the layer weights; decode over
a per-head selection against the dense model with those key positions masked per head.
"""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import random_requests

from harness.pd import arch
from harness.pd.cache import PDCache
from harness.pd.engine import final_logits, make_handoff, run_layers
from harness.pd.kv_select import observe_prefill
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan
from harness.quality import long_tasks
from harness.quality.scoring import Scorer

ALL = (0, 1, 2, 3)
PDTRIM_LIKE = KVPolicy(3, 5, (1, 3))  # selected layers S = {1, 3}, n_first + n_last = 8
DECODE = (0, 1, 3)


def streaming(budget, **kw):
    return KVPolicy(kind="streaming", budget=budget, **kw)


def snapkv(budget, **kw):
    return KVPolicy(kind="snapkv", budget=budget, **{"window": 4, "kernel": 3, **kw})


def per_token_bytes(model) -> int:
    kv_heads, head_dim = arch.kv_heads_and_dim(model.config)
    return 2 * kv_heads * head_dim * next(model.parameters()).element_size()


def prefill(model, plan, prompts):
    """Prefill stage as the scorer runs it: (cache, lengths, last-position logits)."""
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    pos = torch.arange(width)[None].expand(len(prompts), width)
    cache = PDCache(retain=plan.decode_layers)
    with torch.inference_mode(), observe_prefill(model, plan, cache, lengths):
        h = run_layers(model, plan.prefill_layers, ids, pos, pos < lengths[:, None], cache)
    return cache, lengths, final_logits(model, h[torch.arange(len(prompts)), lengths - 1])


def per_request(sent, layer, r):
    """Rows of request r in a packed layer: (start, stop)."""
    c = sent.counts[layer].tolist()
    return sum(c[:r]), sum(c[: r + 1])


# -- policies as data ----------------------------------------------------------------------------
def test_old_records_load_and_policies_roundtrip():
    from conftest import ROOT

    from harness.store import records

    old = {"n_first": 16, "n_last": 48, "layers": [12, 13]}
    assert KVPolicy.from_dict(old) == KVPolicy(16, 48, (12, 13)) and KVPolicy.from_dict(old).to_dict() == old
    stored = records.load(ROOT / "results" / "issue3" / "default" / "pdtrim__disaggregated.json")
    plan = PruningPlan.from_dict(stored.plan)
    assert plan.kv_policy.kind == "first_last" and plan.to_dict()["kv_policy"] == stored.plan["kv_policy"]
    for budget in (KVBudget(match=PDTRIM_LIKE), KVBudget(tokens=7), KVBudget(ratio=0.1)):
        for pol in (streaming(budget, n_sink=2), snapkv(budget, pooling="avg")):
            p = PruningPlan("x", 4, ALL, DECODE, pol)
            assert PruningPlan.from_dict(p.to_dict()) == p and not p.is_unified


@pytest.mark.parametrize("make, message", [
    (lambda: KVBudget(), "exactly one"),
    (lambda: KVBudget(tokens=3, ratio=0.5), "exactly one"),
    (lambda: KVBudget(match=streaming(KVBudget(tokens=2))), "first_last"),
    (lambda: KVPolicy(kind="streaming"), "needs a budget"),
    (lambda: KVPolicy(1, 1, (0,), budget=KVBudget(tokens=2)), "no budget"),
    (lambda: snapkv(KVBudget(tokens=2), kernel=4), "odd kernel"),
    (lambda: KVPolicy(kind="no_such_policy", budget=KVBudget(tokens=2)), "kind must be one of"),
    (lambda: PruningPlan("x", 4, ALL, (0, 1), streaming(KVBudget(match=PDTRIM_LIKE))), "budget.match.layers"),
])
def test_invalid_policies_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_budget_rule_spreads_exactly_the_reference_layer_positions():
    for n_dec in (1, 3, 7, 22):
        decode = tuple(range(n_dec))
        for n_sel in range(n_dec + 1):
            ref = KVPolicy(2, 5, decode[n_dec - n_sel:]) if n_sel else KVPolicy()
            pol = snapkv(KVBudget(match=ref))
            for T in (1, 2, 6, 7, 8, 9, 31, 100, 1024):
                ks = pol.layer_budgets(decode, T)
                assert sum(ks) == (n_dec - n_sel) * T + n_sel * min(T, 7)  # PDTRIM.md §3's count
                assert all(1 <= k <= T for k in ks) and max(ks) - min(ks) <= 1
                assert ks == sorted(ks, reverse=True)  # the remainder goes to the first decode layers
    assert streaming(KVBudget(ratio=0.1)).layer_budgets((0, 1), 30) == [3, 3]  # exact decimal: ceil(0.1 · 30) = 3
    assert streaming(KVBudget(ratio=0.1)).layer_budgets((0,), 5) == [1]
    assert streaming(KVBudget(tokens=12)).layer_budgets((0, 1), 5) == [5, 5]


# -- bytes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["streaming", "snapkv"])
def test_bytes_equal_arithmetic_and_pdtrim_bytes_on_the_same_plan(tiny, kind):
    reqs = random_requests(15, 256, seed=5, max_ctx=60)  # shared contexts, lengths 1..60 around n_first + n_last
    model = tiny.model
    pdtrim = PruningPlan("x", 4, ALL, DECODE, PDTRIM_LIKE)
    pol = (streaming if kind == "streaming" else snapkv)(KVBudget(match=PDTRIM_LIKE))
    base = Scorer(model, pdtrim, "disaggregated", max_length=4096, batch_size=4)
    base.loglikelihood(reqs)
    ours = Scorer(model, pdtrim.replace(kv_policy=pol), "disaggregated", max_length=4096, batch_size=4)
    ours.loglikelihood(reqs)
    per_tok = per_token_bytes(model)
    arithmetic = sum(per_tok * ((len(DECODE) - 2) * len(c) + 2 * min(len(c), 8)) for c, _ in reqs)
    assert ours.tally.kv_bytes == base.tally.kv_bytes == arithmetic
    paged = sum(per_tok * 16 * math.ceil(k / 16) for c, _ in reqs for k in pol.layer_budgets(DECODE, len(c)))
    assert ours.tally.kv_bytes_paged == paged


def test_explicit_budgets_and_short_prompts_send_everything(tiny):
    model = tiny.model
    prompts = [list(range(1, 41)), list(range(3, 9))]  # T = 40 and T = 6
    cases = [(streaming(KVBudget(tokens=10)), [10, 6]), (snapkv(KVBudget(tokens=10)), [10, 6]),
             (snapkv(KVBudget(ratio=0.25)), [10, 2])]  # ceil(0.25 · 40), ceil(0.25 · 6)
    for pol, counts in cases:
        plan = PruningPlan("x", 4, ALL, DECODE, pol)
        cache, lengths, _ = prefill(model, plan, prompts)
        sent = make_handoff(cache, plan, lengths)
        for layer in DECODE:
            assert sent.counts[layer].tolist() == counts
            a, b = per_request(sent, layer, 1)
            pos = sent.positions[layer][a:b]
            heads = pos.T.tolist() if pol.per_head else [pos.tolist()]
            if counts[1] == 6:  # T = 6 <= budget: every position, in every head
                assert heads == [[0, 1, 2, 3, 4, 5]] * len(heads)
            else:  # under the budget, the window's last positions
                assert heads == [[4, 5]] * len(heads)
        assert sent.kv_bytes == per_token_bytes(model) * len(DECODE) * sum(counts)


# -- exactness when nothing is dropped -------------------------------------------------------------
@pytest.mark.parametrize("pol", [streaming(KVBudget(tokens=10_000)), snapkv(KVBudget(tokens=10_000)),
                                 snapkv(KVBudget(ratio=1.0)), streaming(KVBudget(match=KVPolicy()))])
def test_budget_covering_every_prompt_equals_full_kv_exactly(tiny, pol):
    reqs = random_requests(12, 256, seed=8, max_ctx=50)
    plan = PruningPlan("x", 4, ALL, DECODE, pol)
    full = PruningPlan("x", 4, ALL, DECODE)
    a = Scorer(tiny.model, plan, "disaggregated", max_length=4096, batch_size=5)
    b = Scorer(tiny.model, full, "disaggregated", max_length=4096, batch_size=5)
    assert a.loglikelihood(reqs) == b.loglikelihood(reqs)  # bit-identical log-probs
    assert a.tally.as_dict()["kv_bytes"] == b.tally.as_dict()["kv_bytes"]
    prompts = [c for c, _ in reqs[:4]]
    assert a.generate(prompts, 6) == b.generate(prompts, 6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_observing_the_prefill_changes_nothing(tiny, impl):
    model = tiny.model
    prompts = [list(range(5, 45)), list(range(7, 20))]
    plan = PruningPlan("x", 4, ALL, DECODE, snapkv(KVBudget(tokens=6)))
    previous = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        observed, _, logits = prefill(model, plan, prompts)
        plain, _, ref = prefill(model, plan.replace(kv_policy=KVPolicy()), prompts)
    finally:
        model.config._attn_implementation = previous
    assert torch.equal(logits, ref)
    assert all(torch.equal(observed.keys[i], plain.keys[i]) for i in DECODE)
    assert sorted(observed.window_scores) == list(DECODE) and not plain.window_scores
    assert model.config._attn_implementation == previous


# -- streaming selection ------------------------------------------------------------------------
def test_streaming_sends_sinks_and_recent_positions_in_every_layer(tiny):
    pol = streaming(KVBudget(match=PDTRIM_LIKE), n_sink=2)
    plan = PruningPlan("x", 4, ALL, DECODE, pol)
    prompts = [list(range(1, 31)), list(range(2, 12)), [5, 6, 7]]
    cache, lengths, _ = prefill(tiny.model, plan, prompts)
    sent = make_handoff(cache, plan, lengths)
    for r, p in enumerate(prompts):
        T = len(p)
        for layer, k in zip(DECODE, pol.layer_budgets(DECODE, T)):
            a, b = per_request(sent, layer, r)
            sinks = min(2, k)
            assert sent.positions[layer][a:b].tolist() == list(range(sinks)) + list(range(T - (k - sinks), T))
            assert torch.equal(sent.keys[layer][a:b], cache.keys[layer][r].transpose(0, 1)[sent.positions[layer][a:b]])


# -- SnapKV selection against an independent computation -------------------------------------------------
def rotate(x, pos, theta):
    """Rotary embedding by its definition (half-split layout), float64."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def prompt_attention(model, prompt, layer):
    """probs[h][t]: query head h's causal softmax at prompt position t over keys 0..t (float64, from the weights)."""
    cfg = model.config
    T, H, G = len(prompt), cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    with torch.inference_mode():
        h_in = model.model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[layer][0]
        blk = model.model.layers[layer]
        x = blk.input_layernorm(h_in).double()
        q = F.linear(x, blk.self_attn.q_proj.weight.double()).view(T, H, d)
        kk = F.linear(x, blk.self_attn.k_proj.weight.double()).view(T, G, d)
    pos = torch.arange(T)
    theta = cfg.rope_parameters["rope_theta"]
    assert cfg.rope_parameters["rope_type"] == "default"
    q, kk = rotate(q, pos, theta), rotate(kk, pos, theta)
    return [[torch.softmax(kk[: t + 1, h // (H // G)] @ q[t, h] / math.sqrt(d), dim=0) for t in range(T)] for h in range(H)]


def snapkv_reference(model, prompt, layer, k, window, kernel, pooling, order="mean_then_pool"):
    """Per KV head: the positions SnapKV keeps, computed from the layer's weights for one prompt alone.

    `order`: average the group's votes, then pool (mean_then_pool), or pool each query head's votes,
    then average (pool_then_mean, SnapKV's reference code)."""
    cfg = model.config
    T, H, G = len(prompt), cfg.num_attention_heads, cfg.num_key_value_heads
    if k >= T:
        return [list(range(T))] * G
    if k <= window:
        return [list(range(T - k, T))] * G
    probs = prompt_attention(model, prompt, layer)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    out = []
    for g in range(G):
        heads = []
        for head in range(g * (H // G), (g + 1) * (H // G)):
            votes = torch.zeros(T, dtype=torch.float64)
            for t in range(T - window, T):  # window query at position t sees keys 0..t
                votes[: t + 1] += probs[head][t]
            heads.append(votes[: T - window])
        if order == "mean_then_pool":
            prefix = (sum(heads) / len(heads))[None, None]
            pooled = pool(prefix, kernel, stride=1, padding=kernel // 2)[0, 0].tolist()
        else:
            per_head = [pool(v[None, None], kernel, stride=1, padding=kernel // 2)[0, 0] for v in heads]
            pooled = (sum(per_head) / len(per_head)).tolist()
        top = sorted(range(T - window), key=lambda c: (-pooled[c], c))[: k - window]
        out.append(sorted(top) + list(range(T - window, T)))
    return out


@pytest.mark.parametrize("order", ["mean_then_pool", "pool_then_mean"])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_selection_equals_independent_criterion(tiny, pooling, order):
    model = tiny.model
    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (40, 23, 9, 14)]
    pol = KVPolicy(kind="snapkv", budget=KVBudget(match=KVPolicy(2, 4, (2,))), window=5, kernel=3, pooling=pooling,
                   order=order)
    decode = (0, 2, 3)
    plan = PruningPlan("x", 4, ALL, decode, pol)
    cache, lengths, _ = prefill(model, plan, prompts)
    sent = make_handoff(cache, plan, lengths)
    assert sent.positions[2].shape == (int(sent.counts[2].sum()), model.config.num_key_value_heads)
    for r, p in enumerate(prompts):
        for layer, k in zip(decode, pol.layer_budgets(decode, len(p))):
            a, b = per_request(sent, layer, r)
            got = sent.positions[layer][a:b].T.tolist()  # per KV head, in position order
            assert got == snapkv_reference(model, p, layer, k, 5, 3, pooling, order), (r, layer)
            for g, cols in enumerate(got):  # the K and V sent are the prefill's, at their original (rotated) positions
                assert torch.equal(sent.keys[layer][a:b, g], cache.keys[layer][r, g, cols])
                assert torch.equal(sent.values[layer][a:b, g], cache.values[layer][r, g, cols])
    assert not torch.equal(sent.positions[0][:, 0], sent.positions[0][:, 1])  # the two KV heads chose differently


# -- decode over a per-head selection ----------------------------------------------------------------
def masked_reference(model, reqs, kept):
    """Sum of continuation log-probs from one dense forward per request in which the continuation
    queries of KV head g's query heads see only the prompt positions kept[i][g] (in every layer)."""
    H, G = model.config.num_attention_heads, model.config.num_key_value_heads
    out = []
    with torch.inference_mode():
        for (ctx, cont), heads in zip(reqs, kept):
            T, n = len(ctx), len(ctx) + len(cont) - 1
            allowed = torch.ones(n, n).tril().bool()[None].repeat(H, 1, 1)
            for h in range(H):
                dropped = torch.ones(T, dtype=torch.bool)
                dropped[heads[h // (H // G)]] = False
                allowed[h, T:, :T] &= ~dropped
            mask = allowed[None]
            if model.config._attn_implementation == "eager":  # eager attention adds its mask
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]), attention_mask=mask).logits[0].float(), -1)
            out.append(sum(float(logp[T - 1 + j, t]) for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_per_head_decode_equals_dense_model_with_those_positions_masked_per_head(tiny, impl):
    """Prefill and decode run every layer; each request's per-head selection is made the same in every layer
    (layer 0's window scores copied to the others, 9 positions per head), so that one dense forward with a
    per-head 4D mask can express it: continuation queries must not see what their KV head did not send."""
    model = tiny.model
    reqs = [r for r in random_requests(16, 256, seed=9, max_ctx=40, max_cont=5) if len(r[0]) > 12][:12]
    reqs += [(reqs[0][0], reqs[0][1][:2]), (reqs[1][0], reqs[1][1][:1] + [7])]  # one-query decode steps too
    pol = snapkv(KVBudget(tokens=9))
    plan = PruningPlan("x", 4, ALL, ALL, pol)
    previous = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        kept, got = [], []
        for ctx, cont in reqs:
            cache, lengths, last = prefill(model, plan, [ctx])
            for layer in ALL:
                cache.window_scores[layer] = cache.window_scores[0]  # same scores -> same selection in all layers
            sent = make_handoff(cache, plan, lengths)
            assert all(torch.equal(sent.positions[layer], sent.positions[0]) for layer in ALL)
            kept.append(sent.positions[0].T.tolist())
            dcache = sent.to_cache()
            assert dcache.positions[0].shape == (1, model.config.num_key_value_heads, 9)
            lp = torch.log_softmax(last.float(), -1)[0, cont[0]].item()
            if len(cont) > 1:
                pos = (len(ctx) + torch.arange(len(cont) - 1))[None]
                h = run_layers(model, ALL, torch.tensor([cont[:-1]]), pos, torch.ones_like(pos, dtype=torch.bool), dcache)
                with torch.inference_mode():
                    logp = torch.log_softmax(final_logits(model, h[0]), -1)
                lp += sum(float(logp[j, t]) for j, t in enumerate(cont[1:]))
            got.append(lp)
        ref = masked_reference(model, reqs, kept)
    finally:
        model.config._attn_implementation = previous
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4
    full = Scorer(model, PruningPlan.dense("u", 4), "disaggregated", max_length=4096).loglikelihood(reqs)
    assert max(abs(a - b[0]) for a, b in zip(got, full)) > 1e-3  # the selection really hid positions
    assert any(len({tuple(h) for h in heads}) > 1 for heads in kept)  # heads kept different positions


def test_batched_per_head_decode_equals_one_request_at_a_time(tiny):
    """Padding columns of requests with fewer kept positions, per head, stay invisible."""
    reqs = random_requests(14, 256, seed=10, max_ctx=45, max_cont=5)
    plan = PruningPlan("x", 4, ALL, DECODE, snapkv(KVBudget(match=PDTRIM_LIKE)))
    one = Scorer(tiny.model, plan, "disaggregated", max_length=4096, batch_size=1)
    many = Scorer(tiny.model, plan, "disaggregated", max_length=4096, batch_size=7)
    assert max(abs(a[0] - b[0]) for a, b in zip(one.loglikelihood(reqs), many.loglikelihood(reqs))) <= 1e-4
    prompts = [c for c, _ in reqs[::2]]  # different lengths: one-query decode steps with per-head padding masks
    assert one.generate(prompts, 6) == many.generate(prompts, 6)


# -- the rest of the harness ---------------------------------------------------------------------
def test_static_decode_and_latency_runner_take_per_head_policies(tiny):
    from harness.latency import measure as latency
    from harness.pd.static_decode import StaticKV, decode_step

    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3), snapkv(KVBudget(match=KVPolicy(2, 5, (3,)))))
    prompts = [torch.randint(0, 256, (30,)).tolist(), torch.randint(0, 256, (21,)).tolist()]
    cache, lengths, logits = prefill(model, plan, prompts)
    sent = make_handoff(cache, plan, lengths)
    te = ts = logits.argmax(-1)
    eager_cache, skv = sent.to_cache(), StaticKV(sent.to_cache(), 6)
    ones = torch.ones((2, 1), dtype=torch.bool)
    with torch.inference_mode():
        for step in range(6):
            p = (lengths + step)[:, None]
            te = final_logits(model, run_layers(model, plan.decode_layers, te[:, None], p, ones, eager_cache)[:, 0]).argmax(-1)
            ts = decode_step(model, plan.decode_layers, ts[:, None], p, skv)
            skv.advance()
            assert torch.equal(te, ts)
    w = latency.Workload(prompt_tokens=40, decode_tokens=4, batch_size=2)
    ref = latency.measure(model, plan.replace(kv_policy=KVPolicy(2, 5, (3,))), w, warmup=0, repeats=1)
    for mode in ("eager", "static"):
        m = latency.measure(model, plan, w, warmup=0, repeats=1, decode_mode=mode)
        assert m.kv_bytes == ref.kv_bytes and len(m.itl_ms) == 3


@pytest.mark.parametrize("task", ["pd_ppl", "passkey"])
def test_long_tasks_run_with_token_policies_at_pdtrim_bytes(tiny, data_dir, task):
    opts = (long_tasks.pd_ppl.PplConfig(prompt_tokens=(128,), cont_tokens=8, docs=2, batch_size=2) if task == "pd_ppl"
            else long_tasks.passkey.PasskeyConfig(lengths=(512,), depths=(0.5,), repeats=2, max_new_tokens=6, batch_size=2))
    pdtrim = PruningPlan("x", 4, ALL, (0, 2, 3), KVPolicy(4, 8, (2, 3)))
    kv = {}
    for pol in (pdtrim.kv_policy, streaming(KVBudget(match=pdtrim.kv_policy)), snapkv(KVBudget(match=pdtrim.kv_policy))):
        s = Scorer(tiny.model, pdtrim.replace(kv_policy=pol), "disaggregated", max_length=4096, batch_size=4)
        out = long_tasks.evaluate(task, s, tiny.tokenizer, data_dir, opts, None)
        kv[pol.kind] = out["kv_by"]
    assert kv["streaming"] == {k: {**v, "kv_bytes_paged": kv["streaming"][k]["kv_bytes_paged"]} for k, v in kv["first_last"].items()}
    assert all(kv["snapkv"][s]["kv_bytes"] == kv["first_last"][s]["kv_bytes"] for s in kv["first_last"])


# -- the methods ---------------------------------------------------------------------------------
PDTRIM_TINY = ("k_prefill=1 k_decode=2 k_unified=2 search_samples=8 max_cont=8 probe_prompts=2 probe_tokens=64 "
               "probe_steps=4 n_first=2 n_last=6 tau=0.0")


@pytest.fixture(scope="module")
def calib(tiny, data_dir):
    from harness.quality.calibration import CalibConfig, build_calibration

    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


def test_methods_wrap_pdtrim_and_spend_its_bytes(tiny, calib):
    import methods

    pd_cls = methods.get("pdtrim")
    from harness.config import build_options
    from methods.kv.baselines import parse_base_options

    pd_plan = pd_cls(build_options(pd_cls.Config, "pdtrim", parse_base_options(PDTRIM_TINY))).plan(tiny.model, calib, "disaggregated")
    assert pd_plan.kv_policy.layers  # tau = 0: every decode layer is selected
    reqs = random_requests(8, 256, seed=12, max_ctx=60)
    ref = Scorer(tiny.model, pd_plan, "disaggregated", max_length=4096)
    ref.loglikelihood(reqs)
    for name in ("streamingllm", "snapkv"):
        cls = methods.get(name)
        m = cls(cls.Config(base_options=PDTRIM_TINY))
        assert m.needs_calibration
        plan = m.plan(tiny.model, calib, "disaggregated")
        assert plan.method == name and plan.kv_policy.budget.match == pd_plan.kv_policy
        assert (plan.prefill_layers, plan.decode_layers) == (pd_plan.prefill_layers, pd_plan.decode_layers)
        assert plan.info["base"]["method"] == "pdtrim"
        with m.apply(tiny.model, plan) as applied:
            s = Scorer(tiny.model, applied, "disaggregated", max_length=4096)
            s.loglikelihood(reqs)
        assert s.tally.kv_bytes == ref.tally.kv_bytes
        uni = m.plan(tiny.model, calib, "unified")
        assert uni.is_unified and uni.method == name


def test_method_options_are_checked():
    import methods
    from harness.errors import UsageError

    snap, stream = methods.get("snapkv"), methods.get("streamingllm")
    with pytest.raises(UsageError, match="at most one of keep_tokens"):
        snap(snap.Config(base="manual", keep_tokens=4, keep_ratio=0.5))
    with pytest.raises(UsageError, match="must choose layers"):
        stream(stream.Config(base="snapkv"))
    with pytest.raises(UsageError, match="pdtrim has no option 'k_dcode'"):
        stream(stream.Config(base_options="k_dcode=3"))
    with pytest.raises(UsageError, match="odd kernel"):
        snap(snap.Config(base="manual", kernel=6))
    with pytest.raises(UsageError, match="^snapkv.base=pdtrm: unknown method"):
        snap(snap.Config(base="pdtrm"))
    with pytest.raises(UsageError, match=r"^snapkv: tail.k=-1: must be >= 0"):  # names the option the user set
        snap(snap.Config(base="tail", base_options="k=-1"))
    with pytest.raises(UsageError, match=r"^streamingllm.base_options: k is given twice \('1' and '2'\)"):
        stream(stream.Config(base="tail", base_options="k=1 k=2"))
    m = stream(stream.Config(base="manual", base_options="decode_layers=0,3 kv_layers=3 n_first=1 n_last=2", keep_ratio=0.5))
    assert not m.needs_calibration and m.base.config.decode_layers == (0, 3)


def test_docs_and_docstrings_document_every_option():
    """Registry-driven (a new policy needs no edit here): the methods table of docs/kv_policies.md lists the
    options every KV baseline shares; each policy's class docstring documents each of its own options."""
    from conftest import ROOT

    import methods
    from harness.pd.kv import get_policy, policy_names
    from methods.kv.baselines import BASE_OPTIONS, KVBaseline

    table = (ROOT / "docs" / "kv_policies.md").read_text().split("## The methods", 1)[1].split("\n## ", 1)[0]
    missing = [name for name, _, _ in BASE_OPTIONS if f"`{name}`" not in table]
    assert not missing, f"docs/kv_policies.md lacks the KV baselines' options {missing}"
    for name in policy_names():
        cls = get_policy(name)
        undocumented = [o for o in cls.option_names() if f"- `{o}`:" not in (cls.__doc__ or "")]
        assert not undocumented, f"{cls.__qualname__} ({name}) does not document options {undocumented} in its docstring"
        if cls.method_name:
            method = methods.get(cls.method_name)
            assert issubclass(method, KVBaseline) and method.policy_cls is cls
            assert method.summary == cls.method_summary != ""


def test_every_policy_roundtrips_and_is_registered_once():
    from harness.pd.kv import get_policy, policy_from_dict, policy_names

    assert policy_names()[0] == "first_last" and {"streaming", "snapkv"} <= set(policy_names())
    for name in policy_names():
        cls = get_policy(name)
        pol = cls() if cls.matchable else cls(budget=KVBudget(match=PDTRIM_LIKE))
        assert policy_from_dict(pol.to_dict()) == pol and KVPolicy.from_dict(pol.to_dict()) == pol
        assert pol.kind == name and isinstance(pol, KVPolicy) and pol.describe()
        assert pickle.loads(pickle.dumps(pol)) == pol
        if cls.method_name:  # the generated method class and its Config are module attributes: picklable by name
            import methods

            config = methods.get(cls.method_name).Config()
            assert pickle.loads(pickle.dumps(config)) == config


def test_snapkv_order_key_is_written_only_when_not_the_records_order():
    old = {"kind": "snapkv", "budget": {"tokens": 4}, "window": 32, "kernel": 7, "pooling": "max"}  # a pre-`order` record
    pol = KVPolicy.from_dict(old)
    assert pol.order == "mean_then_pool" and pol.to_dict() == old
    assert not pol.observation().per_query_head
    new = snapkv(KVBudget(tokens=4))
    assert new.order == "pool_then_mean" and new.to_dict()["order"] == "pool_then_mean" and new.observation().per_query_head


@pytest.mark.parametrize("chunk", [256, 2])  # 2: windows longer than a chunk are summed chunk by chunk
@pytest.mark.parametrize("per_query_head", [False, True])
def test_window_attention_equals_per_request_softmax_sums(monkeypatch, chunk, per_query_head):
    """window_attention on random tensors against loops over each request's own prompt, in float64: rows shorter
    than the window (padded batch, H2O's every-query window) add nothing for the queries they do not have."""
    from harness.pd import kv_select

    monkeypatch.setattr(kv_select, "QUERY_CHUNK", chunk)
    torch.manual_seed(0)
    Hk, group, d, C, scale = 2, 3, 4, 7, 0.5
    lengths = torch.tensor([7, 3, 5])
    pos = torch.stack([torch.where(torch.arange(C) < n, torch.arange(C), -1) for n in lengths.tolist()])
    query, key = torch.randn(3, Hk * group, C, d), torch.randn(3, Hk, C, d)
    for window in (4, C):
        got = kv_select.window_attention(query, key, pos, lengths, window, scale, per_query_head)
        for r, T in enumerate(lengths.tolist()):
            want = torch.zeros(Hk, group, C, dtype=torch.float64)
            for h in range(Hk * group):
                for t in range(max(0, T - window), T):  # the request's last `window` queries, each over keys 0..t
                    s = (key[r, h // group, : t + 1].double() @ query[r, h, t].double()) * scale
                    want[h // group, h % group, : t + 1] += torch.softmax(s, dim=0)
            want = want if per_query_head else want.mean(dim=1)
            assert torch.allclose(got[r].double(), want, atol=1e-5), (window, r)


@pytest.mark.parametrize("ratio, num, den", [(0.1, 1, 10), (0.07, 7, 100), (0.55, 11, 20), (0.14, 7, 50)])
def test_ratio_budget_is_the_decimal_ratio_rounded_up_in_integers(ratio, num, den):
    """min(T, max(1, ceil(num · T / den))) in integers: 0.07 of 100 positions keeps 7 (in floats 0.07 · 100 is
    7.000000000000001, rounded up to 8)."""
    budget = KVBudget(ratio=ratio)
    for T in range(1, 301):
        want = min(T, max(1, -(-num * T // den)))
        assert budget.per_layer(T) == want, (ratio, T)
        assert budget.total(DECODE, T) == len(DECODE) * want
    assert not budget.keeps_all


def test_a_ratio_outside_zero_to_one_is_refused_and_a_ratio_of_one_keeps_everything():
    for bad in (1.5, -0.25):
        with pytest.raises(ValueError, match="ratio"):
            KVBudget(ratio=bad)
    with pytest.raises(ValueError, match="tokens"):
        KVBudget(tokens=-3)
    whole = KVBudget(ratio=1.0)
    assert whole.keeps_all and all(whole.per_layer(T) == T for T in (1, 7, 64))
    assert PruningPlan("x", 4, ALL, ALL, streaming(whole)).is_unified  # every position of every layer: no KV pruning


def test_the_method_contract_catches_a_keep_that_depends_on_the_layer():
    """The handoff asks a head-shared, non-observing policy once per budget and reuses that mask in later layers, so a
    plug-in whose keep() reads `layer` would send another layer's positions without a word; the contract says so."""
    from method_contract import check_keep_ignores_the_layer

    pol = streaming(KVBudget(tokens=5))
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), kv_policy=pol)
    check_keep_ignores_the_layer(plan)  # the package's streaming policy keeps by position alone
    real = pol.keep
    object.__setattr__(pol, "keep", lambda layer, *a: real(layer, *a) if layer < 2 else real(layer, *a).roll(1, dims=1))
    with pytest.raises(AssertionError, match="streaming.keep.. gave layer 2 another mask than layer 0"):
        check_keep_ignores_the_layer(plan)


def test_an_observed_prefill_does_not_keep_its_cache_alive(tiny):
    """Regression: transformers' attention registry held the prefill observer, and so the last prefill cache of a
    SnapKV-style policy (every decode layer's prompt K/V), after the handoff and its callers had dropped it."""
    import gc
    import weakref

    from harness.pd.batching import pad_tokens
    from harness.pd.stages import StagedModel

    plan = PruningPlan("x", 4, ALL, DECODE, snapkv(KVBudget(tokens=3)))
    out = StagedModel(tiny.model, plan).prefill(pad_tokens([[5] * 9, [7] * 4], "cpu"))
    cache = weakref.ref(out.cache)
    del out
    gc.collect()
    assert cache() is None
