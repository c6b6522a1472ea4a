"""The one module that knows how attention layers talk to a KV cache.

transformers' cache classes changed shape through 5.x (and the forward argument was renamed from
`past_key_values` to `cache`); the harness therefore keeps its own small cache. A decoder layer's
attention only calls `cache.update(key_states, value_states, layer_idx, ...)` and uses the
returned full K and V, which is all `PDCache` implements.

Each cached column carries the *original* position of its token. Layers are keyed by their
index in the unpruned model, so prefill and decode stages running different layer subsets can
share one cache, and layers may hold different numbers of prompt positions (KV pruning). A
position of -1 marks an empty column (padding) that no query may see.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PDCache:
    """K/V per layer, shape (batch, kv_heads, columns, head_dim), with positions (batch, columns)
    or, for a per-head selection, (batch, kv_heads, columns).

    Usage per forward step: `begin_step(positions)` with the new tokens' positions (-1 for
    padding), then for each layer `layer_positions(i)` gives the key positions the layer will
    see after its update (used to build its attention mask), and the layer's attention calls
    `update`. Layers whose columns hold the same positions share one positions tensor object,
    so masks can be built once per distinct pattern. `window_scores` holds, for layers observed by
    `harness.pd.kv_select.observe_prefill`, the attention record the KV policy asked for (per row, KV
    head [, query head of its group] and column), read by the handoff.
    """

    def __init__(self, retain: Iterable[int] | None = None) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        self._retain = None if retain is None else frozenset(int(i) for i in retain)
        self._step_pos: torch.Tensor | None = None
        self._merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.window_scores: dict[int, torch.Tensor] = {}

    # -- step bookkeeping -------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor) -> None:
        """Declare the positions (batch, q) of the tokens the next forward appends (-1 = pad)."""
        self._step_pos = positions
        self._merged = {}

    @property
    def step_positions(self) -> torch.Tensor:
        """Positions (batch, q) of the tokens the current forward appends (-1 = pad)."""
        assert self._step_pos is not None, "begin_step() must precede a forward"
        return self._step_pos

    def layer_positions(self, layer_idx: int) -> torch.Tensor:
        """Key positions (batch, [kv_heads,] columns) layer `layer_idx` attends over in the current step."""
        assert self._step_pos is not None, "begin_step() must precede a forward"
        old = self.positions.get(layer_idx)
        if old is None:
            return self._step_pos
        hit = self._merged.get(id(old))
        if hit is None:
            step = self._step_pos if old.dim() == 2 else self._step_pos[:, None, :].expand(-1, old.shape[1], -1)
            hit = (old, torch.cat([old, step], dim=-1))
            self._merged[id(old)] = hit  # keeps `old` alive so its id stays unique
        return hit[1]

    # -- the attention-facing API ------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's K/V (batch, kv_heads, q, head_dim) and return the layer's full K/V."""
        k_old = self.keys.get(layer_idx)
        if k_old is None:
            k, v = key_states, value_states
        else:
            k = torch.cat([k_old, key_states], dim=2)
            v = torch.cat([self.values[layer_idx], value_states], dim=2)
        if self._retain is None or layer_idx in self._retain:
            self.positions[layer_idx] = self.layer_positions(layer_idx)
            self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    # -- inspection ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def kv_bytes(self) -> int:
        """Bytes of every K and V tensor held (padding columns included)."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    def set_window_scores(self, layer_idx: int, scores: torch.Tensor) -> None:
        """Record per-column scores (batch, kv_heads[, group], columns) of a prefill layer (for the handoff)."""
        self.window_scores[layer_idx] = scores

    def frozen(self) -> PDCache:
        """A view over the same K/V that later steps read but never extend (this cache stays as is).

        Used to evaluate many decode-stage variants against one prefilled prompt.
        """
        view = PDCache(retain=())
        view.keys, view.values, view.positions = self.keys, self.values, self.positions
        return view

    def frozen_as(self, dtype: torch.dtype) -> PDCache:
        """`frozen()`, with K/V converted to `dtype` (positions shared): a float32 prompt's cache read by a
        bfloat16 copy of the model (PDTrim's screening)."""
        view = PDCache(retain=())
        view.keys = {i: k.to(dtype) for i, k in self.keys.items()}
        view.values = {i: v.to(dtype) for i, v in self.values.items()}
        view.positions = self.positions
        return view

    def select_rows(self, rows: torch.Tensor) -> PDCache:
        """A cache holding batch rows `rows` (used when several requests share one prefill)."""
        out = PDCache(self._retain)
        shared: dict[int, torch.Tensor] = {}
        for i in self.layers:
            p = self.positions[i]
            if id(p) not in shared:
                shared[id(p)] = p.index_select(0, rows)  # positions: beside the inputs, as `rows` is
            out.positions[i] = shared[id(p)]
            kv_rows = rows.to(self.keys[i].device)  # a model spread over GPUs: K/V on their layer's device
            out.keys[i] = self.keys[i].index_select(0, kv_rows)
            out.values[i] = self.values[i].index_select(0, kv_rows)
        out.window_scores = {i: t.index_select(0, rows.to(t.device)) for i, t in self.window_scores.items()}
        return out


# -- transformers caches (exported checkpoints run with stock transformers) ---------------------
def hf_cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) of each layer of a transformers `Cache` (as a forward with `use_cache=True` returns
    it), each (batch, kv_heads, columns, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def hf_cache_from_layers(kv: Iterable[tuple[torch.Tensor, torch.Tensor]], config):
    """A transformers `DynamicCache` for a model with `config` whose layer i holds `kv[i]` = (K, V)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache
