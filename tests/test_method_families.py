"""Every registered method on families other than Llama: fused projections (Phi-3), mixture-of-experts blocks
(Mixtral), multi-head latent attention with dense and MoE layers mixed (DeepSeek-V3). The load check accepts them
after comparing the engine's dense scores with their own forward (tests/test_families.py); this runs the methods'
own code on them (block statistics, gradients, trained replacements, the attention probe, healing)."""

from __future__ import annotations

import functools

import pytest
from method_contract import check_method_contract, make
from test_families import tiny_family
from test_methods import EXERCISE

import methods
from harness.errors import UsageError
from harness.pd import arch

FAMILIES = ("phi3", "mixtral", "deepseek_v3")


@functools.cache
def model_of(family: str):
    return tiny_family(family)


@pytest.fixture(scope="module")
def calib(data_dir):
    from harness.pd.presets import byte_tokenizer
    from harness.quality.calibration import CalibConfig, build_calibration

    return build_calibration(byte_tokenizer(300), data_dir, CalibConfig(n_samples=12, max_tokens=64, seed=0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", methods.names())
def test_every_method_keeps_its_contract_on_other_families(name, family, calib):
    """Plans in both modes, applied and scored by the engine; a KV policy that selects per KV head is refused on a
    latent KV cache (DeepSeek-V3 has no KV heads), naming the model type."""
    from harness.pd.kv import KVBudget

    model = model_of(family)
    method = make(name, arch.n_layers(model), EXERCISE.get(name))
    if arch.latent_kv(model.config) and hasattr(method, "policy_cls") and method.policy(KVBudget(tokens=1)).per_head:
        with pytest.raises(UsageError, match=rf"{family} model caches one compressed latent per token"):
            check_method_contract(name, model, calib, EXERCISE.get(name))
        return
    check_method_contract(name, model, calib, EXERCISE.get(name))


def test_taylor_importance_counts_every_weight_of_a_mixture_of_experts_block(calib):
    """Σ |w · dL/dw| over every non-bias parameter of each block, by an independent backward through the model's own
    forward: the `*weight` filter skipped Mixtral's expert tensors (`experts.gate_up_proj`, `experts.down_proj`), so an
    MoE block scored by its attention, norms and router alone."""
    from copy import deepcopy

    import torch
    import torch.nn.functional as F

    from methods.depth.perplexity import calibration_rows, make_batches
    from methods.depth.shortened_taylor import taylor_scores

    model = model_of("mixtral")
    batches = make_batches(calibration_rows(calib.input_ids, 6, 0), torch.device("cpu"), 4, 512)
    ours, _ = taylor_scores(model, batches)
    clone = deepcopy(model)
    n_targets = sum(len(b.targets) for b in batches)
    with torch.enable_grad():
        for b in batches:
            logits = clone(input_ids=b.ids, attention_mask=b.valid.long()).logits[b.rows, b.cols].float()
            (F.cross_entropy(logits, b.targets, reduction="sum") / n_targets).backward()
    ref = [sum(float((p.detach().double() * p.grad.double()).abs().sum()) for n, p in layer.named_parameters()
               if not n.endswith("bias") and p.grad is not None) for layer in arch.decoder_layers(clone)]
    assert any("experts" in n for n, _ in arch.block_weights(arch.decoder_layers(model)[0]))
    assert ours == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "granite", "olmo2", "deepseek_v3"])
def test_a_streamline_replacement_exports_as_a_layer_computing_it(family, calib, tmp_path):
    """The trained FFN is written as a decoder layer with zero attention, and reloads with the logits the harness
    scored. Granite's layer scales its residual branches (`residual_multiplier`) and OLMo-2's norms the MLP's output:
    the replacement was h + MLP(norm(h)) in every family, which such a layer does not compute, so their exports were
    refused (after the training); DeepSeek's replacement of a dense block is written as a dense layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.pd.models import LoadedModel
    from harness.pd.presets import byte_tokenizer
    from harness.run.export import export_plan

    model = model_of(family)
    cls = methods.get("streamline")
    method = cls(cls.Config(k=2, replace="ffn", replace_steps=3, batch_size=4))
    plan = method.plan(model, calib, "unified")
    export_plan(LoadedModel(model, byte_tokenizer(300), family), method, plan, tmp_path / "ck")
    ids = torch.tensor([[5, 17, 290, 42, 256, 7, 99, 123]])
    with torch.inference_mode(), method.apply(model, plan), arch.layers_swapped(model, plan.prefill_layers):
        expected = model(ids).logits
    with torch.inference_mode():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "granite", "olmo2", "deepseek_v3"])
def test_a_streamline_replacement_starts_as_its_blocks_own_ffn_half(family):
    """Untrained, the replacement computes what block b does with its attention adding nothing (its weights zeroed):
    the paper's initialisation from the block. It was h + MLP(post_attention_layernorm(h)) in every family: in OLMo-2
    that norm is the attention output's (its MLP reads h unnormed and its output is normed), and Granite scales the
    MLP's output by `residual_multiplier` (0.5 here), so the replacement began as no block of the model."""
    import torch

    from methods.depth.streamline import train_replacement

    model = model_of(family) if family != "llama" else tiny_family("llama")
    b = 1  # DeepSeek's first MoE block (first_k_dense_replace=1)
    layer = arch.decoder_layers(model)[b]
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ffn, _ = train_replacement(model, b, x, x, 0, 1e-3, 4, 0)
    zeroed = {k: torch.zeros_like(t) if k.startswith("self_attn.") else t for k, t in layer.state_dict().items()}
    rot = arch.decoder(model).rotary_emb(x[None], position_ids=torch.arange(7)[None])
    with torch.inference_mode():
        want = torch.func.functional_call(layer, zeroed, (x[None],), {"attention_mask": None, "position_embeddings": rot,
                                                                      "position_ids": torch.arange(7)[None]})
        got = ffn(x)
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(got, want[0], atol=1e-6, rtol=0)
    assert not torch.allclose(got, x, atol=1e-3)  # the FFN half adds something


def test_a_streamline_replacement_of_a_layer_without_self_attn_is_refused():
    """The replacement is a copy of the block without its `self_attn`: a layer whose attention is named otherwise is
    refused by name (it was a TypeError naming `post_attention_layernorm`, which OLMo-2's layer has but applies to
    the attention's output)."""
    import torch

    from methods.depth.streamline import train_replacement

    model = tiny_family("llama")
    layer = arch.decoder_layers(model)[1]
    layer.attention = layer.self_attn
    del layer.self_attn
    x = torch.zeros(3, model.config.hidden_size)
    with pytest.raises(UsageError, match="streamline.replace=ffn: a LlamaDecoderLayer has no `self_attn` to take out"):
        train_replacement(model, 1, x, x, 0, 1e-3, 4, 0)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "pyramidkv"])
def test_a_per_head_kv_baseline_on_a_latent_kv_cache_is_refused_before_its_base_plans(name, calib, monkeypatch):
    """The engine refused it only once the plan was made: after the base's search (PDTrim's takes minutes)."""
    model = model_of("deepseek_v3")
    method = methods.get(name)(methods.get(name).Config(base="pdtrim"))
    monkeypatch.setattr(type(method.base), "plan", lambda *a: pytest.fail("the base planned"))
    with pytest.raises(UsageError, match=rf"{name}: the {name} KV policy selects positions per KV head, and this "
                                         "deepseek_v3 model caches one compressed latent per token"):
        method.plan(model, calib, "disaggregated")


def test_export_of_a_model_with_unlike_layers_is_refused_before_planning(cli, data_dir, tmp_path, monkeypatch):
    """Qwen2-MoE with `decoder_sparse_step=2` has dense and MoE layers alternating: a pruned config cannot say which
    kept layer is which. `export` refused it only after the plan (a search of minutes) was made."""
    from harness.pd.presets import byte_tokenizer

    tiny_family("qwen2_moe", **QWEN2_MOE_ALTERNATING).save_pretrained(tmp_path / "m")
    byte_tokenizer(300).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(methods.get("shortgpt"), "plan", lambda *a: pytest.fail("planned"))
    got = cli("export", "--model", tmp_path / "m", "--device", "cpu", "--method", "shortgpt", "--set", "shortgpt.k=1",
              "--out", tmp_path / "out", "--data-dir", data_dir)
    assert got.returncode == 2, got.stderr
    assert "decoder layer 1 of this qwen2_moe model differs in class or shapes from layer 0" in got.stderr


QWEN2_MOE_ALTERNATING = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2}


DEEPSEEK_V2 = {"num_key_value_heads": 4, "head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
               "kv_lora_rank": 16, "q_lora_rank": 16, "n_routed_experts": 4, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "moe_intermediate_size": 32}  # as test_families' deepseek_v3


@pytest.mark.parametrize("family, extra", [("deepseek_v3", {}), ("deepseek_v2", DEEPSEEK_V2)])
def test_a_deepseek_export_keeps_its_kept_dense_layers_dense(family, extra, tmp_path):
    """Layers 0, 1 dense and 2, 3 mixtures of experts (`first_k_dense_replace=2`): it was refused ("differs in class
    or shapes from layer 0"). Kept layers keep their source order, so the dense ones still come first: each checkpoint
    says how many it kept, reloads cleanly and gives the pruned logits (prefill 0, 1, 3: two dense; decode 1, 3: one)."""
    import json

    import torch
    from test_export import IDS, assert_clean_load, harness_logits, manual, reload

    from harness.pd.models import LoadedModel
    from harness.pd.presets import byte_tokenizer
    from harness.run.export import export_plan

    model = tiny_family(family, **extra, first_k_dense_replace=2)
    method, plan = manual(model, "disaggregated", prefill_layers=(0, 1, 3), decode_layers=(1, 3))
    export_plan(LoadedModel(model, byte_tokenizer(300), family), method, plan, tmp_path / "pd")
    for stage, layers, dense in (("prefill", (0, 1, 3), 2), ("decode", (1, 3), 1)):
        ck = tmp_path / "pd" / stage
        assert json.loads((ck / "config.json").read_text())["first_k_dense_replace"] == dense
        reloaded, info = reload(ck)
        assert_clean_load(info)
        kinds = [type(layer.mlp).__name__.endswith("MLP") for layer in arch.decoder_layers(reloaded)]
        assert kinds == [i < 2 for i in layers], stage
        with torch.inference_mode():
            got = reloaded(IDS % 300).logits.float()
        assert torch.allclose(got, harness_logits(model, layers, IDS % 300), atol=1e-5, rtol=0), stage
    assert model.config.first_k_dense_replace == 2  # the source config is unchanged


def test_a_config_that_builds_another_kind_of_layer_where_one_is_written_is_refused():
    """The check behind a dense-then-MoE export: a slot whose tensors are not what the pruned config builds at its
    index (an MoE layer written where the config says dense) is refused, not reloaded with random weights."""
    from harness.run.checkpoint import Slot, _check_config_builds, pruned_config

    model = tiny_family("deepseek_v3", first_k_dense_replace=2)
    layers = arch.decoder_layers(model)
    slots = [Slot(("layer", i), i, layers[i].state_dict(), i) for i in (0, 2)]
    _check_config_builds(model, pruned_config(model.config, slots, model.dtype, "DeepseekV3ForCausalLM"), slots)
    swapped = [Slot(("layer", 2), 2, layers[2].state_dict(), 0), Slot(("layer", 0), 0, layers[0].state_dict(), 2)]
    with pytest.raises(UsageError, match=r"checkpoint layer 0 \(source layer 0\) of this deepseek_v3 model would reload "
                                         "as another kind of layer"):
        _check_config_builds(model, pruned_config(model.config, swapped, model.dtype, "DeepseekV3ForCausalLM"), swapped)
