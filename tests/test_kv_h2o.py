"""H2O (harness/pd/kv/h2o.py): selection against a brute-force heavy-hitter count, bytes, serialisation, the method."""

import math

import pytest
import torch
from conftest import random_requests
from test_kv_policies import ALL, DECODE, PDTRIM_LIKE, per_request, per_token_bytes, prefill, prompt_attention

from harness.pd.engine import make_handoff
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan
from harness.quality.scoring import Scorer


def h2o(budget, **kw):
    return KVPolicy(kind="h2o", budget=budget, **kw)


def brute_force(scores, T, k, recent):
    """Kept positions of one head: the last min(k, recent), then the best k - that of positions < T - recent."""
    n_rec = min(k, recent)
    older = [c for c in range(T) if c < T - recent]
    heavy = sorted(older, key=lambda c: (-scores[c], c))[: k - n_rec]
    return sorted(heavy + list(range(T - n_rec, T)))


def test_keep_on_tiny_tensors_equals_brute_force():
    torch.manual_seed(0)
    R, H, C = 3, 2, 11
    lengths = torch.tensor([11, 7, 4])
    positions = torch.where(torch.arange(C)[None] < lengths[:, None], torch.arange(C)[None], -1)
    scores = torch.randint(0, 4, (R, H, C)).float()  # few values: many ties, which go to the earlier position
    apart = False
    for recent in (0, 2, 5):
        pol = h2o(KVBudget(tokens=1), recent=recent)
        for ks in ([1, 1, 1], [3, 5, 4], [6, 7, 2], [11, 3, 4]):
            k = torch.tensor(ks)
            keep = pol.keep(0, positions, lengths, k, scores)
            for r in range(R):
                T = int(lengths[r])
                for h in range(H):
                    got = torch.nonzero(keep[r, h]).flatten().tolist()
                    assert got == brute_force(scores[r, h].tolist(), T, ks[r], recent), (recent, ks, r, h)
            apart = apart or not torch.equal(keep[:, 0], keep[:, 1])
    assert apart  # the heads of a layer chose different positions (per KV head)


def test_selection_equals_accumulated_attention_from_the_weights(tiny):
    """Heavy hitters from every prompt query's attention, recomputed in float64 from the layer weights."""
    model = tiny.model
    H, G = model.config.num_attention_heads, model.config.num_key_value_heads
    torch.manual_seed(4)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (37, 20, 9, 26)]
    pol = h2o(KVBudget(match=KVPolicy(3, 5, (0, 2, 3))), recent=4)
    decode = (0, 2, 3)
    plan = PruningPlan("x", 4, ALL, decode, pol)
    cache, lengths, _ = prefill(model, plan, prompts)
    sent = make_handoff(cache, plan, lengths)
    for r, p in enumerate(prompts):
        T = len(p)
        for layer, k in zip(decode, pol.layer_budgets(decode, T)):
            probs = prompt_attention(model, p, layer)
            a, b = per_request(sent, layer, r)
            got = sent.positions[layer][a:b].T.tolist()
            for g in range(G):
                acc = torch.zeros(T, dtype=torch.float64)
                for h in range(g * (H // G), (g + 1) * (H // G)):
                    for t in range(T):
                        acc[: t + 1] += probs[h][t] / (H // G)
                assert got[g] == brute_force(acc.tolist(), T, k, 4), (r, layer, g)
                assert torch.equal(sent.keys[layer][a:b, g], cache.keys[layer][r, g, got[g]])


def test_bytes_equal_arithmetic_and_pdtrim_bytes_on_the_same_plan(tiny):
    reqs = random_requests(15, 256, seed=5, max_ctx=60)
    pdtrim = PruningPlan("x", 4, ALL, DECODE, PDTRIM_LIKE)
    pol = h2o(KVBudget(match=PDTRIM_LIKE), recent=3)
    base = Scorer(tiny.model, pdtrim, "disaggregated", max_length=4096, batch_size=4)
    base.loglikelihood(reqs)
    ours = Scorer(tiny.model, pdtrim.replace(kv_policy=pol), "disaggregated", max_length=4096, batch_size=4)
    ours.loglikelihood(reqs)
    per_tok = per_token_bytes(tiny.model)
    arithmetic = sum(per_tok * ((len(DECODE) - 2) * len(c) + 2 * min(len(c), 8)) for c, _ in reqs)
    assert ours.tally.kv_bytes == base.tally.kv_bytes == arithmetic
    paged = sum(per_tok * 16 * math.ceil(k / 16) for c, _ in reqs for k in pol.layer_budgets(DECODE, len(c)))
    assert ours.tally.kv_bytes_paged == paged


def test_full_budget_equals_full_kv_exactly(tiny):
    reqs = random_requests(8, 256, seed=8, max_ctx=40)
    a = Scorer(tiny.model, PruningPlan("x", 4, ALL, DECODE, h2o(KVBudget(ratio=1.0))), "disaggregated", max_length=4096)
    b = Scorer(tiny.model, PruningPlan("x", 4, ALL, DECODE), "disaggregated", max_length=4096)
    assert a.loglikelihood(reqs) == b.loglikelihood(reqs)


def test_roundtrip_and_validation():
    for budget in (KVBudget(match=PDTRIM_LIKE), KVBudget(tokens=7), KVBudget(ratio=0.1)):
        pol = h2o(budget, recent=5)
        d = pol.to_dict()
        assert d == {"kind": "h2o", "budget": budget.to_dict(), "recent": 5}
        assert KVPolicy.from_dict(d) == pol and pol.per_head and pol.observation().queries is None
        p = PruningPlan("x", 4, ALL, DECODE, pol)
        assert PruningPlan.from_dict(p.to_dict()) == p and not p.is_unified
    assert "recent 5 + heavy hitters" in h2o(KVBudget(tokens=7), recent=5).describe()
    with pytest.raises(ValueError, match="recent >= 0"):
        h2o(KVBudget(tokens=2), recent=-1)
    with pytest.raises(ValueError, match="needs a budget"):
        KVPolicy(kind="h2o")


def test_method_wraps_a_base_plan_at_its_bytes(tiny):
    import methods

    cls = methods.get("h2o")
    m = cls(cls.Config(base="manual", base_options="decode_layers=0,3 kv_layers=3 n_first=1 n_last=2", recent=2))
    plan = m.plan(tiny.model, None, "disaggregated")
    assert plan.kv_policy == h2o(KVBudget(match=KVPolicy(1, 2, (3,))), recent=2) and plan.decode_layers == (0, 3)
    assert m.options()["recent"] == 2 and m.plan(tiny.model, None, "unified").is_unified
