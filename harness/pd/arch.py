"""Small accessors that isolate architecture details (Llama-family decoders).

Everything that knows where a model keeps its decoder layers, norm, rotary embedding and head
lives here, so the engine and the methods have one code path for every supported model.
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
                f"{type(model).__name__}: unsupported architecture (decoder has no `{attr}`); "
                "the harness supports Llama-family decoders (Llama, Mistral, Qwen2, SmolLM)"
            )
    return dec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def lm_head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of one layer's K (or V) per token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(getattr(config, "num_key_value_heads", config.num_attention_heads)), int(head_dim)


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
    model would be silently wrong on prompts longer than the window."""
    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    sliding = sorted(kinds - {"full_attention"}) or (["sliding_window"] if not kinds and window and getattr(
        config, "use_sliding_window", True) else [])
    if sliding:
        raise UsageError(f"--model {spec}: it has sliding-window attention ({', '.join(sliding)}, window {window}), which "
                         "the PD engine does not implement (it would score every layer with full attention); use a model "
                         "with full attention in every layer")


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
