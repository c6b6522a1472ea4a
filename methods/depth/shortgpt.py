"""`shortgpt`: ShortGPT layer removal (Men et al., arXiv 2403.03853).

Block Influence of decoder block i is BI_i = 1 - E[cos(h_in, h_out)], the expectation over
calibration tokens (padding excluded), with h_in/h_out the block's input and output hidden
states taken by forward hooks (so the last block is compared with its own output, not with the
final-norm output). The `k` blocks with the lowest BI are removed; the removal order (lowest BI
first) also drives `stage:shortgpt` (methods/depth/stage.py).

Prefill stage: the kept blocks. Decode stage: the same kept blocks (ShortGPT prunes one model
for both stages). KV: every prompt position of every kept block is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from harness.errors import UsageError
from methods.base import DepthOptions
from methods.depth.blocks import block_cosines
from methods.depth.ranked import RankedDepthMethod, Ranking
from methods.registry import register


@register
class ShortGPT(RankedDepthMethod):
    name = "shortgpt"
    summary = "remove the k blocks with the lowest Block Influence; same blocks in both stages"
    doc_row = ("drops the `k` blocks (default 8) with the lowest Block Influence `1 − E[cos(h_in, h_out)]` over calibration tokens "
               "(ShortGPT, arXiv 2403.03853)", "same blocks", "all positions")
    baseline_doc = ("ShortGPT, arXiv 2403.03853", "lowest Block Influence 1 − E[cos(h_in, h_out)]", "whole set, 1 forward")
    needs_calibration = True

    @dataclass(frozen=True)
    class Config(DepthOptions):
        k: int = 8  # blocks removed
        batch_size: int = 16  # calibration forward batch (does not change the result beyond float noise)

    def validate_config(self, config) -> None:
        if config.k < 0:
            raise UsageError(f"shortgpt.k={config.k}: must be >= 0 (number of blocks to remove)")
        if config.batch_size < 1:
            raise UsageError(f"shortgpt.batch_size={config.batch_size}: must be >= 1")

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        t0 = time.perf_counter()
        bi = [1.0 - c for c in block_cosines(model, calib, self.config.batch_size, "shortgpt")]
        order = sorted(eligible, key=lambda i: (bi[i], i))
        return Ranking(order, {"block_influence": bi, "criterion": "1 - mean cos(h_in, h_out)",
                               "work": {"full_forward_equivalents": 1, "score_seconds": time.perf_counter() - t0}})
