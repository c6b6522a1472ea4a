"""`random`: remove `k` blocks drawn at random (seeded): the floor any block criterion must beat.

The eligible blocks (all but the first `keep_first` and last `keep_last`, default 1 and 1) are
shuffled with `random.Random(seed)`; the first `k` of that permutation are removed, and the
permutation is the removal order `stage:random` uses. The plan records the permutation.

Prefill stage: the kept blocks. Decode stage: the same kept blocks. KV: every prompt position of
every kept block is sent. No calibration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from methods.base import DepthOptions
from methods.depth.ranked import RankedDepthMethod, Ranking, check_counts
from methods.registry import register


@register
class RandomBlocks(RankedDepthMethod):
    name = "random"
    summary = "remove k blocks drawn with a seeded RNG (first and last kept); no calibration"
    doc_row = ("drops `k` blocks drawn with a seed", "same blocks", "all positions")
    baseline_doc = ("(floor)", "k blocks of a seeded permutation; first and last kept", "none")
    needs_calibration = False

    @dataclass(frozen=True)
    class Config(DepthOptions):
        k: int = 8  # blocks removed
        seed: int = 0  # the draw
        keep_first: int = 1  # first blocks never removed
        keep_last: int = 1  # last blocks never removed

    def validate_config(self, config) -> None:
        check_counts(self.name, config, ("k", "keep_first", "keep_last"))

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        order = list(eligible)
        random.Random(self.config.seed).shuffle(order)
        return Ranking(order, {"criterion": f"random permutation of the eligible blocks, random.Random({self.config.seed}).shuffle",
                               "permutation": order, "seed": self.config.seed, "work": {"full_forward_equivalents": 0}})
