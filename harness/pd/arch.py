"""Small accessors that isolate architecture details, and the refusal of the architectures the engine cannot run.

Everything that knows where a model keeps its decoder layers, norm, rotary embedding and head
lives here, so the engine and the methods have one code path for every supported model. Supported:
decoders whose forward is embed_tokens -> decoder layers (full attention, one rotary embedding) ->
norm -> LM head and nothing else (Llama, Mistral v0.3, Qwen2/Qwen3, Phi-3, OLMo/OLMo-2, Gemma,
Mixtral, Qwen2-MoE, DeepSeek-V2/V3, SmolLM); `check_supported` refuses the rest at load.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from harness.errors import UsageError


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder (`LlamaModel` inside `LlamaForCausalLM`)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for attr in ("layers", "embed_tokens", "norm", "rotary_emb"):
        if not hasattr(dec, attr):
            raise TypeError(
                f"{type(model).__name__}: unsupported architecture (decoder has no `{attr}`); the harness supports "
                "decoders that run embed_tokens -> layers -> norm -> LM head with full attention (Llama, Mistral v0.3, "
                "Qwen2/Qwen3, Phi-3, OLMo, Gemma, Mixtral, SmolLM; docs/running.md lists them)"
            )
    return dec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def lm_head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def block_weights(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A decoder layer's weights: every parameter but its biases. Llama-like layers name them `*weight`; the experts of
    a mixture-of-experts block (transformers 5's fused `experts.gate_up_proj` and `experts.down_proj` of Mixtral,
    Qwen2-MoE, DeepSeek-V3) are 3-D parameters without that suffix, which a `*weight` filter silently left out."""
    return [(name, p) for name, p in layer.named_parameters() if "bias" not in name.rsplit(".", 1)[-1]]


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of one layer's K (or V) per token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(getattr(config, "num_key_value_heads", config.num_attention_heads)), int(head_dim)


def latent_kv(config) -> bool:
    """Whether the model caches one compressed latent per token and layer (multi-head latent attention: DeepSeek-V2/V3,
    `kv_lora_rank`), not K and V per KV head: transformers 5.24 caches (batch, 1, T, kv_lora_rank) and the rotary
    key part, so `kv_heads_and_dim` does not describe the cache and a policy selecting per KV head has no heads to
    select in."""
    return getattr(config, "kv_lora_rank", None) is not None


def check_policy_fits(config, policy, spec: str) -> None:
    """UsageError for a per-head KV policy (SnapKV, H2O, PyramidKV) on a model whose cache holds no KV heads
    (`latent_kv`): it failed every cell with a contract error blaming the policy's keep() mask shape."""
    if policy.per_head and latent_kv(config):
        raise UsageError(f"{spec}: the {policy.kind} KV policy selects positions per KV head, and this "
                         f"{getattr(config, 'model_type', '?')} model caches one compressed latent per token (multi-head "
                         "latent attention), with no KV heads; use a policy shared by the heads (first_last, streaming)")


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's execution device.

    For a model placed by accelerate (`--device-map`), parameters offloaded to CPU or disk sit on
    `meta` or `cpu` while the module runs elsewhere; its hook names the execution device.
    """
    hook = getattr(decoder(model).embed_tokens, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(model.parameters()).device


def execution_devices(model: nn.Module) -> list[torch.device]:
    """Every device the model computes on: the inputs' device and, for a model placed by accelerate, each GPU of its
    device map (layers offloaded to CPU memory or disk run on the inputs' device)."""
    placed = getattr(model, "hf_device_map", None) or {}
    # accelerate's maps hold GPU indices, "cpu", "disk" (and "mps"); a map given by hand may hold "cuda:1" or a
    # torch.device, torch.device("cpu") too, which compares unequal to "cpu"
    devs = [torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in placed.values()
            if not (isinstance(d, str) and d == "disk")]
    return list(dict.fromkeys([model_device(model), *(d for d in devs if d.type != "cpu")]))


@functools.cache
def cache_kwarg(layer_cls: type) -> str:
    """Name of the decoder layer's cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def layers_swapped(model: nn.Module, keep: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with only decoder layers `keep` (original indices), restoring them on exit.

    The kept modules are the same objects (no weight is copied); on exit the original
    `ModuleList` object is put back, so the model is exactly as before.
    """
    dec = decoder(model)
    original = dec.layers
    dec.layers = nn.ModuleList([original[i] for i in keep])
    try:
        yield model
    finally:
        dec.layers = original


def check_full_attention(config, spec: str) -> None:
    """UsageError for sliding-window attention layers (Mistral's `sliding_window`, Qwen2 with
    `use_sliding_window`, Gemma-2's alternating `layer_types`): the PD engine masks every layer causally
    over the whole prompt, and removing blocks would also shift which layers slide, so the scores of such a
    model would be silently wrong on prompts longer than the window. Layers of any other kind than full or
    sliding attention (linear attention, indexed sparse attention, ...) keep state or select keys the
    PD cache does not hold: refused too (the engine failed on them with an AttributeError or shape error)."""
    kinds = set(getattr(config, "layer_types", None) or ())
    kind = getattr(config, "model_type", "?")
    window = getattr(config, "sliding_window", None)
    sliding = sorted(k for k in kinds if "sliding" in k or "chunk" in k) or (["sliding_window"] if not kinds and window and getattr(
        config, "use_sliding_window", True) else [])
    if sliding:
        raise UsageError(f"--model {spec}: this {kind} model has sliding-window attention ({', '.join(sliding)}, window {window}), which "
                         "the PD engine does not implement (it would score every layer with full attention); use a model "
                         "with full attention in every layer")
    other = sorted(kinds - {"full_attention"})
    if other:
        raise UsageError(f"--model {spec}: this {kind} model has {', '.join(other)} layers, which the PD engine does not implement (it "
                         "calls each layer with full causal attention over a key/value cache); use a model with full "
                         "attention in every layer")


# Config values under which the model's own forward computes outside its decoder layers, where the engine (which
# embeds, runs the layers and applies norm + LM head itself) and the unified scorer (decoder + LM head) do not:
# each would score wrongly (found by comparing every transformers 5.24 family with its own forward; the families
# disagree on the sense too: Granite divides the logits by `logits_scaling`, HyperCLOVA X multiplies). None or 1
# is neutral.
OUTSIDE_LAYERS = {
    "final_logit_softcapping": "final logit soft-capping",  # Gemma-2/3, VaultGemma, nanochat
    "logit_scale": "a logit scale",  # Cohere, Cohere2
    "logits_scaling": "logits scaling",  # Granite, HyperCLOVA X, MiniCPM3
    "embedding_multiplier": "an embedding multiplier in the model's forward",  # Granite, HyperCLOVA X
}
# Families whose decoder does what the engine's per-layer calls leave out, named by model_type.
ENGINE_GAPS = {
    "nanochat": "a norm of the embeddings before the first decoder layer",
    "doge": "dynamic-mask attention, which needs the causal mask materialised (the engine passes none on a causal step)",
}


def check_supported(model: nn.Module, spec: str) -> None:
    """UsageError (exit 2) naming the model type and what is missing, for a model the PD engine cannot run or would
    score wrongly: no Llama-like decoder (`decoder`), rotary embeddings per layer type (Gemma-3's local/global
    RoPE), or what `check_supported_config` reads in its config. Checked at load (`harness.pd.models`), before any
    score; the config's part also before the weights load (`harness.run.task_check.model_before_load`)."""
    try:
        dec = decoder(model)
    except TypeError as e:
        raise UsageError(f"--model {spec}: {e}") from None
    config = model.config.get_text_config()
    check_supported_config(config, spec)
    if "layer_type" in inspect.signature(dec.rotary_emb.forward).parameters:  # one table per layer type
        _refuse(config, spec, ["rotary embeddings per layer type (the engine computes one for every layer)"])


def check_supported_config(config, spec: str) -> None:
    """`check_supported`'s refusals that the config alone decides (no weights needed): sliding-window or
    non-attention layers (`check_full_attention`), computation outside the decoder layers (OUTSIDE_LAYERS) or a
    family in ENGINE_GAPS. `config`: the text model's (`get_text_config()`)."""
    check_full_attention(config, spec)
    kind = getattr(config, "model_type", "?")
    gaps = [ENGINE_GAPS[kind]] if kind in ENGINE_GAPS else []
    gaps += [f"{what} ({name}={getattr(config, name)})" for name, what in OUTSIDE_LAYERS.items()
             if getattr(config, name, None) not in (None, 1)]
    if gaps:
        _refuse(config, spec, gaps)


def _refuse(config, spec: str, gaps: list[str]) -> None:
    kind = getattr(config, "model_type", "?")
    raise UsageError(f"--model {spec}: {kind} models are not supported: the PD engine does not implement "
                     f"{'; '.join(gaps)}, so it would score them wrongly or fail; supported are decoders that run "
                     "embed_tokens -> layers -> norm -> LM head (docs/running.md lists them)")


def need_resident_weights(model: nn.Module, what: str) -> None:
    """Refuse (UsageError) when decoder layers of `model` are offloaded by `--device-map` (their parameters on `meta`,
    the weights in CPU memory or on disk, loaded for each forward): `what` reads or trains the weights themselves,
    and an offloaded parameter gets no gradient (accelerate swaps in a loaded copy), nor can it be copied."""
    off = [i for i, layer in enumerate(decoder_layers(model)) if any(p.device.type == "meta" for p in layer.parameters())]
    if off:
        raise UsageError(f"{what} needs the weights of every decoder layer resident, but --device-map offloaded layers "
                         f"{off} to CPU memory or disk: give them room on the GPUs (--max-memory), or choose another "
                         "method or option")


def strided_sample(flat: torch.Tensor) -> torch.Tensor:
    """The values of a flattened tensor the fingerprints read: its first and last 8 and ~1,000 evenly strided between
    (an edit anywhere in a tensor of up to ~1,000 values, or of a stride's worth in a larger one, changes them)."""
    return torch.cat([flat[:8], flat[:: max(1, flat.numel() // 1024)], flat[-8:]])


def hash_parameters(h, model: nn.Module, sample: Callable[[torch.Tensor], torch.Tensor], with_dtype: bool) -> None:
    """Feed hashlib object `h` each parameter's name and shape (and dtype, with `with_dtype`) and the float32 bytes
    of `sample(its flattened values)`; an offloaded (meta) parameter gives its name and shape only. The one loop
    behind methods.base.model_fingerprint (cache keys) and harness.run.inputs.weights_fingerprint (records)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update((f"|{name}:{tuple(p.shape)}" + (f":{p.dtype}" if with_dtype else "")).encode())
            if p.device.type != "meta" and p.numel():
                h.update(sample(p.detach().reshape(-1)).float().cpu().numpy().tobytes())
