"""Tensor helpers of the token-selection KV policies (`harness/pd/kv/`), and the prefill attention observer.

- Budgets: `layer_budgets` turns a policy's budget into per-request counts for every decode
  layer (the rule is the policy's `layer_budgets`).
- `top_positions`, `pool_positions`: ranking and pooling shared by the selection policies.
- `streaming_keep`: first min(n_sink, k) positions + the most recent rest, shared by a layer's heads.
- `snapkv_keep`: per KV head, the observation window + the prefix positions with the highest
  pooled window attention (SnapKV, arXiv 2404.14469; docs/kv_policies.md).
- `observe_prefill`: during the prefill forward, an attention function (registered with
  transformers' `AttentionInterface` for the duration) calls the model's own attention unchanged
  and, in the decode layers only, also computes what the policy's `Observation` asks: the
  attention of the last `queries` prompt queries (or of all of them) of each request over its
  prompt keys, summed over those queries, averaged over the query heads of each KV head's group
  or kept per query head; the result is stored in the prefill cache (`PDCache.window_scores`),
  where the handoff reads it and passes it to the policy's `keep`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.pd.cache import PDCache
from harness.pd.kv import KVPolicy, Observation
from harness.pd.plan import PruningPlan

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


def top_positions(score: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """bool (R, H, C): the n[r] columns with the highest score per (request, head), ties to the earlier column.

    score: (R, H, C) float, -inf where a column may not be chosen (n[r] must not exceed the
    eligible columns). A stable descending sort ranks the columns; the first n[r] are kept.
    """
    R, H, C = score.shape
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank_ok = (torch.arange(C, device=score.device)[None, None, :] < n[:, None, None]).expand(R, H, C)
    return torch.zeros((R, H, C), dtype=torch.bool, device=score.device).scatter_(2, order, rank_ok)


def pool_positions(scores: torch.Tensor, eligible: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Pool scores (R, ..., C) over columns with a `kernel`-wide, stride-1, centred filter, inside `eligible`.

    eligible: bool, broadcastable to scores. Max-pooling treats the outside as -inf, average-pooling
    as 0 (counted in the average), as SnapKV's reference code does by pooling the sliced prefix
    with padding. The result is -inf outside `eligible`.
    """
    shape, C = scores.shape, scores.shape[-1]
    x = scores.float().masked_fill(~eligible, float("-inf") if pooling == "max" else 0.0).reshape(-1, 1, C)
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.reshape(shape).masked_fill(~eligible, float("-inf"))


def snapkv_keep(
    scores: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor,
    window: int, kernel: int, pooling: str,
) -> torch.Tensor:
    """Columns (requests, kv_heads, C) to keep, exactly k[r] per KV head of request r.

    Args:
        scores: window attention per column (`observe_prefill`): (requests, kv_heads, C) already
            averaged over each KV head's group of query heads (pooled after the average), or
            (requests, kv_heads, group, C) per query head (pooled per query head, then averaged
            over the group: the order of SnapKV's reference code).
        positions: (requests, C) original position of each column (-1 = padding); the columns of
            a prefill cache are in position order, which pooling relies on.
        lengths: (requests,) prompt tokens T. k: (requests,) positions to keep per KV head (<= T).

    The last min(k, window) prompt positions are kept; the remaining k - min(k, window) are the
    prefix positions (< T - window) with the highest pooled score, ties to the earlier position.
    Pooling runs over the prefix only (`pool_positions`).
    """
    T = lengths[:, None]
    valid = positions >= 0
    n_win = k.clamp(max=window)
    win = valid & (positions >= T - n_win[:, None])
    prefix = (valid & (positions < T - window))[:, None, :]
    if scores.dim() == 4:  # per query head: pool each, then average over the group
        pooled = pool_positions(scores, prefix[:, :, None, :], kernel, pooling).mean(dim=2)
        pooled = pooled.masked_fill(~prefix, float("-inf"))
    else:
        pooled = pool_positions(scores, prefix, kernel, pooling)
    return top_positions(pooled, k - n_win) | win[:, None, :]


QUERY_CHUNK = 256  # observed queries per einsum: bounds the (B, heads, chunk, C) float32 scores


def window_attention(
    query: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor, lengths: torch.Tensor, window: int, scaling: float,
    per_query_head: bool = False,
) -> torch.Tensor:
    """Window attention per KV head and key column, (B, kv_heads, C) float32, or per query head
    (B, kv_heads, group, C) when `per_query_head`.

    query (B, heads, C, d) and key (B, kv_heads, C, d) of a fresh prefill (column c holds
    position key_pos[:, c]); the window of request b is its columns lengths[b] - window ..
    lengths[b] - 1 (fewer when the prompt is shorter; window >= C means every prompt query).
    Each window query's causal softmax over the keys is summed over the window, then (unless
    `per_query_head`) averaged over the query heads of each KV head. Windows longer than
    `QUERY_CHUNK` are summed chunk by chunk (same result up to float rounding).
    """
    if window <= QUERY_CHUNK:
        return _window_part(query, key, key_pos, lengths, window, 0, window, scaling, per_query_head)
    total = None
    for start in range(0, window, QUERY_CHUNK):
        part = _window_part(query, key, key_pos, lengths, window, start, min(window, start + QUERY_CHUNK), scaling, True)
        total = part if total is None else total + part
    return total if per_query_head else total.mean(dim=2)


def _window_part(query, key, key_pos, lengths, window, start, stop, scaling, per_query_head):
    """Window queries start..stop-1 (of `window`) of `window_attention`, summed over those queries."""
    B, Hq, _, d = query.shape
    Hk = key.shape[1]
    w = stop - start
    qi = lengths[:, None] - window + torch.arange(start, stop, device=query.device)[None, :]  # (B, w)
    q_ok = qi >= 0
    qi = qi.clamp(min=0)
    q = query.gather(2, qi[:, None, :, None].expand(B, Hq, w, d)).float().view(B, Hk, Hq // Hk, w, d)
    s = torch.einsum("bkgwd,bkcd->bkgwc", q, key.float()) * scaling
    qpos = key_pos.gather(1, qi)
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= qpos[:, :, None])  # (B, w, C)
    p = torch.softmax(s.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
    p = p * q_ok[:, None, None, :, None]
    return p.sum(dim=3) if per_query_head else p.sum(dim=3).mean(dim=2)


class _Observer:
    def __init__(self, cache: PDCache, lengths: torch.Tensor, layers: Sequence[int], what: Observation, inner: str) -> None:
        self.cache, self.lengths, self.layers, self.what, self.inner = cache, lengths, frozenset(layers), what, inner

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
                raise RuntimeError("prefill attention is observed in a fresh prefill (queries = keys); this forward extends a cache")
            # a fresh prefill: the keys are this step's tokens. Positions and lengths: on the input's device; this
            # layer may sit on another GPU (its scores stay there, beside its K/V)
            kpos, lengths = self.cache.step_positions.to(query.device), self.lengths.to(query.device)
            window = self.what.queries if self.what.queries is not None else key.shape[2]  # None: every prompt query
            with torch.no_grad():
                scores = window_attention(query, key, kpos, lengths, window, kwargs["scaling"], self.what.per_query_head)
            self.cache.set_window_scores(layer, scores)
        return out


@contextlib.contextmanager
def observe_prefill(model: nn.Module, plan: PruningPlan, cache: PDCache, lengths: torch.Tensor) -> Iterator[None]:
    """Around the prefill forward of prompts with `lengths` (rows,): record, in the decode layers,
    what the plan's KV policy asks to observe (`KVPolicy.observation`; no-op when nothing). The
    prefill's outputs are unchanged."""
    what = plan.kv_policy.observation()
    if what is None:
        yield
        return
    from transformers import AttentionInterface

    previous = model.config._attn_implementation
    inner = mask_impl(model.config)
    name = OBSERVER_PREFIX + inner
    observer = _Observer(cache, lengths, plan.decode_layers, what, inner)
    AttentionInterface.register(name, observer.attend)
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        # transformers' registry keeps `attend` (so the observer) until the next observed prefill replaces it: without
        # this, the prefill cache (every decode layer's prompt K/V) stayed alive after its callers had released it
        observer.cache = observer.lengths = None
