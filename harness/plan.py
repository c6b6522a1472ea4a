"""`PruningPlan` and `KVPolicy`: what a method decided, as validated, serialisable data.

A plan names the decoder layers each stage runs (by their index in the unpruned model) and the
policy the prefill->decode handoff applies to the prompt KV. The subset rule
`decode_layers ⊆ prefill_layers` is structural: the prefill stage is the only source of a
layer's prompt KV, so the decode stage can only run layers that prefill ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KVPolicy:
    """Which prompt positions of which layers the handoff sends.

    `layers` empty means every decode layer sends every prompt position. Otherwise each layer in
    `layers` sends only prompt positions `[0, n_first) ∪ [T - n_last, T)` of a T-token prompt
    (all of them when `T <= n_first + n_last`); the other decode layers send everything.
    Kept positions keep their original position ids; dropped ones are invisible to decode.
    """

    n_first: int = 0
    n_last: int = 0
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.n_first < 0 or self.n_last < 0:
            raise ValueError(f"KVPolicy: n_first and n_last must be >= 0, got {self.n_first}, {self.n_last}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"KVPolicy.layers must be sorted and unique, got {self.layers}")
        if self.layers and self.n_first + self.n_last < 1:
            raise ValueError("KVPolicy: selected layers must keep at least one position (n_first + n_last >= 1)")

    @property
    def keeps_all(self) -> bool:
        """True when the handoff sends every prompt position of every decode layer."""
        return not self.layers

    def to_dict(self) -> dict[str, Any]:
        return {"n_first": self.n_first, "n_last": self.n_last, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVPolicy:
        return cls(n_first=int(d["n_first"]), n_last=int(d["n_last"]), layers=tuple(d["layers"]))


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
        for stage in ("prefill_layers", "decode_layers"):
            idx = tuple(int(i) for i in getattr(self, stage))
            object.__setattr__(self, stage, idx)
            if list(idx) != sorted(set(idx)) or not all(0 <= i < self.n_layers for i in idx):
                raise ValueError(
                    f"{stage}={list(idx)}: need sorted, unique layer indices in [0, {self.n_layers})"
                )
            if not idx:
                raise ValueError(f"{stage} is empty: a stage must run at least one layer")
        extra = sorted(set(self.decode_layers) - set(self.prefill_layers))
        if extra:
            raise ValueError(
                f"decode_layers must be a subset of prefill_layers (decode reads prompt KV that only "
                f"prefill produces); layers {extra} run in decode but not in prefill"
            )
        outside = sorted(set(self.kv_policy.layers) - set(self.decode_layers))
        if outside:
            raise ValueError(f"kv_policy.layers {outside} are not decode layers {list(self.decode_layers)}")

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
            n_layers=int(d["n_layers"]),
            prefill_layers=tuple(d["prefill_layers"]),
            decode_layers=tuple(d["decode_layers"]),
            kv_policy=KVPolicy.from_dict(d.get("kv_policy", {"n_first": 0, "n_last": 0, "layers": []})),
            info=dict(d.get("info", {})),
        )

    def replace(self, **changes: Any) -> PruningPlan:
        return dataclasses.replace(self, **changes)
