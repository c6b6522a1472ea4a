"""Screening estimates of PDTrim's stage objectives: the same forwards in a bfloat16 copy of the model.

A greedy step of the search compares 16-23 candidate blocks, most of them far from the best. On a
CPU with bfloat16 dot products (AVX512-BF16, AMX) a bfloat16 forward costs about a third of a
float32 one, and its objective values rank the candidates as the float32 ones do: on SmolLM2's
default search (32 sequences) every candidate of every greedy step was within 1.4 % of its float32
value, and the float32 best ranked first by the screen at all 8 steps
(`results/issue16/screening_bf16.json`). So the search screens every candidate it would have
evaluated, then evaluates in float32 only those whose screened value is within `screen_margin`
(relative) of the lowest, and takes the lowest float32 value (`methods/pdtrim/search.py`).

Each estimate resumes from the float32 objective's cached layer inputs (its base) at the first
layer where the candidate differs, cast to bfloat16, and is scored against the same float32
teacher; nothing it computes is kept as a base. The decode estimate reads the float32 prompt
caches, converted once per `R_P`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from harness.pd.cache import PDCache
from harness.pd.engine import run_layers

SCREEN_DTYPES = {"bfloat16": torch.bfloat16, "none": None}


def screen_copy(model, dtype: torch.dtype | None):
    """A copy of `model` in `dtype` for screening, or None when there is nothing to gain (no dtype, or the
    model already computes in it or in a narrower type: the screen would cost what the objective does)."""
    weights = next(model.parameters()).dtype
    if dtype is None or weights != torch.float32:
        return None
    return copy.deepcopy(model).to(dtype).eval()


class Screen:
    """Estimates of `obj.prefill(R)` and `obj.decode(R_D, R_P)` computed by `model` (a narrow copy of
    `obj.model`), resumed from `obj`'s base. Counts its own work apart from the objective's."""

    def __init__(self, obj, model) -> None:
        self.obj, self.model = obj, model
        self.dtype = next(model.parameters()).dtype
        self.evaluations = 0
        self.layer_token_passes = 0
        self._caches: tuple[frozenset, list[PDCache | None]] | None = None

    @torch.inference_mode()
    def prefill(self, removed: Iterable[int]) -> float:
        obj, target = self.obj, frozenset(removed)
        base_set, base_inputs = obj._pbase
        start = obj._first_difference(target, base_set, obj.n_layers)
        layers = [i for i in obj._kept(target) if i >= start]
        total = torch.zeros((), dtype=torch.float64, device=obj.device)
        for b, base in zip(obj.batches, base_inputs):
            h = (base[start] if start < obj.n_layers else base["out"]).to(self.dtype)
            h = run_layers(self.model, layers, None, b.full.positions, b.full.valid, PDCache(retain=()), hidden=h)
            total += obj._kl(b.teacher, h[b.rows, b.cols], self.model)
            self.layer_token_passes += len(layers) * b.tokens
        self.evaluations += 1
        return float(total) / obj.n_scored

    @torch.inference_mode()
    def decode(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> float:
        obj, rd, rp = self.obj, frozenset(removed_decode), frozenset(removed_prefill)
        if not rp <= rd:
            raise ValueError(f"decode removal {sorted(rd)} must contain prefill removal {sorted(rp)}")
        if obj._dbase is None or obj._dbase[1] != rp:
            obj.set_decode_base(rp, rp)
        states = obj._prompt_state(rp)  # float32 prefill of the prompts: the first tokens' KL is exact
        base_set, _, base_inputs = obj._dbase
        start = obj._first_difference(rd, base_set, obj.n_layers)
        layers = [i for i in obj._kept(rd) if i >= start]
        staged = obj._staged(rd, rp, self.model)
        total = torch.zeros((), dtype=torch.float64, device=obj.device)
        for b, (_, first_kl), cache, base in zip(obj.batches, states, self._prompt_caches(rp, states), base_inputs):
            total += first_kl
            if cache is None:
                continue
            h = (base[start] if start < obj.n_layers else base["out"]).to(self.dtype)
            h = staged.decode(cache.frozen(), b.dec, start=start, hidden=h)
            total += obj._kl(b.teacher[b.rest], h[b.dec_rows, b.dec_cols], self.model)
            self.layer_token_passes += len(layers) * int(b.dec.valid.sum())
        self.evaluations += 1
        return float(total) / obj.n_scored

    def _prompt_caches(self, rp: frozenset, states) -> list[PDCache | None]:
        """The prompt caches under `rp` in the screen's dtype (None for a batch without continuation)."""
        if self._caches is None or self._caches[0] != rp:
            self._caches = (rp, [c.frozen_as(self.dtype) if b.dec.ids.shape[1] else None
                                 for b, (c, _) in zip(self.obj.batches, states)])
        return self._caches[1]

    def work(self) -> dict[str, int]:
        return {"screen_evaluations": self.evaluations, "screen_layer_token_passes": self.layer_token_passes}
