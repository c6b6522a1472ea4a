"""Token-selection KV policies at the handoff: StreamingLLM- and SnapKV-style, at a layer-position budget.

- Budgets: `layer_budgets` turns a policy's `KVBudget` into per-request counts for every decode
  layer (the rule is `KVPolicy.layer_budgets`, in `harness/plan.py`).
- `streaming_keep`: first min(n_sink, k) positions + the most recent rest, shared by a layer's heads.
- `snapkv_keep`: per KV head, the observation window + the prefix positions with the highest
  pooled window attention (SnapKV, arXiv 2404.14469; docs/kv_policies.md).
- `observe_prefill`: during the prefill forward, an attention function (registered with
  transformers' `AttentionInterface` for the duration) calls the model's own attention unchanged
  and, in the decode layers only, also computes the attention of the last `window` prompt
  queries of each request over its prompt keys, summed over those queries and averaged over the
  query heads of each KV head's group; the result is stored in the prefill cache
  (`PDCache.window_scores`), where the handoff reads it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import PDCache
from harness.plan import KVPolicy, PruningPlan

OBSERVER_PREFIX = "harness_window_observer|"  # + the wrapped implementation's name


def mask_impl(config) -> str:
    """The attention implementation whose mask format the engine must build (the observer's inner one)."""
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    return impl[len(OBSERVER_PREFIX):] if impl.startswith(OBSERVER_PREFIX) else impl


def layer_budgets(policy: KVPolicy, decode_layers: Sequence[int], lengths: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """{decode layer: positions it keeps for each request}, from prompt lengths (requests,)."""
    layers = tuple(decode_layers)
    per_len = {T: policy.layer_budgets(layers, T) for T in set(lengths.tolist())}
    rows = [per_len[T] for T in lengths.tolist()]
    return {layer: tuple(r[i] for r in rows) for i, layer in enumerate(layers)}


def streaming_keep(positions: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, n_sink: int) -> torch.Tensor:
    """Columns (requests, C) to keep: positions < min(n_sink, k) and the last k - min(n_sink, k) of each prompt."""
    sinks = k.clamp(max=n_sink)
    recent = k - sinks
    return (positions >= 0) & ((positions < sinks[:, None]) | (positions >= (lengths - recent)[:, None]))


def snapkv_keep(
    scores: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor,
    window: int, kernel: int, pooling: str,
) -> torch.Tensor:
    """Columns (requests, kv_heads, C) to keep, exactly k[r] per KV head of request r.

    Args:
        scores: (requests, kv_heads, C) window attention per column (`observe_prefill`).
        positions: (requests, C) original position of each column (-1 = padding); the columns of
            a prefill cache are in position order, which pooling relies on.
        lengths: (requests,) prompt tokens T. k: (requests,) positions to keep per KV head (<= T).

    The last min(k, window) prompt positions are kept; the remaining k - min(k, window) are the
    prefix positions (< T - window) with the highest pooled score, ties to the earlier position.
    Pooling runs over the prefix only (`kernel` wide, stride 1, centred): max-pooling treats the
    outside as -inf and average-pooling as 0 (counted in the average), as SnapKV's reference code
    does by pooling the sliced prefix with padding.
    """
    R, H, C = scores.shape
    T = lengths[:, None]
    valid = positions >= 0
    n_win = k.clamp(max=window)
    win = valid & (positions >= T - n_win[:, None])
    prefix = (valid & (positions < T - window))[:, None, :]
    x = scores.float().masked_fill(~prefix, float("-inf") if pooling == "max" else 0.0).reshape(R * H, 1, C)
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    pooled = pooled.reshape(R, H, C).masked_fill(~prefix, float("-inf"))
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices
    rank_ok = (torch.arange(C, device=scores.device)[None, None, :] < (k - n_win)[:, None, None]).expand(R, H, C)
    top = torch.zeros((R, H, C), dtype=torch.bool, device=scores.device).scatter_(2, order, rank_ok)
    return top | win[:, None, :]


def window_attention(
    query: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor, lengths: torch.Tensor, window: int, scaling: float
) -> torch.Tensor:
    """Window attention per KV head and key column, (B, kv_heads, C), float32.

    query (B, heads, C, d) and key (B, kv_heads, C, d) of a fresh prefill (column c holds
    position key_pos[:, c]); the window of request b is its columns lengths[b] - window ..
    lengths[b] - 1 (fewer when the prompt is shorter). Each window query's causal softmax over
    the keys is summed over the window, then averaged over the query heads of each KV head.
    """
    B, Hq, _, d = query.shape
    Hk = key.shape[1]
    qi = lengths[:, None] - window + torch.arange(window, device=query.device)[None, :]  # (B, w)
    q_ok = qi >= 0
    qi = qi.clamp(min=0)
    q = query.gather(2, qi[:, None, :, None].expand(B, Hq, window, d)).float().view(B, Hk, Hq // Hk, window, d)
    s = torch.einsum("bkgwd,bkcd->bkgwc", q, key.float()) * scaling
    qpos = key_pos.gather(1, qi)
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= qpos[:, :, None])  # (B, w, C)
    p = torch.softmax(s.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
    p = p * q_ok[:, None, None, :, None]
    return p.sum(dim=3).mean(dim=2)


class _Observer:
    def __init__(self, cache: PDCache, lengths: torch.Tensor, layers: Sequence[int], window: int, inner: str) -> None:
        self.cache, self.lengths, self.layers, self.window, self.inner = cache, lengths, frozenset(layers), window, inner

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """The model's own attention, unchanged; in observed layers also the window scores."""
        if self.inner == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS[self.inner]
        out = fn(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        if layer in self.layers:
            if key.shape[2] != query.shape[2]:
                raise RuntimeError("SnapKV window scores are taken in a fresh prefill (queries = keys); this forward extends a cache")
            kpos = self.cache.step_positions  # a fresh prefill: the keys are this step's tokens
            with torch.no_grad():
                scores = window_attention(query, key, kpos, self.lengths, self.window, kwargs["scaling"])
            self.cache.set_window_scores(layer, scores)
        return out


@contextlib.contextmanager
def observe_prefill(model: nn.Module, plan: PruningPlan, cache: PDCache, lengths: torch.Tensor) -> Iterator[None]:
    """Around the prefill forward of prompts with `lengths` (rows,): record window scores if the
    plan's KV policy needs them (no-op otherwise). The prefill's outputs are unchanged."""
    policy = plan.kv_policy
    if not policy.needs_prefill_attention:
        yield
        return
    from transformers import AttentionInterface

    previous = model.config._attn_implementation
    inner = mask_impl(model.config)
    name = OBSERVER_PREFIX + inner
    AttentionInterface.register(name, _Observer(cache, lengths, plan.decode_layers, policy.window, inner).attend)
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous
