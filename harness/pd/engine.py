"""The PD engine: a prefill stage, a handoff that ships (pruned) KV, and a decode stage.

The engine drives the decoder layers itself rather than calling the model's forward, because
each stage runs its own layer subset and, after KV pruning, each layer holds its own set of
prompt positions: every layer gets an attention mask built from the original positions of the
columns it holds, so a dropped position is simply absent and a padding column (position -1)
is never visible. After a per-head selection (SnapKV-style) a layer's positions, hence its mask,
are per KV head. Layer weights are used in place; the model is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import PluginContractError
from harness.pd import arch, kv_select
from harness.pd.cache import PDCache
from harness.pd.plan import KVPolicy, PruningPlan

PAGE_TOKENS = 16  # paged KV transfer granularity used for the rounded byte count


def attention_mask(
    key_pos: torch.Tensor, query_pos: torch.Tensor, query_valid: torch.Tensor, dtype: torch.dtype, impl: str,
    groups: int = 1,
) -> torch.Tensor:
    """Mask (batch, 1, q, keys) letting a query see keys with 0 <= key_pos <= query_pos.

    `key_pos` (batch, keys) is shared by all heads; per KV head, (batch, kv_heads, keys), the mask
    is (batch, kv_heads · groups, q, keys): query head h reads KV head h // groups (the order of
    transformers' `repeat_kv`). Padding queries (`query_valid` False) see every key, so no row is
    empty (their outputs are discarded). Boolean (True = attend) for sdpa; additive float otherwise.
    """
    if key_pos.dim() == 3:
        kp = key_pos[:, :, None, :]
        allowed = (kp >= 0) & (kp <= query_pos[:, None, :, None])
        allowed = (allowed | ~query_valid[:, None, :, None]).repeat_interleave(groups, dim=1)
    else:
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
    (batch, q, hidden), before the final norm, on the device of `positions` (the inputs'): with a model spread
    over GPUs the last layer may sit on another, and callers index the result with tensors made beside the inputs.
    """
    dec = arch.decoder(model)
    mod_layers = dec.layers
    impl = kv_select.mask_impl(model.config)
    groups = model.config.num_attention_heads // arch.kv_heads_and_dim(model.config)[0]
    h = dec.embed_tokens(input_ids) if hidden is None else hidden
    if not layers:
        return h.to(positions.device)
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
                mask = attention_mask(kpos, step_pos, valid, h.dtype, impl, groups)
            hit = masks[id(kpos)] = (kpos, mask)
        out = mod_layers[i](h, attention_mask=hit[1], position_embeddings=rot, position_ids=positions, **{cache_kw: cache})
        h = out[0] if isinstance(out, tuple) else out
    return h.to(positions.device)


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
    After a per-head selection every KV head of a request sends the same number of positions
    but not the same ones: `keys[l][j, h]` is head h's j-th kept position, and `positions[l]`
    is (N_l, kv_heads). Only K and V count as KV bytes; positions and counts are metadata.
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
                pos_out = torch.full((self.n_requests, width, *pos.shape[1:]), -1, dtype=pos.dtype, device=pos.device)
                pos_out[dest] = pos
                if pos.dim() == 2:  # per KV head: (requests, kv_heads, width), as the cache holds it
                    pos_out = pos_out.transpose(1, 2).contiguous()
                hit = unpacked[id(pos)] = (pos, dest, pos_out)
            _, dest, pos_out = hit
            cache.positions[l] = pos_out
            for src, dst in ((self.keys, cache.keys), (self.values, cache.values)):
                t = src[l]  # on its layer's device; positions and counts on the input's
                full = t.new_zeros((self.n_requests, dest.shape[1], *t.shape[1:]))
                full[dest.to(t.device)] = t
                dst[l] = full.transpose(1, 2).contiguous()
        return cache


def _per_token_bytes(packed: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a packed (N, kv_heads, head_dim) tensor."""
    n = 1
    for s in packed.shape[1:]:
        n *= s
    return n * packed.element_size()


@torch.inference_mode()
def make_handoff(
    cache: PDCache, plan: PruningPlan, lengths: torch.Tensor, rows: torch.Tensor | None = None
) -> Handoff:
    """Pack the prefill cache's KV of `plan.decode_layers` for requests `rows`, applying the KV policy.

    Args:
        cache: prefill cache; batch rows are prefilled prompts. A policy with an `observation()`
            also reads its `window_scores` (prefill run inside `kv_select.observe_prefill`).
        lengths: (prefill batch,) prompt tokens per prefill row.
        rows: (requests,) prefill row of each request; several requests may share one prompt.
    """
    if rows is None:
        rows = torch.arange(lengths.shape[0], device=lengths.device)
    req_len = lengths.index_select(0, rows)
    policy = plan.kv_policy
    observes = policy.observation() is not None
    budgets = kv_select.layer_budgets(policy, plan.decode_layers, req_len)
    keys, values, positions, counts = {}, {}, {}, {}
    patterns: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for l in plan.decode_layers:
        if l not in cache.keys:
            raise KeyError(f"layer {l} has no prefill KV (prefill ran {cache.layers})")
        src_pos = cache.positions[l]
        # K/V sit on their layer's device (a model spread over GPUs); positions, counts and keep masks on the input's
        kv_rows = rows.to(cache.keys[l].device)
        k = torch.tensor(budgets[l], device=req_len.device, dtype=torch.long)
        observed = _observed(cache, policy, l, rows) if observes else None
        if policy.per_head:
            pos = src_pos.index_select(0, rows)
            keep = _checked(policy, l, policy.keep(l, pos, req_len, k, observed), pos, heads=cache.keys[l].shape[1])
            _check_budget(policy, l, keep, k)
            keys[l], values[l], positions[l] = _pack_per_head(keep, pos, k, cache.keys[l].index_select(0, kv_rows),
                                                              cache.values[l].index_select(0, kv_rows))
            counts[l] = k
            continue
        # without observations, a head-shared keep pattern is fixed by the source positions and the counts
        key = (id(src_pos), budgets[l])
        hit = None if observes else patterns.get(key)
        if hit is None:
            pos = src_pos.index_select(0, rows)
            keep = _checked(policy, l, policy.keep(l, pos, req_len, k, observed), pos)
            _check_budget(policy, l, keep, k)
            hit = (keep, pos[keep], keep.sum(dim=1))
            if not observes:
                patterns[key] = hit
        keep, positions[l], counts[l] = hit
        kv_keep = keep.to(kv_rows.device)
        for src, dst in ((cache.keys, keys), (cache.values, values)):
            dst[l] = src[l].index_select(0, kv_rows).transpose(1, 2)[kv_keep].contiguous()
    return Handoff(keys, values, positions, counts, n_requests=int(rows.shape[0]))


def _checked(policy: KVPolicy, layer: int, keep, pos: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """`keep` when it is a bool mask over `pos` (R, C) (per head, `heads` KV heads: (R, H, C)) that selects no padding
    column (position -1, where a shorter request's prompt ends); else a RuntimeError naming the policy: padding holds
    no KV of the request, yet its bytes would be counted as sent."""
    per_head = heads is not None
    want = (pos.shape[0], heads, pos.shape[1]) if per_head else tuple(pos.shape)
    if not (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and tuple(keep.shape) == want):
        got = f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        shape = "(requests, kv heads, prompt columns)" if per_head else "(requests, prompt columns)"
        raise PluginContractError(f"{policy.kind} policy: keep() returned {got} in layer {layer}; it must return a bool "
                                  f"mask {shape} = {want}{_whose(policy)}")
    if bool((keep & (pos[:, None, :] if per_head else pos).lt(0)).any()):
        raise PluginContractError(f"{policy.kind} policy: keep() selected padding columns (position -1) in layer {layer}; "
                                  "select among each request's own positions (positions >= 0), e.g. by position, not by "
                                  f"column{_whose(policy)}")
    return keep


def _check_budget(policy: KVPolicy, layer: int, keep: torch.Tensor, k: torch.Tensor) -> None:
    """`keep` selects exactly k[r] positions per request (and KV head): else the bytes sent and the budget the plan
    states disagree."""
    kept = keep.sum(dim=-1)
    if not torch.equal(kept, k if kept.dim() == 1 else k[:, None].expand_as(kept)):
        per = "request" if kept.dim() == 1 else "request and KV head"
        raise PluginContractError(f"{policy.kind} policy: keep() selected {kept.tolist()} positions per {per} in layer "
                                  f"{layer}; it must select exactly its budget k = {k.tolist()}{_whose(policy)}")


def _whose(policy: KVPolicy) -> str:
    """' (module.Class)' of a policy: the message of a broken contract names the code to fix (a plug-in's, mostly).
    These are PluginContractErrors: the same plan fails the same way on a rerun, so a quality cell says "fix", and
    `latency`, which has no per-cell failures, exits 2 with this line rather than a traceback."""
    return f" ({type(policy).__module__}.{type(policy).__qualname__})"


def _observed(cache: PDCache, policy: KVPolicy, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """The prefill attention record of `layer` (`KVPolicy.observation`) for requests `rows`."""
    scores = cache.window_scores.get(layer)
    if scores is None:
        raise RuntimeError(f"{policy.kind} policy: layer {layer} has no prefill window scores; run the prefill "
                           "inside harness.pd.kv_select.observe_prefill(model, plan, cache, lengths)")
    return scores.index_select(0, rows.to(scores.device)).to(rows.device)  # recorded on the layer's device


def _pack_per_head(
    keep: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a per-head selection: keep (R, H, C) with k[r] columns per head, pos (R, C), K/V (R, H, C, d)
    -> K, V (N, H, d) and positions (N, H), N = sum(k), each head's columns in position order."""
    R, H, C = keep.shape
    if not bool((keep.sum(dim=-1) == k[:, None]).all()):
        raise RuntimeError("per-head selection must keep the same number of positions in every head of a request")
    kmax = int(k.max()) if R else 0
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., :kmax]  # kept columns first, in order
    dest = torch.arange(kmax, device=k.device)[None, :] < k[:, None]
    positions = pos[:, None, :].expand(R, H, C).gather(2, order).transpose(1, 2)[dest]
    idx = order.to(key.device)[..., None].expand(R, H, kmax, key.shape[-1])  # K/V: on their layer's device
    kv_dest = dest.to(key.device)
    packed = [t.gather(2, idx).transpose(1, 2)[kv_dest].contiguous() for t in (key, value)]
    return packed[0], packed[1], positions


def expected_kv_bytes(config, layers: int, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """layers · tokens · elements per token and layer · bytes_per_element (· batch): the arithmetic count, in bytes.
    A layer caches 2 · kv_heads · head_dim elements per token (K and V per KV head), or with a latent KV cache
    (`arch.latent_kv`: DeepSeek-V2/V3) kv_lora_rank + qk_rope_head_dim (the compressed latent and the rotary key part,
    what the handoff sends)."""
    if arch.latent_kv(config):
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        kv_heads, head_dim = arch.kv_heads_and_dim(config)
        per_token = 2 * kv_heads * head_dim
    elem = torch.empty((), dtype=dtype).element_size()
    return layers * batch * tokens * per_token * elem
