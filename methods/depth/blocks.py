"""Block-level calibration statistics shared by depth-pruning methods."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from harness.pd import arch
from methods import cached
from methods.bars import calib_batches

BLOCK_COSINES_VERSION = "1"  # bump when block_cosines' numbers change


def block_cosines(model, calib, batch_size: int = 16, desc: str = "block cosines") -> list[float]:
    """Mean cos(h_in, h_out) over calibration tokens for every decoder block; kept in the on-disk
    cache (methods/cached.py) per (model, calibration set, batch size), so a rerun does no forward.
    `desc` names the progress bar over calibration batches."""
    key = cached.stat_key("block-cosines", model, calib, BLOCK_COSINES_VERSION, [sys.modules[__name__]], batch_size=batch_size)
    hit = cached.load("block-cosines", key)
    if hit is not None and not cached.finite_numbers(hit, arch.n_layers(model)):
        cached.reject("block-cosines", key, f"no list of {arch.n_layers(model)} finite block scores")
    elif hit is not None:
        cached.announce(f"block scores: cos(h_in, h_out) of {len(hit)} blocks")
        return [float(v) for v in hit]
    cos = compute_block_cosines(model, calib, batch_size, desc)
    cached.save("block-cosines", key, cos)
    return cos


@torch.inference_mode()
def compute_block_cosines(model, calib, batch_size: int = 16, desc: str = "block cosines") -> list[float]:
    """Mean cos(h_in, h_out) over calibration tokens for every decoder block, accumulated in float32."""
    layers = arch.decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64, device="cpu")  # host sums of .cpu() terms
    count = torch.zeros((), dtype=torch.float64, device="cpu")
    valid: list[torch.Tensor] = []

    def hook(i):
        def fn(module, args, kwargs, output):
            h_out = output[0] if isinstance(output, tuple) else output
            # the input as passed in: on the previous block's device when the model is spread over GPUs
            h_in = (args[0] if args else kwargs["hidden_states"]).to(h_out.device)
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            sums[i] += cos[valid[0].to(cos.device)].double().sum().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids, mask in calib_batches(calib, batch_size, arch.model_device(model), f"{desc}: calibration batches"):
            valid[:] = [mask.bool()]
            count += mask.sum().double().cpu()
            arch.decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the k smallest scores (ties broken by lower index), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])
