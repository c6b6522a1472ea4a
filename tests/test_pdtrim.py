"""PDTrim on the tiny model: subset rule, greedy choice against independent objectives, seeded
determinism, the attention-share probe against HF eager attentions, and the KV policy it yields."""

import copy
import dataclasses
import itertools

import pytest
import torch
from conftest import pd_kl_from_scratch

import methods
from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import PruningPlan
from harness.quality.calibration import CalibConfig, build_calibration
from harness.quality.scoring import Scorer
from methods.pdtrim.attention_probe import first_last_shares
from methods.pdtrim.objectives import CalibSplit

SMALL = dict(search_samples=8, max_cont=8, probe_prompts=2, probe_tokens=64, probe_steps=3, n_first=2, n_last=6)


@pytest.fixture(scope="module")
def calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


def pdtrim(**kw):
    cls = methods.get("pdtrim")
    return cls(dataclasses.replace(cls.Config(), **{**SMALL, **kw}))


@pytest.mark.parametrize("kp,kd", [(0, 0), (0, 2), (1, 1), (1, 3), (2, 3)])
def test_subset_rule_and_counts(tiny, calib, kp, kd):
    plan = pdtrim(k_prefill=kp, k_decode=kd, kv_pruning=False, sensitivity=False).plan(tiny.model, calib, "disaggregated")
    assert set(plan.removed_prefill) <= set(plan.removed_decode)
    assert set(plan.decode_layers) <= set(plan.prefill_layers)
    assert len(plan.removed_prefill) == kp and len(plan.removed_decode) == kd


def test_k_decode_below_k_prefill_is_a_usage_error():
    with pytest.raises(UsageError, match="R_prefill ⊆ R_decode"):
        pdtrim(k_prefill=3, k_decode=2)


def test_greedy_steps_pick_the_argmin_of_independent_objectives(tiny, calib):
    """Each greedy step removes the candidate with the lowest objective, recomputed here request by
    request through prefill, handoff and decode (no resumption, no batching)."""
    m = pdtrim(k_prefill=1, k_decode=2, kv_pruning=False, sensitivity=False, d_t=-1.0)  # every block in P
    plan = m.plan(tiny.model, calib, "disaggregated")
    split = CalibSplit.from_calibration(calib.input_ids, SMALL["search_samples"], SMALL["max_cont"], 0)
    ep = {j: pd_kl_from_scratch(tiny.model, split.prompts, split.conts, {j}, {j}) for j in range(4)}
    (rp,) = plan.removed_prefill
    assert rp == min(ep, key=lambda j: (ep[j], j))
    ed = {j: pd_kl_from_scratch(tiny.model, split.prompts, split.conts, {rp, j}, {rp}) for j in range(4) if j != rp}
    assert set(plan.removed_decode) == {rp, min(ed, key=lambda j: (ed[j], j))}
    trace = plan.info["search_trace"]
    for j, v in trace["prefill_k1"][0]["candidates"].items():
        assert v == pytest.approx(ep[int(j)], rel=1e-4, abs=1e-6)
    for j, v in trace["decode_k2"][0]["candidates"].items():
        assert v == pytest.approx(ed[int(j)], rel=1e-4, abs=1e-6)


def test_candidates_come_from_the_pruning_set_first(tiny, calib):
    m = pdtrim(k_prefill=1, k_decode=1, kv_pruning=False, sensitivity=False)
    plan = m.plan(tiny.model, calib, "disaggregated")
    info = plan.info
    top = max(range(4), key=lambda i: info["block_cosine"][i])
    # pick d_t so that exactly the most redundant block is in P: it must be removed, whatever E_P says
    d_t = (sorted(info["block_cosine"])[-1] + sorted(info["block_cosine"])[-2]) / 2
    plan = pdtrim(k_prefill=1, k_decode=1, kv_pruning=False, sensitivity=False, d_t=d_t).plan(tiny.model, calib, "disaggregated")
    assert plan.info["pruning_set"] == [top] and list(plan.removed_prefill) == [top]
    assert list(plan.info["search_trace"]["prefill_k1"][0]["candidates"]) == [str(top)]
    # P = {i : s_i >= d_t}: a block whose cosine is d_t itself is in it
    at = pdtrim(k_prefill=1, k_decode=1, kv_pruning=False, sensitivity=False, d_t=max(info["block_cosine"]))
    assert at.plan(tiny.model, calib, "disaggregated").info["pruning_set"] == [top]


def test_annealing_is_deterministic_for_a_seed_and_keeps_the_subset_rule(tiny, calib):
    plans = {}
    for seed in (0, 0, 1):
        m = pdtrim(k_prefill=1, k_decode=2, anneal_steps=6, seed=seed, kv_pruning=False, sensitivity=False, d_t=-1.0)
        plans.setdefault(seed, []).append(m.plan(tiny.model, calib, "disaggregated"))
    assert plans[0][0] == plans[0][1]
    for p in (plans[0][0], plans[1][0]):
        assert set(p.removed_prefill) <= set(p.removed_decode)
        anneal = p.info["search_trace"]["anneal_decode_2"][0]
        assert anneal["best_objective"] <= anneal["start_objective"]  # the best set seen is kept


def test_attention_shares_match_hf_eager_attentions(tiny, calib):
    """One decode step: the probe's share equals the share HF's eager attention puts on the kept positions."""
    from transformers import AutoModelForCausalLM

    model = tiny.model
    # from_config would switch the shared config object (hence the session's tiny model) to eager
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager.eval()
    prompts = [list(range(5, 45)), list(range(50, 80))]
    nf, nl = 3, 5
    plan = PruningPlan.dense("u", 4)
    shares = first_last_shares(model, plan, prompts, nf, nl, steps=1)
    ref = {i: [] for i in range(4)}
    with torch.inference_mode():
        for p in prompts:
            tok = int(model(torch.tensor([p])).logits[0, -1].argmax())
            att = eager(torch.tensor([p + [tok]]), output_attentions=True).attentions  # per layer (1, H, S, S)
            T = len(p)
            kept = [j for j in range(T) if j < nf or j >= T - nl]
            for i, a in enumerate(att):
                ref[i].append(float(a[0, :, T, kept].sum(-1).mean()))
    for i in range(4):
        assert shares[i] == pytest.approx(sum(ref[i]) / len(ref[i]), abs=1e-5)


def test_kv_selection_follows_tau_and_is_applied_at_the_handoff(tiny, calib):
    plan = pdtrim(k_prefill=0, k_decode=1, tau=0.0, sensitivity=False).plan(tiny.model, calib, "disaggregated")
    sel = plan.info["kv_selection"]
    shares = {int(k): v for k, v in sel["shares"].items()}
    assert set(shares) == set(plan.decode_layers) and all(0 <= v <= 1 for v in shares.values())
    assert plan.kv_policy.layers == plan.decode_layers  # tau = 0 selects every decode layer
    for tau in sorted(shares.values()):
        p = pdtrim(k_prefill=0, k_decode=1, tau=tau, sensitivity=False).plan(tiny.model, calib, "disaggregated")
        assert set(p.kv_policy.layers) == {i for i, v in shares.items() if v >= tau}
    # bytes: T-token prompts, selected layers send n_first + n_last positions, others all T
    T, per_tok = 40, 2 * 2 * 16 * 4
    s = Scorer(tiny.model, plan, "disaggregated", max_length=512)
    s.loglikelihood([(list(range(T)), [1, 2, 3])])
    sel_n = len(plan.kv_policy.layers)
    assert s.tally.kv_bytes == ((len(plan.decode_layers) - sel_n) * T + sel_n * (SMALL["n_first"] + SMALL["n_last"])) * per_tok


def test_unified_plan_is_one_set_without_kv_pruning(tiny, calib):
    plan = pdtrim(k_unified=2).plan(tiny.model, calib, "unified")
    assert plan.is_unified and len(plan.removed_decode) == 2 and not plan.kv_policy.layers


def test_stage_sensitivity_is_recorded_per_block(tiny, calib):
    plan = pdtrim(k_prefill=0, k_decode=1, kv_pruning=False, sensitivity_blocks="all").plan(tiny.model, calib, "disaggregated")
    sens = plan.info["stage_sensitivity"]
    assert len(sens["prefill"]) == len(sens["decode"]) == 4
    assert all(v >= 0 for v in itertools.chain(sens["prefill"], sens["decode"]))
    w = plan.info["work"]
    assert w["evaluations"] > 0 and w["full_forward_equivalents"] > 0 and w["search_seconds"] > 0


def test_healing_runs_need_a_distillation_block_and_a_successor():
    from methods.pdtrim.healing import healing_runs

    # removed 1,2 (2 in D) -> block 3 heals; removed 5 (only P) -> none; removed 7 is last -> no successor
    assert healing_runs([1, 2, 5, 7], distill=[2, 7], n_layers=8) == [((1, 2), 3)]
    assert healing_runs([], distill=[0, 1], n_layers=4) == []


def test_heal_trains_the_successor_block_toward_the_dense_output(tiny, calib):
    from methods.pdtrim.healing import heal, installed

    model = tiny.model
    batches = list(type(calib)(texts=[], input_ids=calib.input_ids[:8]).batches(4, "cpu"))
    healed, report = heal(model, batches, [((1,), 2)], steps=40, lr=1e-3, seed=0)
    assert set(healed) == {2} and report["2"]["replaces_run"] == [1]
    assert report["2"]["mse_after"] < 0.9 * report["2"]["mse_before"]
    original = arch.decoder_layers(model)[2]
    with installed(model, healed):
        assert arch.decoder_layers(model)[2] is healed[2]
    assert arch.decoder_layers(model)[2] is original


def test_heal_reports_the_token_weighted_mse_of_the_successor_against_the_dense_output(tiny):
    """mse_before is the MSE over all valid tokens, recomputed here with transformers' own forward: block 2 on
    the input of removed block 1 vs the dense output of block 2. A mean of batch means (the old report) gave
    the 5-valid-token batch below as much weight as the 16-token one."""
    from methods.pdtrim.healing import heal

    model = tiny.model
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, model.config.vocab_size, (2, 8), generator=gen) for _ in range(2)]
    masks = [torch.tensor([[1] * 3 + [0] * 5, [1] * 2 + [0] * 6]), torch.ones(2, 8, dtype=torch.long)]
    _, report = heal(model, list(zip(ids, masks)), [((1,), 2)], steps=0, lr=1e-3, seed=0)

    class Skip(torch.nn.Module):
        def forward(self, hidden_states, *a, **k):
            return hidden_states

    layers = arch.decoder_layers(model)
    out = []
    hook = layers[2].register_forward_hook(lambda mod, args, o: out.append(o[0] if isinstance(o, tuple) else o))
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for x, m in zip(ids, masks):
                model(x, attention_mask=m)
                layers[1], removed = Skip(), layers[1]
                try:
                    model(x, attention_mask=m)
                finally:
                    layers[1] = removed
                dense, pruned = out[-2], out[-1]
                total += float(((pruned - dense) ** 2)[m.bool()].sum())
                count += int(m.sum()) * dense.shape[-1]
    finally:
        hook.remove()
    assert report["2"]["mse_before"] == pytest.approx(total / count, rel=1e-4)
    assert report["2"]["mse_after"] == pytest.approx(report["2"]["mse_before"])  # no steps


# (0, 1): the stages differ, the healed blocks are found by both sets. The search removes block 3 (1, 1) or, from
# decode only, block 0 (0, 1): the pretended run is one that decode sees unchanged (kept blocks on either side)
@pytest.mark.parametrize("kp,kd,run", [(1, 1, ((1,), 2)), (0, 1, ((2,), 3))])
def test_pdtrim_heals_when_asked_and_undoes_it(tiny, calib, monkeypatch, kp, kd, run):
    import methods.pdtrim.healing

    model = tiny.model
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        ref = model(ids).logits.clone()
    kw = dict(k_prefill=kp, k_decode=kd, kv_pruning=False, sensitivity=False)
    plain = pdtrim(**kw).plan(model, calib, "disaggregated")
    assert plain.info["healing"] == {"enabled": False}
    # on the tiny model the search removes the last block or, from decode only, the first (nothing to heal): pretend
    # the removed run is `run`, to exercise the plumbing
    monkeypatch.setattr(methods.pdtrim.healing, "healing_runs", lambda removed, distill, n: [run])
    m = pdtrim(heal=True, heal_steps=20, heal_lr=1e-3, heal_samples=8, **kw)
    plan = m.plan(model, calib, "disaggregated")
    assert plan.info["healing"]["runs"] == [[list(run[0]), run[1]]] and plan == plain  # same layers, healed block
    reqs = [(list(range(3, 30)), [5, 6, 7])]
    with m.apply(model, plan) as applied:
        healed = Scorer(model, applied, "disaggregated", max_length=512).loglikelihood(reqs)
    unhealed = Scorer(model, plain, "disaggregated", max_length=512).loglikelihood(reqs)
    assert healed[0][0] != unhealed[0][0]  # the healed block ran inside apply()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref)  # and is gone after it
    assert m.needs_replan_on_resume()
    with pytest.raises(RuntimeError, match="needs healed blocks"):
        with pdtrim(heal=True, **kw).apply(model, plan):
            pass


def test_greedy_ties_go_to_the_lower_block(tiny, calib, monkeypatch):
    """Equal objectives (here every candidate's): the step removes the lowest-numbered block, whatever the order the
    pruning set lists them in."""
    from methods.pdtrim import method as pm
    from methods.pdtrim.search import SearchState

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    monkeypatch.setattr(pm, "_SHARED_STATES", {})
    monkeypatch.setattr(SearchState, "ep", lambda self, removed: 1.0)
    monkeypatch.setattr(SearchState, "ed", lambda self, removed_decode, removed_prefill: 1.0)
    m = pdtrim(k_prefill=1, k_decode=2, kv_pruning=False, sensitivity=False, d_t=-1.0, screen="none")  # no real screen
    plan = m.plan(tiny.model, calib, "disaggregated")
    assert list(plan.removed_prefill) == [0] and list(plan.removed_decode) == [0, 1]


def test_healing_skips_a_run_that_decode_extends_at_its_start(tiny, calib, monkeypatch):
    """R_P = {2}, R_D = {1, 2}: in prefill block 3 follows the removed run (2,), in decode the run (1, 2), so a copy of
    block 3 trained to map h_in(2) to the dense h_out(3) would be fed h_in(1) by the decode stage. Such a run is not
    healed (block 3 stays the original in both stages); a run decode sees unchanged still is."""
    from methods.pdtrim import method as pm
    from methods.pdtrim.search import SearchState

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    monkeypatch.setattr(pm, "_SHARED_STATES", {})
    monkeypatch.setattr(SearchState, "ep", lambda self, removed: float(sum(i != 2 for i in removed)))
    monkeypatch.setattr(SearchState, "ed", lambda self, removed_decode, removed_prefill: float(sum(i != 1 for i in removed_decode)))
    kw = dict(k_prefill=1, k_decode=2, kv_pruning=False, sensitivity=False, screen="none", d_t=1.0,  # every block in D
              heal=True, heal_steps=2, heal_lr=1e-3, heal_samples=4)
    plan = pdtrim(**kw).plan(tiny.model, calib, "disaggregated")
    assert list(plan.removed_prefill) == [2] and list(plan.removed_decode) == [1, 2]
    assert plan.info["healing"]["runs"] == [] and plan.info["healing"]["blocks"] == {}
    monkeypatch.setattr(SearchState, "ed", lambda self, removed_decode, removed_prefill: float(sum(i != 0 for i in removed_decode)))
    monkeypatch.setattr(pm, "_SHARED_STATES", {})
    plan = pdtrim(**kw).plan(tiny.model, calib, "disaggregated")
    assert list(plan.removed_decode) == [0, 2] and plan.info["healing"]["runs"] == [[[2], 3]]
