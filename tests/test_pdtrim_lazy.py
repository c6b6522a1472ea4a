"""PDTrim's lazy greedy search against the exhaustive one (`lazy=false`, every candidate at every
step), on a 12-block random model in the tiny shape: same sets, same objective values, less work."""

import dataclasses

import pytest
import torch

import methods
from harness.pd.models import byte_tokenizer, preset_config
from harness.quality.calibration import CalibConfig, build_calibration

SEARCH = dict(search_samples=8, max_cont=8, kv_pruning=False, d_t=-1.0, k_prefill=2, k_decode=5, k_unified=5)


@pytest.fixture(scope="module")
def deep():
    from transformers import AutoModelForCausalLM

    cfg = preset_config("tiny")
    cfg.num_hidden_layers = 12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return model, byte_tokenizer(cfg.vocab_size)


@pytest.fixture(scope="module")
def calib(deep, data_dir):
    return build_calibration(deep[1], data_dir, CalibConfig(n_samples=16, max_tokens=48, seed=0))


def plan(model, calib, mode, **kw):
    cls = methods.get("pdtrim")
    return cls(dataclasses.replace(cls.Config(), **{**SEARCH, **kw})).plan(model, calib, mode)


@pytest.mark.parametrize("mode", ["disaggregated", "unified"])
def test_lazy_search_finds_the_exhaustive_sets_with_fewer_evaluations(deep, calib, mode):
    model = deep[0]
    # sensitivity on every search sequence: the lazy first step then starts from exact values
    ref = plan(model, calib, mode, lazy=False, sensitivity_samples=0, screen="none")
    lazy = plan(model, calib, mode, min_exact=1, sensitivity_samples=0, screen="none")
    assert (lazy.removed_prefill, lazy.removed_decode) == (ref.removed_prefill, ref.removed_decode)
    assert lazy.info["objective"] == ref.info["objective"]
    for name, steps in ref.info["search_trace"].items():
        for r, z in zip(steps, lazy.info["search_trace"][name]):
            assert z["removed"] == r["removed"] and z["objective"] == r["objective"]
            assert all(r["candidates"][j] == v for j, v in z["candidates"].items())  # same values where evaluated
    assert lazy.info["work"]["evaluations"] < ref.info["work"]["evaluations"]
    skipped = [s for steps in lazy.info["search_trace"].values() for s in steps if s.get("not_evaluated")]
    assert skipped and all(min(s["not_evaluated"].values()) > s["objective"] for s in skipped)


def screened_steps_match(scr, ref) -> list[dict]:
    """Every greedy step of the screened plan `scr` against the unscreened `ref`: the same block and value, exact
    values exactly for the candidates whose screened value is within the margin of the lowest, and those equal
    to `ref`'s. Returns the screened steps, in trace order."""
    margin, steps = scr.info["screen"]["margin"], []
    for name, zs in scr.info["search_trace"].items():
        for r, z in zip(ref.info["search_trace"][name], zs):
            assert z["removed"] == r["removed"] and z["objective"] == r["objective"]
            lo = min(z["screened"].values())
            assert set(z["candidates"]) == {j for j, v in z["screened"].items() if v <= lo + margin * abs(lo)}
            assert all(r["candidates"][j] == v for j, v in z["candidates"].items() if j in r["candidates"])
            steps.append(z)
    return steps


@pytest.mark.parametrize("mode", ["disaggregated", "unified"])
def test_the_bfloat16_screen_finds_the_float32_sets_with_fewer_float32_evaluations(deep, calib, mode, monkeypatch):
    """The bfloat16 screen (the default where bfloat16 is fast) screens candidates on a bfloat16 copy and evaluates
    in float32 only those within `screen_margin` of the best screened value: same sets and float32 values as the
    float32-only search."""
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")  # both searches compute every value they read
    pm._SHARED_STATES.clear()
    model = deep[0]
    ref = plan(model, calib, mode, screen="none")
    scr = plan(model, calib, mode, screen="bfloat16")
    assert (scr.removed_prefill, scr.removed_decode) == (ref.removed_prefill, ref.removed_decode)
    assert scr.info["objective"] == ref.info["objective"]
    assert scr.info["screen"]["dtype"] == "bfloat16" and ref.info["screen"] is None
    for z in screened_steps_match(scr, ref):
        assert all(v == pytest.approx(z["candidates"].get(j, v), rel=0.05) for j, v in z["screened"].items())
    w, w_ref = scr.info["work"], ref.info["work"]
    assert 0 < w["evaluations"] < w_ref["evaluations"] and w["screen_evaluations"] > w["evaluations"]
    assert scr.info["stage_sensitivity_definition"]["computed_in"] == "bfloat16 (the search's screen)"


@pytest.mark.parametrize("mode", ["disaggregated", "unified"])
def test_the_subset_screen_finds_the_float32_sets_with_fewer_evaluations_on_all_sequences(deep, calib, mode, monkeypatch):
    """screen=subset: each step screens the candidates by the objective on the sensitivity sequences (its base moved
    along the greedy path) and evaluates on all search sequences only those within subset_margin of the best
    screened value: the same sets and values as screen=none, with fewer evaluations on all sequences."""
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    pm._SHARED_STATES.clear()
    model, opts = deep[0], dict(search_samples=16, sensitivity_samples=8)
    ref = plan(model, calib, mode, screen="none", **opts)
    scr = plan(model, calib, mode, screen="subset", **opts)
    assert (scr.removed_prefill, scr.removed_decode) == (ref.removed_prefill, ref.removed_decode)
    assert scr.info["objective"] == ref.info["objective"]
    assert scr.info["screen"]["sequences"] == 8 and scr.info["screen"]["dtype"] == "float32" and ref.info["screen"] is None
    steps = screened_steps_match(scr, ref)
    # the subset values are the sensitivity objective's own: step 1's screen reads the sensitivity record
    first_stage = next(iter(scr.info["search_trace"])).split("_")[0]  # "prefill_k5" or "decode_k5"
    assert all(scr.info["stage_sensitivity"][first_stage][int(j)] == v for j, v in steps[0]["screened"].items())
    evaluated, screened_all = sum(len(z["candidates"]) for z in steps), sum(len(z["screened"]) for z in steps)
    # fewer candidates evaluated on all sequences than screened (whether that saves work depends on the subset's
    # share and the landscape: benchmarks/pdtrim_search.py measures it on SmolLM2)
    assert evaluated < screened_all


@pytest.mark.parametrize("features", [(), ("_is_avx512_bf16_supported",), ("_is_amx_tile_supported",)])
def test_auto_screens_in_bfloat16_only_on_a_cpu_that_computes_it_in_hardware(deep, calib, features, monkeypatch):
    """screen=auto (the default): bfloat16 on a CPU with AVX512-BF16 or AMX; on any other (there torch converts,
    and a bfloat16 forward costs more than a float32 one) the subset screen, here none: the search's 8
    sequences are all the sensitivity sequences."""
    from methods.pdtrim import method as pm
    from methods.pdtrim.screen import screen_dtype

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda on=probe in features: on)
    expect = torch.bfloat16 if features else None
    assert screen_dtype(deep[0], "auto") is expect
    pm._SHARED_STATES.clear()
    p = plan(deep[0], calib, "disaggregated", k_decode=3, k_prefill=1)
    assert p.info["screen"] == ({"dtype": "bfloat16", "option": "auto", "margin": 0.015,
                                 "definition": p.info["screen"]["definition"]} if features else None)
    assert ("screen_evaluations" in p.info["work"]) is bool(features)


def test_a_model_not_in_float32_is_never_screened(deep, calib):
    import copy

    from methods.pdtrim.screen import screen_dtype

    model = deep[0]
    assert screen_dtype(model, "bfloat16") == torch.bfloat16 and screen_dtype(model, "none") is None
    bf = copy.deepcopy(model).to(torch.bfloat16)
    assert screen_dtype(bf, "bfloat16") is None and screen_dtype(bf, "auto") is None
    p = plan(bf, calib, "disaggregated", k_decode=3, k_prefill=1)
    assert p.info["screen"] is None and "screen_evaluations" not in p.info["work"]
    assert all("screened" not in s for steps in p.info["search_trace"].values() for s in steps)


def test_sensitivity_on_fewer_sequences_is_recorded_as_such(deep, calib):
    p = plan(deep[0], calib, "disaggregated", sensitivity_samples=4, screen="none")  # subset: it would screen too
    assert p.info["search_sequences"]["sensitivity_sequences"] == 4
    # the search objective is pooled: each exact value evaluates the other sequences once, and the sensitivity
    # sequences too unless the record has that value already (E_P({j}) of the first prefill step)
    trace = p.info["search_trace"]
    exact = sum(len(s["candidates"]) for steps in trace.values() for s in steps)
    first = next(steps[0] for name, steps in trace.items() if name.startswith("prefill"))  # E_P({j})
    w = p.info["work"]
    assert w["sensitivity_evaluations"] == 2 * 12 + exact - len(first["candidates"])
    assert w["evaluations"] - w["sensitivity_evaluations"] == exact
    assert len(p.info["stage_sensitivity"]["prefill"]) == 12


def test_a_depth_sweep_extends_one_greedy_path(deep, calib, monkeypatch):
    """`k_decode=5` then `k_decode=3` (new instances, as sweep cells are): the second is read off the
    first's greedy path with no objective evaluation, and equals a search from scratch."""
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")  # in-process sharing only: 'fresh' must search

    model = deep[0]
    pm._SHARED_STATES.clear()
    deep_plan = plan(model, calib, "disaggregated", k_decode=5)
    short = plan(model, calib, "disaggregated", k_decode=3)
    assert short.info["work"]["this_mode"]["evaluations"] == 0
    first_step = deep_plan.info["search_trace"]["decode_k5"][0]["removed"]
    assert short.removed_decode == tuple(sorted({*deep_plan.removed_prefill, first_step}))
    pm._SHARED_STATES.clear()
    fresh = plan(model, calib, "disaggregated", k_decode=3)
    assert (fresh.removed_prefill, fresh.removed_decode) == (short.removed_prefill, short.removed_decode)
    assert fresh.info["objective"] == short.info["objective"]
    assert fresh.info["work"]["this_mode"]["evaluations"] > 0
    # options the search reads are part of the key: another seed is another search
    other = plan(model, calib, "disaggregated", k_decode=3, seed=1)
    assert other.info["work"]["this_mode"]["evaluations"] > 0


@pytest.mark.parametrize("mode", ["disaggregated", "unified"])
def test_sensitivity_of_the_candidates_only_gives_the_same_search(deep, calib, mode, monkeypatch):
    """The default measures single-block sensitivity only where the lazy search reads it (its
    candidates): same sets, same trace and same recorded values as measuring every block, fewer
    evaluations; blocks outside the candidates are null in the record."""
    from methods.depth.blocks import block_cosines
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    d_t = sorted(block_cosines(deep[0], calib))[4]  # 8 of 12 blocks in the pruning set; k=9 reaches the rest
    # screen pinned: a bfloat16 screen ("auto" on an AVX512-BF16/AMX CPU) resumes from the objective's base, which
    # the extra sensitivity evaluations move, so its estimates (not the sets or float32 values) differ in low digits
    opts = dict(d_t=d_t, k_prefill=2, k_decode=9, k_unified=6, sensitivity_samples=4, screen="subset")
    full = plan(deep[0], calib, mode, sensitivity_blocks="all", **opts)
    pm._SHARED_STATES.clear()
    cand = plan(deep[0], calib, mode, **opts)
    assert (cand.removed_prefill, cand.removed_decode) == (full.removed_prefill, full.removed_decode)
    assert cand.info["search_trace"] == full.info["search_trace"]
    sens_full, sens_cand = full.info["stage_sensitivity"], cand.info["stage_sensitivity"]
    measured = [i for i, v in enumerate(sens_cand["prefill"]) if v is not None]
    assert measured and len(measured) < 12 and all(sens_cand["prefill"][i] == sens_full["prefill"][i] for i in measured)
    assert cand.info["work"]["sensitivity_evaluations"] < full.info["work"]["sensitivity_evaluations"]



def test_prefill_ratio_scales_the_prefill_depth_with_k_decode(deep, calib, monkeypatch):
    """`prefill_ratio=0.5` makes k_prefill = floor(k_decode / 2) for PDTrim and a `stage:` wrapper, so
    a sweep over k_decode keeps the stages' proportion; the prefill set is the same greedy path's
    prefix as with k_prefill given directly; a ratio outside [0, 1] is refused."""
    from harness.errors import UsageError
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    model = deep[0]
    pm._SHARED_STATES.clear()
    for k in (2, 3, 5):
        p = plan(model, calib, "disaggregated", k_decode=k, prefill_ratio=0.5, k_prefill=0)
        assert len(p.removed_prefill) == k // 2 and len(p.removed_decode) == k
        assert set(p.removed_prefill) <= set(p.removed_decode)
        direct = plan(model, calib, "disaggregated", k_decode=k, k_prefill=k // 2)
        assert (direct.removed_prefill, direct.removed_decode) == (p.removed_prefill, p.removed_decode)
    stage = methods.get("stage:shortgpt")
    sp = stage(dataclasses.replace(stage.Config(), k_decode=6, prefill_ratio=0.34)).plan(model, calib, "disaggregated")
    assert len(sp.removed_prefill) == 2 and len(sp.removed_decode) == 6
    assert set(sp.removed_prefill) <= set(sp.removed_decode)
    for name in ("pdtrim", "stage:shortgpt"):
        cls = methods.get(name)
        with pytest.raises(UsageError, match="prefill_ratio"):
            cls(dataclasses.replace(cls.Config(), prefill_ratio=1.5))


def test_the_pooled_objective_is_the_mean_over_all_search_sequences(deep, calib):
    """With the sensitivity measured on fewer sequences, E_P and E_D are pooled from the objective on those and the
    one on the others; they equal an objective over all search sequences at once (up to float rounding: other
    batches), and the pooled value reuses the sensitivity record's part."""
    from methods.pdtrim import method as pm
    from methods.pdtrim.objectives import CalibSplit, StageObjective

    cls = methods.get("pdtrim")
    c = dataclasses.replace(cls.Config(), **{**SEARCH, "sensitivity_samples": 3, "screen": "none"})
    pm._SHARED_STATES.clear()
    st = cls(c)._search_state(deep[0], calib)
    whole = StageObjective(deep[0], CalibSplit.from_calibration(calib.input_ids, c.search_samples, c.max_cont, c.seed),
                           c.batch_size, c.batch_tokens)
    assert st.sens_obj.n_scored + st.obj.n_scored == whole.n_scored and st.sens_obj is not st.obj
    before = st.sens_obj.evaluations
    assert st.ep({5}) == pytest.approx(whole.prefill({5}), rel=1e-5)
    assert st.sens_obj.evaluations == before  # E_P({5}) on the sensitivity sequences: the record's value
    for removed in ({2, 7}, {1, 3, 9}):
        assert st.ep(removed) == pytest.approx(whole.prefill(removed), rel=1e-5)
        assert st.ed(removed | {10}, removed) == pytest.approx(whole.decode(removed | {10}, removed), rel=1e-5)
    assert st.ed({4}, set()) == pytest.approx(whole.decode({4}, set()), rel=1e-5)


def test_the_bfloat16_screen_copy_keeps_the_rotary_frequencies_in_float32(deep):
    """`.to(bfloat16)` rounded the rotary inv_freq too: position 511's angles were off by up to ~1 rad, so the
    screen scored every candidate with scrambled positions (from_pretrained(dtype=) keeps them float32)."""
    from methods.pdtrim.screen import screen_copy

    model = deep[0]
    narrow = screen_copy(model, torch.bfloat16)
    assert next(narrow.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    freqs = [n for n, _ in model.named_buffers() if n.endswith("inv_freq")]
    assert freqs and all(torch.equal(narrow.get_buffer(n), model.get_buffer(n)) for n in freqs)
    pos = torch.arange(512)[None]
    x = torch.zeros(1, 512, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, pos)
    cos_n, sin_n = narrow.model.rotary_emb(x.bfloat16(), pos)
    assert max((cos_n.float() - cos).abs().max(), (sin_n.float() - sin).abs().max()) < 8e-3  # cos/sin's own rounding


def test_a_screen_with_no_margin_evaluates_the_best_screened_candidate(deep, calib, monkeypatch):
    """subset_margin=0 (allowed): each step evaluates exactly the candidates screened as the best, not none of them."""
    from methods.pdtrim import method as pm

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    pm._SHARED_STATES.clear()
    scr = plan(deep[0], calib, "disaggregated", screen="subset", subset_margin=0.0, search_samples=16, sensitivity_samples=8)
    for steps in scr.info["search_trace"].values():
        for step in steps:
            lo = min(step["screened"].values())
            assert set(step["candidates"]) == {j for j, v in step["screened"].items() if v == lo}
