"""`snapkv`: SnapKV (Li et al., arXiv 2404.14469) at the handoff, per KV head."""

from __future__ import annotations

from dataclasses import dataclass

from harness.pd.kv import register_policy
from harness.pd.kv.base import Observation, TokenSelection

POOLINGS = ("max", "avg")
ORDERS = ("pool_then_mean", "mean_then_pool")


@register_policy
@dataclass(frozen=True)
class SnapKV(TokenSelection):
    """Every decode layer l keeps k_l(T) positions per KV head: the observation window and the most-voted prefix.

    - `budget`: the `KVBudget`; k_l(T) from the even split (`TokenSelection.layer_budgets`).
    - `window`: observation window, the last `window` prompt positions, always kept; their
      queries' attention over the prefix (summed over the window) are the votes.
    - `kernel`: pooling width over positions (odd, stride 1, centred; pooled over the prefix only).
    - `pooling`: `max` or `avg`.
    - `order`: how votes of the query heads sharing a KV head (GQA) are combined:
      `pool_then_mean` (the dataclass default; SnapKV's reference code order) pools each query
      head's votes, then averages over the group; `mean_then_pool` averages over the group, then
      pools (the harness's first reading). A stored dict without `order` means `mean_then_pool`
      (the records made before the option existed); `order` is written only when it is not.
    The prefix positions (< T - window) with the highest pooled votes fill the rest of the
    budget; ties go to the earlier position; k <= window keeps the last k positions.
    """

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    order: str = "pool_then_mean"

    name = "snapkv"
    example_options = {"window": 4, "kernel": 3}
    method_name = "snapkv"
    method_summary = ("base plan's layers (default pdtrim); per KV head, the window + prefix most attended by it in "
                      "prefill, at the base's KV bytes")
    dict_defaults = {"order": "mean_then_pool"}

    def validate(self) -> None:
        super().validate()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.pooling not in POOLINGS:
            raise ValueError(f"KVPolicy: need window >= 1, an odd kernel >= 1 and pooling in {POOLINGS}; "
                             f"got {self.window}, {self.kernel}, {self.pooling!r}")
        if self.order not in ORDERS:
            raise ValueError(f"KVPolicy: order must be one of {ORDERS}, got {self.order!r}")

    @property
    def per_head(self) -> bool:
        return True

    def observation(self) -> Observation:
        return Observation(queries=self.window, per_query_head=self.order == "pool_then_mean")

    def keep(self, layer, positions, lengths, k, observed):
        from harness.pd.kv_select import snapkv_keep

        return snapkv_keep(observed, positions, lengths, k, self.window, self.kernel, self.pooling)

    def how(self) -> str:
        grouping = ", pooled per query head" if self.order == "pool_then_mean" else ""
        return f"window {self.window}, {self.pooling}-pool {self.kernel}{grouping}, per KV head"
