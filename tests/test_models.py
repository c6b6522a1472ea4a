"""Model specs: a saved directory loads back to the same logits; random presets have the published shapes."""

import pytest
import torch

from harness.errors import UsageError
from harness.pd.models import PRESETS, load_model


def test_local_directory_roundtrip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, tiny.model(ids).logits)
    assert again.description["kind"] == "directory" and again.tokenizer.encode("ab") == tiny.tokenizer.encode("ab")


def test_presets_shapes():
    assert PRESETS["llama3-8b"]["num_hidden_layers"] == 32 and PRESETS["llama3-8b"]["num_key_value_heads"] == 8
    assert PRESETS["smollm2-135m"]["num_attention_heads"] == 9 and PRESETS["smollm2-135m"]["num_key_value_heads"] == 3
    from harness.pd.models import preset_config

    qwen = preset_config("qwen2.5-7b")
    assert qwen.model_type == "qwen2" and (qwen.num_hidden_layers, qwen.num_key_value_heads, qwen.hidden_size) == (28, 4, 3584)
    small = load_model("random:smollm2-135m", device="cpu", dtype="bfloat16")
    assert small.model.config.num_hidden_layers == 30 and next(small.model.parameters()).dtype == torch.bfloat16


def test_smollm2_default_is_the_real_model(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # dequantised, serialisable
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_qwen2_architecture_runs_through_the_engine():
    """The Qwen2.5 preset's architecture (q/k/v bias) at a tiny width: both PD settings agree."""
    from transformers import AutoModelForCausalLM

    from harness.pd.models import preset_config
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    cfg = preset_config("qwen2.5-7b")
    cfg.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 300})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    reqs = [(list(range(1, 30)), [3, 4, 5]), (list(range(7, 12)), [9])]
    plan = PruningPlan("x", 3, (0, 1, 2), (0, 2))
    uni = Scorer(model, PruningPlan.dense("u", 3), "unified", max_length=100).loglikelihood(reqs)
    dis = Scorer(model, PruningPlan.dense("u", 3), "disaggregated", max_length=100).loglikelihood(reqs)
    assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(uni, dis))
    assert Scorer(model, plan, "disaggregated", max_length=100).loglikelihood(reqs)[0][0] != dis[0][0]


def test_sliding_window_models_are_refused_and_every_preset_has_full_attention():
    """The PD engine masks every layer causally over the whole prompt: a sliding-window model's scores would be
    silently wrong past its window (found with a Qwen2 of use_sliding_window=True: 0.17 off per request)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from harness.errors import UsageError
    from harness.pd.arch import check_full_attention
    from harness.pd.models import PRESETS, preset_config

    for cfg in (MistralConfig(), Gemma2Config(), Qwen2Config(use_sliding_window=True, max_window_layers=2, num_hidden_layers=4)):
        with pytest.raises(UsageError, match="sliding-window attention"):
            check_full_attention(cfg, "m")
    for cfg in (LlamaConfig(), Qwen2Config(), MistralConfig(sliding_window=None), *map(preset_config, PRESETS)):
        check_full_attention(cfg, "m")


def test_a_random_model_that_cannot_be_built_is_a_usage_error_naming_it(monkeypatch):
    """A build failure (a missing attention package, a placement that cannot be met) exits 2 naming the model and the
    error, not a traceback."""
    import harness.pd.models as models

    def broken(*a, **k):
        raise ImportError("some_attention_package is not installed")

    monkeypatch.setattr(models, "random_model", broken)
    with pytest.raises(UsageError, match=r"--model random:tiny: could not build it: ImportError: some_attention_package"):
        load_model("random:tiny", "cpu")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_attention_implementations_that_cannot_take_the_engine_masks_are_refused(impl):
    """flash attention sums the mask's last axis as a 2-D padding mask; the engine hands each layer (batch, heads, q,
    keys) masks for pruned KV, so a flash model scored wrongly or failed; flex wants a BlockMask."""
    from harness.pd.models import parse_model_args

    with pytest.raises(UsageError, match=rf"attn_implementation={impl}: not supported; .* only eager and sdpa take"):
        parse_model_args(f"attn_implementation={impl}")
    assert parse_model_args("attn_implementation=eager") == {"attn_implementation": "eager"}


def test_a_random_model_in_bfloat16_keeps_its_rotary_frequencies_in_float32():
    """As from_pretrained(dtype=bfloat16) leaves a real model (so a reloaded export scores the same)."""
    loaded = load_model("random:tiny", "cpu", "bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_near_miss_of_a_known_model_name_is_named_when_the_hub_fails(monkeypatch):
    """`--model smollm2` (for smollm2-135m) went to the hub and failed with the hub's connection error only."""
    from harness.errors import UsageError
    from harness.pd import models

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_from_pretrained", offline)
    monkeypatch.setattr(models.hub, "unreachable", lambda: None)  # the hub's name resolves; its load then fails
    with pytest.raises(UsageError, match=r"--model smollm2: could not load it: OSError: .*\(did you mean smollm2-135m\? "
                                         r"no hub access here\?"):
        load_model("smollm2", device="cpu")
    with pytest.raises(UsageError, match=r"\(did you mean random:tiny\? "):
        load_model("random-tiny", device="cpu")
    with pytest.raises(UsageError, match=r"could not load it: OSError: .*\(no hub access here\?"):
        load_model("gpt2", device="cpu")  # a real hub id, nothing like the harness's names


def _hub_host_unknown(monkeypatch):
    """No proxy, hub not offline, and the hub's host name fails to resolve, as on a machine with no network."""
    import socket

    from huggingface_hub import constants

    def no_dns(host, *a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_an_uncached_hub_id_with_no_hub_reachable_is_refused_at_once(monkeypatch):
    """A typo'd hub id with no network spent ~50 s in huggingface_hub's retries before any message."""
    from harness.errors import UsageError
    from harness.pd import models

    _hub_host_unknown(monkeypatch)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("went to from_pretrained"))
    monkeypatch.setattr(models.hub, "is_cached", lambda repo, revision=None: False)
    with pytest.raises(UsageError, match=r"--model HuggingFaceTB/SmolLM2-135M-Instrct: not in the local Hugging Face "
                                         r"cache, and the hub cannot be reached \(huggingface.co does not resolve: "):
        load_model("HuggingFaceTB/SmolLM2-135M-Instrct", device="cpu")


def test_a_cached_hub_id_with_no_hub_reachable_loads_from_the_cache_alone(monkeypatch, tmp_path):
    """Cached files load without the retries; `local_files_only` is not recorded in the model's args."""
    from huggingface_hub import constants

    from harness.pd import hub, models

    _hub_host_unknown(monkeypatch)
    snap = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--m" / "refs").mkdir()
    (tmp_path / "models--org--m" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.is_cached("org/m") and not hub.is_cached("org/other")
    calls = []

    def cached(path, dtype, device, placement=None, model_args=None, local_only=False):
        calls.append((path, model_args, local_only))
        return load_model("random:tiny", "cpu").model, None

    monkeypatch.setattr(models, "_from_pretrained", cached)
    loaded = load_model("org/m", device="cpu", model_args={"revision": "main"})
    assert calls == [("org/m", {"revision": "main"}, True)]
    assert loaded.description["model_args"] == {"revision": "main"}


def test_tokenizer_and_config_refuse_what_load_model_refuses_with_its_words(monkeypatch, tmp_path):
    """A run checks its options against the tokenizer and config before the weights load (`tokenizer_and_config`):
    a spec that names nothing loadable gets load_model's own message there, not another one, and no hub retries."""
    from harness.errors import UsageError
    from harness.pd import models

    _hub_host_unknown(monkeypatch)
    monkeypatch.setattr(models.hub, "is_cached", lambda repo, revision=None: False)
    (tmp_path / "no_config").mkdir()
    for spec in (str(tmp_path / "missing.gguf"), "./nowhere/at/all", str(tmp_path / "no_config"), "org/uncached",
                 "random:nope"):
        with pytest.raises(UsageError) as loading:
            load_model(spec, device="cpu")
        with pytest.raises(UsageError) as light:
            models.tokenizer_and_config(spec)
        assert str(light.value) == str(loading.value)


def test_tokenizer_and_config_of_a_model_folder_are_the_loaded_ones(tmp_path):
    """A saved model folder: the config and tokenizer read without the weights are those `load_model` gives."""
    from harness.pd import models

    saved = load_model("random:tiny", device="cpu")
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    tok, config = models.tokenizer_and_config(str(tmp_path))
    loaded = load_model(str(tmp_path), device="cpu")
    assert config.to_dict() == loaded.model.config.to_dict()
    assert tok.encode("The pass key is 12345.") == loaded.tokenizer.encode("The pass key is 12345.")
    assert tok.chat_template == loaded.tokenizer.chat_template is not None


def test_tokenizer_and_config_of_the_default_model_are_the_loaded_ones(smollm2):
    """The default model (a GGUF file, converted once): its config and tokenizer without loading the weights."""
    from harness.pd import models

    tok, config = models.tokenizer_and_config("smollm2-135m")
    assert config.to_dict() == smollm2.model.config.to_dict()
    assert tok.encode("The pass key is 12345.") == smollm2.tokenizer.encode("The pass key is 12345.")
    assert tok.chat_template == smollm2.tokenizer.chat_template is not None


def test_the_hub_check_gives_no_verdict_behind_a_proxy_or_offline(monkeypatch):
    """A proxy may reach the hub when its name does not resolve here; HF_HUB_OFFLINE needs no retries."""
    from huggingface_hub import constants

    from harness.pd import hub

    _hub_host_unknown(monkeypatch)
    assert hub.unreachable().startswith("huggingface.co does not resolve: ")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.unreachable() is None


@pytest.mark.parametrize("device", ["cudax", "cuda:abc", "cuda0", "CPU", "gpu"])
def test_a_misspelt_device_is_named_whatever_the_machine(device):
    """`cudax` and `cuda:abc` passed the startswith("cuda") check: on a GPU machine torch.device raised its own
    RuntimeError (a traceback); on a CPU one the message said CUDA is missing, not that the name is wrong."""
    from harness.errors import UsageError
    from harness.pd.models import resolve_device

    with pytest.raises(UsageError, match=r"expected auto, cpu or cuda\[:N\]"):
        resolve_device(device)


# -- architecture coverage: every family the load check lets through scores as its own forward -----------------------
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


@pytest.mark.parametrize("command", ["run", "latency"])
def test_an_unsupported_family_is_refused_before_its_weights_load(command, tmp_path, data_dir, monkeypatch):
    """What the config alone rules out (here Cohere's logit scale) is refused from the config, before the weights
    load (an 8B model's minutes), by `run` and `latency`; it came once `load_model` had returned."""
    from harness.cli import latency, run
    from harness.pd import models
    from harness.pd.presets import byte_tokenizer

    tiny_family("cohere").save_pretrained(tmp_path / "m")
    byte_tokenizer(300).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    argv = ["--model", str(tmp_path / "m"), "--device", "cpu", "--methods", "unpruned", "--out", str(tmp_path / "o"), "-q"]
    with pytest.raises(UsageError, match=r"cohere models are not supported: .* logit scale"):
        if command == "run":
            run.cmd_run([*argv, "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data_dir)])
        else:
            latency.cmd_latency([*argv, "--prompt-tokens", "8", "--decode-tokens", "2", "--batch-size", "1"])


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
