"""`python -m harness export`: a method's plan as pruned Hugging Face checkpoints.

    python -m harness export --method shortgpt --set shortgpt.k=8 --out DIR
    python -m harness export --method pdtrim --mode disaggregated --plans-from results/issue3/default --out DIR
    python -m harness export --record results/issue3/default/pdtrim__disaggregated.json --out DIR

The plan is made afresh (loading the model, and calibration data for methods that calibrate) or
replayed from a run record (`--record FILE`, or `--plans-from RUN_DIR` with `--method`/`--mode`),
so e.g. PDTrim's search is not repeated. The weights are written inside `method.apply(model, plan)`,
so whatever the method installs (healed blocks, a trained replacement) is what the checkpoint
holds (harness/run/checkpoint.py).

Layout of DIR:

- A unified plan (one layer set for both stages, no KV pruning; also a disaggregated-mode plan of
  that kind, e.g. ShortGPT's): one checkpoint in DIR itself: config.json (`num_hidden_layers` =
  layers kept), model.safetensors (layer i = source layer `layers[i]`), tokenizer files,
  generation_config.json, and harness_export.json: {"format", "kind": "unified", "method",
  "method_options", "mode", "plan" (`PruningPlan.to_dict()`, source-model layer indices),
  "source_model", "layers" (source index of each checkpoint layer, null for an inserted
  replacement layer), "inserted_layers", "harness" (version, git commit), "created"}.
- A disaggregated plan: DIR/prefill/ and DIR/decode/ (each a checkpoint as above, `kind`
  "prefill" / "decode") and DIR/manifest.json, which tells a PD serving system how to connect them:

    {"format": "pd-harness-export/1", "kind": "disaggregated", "method", "method_options", "mode",
     "source_model", "plan", "harness", "created",
     "prefill": {"path": "prefill", "num_hidden_layers": P, "layers": [source index per layer]},
     "decode":  {"path": "decode",  "num_hidden_layers": D, "layers": [...]},
     "decode_kv_from_prefill": [j_0, ..., j_{D-1}],   # decode layer i attends over the prompt KV of prefill layer j_i
     "layer_map": [{"decode_layer": i, "prefill_layer": j_i, "source_layer": s}, ...],
     "prefill_layers_not_sent": [prefill layers whose KV no decode layer reads],
     "kv_policy": {"description": "...", "source_index": {...}, "prefill_index": {...}, "decode_index": {...}},
     "first_token": "prefill"}

  Decode layer i and prefill layer j_i are the same source layer with the same weights
  (`decode ⊆ prefill`), so the handoff ships, per request, the K/V of prefill layers
  `decode_kv_from_prefill` in that order. `kv_policy` is the plan's `KVPolicy.to_dict()` with its
  layer lists given in source, prefill-checkpoint and decode-checkpoint indices: with a
  first_last policy, those layers send only the first `n_first` and last `n_last` prompt
  positions (kept positions keep their original position ids); `streaming`/`snapkv` keep a
  budget per layer (docs/kv_policies.md). The first generated token comes from the prefill
  checkpoint's last-position logits; the decode checkpoint continues at position T (the prompt
  length). `decode_cache_from_prefill` builds the decode model's cache from a prefill forward's
  cache (no KV policy) and is how the tests check the pair reproduces the harness's scoring.

Bad input (unknown method, `--out` not empty without `--force`, a record of another model or
seed, a plan whose installed weights a checkpoint cannot express) exits 2 with a message."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from harness.errors import UsageError

FORMAT = "pd-harness-export/1"


def _replacement(method, plan, model, hooks_before: dict[str, int]):
    """The checkpoint form of forward hooks `method.apply` installed (None if it installed none).

    Only streamline's trained FFN replacement is known; any other hook changes the computation in
    a way no standard checkpoint holds, so the export is refused rather than silently dropped."""
    from harness.run.checkpoint import Replacement, hook_counts
    from methods.depth.streamline import Streamline
    from methods.kv.baselines import KVBaseline

    added = {k: v for k, v in hook_counts(model).items() if v > hooks_before.get(k, 0)}
    if not added:
        return None
    inner, view = method, plan  # view: the plan as `inner` made it (a KV baseline keeps its base's info nested)
    while not isinstance(inner, Streamline) and (getattr(inner, "base", None) or getattr(inner, "inner", None)):
        if isinstance(inner, KVBaseline):
            view = inner.base_view(view)
        inner = getattr(inner, "base", None) or getattr(inner, "inner", None)
    rep = view.info.get("replacement", {})
    # streamline keeps the trained network per kept-layer set (it is not part of the plan)
    ffn = inner._trained.get(plan.prefill_layers) if isinstance(inner, Streamline) and rep.get("enabled") else None
    if ffn is None:
        raise UsageError(f"{plan.method}'s apply installs forward hooks on {', '.join(sorted(added))}: a computation a "
                         "standard Hugging Face checkpoint cannot express, so it is not exported")
    run = tuple(view.info["removed"])
    n = plan.n_layers
    return Replacement(run, ffn, ffn.layer.state_dict(), run[-1] + 1 if run[-1] + 1 < n else None,
                       {k: rep[k] for k in ("mse_before", "mse_after", "steps", "installed") if k in rep})


def build_manifest(prefill, decode, plan) -> dict[str, Any]:
    """The PD part of manifest.json from the two checkpoints' slots (harness.run.checkpoint.Slot)."""
    where = {s.key: j for j, s in enumerate(prefill)}
    missing = [s.key for s in decode if s.key not in where]
    if missing:  # decode ⊆ prefill makes this impossible for a valid plan
        raise ValueError(f"decode layers {missing} have no prefill layer to read KV from")
    kv_from = [where[s.key] for s in decode]
    src_prefill = {s.original: j for j, s in enumerate(prefill) if s.original is not None}
    src_decode = {s.original: i for i, s in enumerate(decode) if s.original is not None}
    policy = plan.kv_policy.to_dict()
    return {
        "prefill": {"path": "prefill", "num_hidden_layers": len(prefill), "layers": [s.original for s in prefill]},
        "decode": {"path": "decode", "num_hidden_layers": len(decode), "layers": [s.original for s in decode]},
        "decode_kv_from_prefill": kv_from,
        "layer_map": [{"decode_layer": i, "prefill_layer": j, "source_layer": s.original} for i, (s, j) in enumerate(zip(decode, kv_from))],
        "prefill_layers_not_sent": sorted(set(range(len(prefill))) - set(kv_from)),
        "kv_policy": {"description": plan.kv_policy.describe(), "source_index": policy,
                      "prefill_index": plan.kv_policy.remap_layers(src_prefill).to_dict(),
                      "decode_index": plan.kv_policy.remap_layers(src_decode).to_dict()},
        "first_token": "prefill",
    }


def export_plan(loaded, method, plan, out: Path, meta: dict[str, Any] | None = None,
                max_shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write `plan` of `method` on `loaded` (a `LoadedModel`) into the new folder `out`.

    Returns the top-level metadata written (harness_export.json of a unified export, manifest.json
    of a disaggregated one) plus "checkpoints": {name: what `write_checkpoint` returned}. The model
    is unchanged afterwards (the method's `apply` undoes its installs on exit).
    """
    from harness.pd import arch
    from harness.run.checkpoint import hook_counts, layer_reference, layer_slots, write_checkpoint

    model = loaded.model
    if plan.n_layers != arch.n_layers(model):
        raise UsageError(f"the plan is for a {plan.n_layers}-layer model; {loaded.spec} has {arch.n_layers(model)} layers")
    reference, hooks = layer_reference(model), hook_counts(model)
    meta = {"format": FORMAT, "method": plan.method, **(meta or {}), "plan": plan.to_dict(),
            "source_model": {"spec": loaded.spec, **loaded.description}, "harness": _harness_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    with method.apply(model, plan) as applied:
        rep = _replacement(method, applied, model, hooks)
        if applied.is_unified:
            slots = layer_slots(model, applied.prefill_layers, reference, rep)
            ck = write_checkpoint(out, model, loaded.tokenizer, slots, {**meta, "kind": "unified"}, max_shard_size)
            return {**meta, "kind": "unified", "layers": ck["layers"], "checkpoints": {".": ck}}
        prefill = layer_slots(model, applied.prefill_layers, reference, rep)
        decode = layer_slots(model, applied.decode_layers, reference, rep)
        head = {k: meta[k] for k in ("format", "method", "mode") if k in meta}
        manifest = {**head, "kind": "disaggregated", **build_manifest(prefill, decode, applied), **meta}
        cks = {}
        for name, slots in (("prefill", prefill), ("decode", decode)):
            cks[name] = write_checkpoint(out / name, model, loaded.tokenizer, slots,
                                         {**meta, "kind": name, "manifest": "../manifest.json"}, max_shard_size)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        return {**manifest, "checkpoints": cks}


def decode_cache_from_prefill(prefill_cache, manifest: dict[str, Any], decode_config):
    """The decode checkpoint's cache from a prefill-checkpoint forward's cache (a transformers `Cache`).

    Decode layer i gets the K/V of prefill layer `manifest["decode_kv_from_prefill"][i]`, every
    prompt position (a plan with a KV policy sends fewer: see the manifest's `kv_policy`).
    """
    from harness.pd.cache import hf_cache_from_layers, hf_cache_layers

    kv = hf_cache_layers(prefill_cache)
    return hf_cache_from_layers([kv[j] for j in manifest["decode_kv_from_prefill"]], decode_config)


def _harness_version() -> dict[str, Any]:
    from importlib import metadata

    from harness.run.env import git_info

    try:
        version = metadata.version("pd-harness")
    except metadata.PackageNotFoundError:
        version = None
    return {"version": version, **git_info()}
