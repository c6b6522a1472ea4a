"""PyramidKV (harness/pd/kv/pyramidkv.py): the budget split, SnapKV's selection per layer, bytes, serialisation, the method."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import random_requests
from test_kv_policies import ALL, DECODE, PDTRIM_LIKE, per_request, per_token_bytes, prefill, snapkv_reference

from harness.pd.engine import make_handoff
from harness.pd.kv.pyramidkv import pyramid_split
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan
from harness.quality.scoring import Scorer


def pyramid(budget, **kw):
    return KVPolicy(kind="pyramidkv", budget=budget, **{"window": 4, "kernel": 3, **kw})


def brute_force_split(total, n, T, beta, floor=1):
    """The rule of the docstring by enumeration: among all integer vectors in [floor, T]^n summing to `total`,
    the one closest (L1, then lexicographically largest first layers) to floor + water-filled arithmetic shares."""
    b = Fraction(beta)
    w = [(2 - 1 / b) - (2 - 2 / b) * Fraction(i, n - 1) for i in range(n)] if n > 1 else [Fraction(1)]
    cap, rest, fixed = T - floor, Fraction(total - n * floor), {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        over = [i for i in free if rest * w[i] / sum(w[j] for j in free) > cap]
        if not over:
            break
        fixed.update({i: Fraction(cap) for i in over})
        rest -= cap * len(over)
    target = [floor + (fixed[i] if i in fixed else rest * w[i] / sum(w[j] for j in free)) for i in range(n)]

    def vectors(k, left):
        if k == n - 1:
            if floor <= left <= T:
                yield (left,)
            return
        for v in range(floor, T + 1):
            for tail in vectors(k + 1, left - v):
                yield (v, *tail)

    return list(min(vectors(0, total), key=lambda v: (sum(abs(x - t) for x, t in zip(v, target)),
                                                      [-x for x in v])))


def test_split_sums_exactly_decreases_and_equals_brute_force():
    for n in (1, 2, 3, 4):
        for T in (1, 2, 5, 9):
            for total in range(n, n * T + 1):
                for beta in (1, 2, 20):
                    ks = pyramid_split(total, n, T, beta)
                    assert sum(ks) == total and all(1 <= k <= T for k in ks) and ks == sorted(ks, reverse=True)
                    assert ks == brute_force_split(total, n, T, beta), (n, T, total, beta)
    assert pyramid_split(100, 5, 100, 20) == [38, 29, 20, 11, 2]  # 1 + 95/5 · (1.95, 1.475, 1, 0.525, 0.05) = 1 + (37.05, 28.025, 19, 9.975, 0.95)
    assert pyramid_split(10, 5, 100, 1) == [2, 2, 2, 2, 2]  # beta 1: flat
    with pytest.raises(ValueError, match="n·floor <= total"):
        pyramid_split(3, 4, 10, 20)
    with pytest.raises(ValueError, match="n·floor <= total"):
        pyramid_split(7, 4, 10, 20, floor=2)


def test_split_above_a_floor_equals_brute_force():
    """reserve_window's split: every layer first gets `floor` positions, the rest shared as above."""
    for n in (1, 2, 3):
        for T in (2, 5, 7):
            for floor in range(1, T + 1):
                for total in range(n * floor, n * T + 1):
                    for beta in (1, 3, 20):
                        ks = pyramid_split(total, n, T, beta, floor)
                        assert sum(ks) == total and all(floor <= k <= T for k in ks) and ks == sorted(ks, reverse=True)
                        assert ks == brute_force_split(total, n, T, beta, floor), (n, T, floor, total, beta)


def test_reserved_window_split_is_the_papers():
    """PyramidKV's code (PyramidKVCluster.update_kv): with capacity C per layer and window w, k = C - w is split
    linearly from 2k - k/beta (first layer) to k/beta (last) and every layer keeps its window on top."""
    decode, T = tuple(range(8)), 4096
    for C, w, beta in ((96, 32, 20), (64, 8, 4), (200, 32, 2)):
        ks = pyramid(KVBudget(tokens=C), window=w, beta=beta).layer_budgets(decode, T)
        k = C - w
        top, low = 2 * k - k / beta, k / beta
        paper = [w + top - (top - low) * i / (len(decode) - 1) for i in range(len(decode))]
        assert sum(ks) == C * len(decode) and max(abs(a - b) for a, b in zip(ks, paper)) < 1, (C, w, beta, ks, paper)
        assert min(ks) >= w
    old = pyramid(KVBudget(tokens=96), window=32, beta=20, reserve_window=False).layer_budgets(decode, T)
    assert old[-1] < 32 and sum(old) == 96 * 8  # the split without the window: the deepest layer loses it


def test_budgets_match_the_first_last_total_per_request():
    for n_dec in (1, 3, 7, 22):
        decode = tuple(range(n_dec))
        for n_sel in range(0, n_dec + 1, 2):
            ref = KVPolicy(2, 5, decode[n_dec - n_sel:]) if n_sel else KVPolicy()
            pol = pyramid(KVBudget(match=ref))
            for T in (1, 2, 6, 7, 9, 31, 100, 1024):
                ks = pol.layer_budgets(decode, T)
                assert sum(ks) == (n_dec - n_sel) * T + n_sel * min(T, 7)
                assert all(1 <= k <= T for k in ks) and ks == sorted(ks, reverse=True)
                assert all(k >= min(4, T, sum(ks) // n_dec) for k in ks)  # the window (4) where B(T) allows it
    ks = pyramid(KVBudget(tokens=40), reserve_window=False).layer_budgets(tuple(range(8)), 1000)
    assert sum(ks) == 320 and ks[0] > 2 * 40 - 10 and ks[-1] < 5  # a real pyramid: ~78 down to ~3
    ks = pyramid(KVBudget(tokens=40)).layer_budgets(tuple(range(8)), 1000)
    assert sum(ks) == 320 and ks[0] > 2 * 40 - 10 - 4 and 4 <= ks[-1] < 9  # ~74 down to window 4 + ~2


def test_a_budget_below_the_window_reserves_each_layers_share_of_it():
    """B(T) / n under the window (keep_tokens or keep_ratio below it, or a small first/last budget to match): each
    layer first keeps floor(B / n) positions, not one more, which would ask pyramid_split for more than B(T)."""
    decode = tuple(range(8))  # window 4
    assert pyramid(KVBudget(tokens=3)).layer_budgets(decode, 100) == [3] * 8
    assert pyramid(KVBudget(ratio=0.02)).layer_budgets(decode, 100) == [2] * 8
    # B = 12 + 7 · min(12, 2) = 26: 3 per layer reserved, the 2 left to the first layers
    assert pyramid(KVBudget(match=KVPolicy(1, 1, decode[1:]))).layer_budgets(decode, 12) == [4, 4, 3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("order", ["pool_then_mean", "mean_then_pool"])
def test_selection_is_snapkv_at_each_layers_own_budget(tiny, order):
    model = tiny.model
    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (40, 23, 9, 14)]
    pol = pyramid(KVBudget(match=KVPolicy(2, 4, (2,))), window=5, order=order, beta=4)
    decode = (0, 2, 3)
    plan = PruningPlan("x", 4, ALL, decode, pol)
    cache, lengths, _ = prefill(model, plan, prompts)
    sent = make_handoff(cache, plan, lengths)
    for r, p in enumerate(prompts):
        ks = pol.layer_budgets(decode, len(p))
        for layer, k in zip(decode, ks):
            a, b = per_request(sent, layer, r)
            assert b - a == k
            assert sent.positions[layer][a:b].T.tolist() == snapkv_reference(model, p, layer, k, 5, 3, "max", order)
    assert len(set(pol.layer_budgets(decode, 40))) > 1  # the layers really got different budgets


def test_bytes_equal_arithmetic_and_pdtrim_bytes_on_the_same_plan(tiny):
    reqs = random_requests(15, 256, seed=5, max_ctx=60)
    pdtrim = PruningPlan("x", 4, ALL, DECODE, PDTRIM_LIKE)
    pol = pyramid(KVBudget(match=PDTRIM_LIKE))
    base = Scorer(tiny.model, pdtrim, "disaggregated", max_length=4096, batch_size=4)
    base.loglikelihood(reqs)
    ours = Scorer(tiny.model, pdtrim.replace(kv_policy=pol), "disaggregated", max_length=4096, batch_size=4)
    ours.loglikelihood(reqs)
    per_tok = per_token_bytes(tiny.model)
    arithmetic = sum(per_tok * ((len(DECODE) - 2) * len(c) + 2 * min(len(c), 8)) for c, _ in reqs)
    assert ours.tally.kv_bytes == base.tally.kv_bytes == arithmetic
    paged = sum(per_tok * 16 * math.ceil(k / 16) for c, _ in reqs for k in pol.layer_budgets(DECODE, len(c)))
    assert ours.tally.kv_bytes_paged == paged


def test_roundtrip_and_validation():
    for budget in (KVBudget(match=PDTRIM_LIKE), KVBudget(tokens=7), KVBudget(ratio=0.1)):
        pol = pyramid(budget, beta=8.0, order="mean_then_pool")
        d = pol.to_dict()
        assert d == {"kind": "pyramidkv", "budget": budget.to_dict(), "window": 4, "kernel": 3, "pooling": "max",
                     "order": "mean_then_pool", "beta": 8.0, "reserve_window": True}
        assert KVPolicy.from_dict(d) == pol and pol.per_head
        p = PruningPlan("x", 4, ALL, DECODE, pol)
        assert PruningPlan.from_dict(p.to_dict()) == p
    assert pyramid(KVBudget(tokens=7)).to_dict()["order"] == "pool_then_mean"
    old = {k: v for k, v in pyramid(KVBudget(tokens=7)).to_dict().items() if k != "reserve_window"}
    assert KVPolicy.from_dict(old).reserve_window is False  # a dict from before the option: the whole split
    assert "reserve_window" not in pyramid(KVBudget(tokens=7), reserve_window=False).to_dict()
    assert pyramid(KVBudget(tokens=7), beta=8, reserve_window=False).describe().startswith(
        "pyramidkv (pyramid beta 8, window 4, max-pool 3")
    assert pyramid(KVBudget(tokens=7), beta=8).describe().startswith(
        "pyramidkv (pyramid beta 8 above each layer's window, window 4, max-pool 3")
    with pytest.raises(ValueError, match="beta >= 1"):
        pyramid(KVBudget(tokens=2), beta=0.5)
    with pytest.raises(ValueError, match="odd kernel"):
        pyramid(KVBudget(tokens=2), kernel=2)


def test_method_wraps_a_base_plan_at_its_bytes(tiny):
    import methods

    cls = methods.get("pyramidkv")
    m = cls(cls.Config(base="manual", base_options="decode_layers=0,3 kv_layers=3 n_first=1 n_last=2", beta=5.0))
    plan = m.plan(tiny.model, None, "disaggregated")
    assert plan.kv_policy == KVPolicy(kind="pyramidkv", budget=KVBudget(match=KVPolicy(1, 2, (3,))), beta=5.0)
    assert "1/beta" in plan.info["kv"]["budget_rule"] and m.options()["order"] == "pool_then_mean"


def test_options_left_out_mean_the_split_before_the_option():
    """`reserve_window=false` is left out of the stored options (its dict default); read back it must be False, not the
    method's new default: else --plans-from (quality and latency) and export took a plan of the whole split for the
    paper's, and the other way round, as made alike."""
    import methods
    from harness.run.reuse import with_defaults

    cls = methods.get("pyramidkv")
    paper, whole = cls(cls.Config()), cls(cls.Config(reserve_window=False))
    assert "reserve_window" not in whole.options() and paper.options()["reserve_window"] is True
    assert with_defaults(whole, whole.options())["reserve_window"] is False
    assert with_defaults(paper, paper.options())["reserve_window"] is True
    before = {k: v for k, v in paper.options().items() if k != "reserve_window"}  # a record from before the option
    assert with_defaults(paper, before) == with_defaults(whole, whole.options()) != with_defaults(paper, paper.options())


def test_a_record_of_the_split_before_reserve_window_is_not_reused_by_the_papers(tiny, data_dir, tmp_path):
    """A record without reserve_window (made before it, or with reserve_window=false) is not the default run's: the
    option is not 'added since, now at its default' (absent means False); it was reused under the paper's split."""
    from harness.config import RunConfig
    from harness.errors import UsageError
    from harness.run import pipeline

    run = dict(model="random:tiny", methods=("pyramidkv",), tasks=("arc_easy",), limit=2, device="cpu",
               modes=("disaggregated",), data_dir=str(data_dir))
    sets = ("pyramidkv.base=tail", "pyramidkv.base_options=k=1")
    pipeline.run(RunConfig(**run, overrides=(*sets, "pyramidkv.reserve_window=false")), tmp_path, loaded=tiny)
    with pytest.raises(UsageError, match="different configuration"):
        pipeline.run(RunConfig(**run, overrides=sets), tmp_path, loaded=tiny)
    pipeline.run(RunConfig(**run, overrides=(*sets, "pyramidkv.reserve_window=false")), tmp_path, loaded=tiny)  # its own
