"""Model families other than Llama: each one the engine accepts scores and generates as its own forward, each one
it would score wrongly is refused naming what is missing (harness/pd/arch.py `check_supported`), and a latent KV
cache (DeepSeek-V3) hands over its latent."""

import pytest
import torch

from harness.errors import UsageError
from harness.pd.models import load_model

TINY = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 512, "pad_token_id": 0,
        "eos_token_id": None, "tie_word_embeddings": False, "initializer_range": 0.1}  # larger weights: gaps show
FAMILIES = {  # what each adds to Llama's layer
    "qwen3": {},  # q/k norms
    "gemma": {},  # embeddings scaled by sqrt(hidden) inside the embedding module, (1 + w) norms
    "phi3": {"partial_rotary_factor": 0.5},  # fused qkv and gate/up projections, partial rotary
    "olmo2": {},  # norms after attention and MLP, q/k norms
    "stablelm": {},  # LayerNorm, partial rotary (0.25)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # mixture of experts
    "deepseek_v3": {"num_key_value_heads": 4, "head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
                    "topk_group": 1},  # multi-head latent attention: K and V of unequal widths
    "granite": {"residual_multiplier": 0.5, "attention_multiplier": 0.1},  # multipliers inside the layers run
}


def tiny_family(model_type: str, attn: str = "sdpa", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **FAMILIES.get(model_type, {}), **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_supported_family_scores_and_generates_as_its_own_forward(model_type):
    """Dense plan, both modes, padded batches of 4, against one plain HF forward per request; greedy generation
    against HF `generate` (a survey of every transformers 5.24 family the load check accepts agreed within 2e-6)."""
    from conftest import random_requests, reference_loglikelihood

    from harness.pd.arch import check_supported
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    model = tiny_family(model_type)
    check_supported(model, model_type)
    reqs = random_requests(5, 300, seed=1, max_ctx=30, max_cont=5)
    ref = reference_loglikelihood(model, reqs)
    plan = PruningPlan.dense("u", 4)
    for mode in ("unified", "disaggregated"):
        got = Scorer(model, plan, mode, max_length=512, batch_size=4).loglikelihood(reqs)
        assert max(abs(a - b) for a, (b, _) in zip(ref, got)) <= 1e-4, mode
    ctxs = [c for c, _ in reqs[:3]]
    ours = Scorer(model, plan, "disaggregated", max_length=512, batch_size=4).generate(ctxs, 8)
    with torch.inference_mode():
        theirs = [model.generate(torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False)[0, len(c):].tolist() for c in ctxs]
    assert ours == theirs


@pytest.mark.parametrize(("model_type", "extra", "what"), [
    ("cohere", {}, r"cohere models are not supported: .* a logit scale \(logit_scale=0.0625\)"),
    ("granite", {"embedding_multiplier": 12.0, "logits_scaling": 8.0},  # as Granite-3's config
     r"granite models .* logits scaling \(logits_scaling=8.0\); an embedding multiplier"),
    ("nanochat", {}, r"nanochat models .* a norm of the embeddings before the first decoder layer"),
    ("doge", {}, r"doge models .* dynamic-mask attention"),
    ("laguna", {}, r"laguna models .* rotary embeddings per layer type"),
    ("qwen3_next", {}, r"this qwen3_next model has linear_attention layers"),
    ("gemma2", {}, r"this gemma2 model has sliding-window attention"),
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}, r"GPT2LMHeadModel: unsupported architecture \(decoder has no"),
])
def test_families_the_engine_would_score_wrongly_are_refused_naming_what_is_missing(model_type, extra, what):
    """Each scored silently wrong (cohere 0.6 nats per request off its own forward; granite, nanochat and doge up to
    3.4; gemma2 0.4 from soft-capping alone) or failed mid-run with an AttributeError or TypeError (laguna,
    qwen3_next, gpt2) before the load check refused them."""
    from harness.pd.arch import check_supported

    model = tiny_family(model_type, "eager", **extra)
    with pytest.raises(UsageError, match=rf"--model m: {what}"):
        check_supported(model, "m")


def test_a_model_folder_of_an_unsupported_family_is_refused_at_load(tmp_path):
    """The check runs where every model loads (exit 2 before any cell), not only when called."""
    from harness.pd.presets import byte_tokenizer

    tiny_family("cohere").save_pretrained(tmp_path)
    byte_tokenizer(300).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"cohere models are not supported: .* logit scale"):
        load_model(str(tmp_path), device="cpu", dtype="float32")


def _refused_before_the_weights(command, family, methods, match, tmp_path, data_dir, monkeypatch):
    """`run` or `latency` on a saved folder of `family` with `methods` (argv) raises a UsageError matching `match`,
    and `load_model` is never called."""
    from harness.cli import latency, run
    from harness.pd import models
    from harness.pd.presets import byte_tokenizer

    tiny_family(family).save_pretrained(tmp_path / "m")
    byte_tokenizer(300).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    argv = ["--model", str(tmp_path / "m"), "--device", "cpu", *methods, "--out", str(tmp_path / "o"), "-q"]
    with pytest.raises(UsageError, match=match):
        if command == "run":
            run.cmd_run([*argv, "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data_dir), "--mode", "disaggregated"])
        else:
            latency.cmd_latency([*argv, "--prompt-tokens", "8", "--decode-tokens", "2", "--batch-size", "1"])


@pytest.mark.parametrize("command", ["run", "latency"])
def test_an_unsupported_family_is_refused_before_its_weights_load(command, tmp_path, data_dir, monkeypatch):
    """What the config alone rules out (here Cohere's logit scale) is refused from the config, before the weights
    load (an 8B model's minutes), by `run` and `latency`; it came once `load_model` had returned."""
    _refused_before_the_weights(command, "cohere", ["--methods", "unpruned"],
                                r"cohere models are not supported: .* logit scale", tmp_path, data_dir, monkeypatch)


def hf_with_layers(model, keep):
    """A deep copy of `model` whose decoder holds only layers `keep`, renumbered for transformers' own cache."""
    import copy

    from harness.pd import arch

    m = copy.deepcopy(model)
    dec = arch.decoder(m)
    dec.layers = torch.nn.ModuleList([dec.layers[i] for i in keep])
    for new, layer in enumerate(dec.layers):
        layer.self_attn.layer_idx = new
    m.config.num_hidden_layers = len(keep)
    m.config.layer_types = [m.config.layer_types[i] for i in keep]
    return m


def test_a_pd_plan_scores_as_transformers_own_modules_with_the_handed_over_cache():
    """Prefill with layers (0, 1, 2, 3), decode with (0, 2, 3) on a Qwen3 (q/k norms), computed without the engine:
    the prompt through a copy holding the prefill layers (its DynamicCache), the decode layers' K/V of that cache
    into a copy holding the decode layers, the continuation through it."""
    from conftest import random_requests

    from harness.pd.cache import hf_cache_from_layers, hf_cache_layers
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    model = tiny_family("qwen3")
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3))
    reqs = random_requests(4, 300, seed=2, max_ctx=20, max_cont=5)
    prefill, decode = hf_with_layers(model, plan.prefill_layers), hf_with_layers(model, plan.decode_layers)
    ref = []
    with torch.inference_mode():
        for ctx, cont in reqs:
            out = prefill(torch.tensor([ctx]), use_cache=True)
            kv = hf_cache_layers(out.past_key_values)
            logits = [out.logits[0, -1:]]
            if len(cont) > 1:
                cache = hf_cache_from_layers([kv[plan.prefill_layers.index(i)] for i in plan.decode_layers], decode.config)
                pos = torch.arange(len(ctx), len(ctx) + len(cont) - 1)[None]
                logits.append(decode(torch.tensor([cont[:-1]]), cache=cache, position_ids=pos).logits[0])
            logp = torch.log_softmax(torch.cat(logits).float(), -1)
            ref.append(float(logp[torch.arange(len(cont)), cont].sum()))
    got = Scorer(model, plan, "disaggregated", max_length=512, batch_size=4).loglikelihood(reqs)
    assert max(abs(a - b) for a, (b, _) in zip(ref, got)) <= 1e-4
    dense = Scorer(model, PruningPlan.dense("u", 4), "disaggregated", max_length=512).loglikelihood(reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(dense, got)) > 1e-2  # the decode plan matters at all


def test_a_latent_kv_cache_refuses_per_head_policies_and_counts_the_latent():
    """DeepSeek-V3's cache (transformers 5.24) holds one compressed latent per token and layer, no KV heads: SnapKV,
    H2O and PyramidKV, which select per KV head, failed every cell with a contract error blaming their own keep()
    mask. They are refused naming the model; a head-shared policy runs, and the bytes sent are the latent's
    (kv_lora_rank + qk_rope_head_dim per token and layer), not 2 · kv heads · head_dim."""
    from harness.latency.measure import Workload, measure
    from harness.pd.kv import get_policy
    from harness.pd.kv.base import KVBudget
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    model = tiny_family("deepseek_v3")
    for kind in ("snapkv", "h2o", "pyramidkv"):
        policy = get_policy(kind)(**{**get_policy(kind).example_options, "budget": KVBudget(tokens=8)})
        with pytest.raises(UsageError, match=rf"the {kind} KV policy selects positions per KV head, and this deepseek_v3 "
                                             "model caches one compressed latent per token"):
            Scorer(model, PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), policy), "disaggregated", max_length=64)
    m = measure(model, PruningPlan.dense("u", 4), Workload(10, 4, 2), warmup=0, repeats=1)
    c = model.config
    assert m.kv_bytes == 2 * 4 * 10 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4  # requests · layers · tokens · latent · fp32
    # static decode's buffers took V's width from K's: a RuntimeError on the latent's unequal widths
    static = measure(model, PruningPlan.dense("u", 4), Workload(10, 4, 2), warmup=0, repeats=1, decode_mode="static")
    assert torch.equal(static.tokens, m.tokens) and static.kv_bytes == m.kv_bytes


@pytest.mark.parametrize("decode", [(0, 1, 2, 3), (0, 2)])
def test_expected_kv_bytes_of_a_latent_kv_cache_are_the_bytes_its_handoffs_send(decode):
    """`engine.expected_kv_bytes`, the arithmetic the tests check measured bytes against, counted K and V per KV head
    (2 · kv_heads · head_dim per token and layer) on DeepSeek-V3 too, whose cache holds one latent of kv_lora_rank +
    qk_rope_head_dim per token and layer (here 2 · 4 · 8 = 64 against 16 + 8 = 24): it now gives what the handoffs
    count, in float32 and bfloat16."""
    from conftest import random_requests

    from harness.pd.engine import expected_kv_bytes
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    model = tiny_family("deepseek_v3")
    reqs = random_requests(6, 300, seed=2, max_ctx=30, max_cont=4)
    for dtype in (torch.float32, torch.bfloat16):
        scorer = Scorer(model.to(dtype), PruningPlan("x", 4, (0, 1, 2, 3), decode), "disaggregated", max_length=64)
        scorer.loglikelihood(reqs)
        expect = sum(expected_kv_bytes(model.config, len(decode), len(c), dtype) for c, _ in reqs)
        assert scorer.tally.kv_bytes == expect > 0, dtype


@pytest.mark.parametrize("command", ["run", "latency"])
def test_a_per_head_kv_baseline_on_a_latent_kv_cache_is_refused_before_the_weights_load(command, tmp_path, data_dir,
                                                                                        monkeypatch):
    """From the config (`Method.check_config`), as the family refusals: it came once the weights had loaded."""
    _refused_before_the_weights(command, "deepseek_v3", ["--methods", "unpruned,snapkv", "--set", "snapkv.base=tail",
                                                         "--set", "snapkv.base_options=k=1"],
                                r"snapkv: the snapkv KV policy selects positions per KV head, and this deepseek_v3 model "
                                r"caches one compressed latent per token", tmp_path, data_dir, monkeypatch)
