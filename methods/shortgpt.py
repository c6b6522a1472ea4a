"""`shortgpt`: ShortGPT layer removal (Men et al., arXiv 2403.03853).

Block Influence of decoder block i is BI_i = 1 - E[cos(h_in, h_out)], the expectation over
calibration tokens (padding excluded), with h_in/h_out the block's input and output hidden
states taken by forward hooks (so the last block is compared with its own output, not with the
final-norm output). The `k` blocks with the lowest BI are removed.

Prefill stage: the kept blocks. Decode stage: the same kept blocks (ShortGPT prunes one model
for both stages). KV: every prompt position of every kept block is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from harness import arch
from harness.errors import UsageError
from harness.plan import PruningPlan
from methods.base import Method
from methods.blocks import block_cosines, lowest
from methods.registry import register


@register
class ShortGPT(Method):
    name = "shortgpt"
    summary = "remove the k blocks with the lowest Block Influence; same blocks in both stages"
    needs_calibration = True

    @dataclass(frozen=True)
    class Config:
        k: int = 8  # blocks removed
        batch_size: int = 16  # calibration forward batch (does not change the result beyond float noise)

    def validate_config(self, config) -> None:
        if config.k < 0:
            raise UsageError(f"shortgpt.k={config.k}: must be >= 0 (number of blocks to remove)")
        if config.batch_size < 1:
            raise UsageError(f"shortgpt.batch_size={config.batch_size}: must be >= 1")

    def plan(self, model, calib, mode: str) -> PruningPlan:
        n = arch.n_layers(model)
        if self.config.k >= n:
            raise UsageError(f"shortgpt.k={self.config.k}: must be < the model's {n} layers (at least one must stay)")
        key = (id(model), id(calib))
        if getattr(self, "_memo", (None,))[0] != key:  # the plan does not depend on the mode
            t0 = time.perf_counter()
            cos = block_cosines(model, calib, self.config.batch_size)
            self._memo = (key, cos, time.perf_counter() - t0)
        cos, seconds = self._memo[1], self._memo[2]
        bi = [1.0 - c for c in cos]
        drop = lowest(bi, self.config.k)
        keep = tuple(i for i in range(n) if i not in drop)
        return PruningPlan(self.name, n, keep, keep,
                           info={"block_influence": bi, "removed": drop, "criterion": "1 - mean cos(h_in, h_out)",
                                 "work": {"full_forward_equivalents": 1, "score_seconds": seconds}})
