"""Depth-pruning baselines on the tiny model, each checked against an independent computation of its
criterion (explicit loops over the decoder layers, a plain autograd pass, HF hidden states,
arithmetic), and the stage-aware wrapper's nesting, counts and option handling."""

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from method_contract import check_stage_wrapper_nests

import methods
from harness.errors import UsageError
from harness.pd import arch
from harness.pd.cache import PDCache
from harness.pd.engine import run_layers
from harness.quality.calibration import CalibConfig, build_calibration


@pytest.fixture(scope="module")
def calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


@pytest.fixture(scope="module")
def rows(calib):
    return [r for r in calib.input_ids if len(r) >= 2]  # every sequence with a token to predict


def make(name, **options):
    cls = methods.get(name)
    return cls(dataclasses.replace(cls.Config(), **options))


def _layer(dec, layer, h, pos):
    out = layer(h, attention_mask=None, position_embeddings=dec.rotary_emb(h, pos), position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def independent_nll(model, rows, removed):
    """Mean next-token NLL, one sequence at a time, by an explicit loop over the kept decoder layers."""
    dec, head = arch.decoder(model), model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids, pos = torch.tensor([row]), torch.arange(len(row))[None]
            h = dec.embed_tokens(ids)
            for i, layer in enumerate(dec.layers):
                if i not in removed:
                    h = _layer(dec, layer, h, pos)
            logits = head(dec.norm(h))[0, :-1].double()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    return total / count


# -- SLEB ------------------------------------------------------------------------------------
def test_sleb_greedy_order_matches_independent_perplexities(tiny, calib, rows):
    m = make("sleb", k=3, keep_first=0, keep_last=0, samples=len(rows), batch_size=5)
    plan = m.plan(tiny.model, calib, "disaggregated")
    removed: list[int] = []
    for step in plan.info["steps"]:
        ref = {j: independent_nll(tiny.model, rows, {*removed, j}) for j in range(4) if j not in removed}
        assert set(step["candidates"]) == {str(j) for j in ref}
        for j, v in step["candidates"].items():
            assert v == pytest.approx(ref[int(j)], rel=1e-5)
        removed.append(min(ref, key=lambda j: (ref[j], j)))
        assert step["removed"] == removed[-1]
    assert plan.info["removal_order"] == removed and list(plan.removed_decode) == sorted(removed) == list(plan.removed_prefill)
    assert plan.info["dense_nll"] == pytest.approx(independent_nll(tiny.model, rows, set()), rel=1e-5)
    assert m.removal_order(tiny.model, calib, 2) == removed[:2]


def test_sleb_never_removes_first_or_last_block_by_default(tiny, calib):
    plan = make("sleb", k=2, samples=8).plan(tiny.model, calib, "unified")
    assert set(plan.removed_decode) == {1, 2} and set(plan.info["steps"][0]["candidates"]) == {"1", "2"}
    with pytest.raises(UsageError, match=r"sleb.k=3: at most 2 of the model's 4 blocks can be removed \(sleb: the first 1 and last 1"):
        make("sleb", k=3).plan(tiny.model, calib, "unified")
    with pytest.raises(UsageError, match=r"sleb.samples=0: must be >= 1"):
        make("sleb", samples=0)


# -- Shortened LLaMA ---------------------------------------------------------------------------
@pytest.mark.parametrize("keep_first, keep_last", [(0, 0), (1, 1), (2, 0)])
def test_shortened_ppl_ranks_single_block_removals_by_independent_perplexity(tiny, calib, rows, keep_first, keep_last):
    eligible = list(range(keep_first, 4 - keep_last))
    k = len(eligible) - 1
    plan = make("shortened_ppl", k=k, keep_first=keep_first, keep_last=keep_last, samples=len(rows), batch_size=7).plan(
        tiny.model, calib, "disaggregated")
    ref = {j: independent_nll(tiny.model, rows, {j}) for j in eligible}
    for j, v in plan.info["nll_without_block"].items():
        assert v == pytest.approx(ref[int(j)], rel=1e-5)
    order = sorted(eligible, key=lambda j: (ref[j], j))
    assert plan.info["removal_order"] == order[:k] and list(plan.removed_decode) == sorted(order[:k])


def test_shortened_plus_rule_defaults_and_errors(tiny, calib):
    for name in ("shortened_ppl", "shortened_taylor"):
        c = methods.get(name).Config()
        assert (c.k, c.keep_first, c.keep_last) == (8, 4, 2)
        with pytest.raises(UsageError, match=rf"{name}.k=1: at most 0 of the model's 4 blocks can be removed \({name}: the first 4 and last 2"):
            make(name, k=1).plan(tiny.model, calib, "unified")
        with pytest.raises(UsageError, match=rf"{name}.keep_last=-1: must be >= 0"):
            make(name, keep_last=-1)


def independent_taylor(model, rows):
    """Σ |w · dL/dw| per block over its *weight parameters, L = mean NLL over all tokens, by autograd.grad
    one sequence at a time (no .grad is touched)."""
    layers = arch.decoder_layers(model)
    weights = [[p for n, p in layer.named_parameters() if n.endswith("weight")] for layer in layers]
    flat = [p for ws in weights for p in ws]
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    n_tokens = sum(len(r) - 1 for r in rows)
    with torch.enable_grad():
        for row in rows:
            ids = torch.tensor([row])
            logits = model(ids).logits[0, :-1].float()
            loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum") / n_tokens
            for acc, g in zip(grads, torch.autograd.grad(loss, flat, allow_unused=True)):
                if g is not None:
                    acc += g.double()
    scores, at = [], 0
    for ws in weights:
        scores.append(sum(float((p.detach().double() * grads[at + i]).abs().sum()) for i, p in enumerate(ws)))
        at += len(ws)
    return scores


def test_shortened_taylor_matches_independent_autograd(tiny, calib, rows):
    ref = independent_taylor(tiny.model, rows)
    plan = make("shortened_taylor", k=3, keep_first=0, keep_last=0, samples=len(rows), batch_size=5).plan(
        tiny.model, calib, "disaggregated")
    ours = plan.info["taylor_importance"]
    assert ours == pytest.approx(ref, rel=1e-4)
    order = sorted(range(4), key=lambda j: (ref[j], j))
    assert plan.info["removal_order"] == order[:3] and list(plan.removed_decode) == sorted(order[:3])
    plan = make("shortened_taylor", k=2, keep_first=1, keep_last=1, samples=len(rows)).plan(tiny.model, calib, "unified")
    assert plan.info["removal_order"] == sorted([1, 2], key=lambda j: (ref[j], j))


def test_shortened_taylor_restores_requires_grad_and_grad_exactly(tiny, calib):
    model = tiny.model
    params = dict(model.named_parameters())
    first = arch.decoder_layers(model)[0].self_attn.q_proj.weight
    embed = arch.decoder(model).embed_tokens.weight
    sentinel = torch.full_like(first, 7.0)
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        first.grad = sentinel
        embed.requires_grad_(False)
        expected_rg = {n: p.requires_grad for n, p in params.items()}
        make("shortened_taylor", k=1, keep_first=1, keep_last=1, samples=8).plan(model, calib, "unified")
        assert first.grad is sentinel and bool((sentinel == 7.0).all())
        assert {n: p.requires_grad for n, p in params.items()} == expected_rg
        assert all(p.grad is None for p in params.values() if p is not first)
    finally:
        first.grad = None
        for n, p in params.items():
            p.requires_grad_(before[n])


# -- LLM-Streamline ------------------------------------------------------------------------------
def independent_run_cosines(model, rows, k):
    """Mean cos(input of block i, output of block i+k-1) per start i, from output_hidden_states."""
    dec, n = arch.decoder(model), arch.n_layers(model)
    sums, count = torch.zeros(n - k + 1, dtype=torch.float64), 0
    with torch.inference_mode():
        for row in rows:
            ids, pos = torch.tensor([row]), torch.arange(len(row))[None]
            hs = dec(ids, output_hidden_states=True, use_cache=False).hidden_states  # last entry is after the final norm
            states = [*hs[:n], _layer(dec, dec.layers[n - 1], hs[n - 1], pos)]
            for i in range(n - k + 1):
                sums[i] += F.cosine_similarity(states[i][0].double(), states[i + k][0].double(), dim=-1).sum()
            count += len(row)
    return (sums / count).tolist()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_streamline_removes_the_most_similar_contiguous_run(tiny, calib, k):
    ref = independent_run_cosines(tiny.model, calib.input_ids, k)
    plan = make("streamline", k=k, batch_size=5).plan(tiny.model, calib, "disaggregated")
    ours = [plan.info["run_cosine"][str(i)] for i in range(5 - k)]
    assert ours == pytest.approx(ref, abs=1e-5)
    start = max(range(len(ref)), key=lambda i: (ref[i], -i))
    assert list(plan.removed_decode) == list(range(start, start + k)) == list(plan.removed_prefill)
    assert plan.info["replacement"] == {"enabled": False}


def test_streamline_ffn_replacement_is_trained_installed_and_undone(tiny, calib):
    model = tiny.model
    m = make("streamline", k=2, replace="ffn", replace_steps=150, replace_lr=1e-3)
    plan = m.plan(model, calib, "disaggregated")
    rep = plan.info["replacement"]
    assert rep["enabled"] and rep["mse_after"] < 0.8 * rep["mse_before"]
    assert m.needs_replan_on_resume()
    run, ffn = plan.info["removed"], m._trained[plan.prefill_layers]
    ids = torch.tensor([calib.input_ids[0]])
    pos, valid = torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool)

    def forward(layers, **kw):
        return run_layers(model, layers, ids if "hidden" not in kw else None, pos, valid, PDCache(retain=()), **kw)

    with torch.inference_mode():
        plain = forward(plan.prefill_layers)
        h = forward([i for i in range(run[0])])
        explicit = forward([i for i in range(run[-1] + 1, 4)], hidden=ffn(h))
        with m.apply(model, plan):
            installed = forward(plan.prefill_layers)
        after = forward(plan.prefill_layers)
    assert torch.allclose(installed, explicit, atol=1e-5) and not torch.allclose(installed, plain, atol=1e-3)
    assert torch.equal(after, plain)  # the hook is gone
    with pytest.raises(RuntimeError, match="call plan"):
        with make("streamline", k=2, replace="ffn").apply(model, plan):
            pass


def test_streamline_replacement_after_a_run_that_ends_at_the_last_block(tiny, calib):
    """A run at the end has no block after it: the network runs after the block before the run."""
    from methods.depth.streamline import installed, train_replacement

    model = tiny.model
    x, y = torch.randn(64, 64), torch.randn(64, 64)
    ffn, _ = train_replacement(model, 2, x, y, steps=3, lr=1e-3, batch_tokens=16, seed=0)
    ids = torch.tensor([calib.input_ids[1]])
    pos, valid = torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        explicit = ffn(run_layers(model, [0, 1], ids, pos, valid, PDCache(retain=())))
        with installed(model, [2, 3], ffn):
            got = run_layers(model, [0, 1], ids, pos, valid, PDCache(retain=()))
        assert torch.allclose(got, explicit, atol=1e-6)
        assert not torch.allclose(run_layers(model, [0, 1], ids, pos, valid, PDCache(retain=())), explicit, atol=1e-3)


def test_streamline_options_are_checked(tiny, calib):
    with pytest.raises(UsageError, match=r"streamline.replace='lora': expected one of none, ffn"):
        make("streamline", replace="lora")
    with pytest.raises(UsageError, match=r"streamline.k=4: must be < the model's 4 layers"):
        make("streamline", k=4).plan(tiny.model, calib, "unified")


# -- tail and random ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_tail_removes_the_blocks_before_the_final_one(tiny, k):
    m = make("tail", k=k)
    assert not m.needs_calibration
    plan = m.plan(tiny.model, None, "disaggregated")
    assert list(plan.removed_decode) == list(range(4 - 1 - k, 4 - 1)) == list(plan.removed_prefill)
    assert 3 in plan.decode_layers


def test_tail_keeps_at_least_the_final_block(tiny):
    with pytest.raises(UsageError, match=r"tail.k=4: must be < the model's 4 layers"):
        make("tail", k=4).plan(tiny.model, None, "unified")


def test_random_is_a_seeded_draw_that_keeps_first_and_last(tiny):
    plans = {}
    for seed in range(8):
        m = make("random", k=2, seed=seed, keep_first=0, keep_last=0)
        assert not m.needs_calibration
        plan = m.plan(tiny.model, None, "disaggregated")
        perm = list(range(4))
        random.Random(seed).shuffle(perm)
        assert plan.info["permutation"] == perm and plan.info["seed"] == seed
        assert list(plan.removed_decode) == sorted(perm[:2])
        plans[seed] = plan.removed_decode
    assert len(set(plans.values())) > 1  # the seed matters
    for seed in range(8):
        assert set(make("random", k=2, seed=seed).plan(tiny.model, None, "unified").removed_decode) == {1, 2}


# -- the stage-aware wrapper ----------------------------------------------------------------------
BUILTIN_STAGE_BASES = {"random", "shortened_ppl", "shortened_taylor", "shortgpt", "sleb", "tail"}


def test_stage_variants_exist_for_every_ranked_baseline():
    bases = methods.registry.stage_bases()
    assert bases == [n for n in methods.names() if not n.startswith("stage:") and methods.get(n).stage_variant]
    assert BUILTIN_STAGE_BASES <= set(bases) and bases == sorted(bases)
    assert not {"streamline", "pdtrim", "manual", "unpruned", "streamingllm", "snapkv"} & set(bases)
    cls = methods.get("stage:sleb")
    assert cls is methods.get("stage:sleb") and cls.name == "stage:sleb" and cls.needs_calibration
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    assert fields[:4] == ["k_prefill", "k_decode", "k_unified", "prefill_ratio"] and "k" not in fields
    assert set(fields[4:]) == {f.name for f in dataclasses.fields(methods.get("sleb").Config)} - {"k"}
    assert not methods.get("stage:tail").needs_calibration


@pytest.mark.parametrize("base", methods.registry.stage_bases())
def test_stage_wrapper_nests_the_base_order(tiny, calib, base):
    check_stage_wrapper_nests(base, tiny.model, calib)


def test_stage_wrapper_bad_options_say_what_is_right(tiny, calib):
    with pytest.raises(UsageError, match=r"stage:shortgpt: need 0 <= k_prefill <= k_decode \(R_prefill ⊆ R_decode\).*k_prefill=3, k_decode=2"):
        make("stage:shortgpt", k_prefill=3, k_decode=2)
    with pytest.raises(UsageError, match=r"stage:shortgpt.k_decode=4: must be < the model's 4 layers"):
        make("stage:shortgpt", k_prefill=1, k_decode=4).plan(tiny.model, calib, "disaggregated")
    with pytest.raises(UsageError, match=r"stage:sleb.k_decode=3: at most 2 of the model's 4 blocks can be removed \(sleb: the first 1"):
        make("stage:sleb", k_prefill=1, k_decode=3).plan(tiny.model, calib, "disaggregated")
    with pytest.raises(UsageError, match=r"stage:sleb: sleb.samples=0: must be >= 1"):
        make("stage:sleb", samples=0)
    with pytest.raises(UsageError, match=r"no stage-aware variant 'stage:streamline': its removed run moves with its length.*"
                                         r"stage-aware variants exist for stage:random, stage:shortened_ppl"):
        methods.get("stage:streamline")
    with pytest.raises(UsageError, match=r"no stage-aware variant 'stage:pdtrim'"):
        methods.get("stage:pdtrim")
    with pytest.raises(UsageError, match=r"unknown method 'stage:nope'"):
        methods.get("stage:nope")


def test_stage_options_parse_from_set_flags(data_dir):
    from harness.config import RunConfig
    from harness.run.pipeline import prepare

    cfg = RunConfig(methods=("stage:shortgpt", "shortgpt"), tasks=(), data_dir=str(data_dir),
                    overrides=("stage:shortgpt.k_decode=6", "stage:shortgpt.batch_size=4", "shortgpt.k=5"))
    got = prepare(cfg).methods
    assert got["stage:shortgpt"].config.k_decode == 6 and got["stage:shortgpt"].config.batch_size == 4
    assert got["stage:shortgpt"].inner.config.batch_size == 4 and got["shortgpt"].config.k == 5
    assert got["stage:shortgpt"].options() == {"k_prefill": 4, "k_decode": 6, "k_unified": 8, "prefill_ratio": None,
                                                  "batch_size": 4}
    with pytest.raises(UsageError, match=r"stage:shortgpt has no option 'k'; options: k_prefill, k_decode, k_unified, prefill_ratio, batch_size"):
        prepare(dataclasses.replace(cfg, overrides=("stage:shortgpt.k=3",)))


def test_help_lists_the_baselines_and_the_stage_variants():
    from harness.cli.run import _methods_epilog

    text = _methods_epilog()
    for name in methods.names():
        if not name.startswith("stage:"):
            assert f"\n  {name} " in text, name
    assert {"sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail", "random"} <= set(methods.names())
    assert "stage:BASE" in text and f"BASE one of {', '.join(methods.registry.stage_bases())}" in text
    assert BUILTIN_STAGE_BASES <= set(methods.registry.stage_bases())
    assert "k_prefill=4 (int), k_decode=8 (int), k_unified=8 (int)" in text
    own = {f.name for f in dataclasses.fields(methods.get("stage:shortgpt").Config)} - \
        {f.name for f in dataclasses.fields(methods.get("shortgpt").Config)}
    assert own and all(f" {o}=" in text.split("stage:BASE")[1] for o in own), own  # every option of the wrapper's own


def test_a_memoised_ranking_is_reused_only_for_the_same_calibration_set(tiny, calib, data_dir):
    other = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=8, max_tokens=32, seed=3))
    m = make("shortgpt", k=1)
    first = m.plan(tiny.model, calib, "unified").info["block_influence"]
    second = m.plan(tiny.model, other, "unified").info["block_influence"]
    assert second == make("shortgpt", k=1).plan(tiny.model, other, "unified").info["block_influence"] != first


def test_a_method_and_its_stage_wrapper_share_one_ranking_per_process(tiny, calib, monkeypatch):
    from methods.depth import ranked

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")  # sharing within one process (across processes: tests/test_cache.py)
    ranked._SHARED.clear()
    calls = []
    real = methods.get("sleb")._rank
    monkeypatch.setattr(methods.get("sleb"), "_rank", lambda self, *a: calls.append(a[2]) or real(self, *a))
    plain = make("sleb", k=2, samples=12).plan(tiny.model, calib, "unified")
    stage = methods.get("stage:sleb")
    staged = stage(dataclasses.replace(stage.Config(), k_prefill=1, k_decode=2, k_unified=2, samples=12))
    plan = staged.plan(tiny.model, calib, "disaggregated")
    assert calls == [2]  # one greedy search served both
    assert plan.info["removal_order"] == plain.info["removal_order"]
    ranked._SHARED.clear()  # computed afresh: the same plan
    assert staged.plan(tiny.model, calib, "disaggregated") == plan and calls == [2, 2]
    make("sleb", k=2, samples=6).plan(tiny.model, calib, "unified")  # other options: its own search
    assert calls == [2, 2, 2]


def test_rankings_are_keyed_by_content_not_object_ids(tiny, calib, data_dir, monkeypatch):
    """An equal calibration set built again (another object) reuses the ranking; another model's weights
    (same architecture and name, another seed) or other options do not."""
    from harness.pd.models import load_model
    from methods import base
    from methods.depth import ranked

    ranked._SHARED.clear()
    calls = []
    real = methods.get("shortgpt")._rank
    monkeypatch.setattr(methods.get("shortgpt"), "_rank", lambda self, *a: calls.append(a[2]) or real(self, *a))
    again = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))
    assert again is not calib and again.description == calib.description
    first = make("shortgpt", k=1).plan(tiny.model, calib, "unified")
    assert make("shortgpt", k=1).plan(tiny.model, again, "unified") == first and calls == [1]
    other = load_model("random:tiny", device="cpu", dtype="float32", seed=1).model
    assert base.model_fingerprint(other) != base.model_fingerprint(tiny.model)
    make("shortgpt", k=1).plan(other, calib, "unified")
    make("shortgpt", k=1, batch_size=3).plan(tiny.model, calib, "unified")
    assert calls == [1, 1, 1]



def test_streamline_memo_is_keyed_by_content_not_object_ids(tiny, calib, data_dir, monkeypatch):
    """An equal calibration set built again reuses Streamline's cosines; another model recomputes them
    (with `id()` keys, a freed object's id could be reused by a different model and hit a stale memo)."""
    from harness.pd.models import load_model
    from methods.depth import streamline

    calls = []
    real = streamline.run_cosines
    monkeypatch.setattr(streamline, "run_cosines", lambda *a: calls.append(a[0]) or real(*a))
    m = make("streamline", k=1)
    first = m.plan(tiny.model, calib, "unified")
    again = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))
    assert m.plan(tiny.model, again, "disaggregated").prefill_layers == first.prefill_layers and len(calls) == 1
    other = load_model("random:tiny", device="cpu", dtype="float32", seed=1).model
    m.plan(other, calib, "unified")
    assert len(calls) == 2 and calls[1] is other


def test_docs_describe_every_baseline_option():
    from conftest import ROOT

    from methods import catalog

    text = (ROOT / "docs" / "baselines.md").read_text()
    listed = [c.name for c in catalog.builtin() if c.baseline_doc is not None or c.stage_variant]
    assert {"sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail", "random", "shortgpt"} <= set(listed)
    for name in listed:
        assert f"`{name}`" in text, name
        missing = [f.name for f in dataclasses.fields(methods.get(name).Config) if f"`{f.name}`" not in text]
        assert not missing, f"docs/baselines.md lacks {name} options {missing}"
    for base in methods.registry.stage_bases():
        assert f"`stage:{base}`" in text
