"""`PruningPlan`: what a method decided, as validated, serialisable data.

A plan names the decoder layers each stage runs (by their index in the unpruned model) and the
policy the prefill->decode handoff applies to the prompt KV. The subset rule
`decode_layers ⊆ prefill_layers` is structural: the prefill stage is the only source of a
layer's prompt KV, so the decode stage can only run layers that prefill ran.

The KV policies are plug-ins (`harness/pd/kv/`); `KVPolicy` and `KVBudget` are re-exported here,
and `KVPolicy(n_first, n_last, layers)` still builds the default `first_last` policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.pd.kv import KVBudget, KVPolicy, get_policy, policy_from_dict, policy_names
from harness.pd.kv.base import as_integer

__all__ = ["KVBudget", "KVPolicy", "PlanError", "PruningPlan", "get_policy", "policy_from_dict", "policy_names"]


class PlanError(ValueError):
    """A `PruningPlan` that breaks its rules (layer indices, `decode ⊆ prefill`, the KV policy's layers): a method that
    makes one broke its contract (`Method.make_plan` says so, exit 2), a stored one is not a plan of this harness."""

@dataclass(frozen=True)
class PruningPlan:
    """Layers run by each stage of a PD deployment, plus the KV policy of the handoff.

    Attributes:
        method: registry name of the method that made the plan.
        n_layers: depth of the unpruned model.
        prefill_layers: sorted, unique layer indices the prefill stage runs.
        decode_layers: sorted, unique layer indices the decode stage runs; ⊆ prefill_layers.
        kv_policy: applied to the KV of `decode_layers` at the handoff.
        info: free-form provenance (scores, chosen indices); not used by the engine.
    """

    method: str
    n_layers: int
    prefill_layers: tuple[int, ...]
    decode_layers: tuple[int, ...]
    kv_policy: KVPolicy = KVPolicy()
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        depth = as_integer(self.n_layers)  # not int(): a depth of 2.5 let layer 2 in
        if depth is None or depth < 1:
            raise PlanError(f"n_layers={self.n_layers!r}: need a positive integer depth")
        object.__setattr__(self, "n_layers", depth)
        for stage in ("prefill_layers", "decode_layers"):
            idx = _layer_indices(stage, getattr(self, stage))
            object.__setattr__(self, stage, idx)
            if list(idx) != sorted(set(idx)) or not all(0 <= i < self.n_layers for i in idx):
                raise PlanError(
                    f"{stage}={list(idx)}: need sorted, unique layer indices in [0, {self.n_layers})"
                )
            if not idx:
                raise PlanError(f"{stage} is empty: a stage must run at least one layer")
        extra = sorted(set(self.decode_layers) - set(self.prefill_layers))
        if extra:
            raise PlanError(
                f"decode_layers must be a subset of prefill_layers (decode reads prompt KV that only "
                f"prefill produces); layers {extra} run in decode but not in prefill"
            )
        if not isinstance(self.kv_policy, KVPolicy):
            raise PlanError(f"kv_policy={self.kv_policy!r}: need a KVPolicy")
        try:
            self.kv_policy.check_layers(self.decode_layers)
        except PlanError:
            raise
        except ValueError as e:  # a policy naming layers decode does not run
            raise PlanError(str(e)) from None

    @classmethod
    def dense(cls, method: str, n_layers: int) -> PruningPlan:
        every = tuple(range(n_layers))
        return cls(method, n_layers, every, every)

    @property
    def is_unified(self) -> bool:
        """One layer set for both stages and no KV pruning: runnable as an ordinary forward."""
        return self.prefill_layers == self.decode_layers and self.kv_policy.keeps_all

    @property
    def removed_prefill(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in set(self.prefill_layers))

    @property
    def removed_decode(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in set(self.decode_layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_layers": self.n_layers,
            "prefill_layers": list(self.prefill_layers),
            "decode_layers": list(self.decode_layers),
            "removed_prefill": list(self.removed_prefill),
            "removed_decode": list(self.removed_decode),
            "kv_policy": self.kv_policy.to_dict(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        return cls(
            method=d["method"],
            n_layers=d["n_layers"],  # checked, not converted: int(2.5) would be a depth of 2
            prefill_layers=d["prefill_layers"],
            decode_layers=d["decode_layers"],
            kv_policy=_stored_policy(d.get("kv_policy", {"n_first": 0, "n_last": 0, "layers": []})),
            info=dict(d.get("info", {})),
        )

    def replace(self, **changes: Any) -> PruningPlan:
        return dataclasses.replace(self, **changes)


def _layer_indices(stage: str, layers: Any) -> tuple[int, ...]:
    """The integer layer indices of `stage`; PlanError for anything else (a number, a string, a float index)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise PlanError(f"{stage}={layers!r}: need a sequence of layer indices")
    idx = tuple(layers)
    bad = [i for i in idx if as_integer(i) is None]
    if bad:
        raise PlanError(f"{stage}={list(idx)}: layer indices must be integers, got {bad}")
    return tuple(as_integer(i) for i in idx)


def _stored_policy(d: Any) -> KVPolicy:
    """The policy of a stored plan; PlanError when it is not a policy's dict (e.g. null)."""
    if not isinstance(d, dict):
        raise PlanError(f"kv_policy={d!r}: need a KV policy's dict")
    try:
        return policy_from_dict(d)
    except (KeyError, TypeError, ValueError) as e:  # options missing or out of their rules
        raise PlanError(f"kv_policy={d!r}: not a valid policy ({type(e).__name__}: {e})") from None
