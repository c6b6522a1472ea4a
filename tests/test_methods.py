"""Every registered method honours the contract; ShortGPT matches an independent Block Influence."""

import dataclasses
import re

import pytest
import torch
from conftest import random_requests

import methods
from harness import arch
from harness.calibration import CalibConfig, build_calibration
from harness.errors import UsageError
from harness.plan import PruningPlan
from harness.scoring import Scorer
from methods import ranked

# Options that fit the 4-layer tiny model (defaults are sized for real models).
TINY_OPTIONS = {
    "shortgpt": {"k": 2},
    "manual": {"prefill_layers": (0, 1, 3), "decode_layers": (0, 3)},
    "pdtrim": {"k_prefill": 1, "k_decode": 2, "k_unified": 2, "search_samples": 8, "max_cont": 8,
               "probe_prompts": 2, "probe_tokens": 64, "probe_steps": 4, "n_first": 2, "n_last": 6, "tau": 0.0},
    "sleb": {"k": 2, "samples": 12},
    "shortened_ppl": {"k": 2, "keep_first": 1, "keep_last": 1, "samples": 12},
    "shortened_taylor": {"k": 2, "keep_first": 1, "keep_last": 1, "samples": 12},
    "streamline": {"k": 2, "replace": "ffn", "replace_steps": 20},  # covers installing and undoing the trained FFN
    "tail": {"k": 2},
    "random": {"k": 2},
    # KV baselines over a manual plan whose first/last policy sets their byte budget
    "streamingllm": {"base": "manual", "base_options": "prefill_layers=0,1,3 decode_layers=0,3 kv_layers=3 n_first=1 n_last=2"},
    "snapkv": {"base": "manual", "base_options": "prefill_layers=0,1,3 decode_layers=0,3 kv_layers=3 n_first=1 n_last=2",
               "window": 2, "kernel": 3},
}
for _name in methods.names():  # every other KV baseline (one per registered token-selection policy): the same base
    if _name not in TINY_OPTIONS and getattr(methods.get(_name), "policy_cls", None) is not None:
        TINY_OPTIONS[_name] = {"base": TINY_OPTIONS["streamingllm"]["base"], "base_options": TINY_OPTIONS["streamingllm"]["base_options"]}
STAGE = {"k_prefill": 1, "k_decode": 2, "k_unified": 2}
for _base in ("shortgpt", "sleb", "shortened_ppl", "shortened_taylor", "tail", "random"):
    TINY_OPTIONS[f"stage:{_base}"] = {**STAGE, **{k: v for k, v in TINY_OPTIONS.get(_base, {}).items() if k != "k"}}


@pytest.fixture(scope="module")
def tiny_calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


def make(name):
    cls = methods.get(name)
    return cls(dataclasses.replace(cls.Config(), **TINY_OPTIONS.get(name, {})))


@pytest.mark.parametrize("name", methods.names())
def test_method_contract(name, tiny, tiny_calib):
    model = tiny.model
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        ref = model(ids).logits.clone()
    method = make(name)
    storage = {n: (p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()}
    originals = {id(p): p.data_ptr() for p in model.parameters()}
    for mode in ("unified", "disaggregated"):
        plan = method.plan(model, tiny_calib, mode)
        assert isinstance(plan, PruningPlan) and plan.method == name and plan.n_layers == 4
        ranked._SHARED.clear()  # the fresh instance must compute again, not reuse this process's ranking
        assert make(name).plan(model, tiny_calib, mode) == plan  # deterministic (fresh instance)
        assert set(plan.decode_layers) <= set(plan.prefill_layers)
        if mode == "unified":
            assert plan.is_unified
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, ref)  # planning left the model as it was
        with method.apply(model, plan) as applied:
            # no weight is copied: every original parameter keeps its storage; only a method that
            # installs a trained replacement (streamline's FFN) adds parameters, and at most one block's worth
            for p in model.parameters():
                assert id(p) not in originals or p.data_ptr() == originals[id(p)]
            added = sum(p.numel() for p in model.parameters() if id(p) not in originals)
            assert added == 0 or (name == "streamline" and added <= block_numel(model))
            reqs = random_requests(5, 256, seed=11)
            s = Scorer(model, applied, "disaggregated", max_length=512)
            s.loglikelihood(reqs)
            dense = Scorer(model, PruningPlan.dense("u", 4), "disaggregated", max_length=512)
            dense.loglikelihood(reqs)
            assert 0 < s.tally.kv_bytes <= dense.tally.kv_bytes
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, ref)  # apply() fully undone
        assert {n: (p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters()} == storage


def block_numel(model) -> int:
    return sum(p.numel() for p in arch.decoder_layers(model)[0].parameters())


def test_registry_errors_name_the_known_methods():
    names = methods.names()
    plain = [n for n in names if not n.startswith("stage:")]
    assert {"manual", "pdtrim", "shortgpt", "unpruned", "sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail",
            "random"} <= set(plain) and plain == sorted(plain)
    staged = ", ".join(n for n in names if n.startswith("stage:"))
    with pytest.raises(UsageError, match=re.escape(f"(did you mean 'shortgpt'?); known methods: {', '.join(plain)}; "
                                                   f"stage-aware variants: {staged}")):
        methods.get("shortgtp")


def test_tiny_options_name_registered_methods():
    """TINY_OPTIONS keys are method names (a typo would silently run a method's defaults on the tiny model)."""
    assert set(TINY_OPTIONS) - set(methods.names()) == set()
    assert {"sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail", "random", "stage:sleb"} <= set(methods.names())


def independent_block_cosines(model, calib):
    """Mean cos(h_in, h_out) per block from output_hidden_states, one sample at a time (no padding)."""
    dec = arch.decoder(model)
    n = arch.n_layers(model)
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    with torch.inference_mode():
        for row in calib.input_ids:
            ids = torch.tensor([row])
            hs = dec(ids, output_hidden_states=True, use_cache=False).hidden_states  # last entry is post-norm
            pos = torch.arange(len(row))[None]
            last_out = dec.layers[n - 1](hs[n - 1], attention_mask=None,
                                         position_embeddings=dec.rotary_emb(hs[n - 1], pos), position_ids=pos)
            last_out = last_out[0] if isinstance(last_out, tuple) else last_out
            outs = [*hs[1:n], last_out]
            for i in range(n):
                sums[i] += torch.nn.functional.cosine_similarity(hs[i][0].double(), outs[i][0].double(), dim=-1).sum()
            count += len(row)
    return (sums / count).tolist()


def test_shortgpt_matches_independent_block_influence(tiny, tiny_calib):
    from methods.blocks import block_cosines

    ours = block_cosines(tiny.model, tiny_calib, batch_size=5)
    ref = independent_block_cosines(tiny.model, tiny_calib)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5
    for k in (1, 2, 3):
        plan = methods.get("shortgpt")(methods.get("shortgpt").Config(k=k)).plan(tiny.model, tiny_calib, "disaggregated")
        bi = [1 - c for c in ref]
        expect = sorted(sorted(range(4), key=lambda i: bi[i])[:k])
        assert list(plan.removed_decode) == expect == list(plan.removed_prefill)
        assert plan.info["removed"] == expect


def test_shortgpt_rejects_k_not_below_layer_count(tiny, tiny_calib):
    cls = methods.get("shortgpt")
    with pytest.raises(UsageError, match=r"shortgpt.k=4: must be < the model's 4 layers"):
        cls(cls.Config(k=4)).plan(tiny.model, tiny_calib, "disaggregated")
    with pytest.raises(UsageError, match=r"shortgpt.k=-1"):
        cls(cls.Config(k=-1))


def test_manual_plan_violating_subset_rule_is_a_usage_error(tiny):
    cls = methods.get("manual")
    with pytest.raises(UsageError, match="subset of prefill_layers"):
        cls(cls.Config(prefill_layers=(0, 1), decode_layers=(0, 2))).plan(tiny.model, None, "disaggregated")
