"""`streaming`: StreamingLLM (Xiao et al., arXiv 2309.17453) at the handoff."""

from __future__ import annotations

from dataclasses import dataclass

from harness.pd.kv import register_policy
from harness.pd.kv.base import TokenSelection


@register_policy
@dataclass(frozen=True)
class Streaming(TokenSelection):
    """Every decode layer l keeps k_l(T) positions: attention sinks at the start, then the most recent.

    - `budget`: the `KVBudget`; k_l(T) from the even split (`TokenSelection.layer_budgets`).
    - `n_sink`: attention-sink positions kept at the start: the first min(n_sink, k) positions,
      then the k - min(n_sink, k) most recent (StreamingLLM uses 4). Shared by all heads of a layer.
    """

    n_sink: int = 4

    name = "streaming"
    example_options = {"n_sink": 2}
    method_name = "streamingllm"
    method_summary = ("base plan's layers (default pdtrim); every decode layer gets n_sink first + most recent "
                      "positions, at the base's KV bytes")

    def validate(self) -> None:
        super().validate()
        if self.n_sink < 0:
            raise ValueError(f"KVPolicy: need n_sink >= 0, got {self.n_sink}")

    def keep(self, layer, positions, lengths, k, observed):
        from harness.pd.kv_select import streaming_keep

        return streaming_keep(positions, lengths, k, self.n_sink)

    def how(self) -> str:
        return f"{self.n_sink} sinks + recent"
