"""`unpruned`: the dense model in both stages, all KV sent. The reference every table compares to."""

from __future__ import annotations

from harness.pd import arch
from harness.pd.plan import PruningPlan
from methods.base import Method
from methods.registry import register


@register
class Unpruned(Method):
    name = "unpruned"
    summary = "dense model; every layer in prefill and decode; full KV handoff"
    doc_row = ("all layers", "all layers", "all positions")

    def plan(self, model, calib, mode: str) -> PruningPlan:
        return PruningPlan.dense(self.name, arch.n_layers(model))
