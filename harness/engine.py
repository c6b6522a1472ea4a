"""The PD engine: a prefill stage, a handoff that ships (pruned) KV, and a decode stage.

The engine drives the decoder layers itself rather than calling the model's forward, because
each stage runs its own layer subset and, after KV pruning, each layer holds its own set of
prompt positions: every layer gets an attention mask built from the original positions of the
columns it holds, so a dropped position is simply absent and a padding column (position -1)
is never visible. Layer weights are used in place; the model is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harness import arch
from harness.cache import PDCache
from harness.plan import KVPolicy, PruningPlan

PAGE_TOKENS = 16  # paged KV transfer granularity used for the rounded byte count


def attention_mask(
    key_pos: torch.Tensor, query_pos: torch.Tensor, query_valid: torch.Tensor, dtype: torch.dtype, impl: str
) -> torch.Tensor:
    """Mask (batch, 1, q, keys) letting a query see keys with 0 <= key_pos <= query_pos.

    Padding queries (`query_valid` False) see every key, so no row is empty (their outputs are
    discarded). Boolean (True = attend) for sdpa; additive float for eager attention.
    """
    kp = key_pos[:, None, :]
    allowed = (kp >= 0) & (kp <= query_pos[:, :, None])
    allowed = allowed | ~query_valid[:, :, None]
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@torch.inference_mode()
def run_layers(
    model: nn.Module,
    layers: Sequence[int],
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    valid: torch.Tensor,
    cache: PDCache,
    *,
    hidden: torch.Tensor | None = None,
    collect: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `input_ids` (batch, q) at `positions` (batch, q) through decoder `layers`.

    `valid` (batch, q) is False for padding tokens: their K/V enter the cache with position -1.
    Instead of `input_ids`, `hidden` (batch, q, hidden) may give the input of `layers[0]` (to
    resume a forward from a cached intermediate state). If `collect` is given, the input of each
    layer is stored in it under the layer index. Returns the last layer's hidden states
    (batch, q, hidden), before the final norm.
    """
    dec = arch.decoder(model)
    mod_layers = dec.layers
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    h = dec.embed_tokens(input_ids) if hidden is None else hidden
    if not layers:
        return h
    rot = dec.rotary_emb(h, position_ids=positions.clamp(min=0))
    step_pos = torch.where(valid, positions, torch.full_like(positions, -1))
    fresh_causal = bool(valid.all())  # no padding: a step over an empty cache is plain causal
    cache.begin_step(step_pos)
    cache_kw = arch.cache_kwarg(type(mod_layers[layers[0]]))
    masks: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    q = h.shape[1]
    for i in layers:
        if collect is not None:
            collect[i] = h
        kpos = cache.layer_positions(i)
        hit = masks.get(id(kpos))
        if hit is None:
            mask: torch.Tensor | None
            if impl == "sdpa" and fresh_causal and (kpos is step_pos or (q == 1 and bool((kpos >= 0).all()))):
                mask = None  # exact: causal over fresh tokens, or one query that sees every key
            else:
                mask = attention_mask(kpos, step_pos, valid, h.dtype, impl)
            hit = masks[id(kpos)] = (kpos, mask)
        out = mod_layers[i](h, attention_mask=hit[1], position_embeddings=rot, position_ids=positions, **{cache_kw: cache})
        h = out[0] if isinstance(out, tuple) else out
    return h


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head on hidden states (..., hidden) -> logits (..., vocab), float32."""
    return arch.lm_head(model)(arch.decoder(model).norm(hidden)).float()


@dataclass
class Handoff:
    """What the prefill stage sends to the decode stage: packed K/V of kept prompt positions.

    For each decode layer l: `keys[l]` and `values[l]` have shape (N_l, kv_heads, head_dim), the
    kept positions of all requests concatenated request by request in position order;
    `positions[l]` (N_l,) their original positions; `counts[l]` (requests,) how many each
    request sent. Layers with the same keep pattern share one positions/counts tensor.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    positions: dict[int, torch.Tensor]
    counts: dict[int, torch.Tensor]
    n_requests: int

    @property
    def kv_bytes(self) -> int:
        """Exact bytes of the K and V tensors handed over."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    def kv_bytes_paged(self, page_tokens: int = PAGE_TOKENS) -> int:
        """Bytes when each request's KV of each layer is rounded up to whole pages of tokens."""
        total = 0
        for l, k in self.keys.items():
            pages = (self.counts[l] + page_tokens - 1) // page_tokens
            total += int(pages.sum()) * page_tokens * _per_token_bytes(k) * 2
        return total

    def to_cache(self) -> PDCache:
        """Unpack on the decode side into a padded `PDCache` (padding columns at position -1)."""
        cache = PDCache()
        unpacked: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for l in sorted(self.keys):
            pos, cnt = self.positions[l], self.counts[l]
            hit = unpacked.get(id(pos))
            if hit is None:
                width = int(cnt.max()) if cnt.numel() else 0
                dest = torch.arange(width, device=cnt.device)[None, :] < cnt[:, None]
                pos_out = torch.full((self.n_requests, width), -1, dtype=pos.dtype, device=pos.device)
                pos_out[dest] = pos
                hit = unpacked[id(pos)] = (pos, dest, pos_out)
            _, dest, pos_out = hit
            cache.positions[l] = pos_out
            for src, dst in ((self.keys, cache.keys), (self.values, cache.values)):
                t = src[l]
                full = t.new_zeros((self.n_requests, dest.shape[1], *t.shape[1:]))
                full[dest] = t
                dst[l] = full.transpose(1, 2).contiguous()
        return cache


def _per_token_bytes(packed: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a packed (N, kv_heads, head_dim) tensor."""
    n = 1
    for s in packed.shape[1:]:
        n *= s
    return n * packed.element_size()


def keep_mask(positions: torch.Tensor, lengths: torch.Tensor, policy: KVPolicy, selected: bool) -> torch.Tensor:
    """Which prompt columns (requests, T) a layer sends: valid ones, first/last only if `selected`."""
    valid = positions >= 0
    if not selected:
        return valid
    first = positions < policy.n_first
    last = positions >= (lengths - policy.n_last)[:, None]
    return valid & (first | last)


@torch.inference_mode()
def make_handoff(
    cache: PDCache, plan: PruningPlan, lengths: torch.Tensor, rows: torch.Tensor | None = None
) -> Handoff:
    """Pack the prefill cache's KV of `plan.decode_layers` for requests `rows`, applying the KV policy.

    Args:
        cache: prefill cache; batch rows are prefilled prompts.
        lengths: (prefill batch,) prompt tokens per prefill row.
        rows: (requests,) prefill row of each request; several requests may share one prompt.
    """
    if rows is None:
        rows = torch.arange(lengths.shape[0], device=lengths.device)
    req_len = lengths.index_select(0, rows)
    selected = set(plan.kv_policy.layers)
    keys, values, positions, counts = {}, {}, {}, {}
    patterns: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for l in plan.decode_layers:
        if l not in cache.keys:
            raise KeyError(f"layer {l} has no prefill KV (prefill ran {cache.layers})")
        src_pos = cache.positions[l]
        key = (id(src_pos), l in selected)
        hit = patterns.get(key)
        if hit is None:
            pos = src_pos.index_select(0, rows)
            keep = keep_mask(pos, req_len, plan.kv_policy, l in selected)
            hit = patterns[key] = (keep, pos[keep], keep.sum(dim=1))
        keep, positions[l], counts[l] = hit
        for src, dst in ((cache.keys, keys), (cache.values, values)):
            dst[l] = src[l].index_select(0, rows).transpose(1, 2)[keep].contiguous()
    return Handoff(keys, values, positions, counts, n_requests=int(rows.shape[0]))


def expected_kv_bytes(config, layers: int, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """2 · layers · tokens · kv_heads · head_dim · bytes_per_element (· batch): the arithmetic count."""
    kv_heads, head_dim = arch.kv_heads_and_dim(config)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * batch * tokens * kv_heads * head_dim * elem
