"""Pruned Hugging Face checkpoints: a stage's decoder layers, renumbered 0..n-1, as safetensors.

A checkpoint written here is an ordinary `LlamaForCausalLM` (or whatever class the source model
is) with fewer layers: `config.json` has `num_hidden_layers` = the stage's layer count (and
per-layer config lists such as `layer_types` cut to match, DeepSeek's `first_k_dense_replace`
recounted), the weights of layer `layers[i]` of the source model are stored as
`model.layers.{i}.*`, embeddings, final norm and LM head as they
are (a tied LM head is left out, as `save_pretrained` does, and re-tied on load). So
`AutoModelForCausalLM.from_pretrained` and serving engines (vLLM, SGLang, TGI) load it with no
custom code.

The weights are read from the modules the model holds *while a method's `apply` is active*, so
what a method installs is what is written: healed copies of blocks (`methods/pdtrim/healing.py`) are
plain decoder layers and go in as they are; streamline's trained FFN replacement (a forward hook,
`methods/depth/streamline.py`) is written as an extra decoder layer whose attention weights are all zero
(its attention output is then exactly 0, so the layer computes its FFN half, which the replacement
is: h + MLP(RMSNorm(h)) in Llama's layers). Anything else a checkpoint cannot express is refused
(`UsageError`).

Nothing here modifies the model: tensors are read (and copied to CPU shard by shard on write).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import UsageError
from harness.pd import arch

MAX_SHARD_SIZE = "5GB"  # the Hugging Face default: one file for models up to ~2.5B parameters in bf16
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


@dataclass
class Slot:
    """One decoder layer of an exported checkpoint.

    `key` identifies the layer across the prefill and decode checkpoints of one plan:
    ("layer", i) for layer i of the source model, ("ffn", run) for a replacement of removed `run`.
    `tensors` are the layer's weights, named relative to the layer ("self_attn.q_proj.weight", ...).
    `config_index` is the source layer whose per-layer config entries (e.g. `layer_types`) it takes.
    """

    key: tuple
    original: int | None
    tensors: dict[str, torch.Tensor]
    config_index: int
    note: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Replacement:
    """A network standing in for the removed `run` of blocks: `ffn` (h -> h', hidden states (batch, seq, hidden)),
    and `tensors`, its weights named as in a decoder layer of the model, all but the attention's (which it lacks).

    `before`: the source layer it runs before (None: after the last layer, i.e. after run[0] - 1).
    """

    run: tuple[int, ...]
    ffn: nn.Module
    tensors: dict[str, torch.Tensor]
    before: int | None
    info: dict[str, Any] = field(default_factory=dict)


def layers_prefix(model: nn.Module) -> str:
    """State-dict prefix of the decoder layers, e.g. 'model.layers.' for `LlamaForCausalLM`."""
    dec = arch.decoder(model)
    for name, mod in model.named_modules():
        if mod is dec:
            return f"{name}.layers." if name else "layers."
    raise TypeError(f"{type(model).__name__}: decoder not found among its modules")


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Forward (pre-)hooks per decoder submodule, by name: a method that installs hooks changes these."""
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks)
            for name, m in arch.decoder(model).named_modules() if m._forward_hooks or m._forward_pre_hooks}


def layer_slots(model: nn.Module, layers: Sequence[int], reference: dict[str, Any],
                replacement: Replacement | None = None) -> list[Slot]:
    """The checkpoint layers of a stage that runs source `layers` on `model` as it is now.

    `reference` (`layer_reference`, taken before any method installed anything) gives the class
    and tensor names every layer must have to be written as a standard decoder layer.
    """
    mods = arch.decoder_layers(model)
    slots = []
    for i in layers:
        mod = mods[i]
        tensors = mod.state_dict()
        if type(mod) is not reference["cls"] or _shapes(tensors) != reference["shapes"][i]:
            raise UsageError(f"layer {i} is a {type(mod).__name__} with tensors {sorted(tensors)[:4]}..., not a standard "
                             f"{reference['cls'].__name__}: a Hugging Face checkpoint cannot express it")
        slots.append(Slot(("layer", i), i, tensors, i))
    if replacement is not None:
        _insert_replacement(slots, layers, replacement, model)
    return slots


def layer_reference(model: nn.Module) -> dict[str, Any]:
    """Class of the model's decoder layers and each one's tensor shapes ({name: shape} per source layer).

    Layers that differ in shapes are refused unless the config says which is which in a way `pruned_config` rewrites
    (`first_k_dense_replace`: DeepSeek-V2/V3's dense first layers before its mixture-of-experts ones)."""
    mods = arch.decoder_layers(model)
    shapes = [_shapes(m.state_dict()) for m in mods]
    for i, m in enumerate(mods):
        if type(m) is not type(mods[0]) or (shapes[i] != shapes[0] and not _dense_first(model.config)):
            kind = getattr(model.config, "model_type", "?")
            raise UsageError(f"{type(model).__name__}: decoder layer {i} of this {kind} model differs in class or "
                             "shapes from layer 0, and its config does not say which layers are which in a way export "
                             "rewrites for the kept layers (it does for DeepSeek's `first_k_dense_replace` dense first "
                             "layers); export supports models whose decoder layers are all alike or dense-then-MoE "
                             "as DeepSeek's")
    return {"cls": type(mods[0]), "shapes": shapes}


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


def _dense_first(config) -> int:
    """DeepSeek-V2/V3's `first_k_dense_replace`: layers below it have a dense MLP, the rest experts (0: none dense)."""
    k = getattr(config.get_text_config(), "first_k_dense_replace", None)
    return k if isinstance(k, int) and k > 0 else 0


def _insert_replacement(slots: list[Slot], layers: Sequence[int], rep: Replacement, model: nn.Module) -> None:
    """Put the replacement where its hook runs: before layer `rep.before`, or after layer run[0] - 1."""
    anchor = rep.before if rep.before is not None else rep.run[0] - 1
    if anchor not in layers:
        raise UsageError(f"the replacement of removed blocks {list(rep.run)} hooks onto layer {anchor}, which this stage "
                         "does not run; such a plan cannot be exported")
    at = list(layers).index(anchor) + (0 if rep.before is not None else 1)
    template = arch.decoder_layers(model)[rep.run[0]].state_dict()  # names and shapes of a decoder layer
    tensors = {}
    for name, t in template.items():
        if name.startswith("self_attn."):
            tensors[name] = torch.zeros_like(t)  # zero o_proj (and the rest): the attention adds exactly 0
        elif name in rep.tensors and rep.tensors[name].shape == t.shape:
            tensors[name] = rep.tensors[name]
        else:
            raise UsageError(f"the replacement network has no tensor matching decoder-layer tensor {name}; "
                             "it cannot be written as a decoder layer")
    if extra := sorted(set(rep.tensors) - set(tensors)):
        raise UsageError(f"the replacement network's tensors {extra[:3]} are not a decoder layer's; it cannot be "
                         "written as one")
    _check_computes_replacement(model, arch.decoder_layers(model)[rep.run[0]], tensors, rep)
    note = {"replaces_removed_layers": list(rep.run), "kind": "block's FFN half as a decoder layer with zero attention",
            **rep.info}
    slots.insert(at, Slot(("ffn", rep.run), None, tensors, rep.run[0], note))


def _check_computes_replacement(model: nn.Module, layer: nn.Module, tensors: dict[str, torch.Tensor], rep: Replacement) -> None:
    """UsageError unless a decoder layer like `layer` holding `tensors` (attention zeroed) computes what the
    replacement does on a random input: an attention whose zero weights add something else than 0 would reload as
    another function than the one the harness scored, silently."""
    dec = arch.decoder(model)
    w = next(layer.parameters())
    h = torch.randn(1, 5, dec.embed_tokens.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    pos = torch.arange(5, device=w.device)[None]
    with torch.inference_mode():  # the layer's own module run with the tensors written (torch.func: no copy of it)
        rot = tuple(t.to(w.device) for t in dec.rotary_emb(h, position_ids=pos))
        got = torch.func.functional_call(layer, tensors, (h,), {"attention_mask": None, "position_embeddings": rot,
                                                                "position_ids": pos, arch.cache_kwarg(type(layer)): None})
        got = (got[0] if isinstance(got, tuple) else got).float()
        want = rep.ffn(h).float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        kind = getattr(model.config, "model_type", "?")
        raise UsageError(f"the replacement network of removed blocks {list(rep.run)} cannot be written as a "
                         f"{type(layer).__name__}: this {kind} decoder layer, its attention weights zeroed, does not "
                         "compute what the replacement does (its attention adds something even so); export a plan "
                         "without the replacement")


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the decoder layers (embeddings, final norm, LM head).

    A tensor sharing storage with an earlier one (a tied LM head) is left out when the config
    ties them, since `from_pretrained` re-ties it; otherwise it is cloned (safetensors refuses
    shared storage)."""
    prefix = layers_prefix(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        if name.startswith(prefix):
            continue
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where in seen:
            if tied:
                continue
            t = t.clone()
        seen.add(where)
        out[name] = t
    return out


def pruned_config(config, slots: Sequence[Slot], dtype: torch.dtype, architecture: str):
    """A copy of `config` for a model made of `slots`: layer count and per-layer lists follow the slots."""
    cfg = copy.deepcopy(config)
    n_src = config.num_hidden_layers
    src = [s.config_index for s in slots]
    for name in PER_LAYER_CONFIG_LISTS:
        vals = getattr(cfg, name, None)
        if isinstance(vals, (list, tuple)) and len(vals) == n_src:
            setattr(cfg, name, [vals[i] for i in src])
    mwl = getattr(cfg, "max_window_layers", None)  # Qwen2: layers below it attend fully, the rest in a window
    if isinstance(mwl, int):
        cfg.max_window_layers = sum(1 for i in src if i < mwl)
    if k := _dense_first(config):  # the slots keep their source order, so the kept dense layers still come first
        cfg.get_text_config().first_k_dense_replace = sum(1 for i in src if i < k)
    cfg.num_hidden_layers = len(slots)
    cfg.architectures = [architecture]
    cfg.dtype = dtype
    return cfg


def _check_config_builds(model: nn.Module, config, slots: Sequence[Slot]) -> None:
    """UsageError unless `config` builds, at each index, a decoder layer with the tensor names and shapes of the slot
    written there: else the checkpoint reloads a dense layer's weights into an MoE layer (or the reverse), which
    `from_pretrained` reports as mismatched or missing keys and fills at random. Built on the meta device (no memory)."""
    cls, text = type(arch.decoder_layers(model)[0]), config.get_text_config()
    with torch.device("meta"):
        for i, s in enumerate(slots):
            built = _shapes(cls(text, i).state_dict())
            if built != _shapes(s.tensors):
                kind = getattr(text, "model_type", "?")
                raise UsageError(f"checkpoint layer {i} (source layer {s.config_index}) of this {kind} model would "
                                 f"reload as another kind of layer than the one written ({sorted(set(built) ^ set(s.tensors))[:3]} "
                                 "differ): the pruned config cannot say which kept layers are dense and which are "
                                 "mixtures of experts; export a plan that keeps the dense layers first")


def save_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: str | int = MAX_SHARD_SIZE) -> list[str]:
    """Write `tensors` as `model.safetensors` (or shards plus `model.safetensors.index.json`); return the file names.

    Tensors are copied to CPU one shard at a time, so a GPU model needs one shard of host memory.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    umask = os.umask(0)
    os.umask(umask)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].detach().to("cpu").contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
        os.chmod(out / filename, 0o666 & ~umask)  # safetensors creates 0600 files; a serving user may differ
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        files.append("model.safetensors.index.json")
    return files


def write_checkpoint(out: Path, model: nn.Module, tokenizer: Any, slots: Sequence[Slot], meta: dict[str, Any],
                     max_shard_size: str | int = MAX_SHARD_SIZE) -> dict[str, Any]:
    """Write a loadable checkpoint of `slots` into the (new, empty) folder `out`.

    Files: config.json, model.safetensors (or shards + index), generation_config.json (when the
    model has one), the tokenizer's files and harness_export.json (`meta` plus the layer list).
    Returns what it wrote: {"layers": [source index or None per layer], "files", "bytes"}.
    """
    out.mkdir(parents=True, exist_ok=True)
    prefix = layers_prefix(model)
    tensors = base_tensors(model)
    for i, s in enumerate(slots):
        tensors.update({f"{prefix}{i}.{k}": t for k, t in s.tensors.items()})
    dtype = arch.decoder(model).embed_tokens.weight.dtype
    config = pruned_config(model.config, slots, dtype, type(model).__name__)
    if _dense_first(model.config):  # layers of two kinds: the config must build each kind where it is written
        _check_config_builds(model, config, slots)
    files = save_tensors(out, tensors, max_shard_size)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layers = [s.original for s in slots]
    info = {**meta, "layers": layers, "num_hidden_layers": len(slots),
            "inserted_layers": {str(i): s.note for i, s in enumerate(slots) if s.original is None}}
    (out / "harness_export.json").write_text(json.dumps(info, indent=2, default=str))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"layers": layers, "files": sorted(p.name for p in out.iterdir()), "bytes": size, "weight_files": files}
