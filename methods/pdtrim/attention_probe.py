"""Where decode queries look: per-layer attention share on the first and last prompt positions.

For PDTrim's token-aware KV pruning: prompts are prefilled by the plan's prefill layers, the full
KV is handed over, and a few greedy decode steps run the plan's decode layers through an
attention function (registered with transformers' `AttentionInterface` for the duration) that
computes eager attention and accumulates, per layer, the head-averaged share of each decode
query's attention mass that lands on prompt positions `[0, n_first) ∪ [T - n_last, T)`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from harness.pd import arch
from harness.pd.batching import pad_tokens
from harness.pd.cache import PDCache
from harness.pd.plan import KVPolicy, PruningPlan
from harness.pd.stages import StagedModel
from methods import cached
from methods.bars import progress

PROBE_CACHE_VERSION = "1"  # bump when the shares change (this file's source digest is in the key too)

PROBE_NAME = "harness_attention_probe"


class _Probe:
    def __init__(self, n_first: int, n_last: int, lengths: torch.Tensor) -> None:
        self.n_first, self.n_last, self.lengths = n_first, n_last, lengths
        self.cache: PDCache | None = None
        self.mass: dict[int, float] = {}
        self.queries: dict[int, int] = {}

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """Eager attention that also records the share on the first/last prompt positions."""
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores.float(), dim=-1)  # (B, heads, q, S)
        kpos = self.cache.positions[module.layer_idx]  # (B, S), this step's columns included
        t = self.lengths[:, None]
        kept = (kpos >= 0) & ((kpos < self.n_first) | ((kpos >= t - self.n_last) & (kpos < t)))
        kept = kept.to(weights.device)  # positions: on the input's device; a layer may sit on another GPU
        share = (weights * kept[:, None, None, :]).sum(-1).mean(1)  # (B, q): head-averaged
        self.mass[module.layer_idx] = self.mass.get(module.layer_idx, 0.0) + float(share.sum())
        self.queries[module.layer_idx] = self.queries.get(module.layer_idx, 0) + share.numel()
        out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
        return out, weights


@contextlib.contextmanager
def _probe_attention(model: nn.Module, probe: _Probe) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_NAME, probe.attend)
    previous = model.config._attn_implementation
    model.config._attn_implementation = PROBE_NAME
    try:
        yield
    finally:
        model.config._attn_implementation = previous


@torch.inference_mode()
def first_last_shares(
    model: nn.Module, plan: PruningPlan, prompts: Sequence[Sequence[int]], n_first: int, n_last: int, steps: int = 8
) -> dict[int, float]:
    """Mean share of decode-query attention on the first `n_first` + last `n_last` prompt positions.

    Returns {decode layer: share in [0, 1]} averaged over prompts, heads and `steps` greedy steps.
    """
    # the probe looks at where decode queries would look given every prompt position: the plan's
    # layers with the full KV handed over (a dense policy also has nothing to observe in prefill)
    staged = StagedModel(model, plan.replace(kv_policy=KVPolicy()))  # every position
    out = staged.prefill(pad_tokens(prompts, arch.model_device(model)))
    lengths = out.lengths
    tok = staged.logits(out.last_hidden).argmax(-1)
    dcache = staged.receive(staged.handoff(out))
    probe = _Probe(n_first, n_last, lengths)
    probe.cache = dcache
    ones = torch.ones((len(prompts), 1), dtype=torch.bool, device=lengths.device)
    with _probe_attention(model, probe):
        for step in progress(range(steps), "pdtrim: attention probe, decode steps"):
            tok = staged.step(dcache, tok, lengths + step, ones).argmax(-1)
    return {layer: probe.mass[layer] / probe.queries[layer] for layer in sorted(probe.mass)}


def cached_shares(model, calib, plan: PruningPlan, prompts: Sequence[Sequence[int]], c) -> dict[int, float]:
    """`first_last_shares` with pdtrim's probe options `c`, kept in the on-disk cache (methods/cached.py)
    per (model, calibration set, the plan's layers, the probe options)."""
    key = cached.stat_key("pdtrim-probe", model, calib, PROBE_CACHE_VERSION, [sys.modules[__name__]],
                          prefill_layers=list(plan.prefill_layers), decode_layers=list(plan.decode_layers),
                          probe_prompts=c.probe_prompts, probe_tokens=c.probe_tokens, probe_steps=c.probe_steps,
                          n_first=c.n_first, n_last=c.n_last, seed=c.seed)
    hit = cached.load("pdtrim-probe", key)
    valid = isinstance(hit, dict) and set(hit) == {str(i) for i in plan.decode_layers} and cached.finite_numbers(list(hit.values()), len(hit))
    if hit is not None and not valid:
        cached.reject("pdtrim-probe", key, f"no attention share for each of the {len(plan.decode_layers)} decode layers")
    elif valid:
        cached.announce(f"KV layer selection: attention shares of {len(hit)} decode layers")
        return {int(k): float(v) for k, v in hit.items()}
    shares = first_last_shares(model, plan, prompts, c.n_first, c.n_last, c.probe_steps)
    cached.save("pdtrim-probe", key, {str(k): v for k, v in shares.items()})
    return shares
