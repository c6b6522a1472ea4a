"""`manual`: a plan given explicitly, to replay a plan found elsewhere or to probe one by hand.

Prefill stage: `prefill_layers` (empty = every layer). Decode stage: `decode_layers` (empty = the
prefill layers). KV: `kv_layers` send only the first `n_first` and last `n_last` prompt positions.
In unified mode the prefill layer set is used for both stages, with no KV pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import KVPolicy, PruningPlan
from methods.base import Method, Options
from methods.registry import register


@register
class Manual(Method):
    name = "manual"
    summary = "explicit layer sets per stage and KV policy (replay or probe a plan)"
    doc_row = ("`prefill_layers` (default all)", "`decode_layers` (default = prefill)", "`kv_layers` keep first `n_first` + last `n_last`")

    @dataclass(frozen=True)
    class Config(Options):
        prefill_layers: tuple[int, ...] = ()
        decode_layers: tuple[int, ...] = ()
        kv_layers: tuple[int, ...] = ()
        n_first: int = 0
        n_last: int = 0

    def plan(self, model, calib, mode: str) -> PruningPlan:
        n = arch.n_layers(model)
        c = self.config
        prefill = c.prefill_layers or tuple(range(n))
        decode = c.decode_layers or prefill
        try:
            if mode == "unified":
                return PruningPlan(self.name, n, prefill, prefill)
            return PruningPlan(self.name, n, prefill, decode, KVPolicy(c.n_first, c.n_last, c.kv_layers))
        except ValueError as e:
            raise UsageError(f"manual plan: {e}") from e
