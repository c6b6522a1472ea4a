"""`h2o`: Heavy-Hitter Oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv 2306.14048) at the handoff, per KV head."""

from __future__ import annotations

from dataclasses import dataclass

from harness.pd.kv import register_policy
from harness.pd.kv.base import Observation, TokenSelection


@register_policy
@dataclass(frozen=True)
class H2O(TokenSelection):
    """Every decode layer l keeps k_l(T) positions per KV head: a recent window and the heavy hitters.

    - `budget`: the `KVBudget`; k_l(T) from the even split (`TokenSelection.layer_budgets`).
    - `recent`: the last min(k, recent) prompt positions are always kept (H2O's recent window).
    The other k - min(k, recent) are the heavy hitters: the positions before the recent window
    (< T - recent) with the highest attention accumulated over ALL prompt queries of the prefill
    (each query's causal softmax, summed over the queries, averaged over the query heads of the
    KV head's GQA group), ties to the earlier position. H2O evicts greedily while generating;
    here the accumulated scores of the whole prompt choose once, at the handoff (the prompt
    queries are the only ones the prefill node has seen). The paper's even split between heavy
    hitters and recent tokens is `recent` = half the per-layer budget.
    """

    recent: int = 32

    name = "h2o"
    example_options = {"recent": 3}
    method_name = "h2o"
    method_summary = ("base plan's layers (default pdtrim); per KV head, a recent window + the positions with the "
                      "most accumulated prefill attention, at the base's KV bytes")

    def validate(self) -> None:
        super().validate()
        if self.recent < 0:
            raise ValueError(f"KVPolicy: need recent >= 0, got {self.recent}")

    @property
    def per_head(self) -> bool:
        return True

    def observation(self) -> Observation:
        return Observation(queries=None)  # every prompt query, averaged over the GQA group

    def keep(self, layer, positions, lengths, k, observed):
        """observed (requests, kv_heads, C) accumulated attention -> bool (requests, kv_heads, C), k[r] per head."""
        from harness.pd.kv_select import top_positions

        valid = positions >= 0
        n_recent = k.clamp(max=self.recent)
        recent = valid & (positions >= (lengths - n_recent)[:, None])
        older = (valid & (positions < (lengths - self.recent)[:, None]))[:, None, :]
        score = observed.float().masked_fill(~older, float("-inf"))
        return top_positions(score, k - n_recent) | recent[:, None, :]

    def how(self) -> str:
        return f"recent {self.recent} + heavy hitters of the accumulated prompt attention, per KV head"
