"""`tail`: remove the last `k` blocks before the final one (a data-free depth-pruning reference).

Removes blocks n-1-k .. n-2 of an n-block model and keeps the final block n-1. A position-only
reference with no paper of its own: deep blocks are often the most redundant (Gromov et al.,
arXiv 2403.17887), and Lu et al. (arXiv 2411.15558) report that simply pruning the final layers
is a strong baseline; unlike them, the final block is kept here, and nothing is fine-tuned. Its
removal order, n-2, n-3, …, drives `stage:tail`.

Prefill stage: the kept blocks. Decode stage: the same kept blocks. KV: every prompt position of
every kept block is sent. No calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import DepthOptions
from methods.depth.ranked import RankedDepthMethod, Ranking, check_counts
from methods.registry import register


@register
class Tail(RankedDepthMethod):
    name = "tail"
    summary = "remove the k blocks just before the final block (n-1-k .. n-2); no calibration"
    doc_row = ("drops blocks n−1−k … n−2", "same blocks", "all positions")
    baseline_doc = ("(position only)", "blocks n−1−k … n−2; the final block is kept", "none")
    needs_calibration = False

    @dataclass(frozen=True)
    class Config(DepthOptions):
        k: int = 8  # blocks removed

    def validate_config(self, config) -> None:
        check_counts(self.name, config, ("k",))

    def eligible(self, n_layers: int) -> list[int]:
        return list(range(n_layers - 1))

    def eligibility_rule(self) -> str:
        return "the final block is always kept"

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        return Ranking(sorted(eligible, reverse=True), {"criterion": "position: last blocks before the final one first",
                                                        "work": {"full_forward_equivalents": 0}})
