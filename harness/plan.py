"""`PruningPlan` and `KVPolicy`: what a method decided, as validated, serialisable data.

A plan names the decoder layers each stage runs (by their index in the unpruned model) and the
policy the prefill->decode handoff applies to the prompt KV. The subset rule
`decode_layers ⊆ prefill_layers` is structural: the prefill stage is the only source of a
layer's prompt KV, so the decode stage can only run layers that prefill ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

KV_KINDS = ("first_last", "streaming", "snapkv")
POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class KVBudget:
    """How many prompt positions a token-selection policy (streaming, snapkv) keeps per request.

    Exactly one of the three is set:
    - `match`: a `first_last` policy of the same plan; the request's total of kept layer-positions
      B(T) is what that policy sends, (|K_D| - |S|)·T + |S|·min(T, n_first + n_last), spread over
      every decode layer (`KVPolicy.layer_budgets`). Equal layer-positions mean equal bytes.
    - `tokens`: every decode layer keeps min(T, tokens) positions.
    - `ratio`: every decode layer keeps min(T, max(1, ceil(ratio · T))) positions (ratio read as the
      decimal it prints as, so 0.1 · 30 is exactly 3).
    """

    match: KVPolicy | None = None
    tokens: int = 0
    ratio: float = 0.0

    def __post_init__(self) -> None:
        given = [self.match is not None, self.tokens != 0, self.ratio != 0.0]
        if sum(given) != 1:
            raise ValueError("KVBudget: set exactly one of match, tokens, ratio")
        if self.match is not None and self.match.kind != "first_last":
            raise ValueError(f"KVBudget.match must be a first_last policy, got {self.match.kind!r}")
        if self.tokens < 0 or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"KVBudget: need tokens >= 1 or 0 < ratio <= 1, got tokens={self.tokens}, ratio={self.ratio}")

    def total(self, decode_layers: tuple[int, ...], T: int) -> int:
        """Layer-positions one request with a T-token prompt keeps over `decode_layers`."""
        if self.match is not None:
            return sum(self.match.kept_positions(layer, T) for layer in decode_layers)
        return len(decode_layers) * self.per_layer(T)

    def per_layer(self, T: int) -> int:
        """Positions per layer for `tokens` and `ratio` budgets."""
        if self.tokens:
            return min(T, self.tokens)
        return min(T, max(1, math.ceil(Fraction(repr(self.ratio)) * T)))

    def to_dict(self) -> dict[str, Any]:
        if self.match is not None:
            return {"match": self.match.to_dict()}
        return {"tokens": self.tokens} if self.tokens else {"ratio": self.ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVBudget:
        if "match" in d:
            return cls(match=KVPolicy.from_dict(d["match"]))
        return cls(tokens=int(d.get("tokens", 0)), ratio=float(d.get("ratio", 0.0)))


@dataclass(frozen=True)
class KVPolicy:
    """Which prompt positions of which decode layers the handoff sends.

    `kind` (default `first_last`, PDTrim's token-aware KV pruning):
    - `first_last`: `layers` empty means every decode layer sends every prompt position. Otherwise
      each layer in `layers` sends only prompt positions `[0, n_first) ∪ [T - n_last, T)` of a
      T-token prompt (all of them when `T <= n_first + n_last`); the other decode layers send all.
    - `streaming` (StreamingLLM, arXiv 2309.17453): every decode layer l keeps k_l(T) positions
      (`budget`, `layer_budgets`): the first min(n_sink, k_l) (attention sinks) and the most recent
      rest, shared by all heads of the layer.
    - `snapkv` (SnapKV, arXiv 2404.14469): every decode layer l keeps k_l(T) positions *per KV
      head*: the last `window` prompt positions (the observation window) and the prefix positions
      with the highest window attention (summed over the window's queries, averaged over the query
      heads of the KV head's group, pooled over positions with a `kernel`-wide `pooling` filter),
      from the prefill's own attention; ties go to the earlier position.
    Kept positions keep their original position ids; dropped ones are invisible to decode.
    """

    n_first: int = 0
    n_last: int = 0
    layers: tuple[int, ...] = ()
    kind: str = "first_last"
    budget: KVBudget | None = None  # streaming, snapkv
    n_sink: int = 4  # streaming: attention-sink positions kept at the start (StreamingLLM uses 4)
    window: int = 32  # snapkv: observation window (last prompt positions, always kept)
    kernel: int = 7  # snapkv: pooling width over positions (odd)
    pooling: str = "max"  # snapkv: "max" or "avg"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.kind not in KV_KINDS:
            raise ValueError(f"KVPolicy.kind must be one of {KV_KINDS}, got {self.kind!r}")
        if self.n_first < 0 or self.n_last < 0:
            raise ValueError(f"KVPolicy: n_first and n_last must be >= 0, got {self.n_first}, {self.n_last}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"KVPolicy.layers must be sorted and unique, got {self.layers}")
        if self.kind == "first_last":
            if self.budget is not None:
                raise ValueError("KVPolicy: a first_last policy has no budget (its layers, n_first, n_last say what it keeps)")
            if self.layers and self.n_first + self.n_last < 1:
                raise ValueError("KVPolicy: selected layers must keep at least one position (n_first + n_last >= 1)")
            return
        if self.budget is None:
            raise ValueError(f"KVPolicy: a {self.kind} policy needs a budget")
        if self.layers or self.n_first or self.n_last:
            raise ValueError(f"KVPolicy: a {self.kind} policy applies to every decode layer; n_first, n_last, layers are first_last fields")
        if self.n_sink < 0 or self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.pooling not in POOLINGS:
            raise ValueError(f"KVPolicy: need n_sink >= 0, window >= 1, an odd kernel >= 1 and pooling in {POOLINGS}")

    @property
    def keeps_all(self) -> bool:
        """True when the handoff sends every prompt position of every decode layer, whatever T."""
        if self.kind == "first_last":
            return not self.layers
        b = self.budget
        return (b.match is not None and b.match.keeps_all) or b.ratio == 1.0

    @property
    def per_head(self) -> bool:
        """True when the KV heads of one layer keep different positions (the handoff packs them per head)."""
        return self.kind == "snapkv"

    @property
    def needs_prefill_attention(self) -> bool:
        """True when the selection reads the prefill's attention (`harness.kv_select.observe_prefill`)."""
        return self.kind == "snapkv"

    def kept_positions(self, layer: int, T: int) -> int:
        """Prompt positions a first_last policy sends for `layer` of a T-token prompt."""
        if self.kind != "first_last":
            raise ValueError("kept_positions is the first_last count; token-selection kinds use layer_budgets")
        return min(T, self.n_first + self.n_last) if layer in self.layers else T

    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        """Positions each decode layer keeps for a T-token prompt (same order as `decode_layers`).

        The total B(T) (`KVBudget.total`) is split as evenly as integers allow: every layer gets
        floor(B / n), and the first B mod n decode layers (in layer order) one more, so the sum is
        exactly B(T). Each count is in [1, T] when B(T) >= n.
        """
        if self.kind == "first_last":
            return [self.kept_positions(layer, T) for layer in decode_layers]
        base, extra = divmod(self.budget.total(tuple(decode_layers), T), len(decode_layers))
        return [base + (i < extra) for i in range(len(decode_layers))]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "first_last":  # exactly the pre-`kind` layout, so stored records and run keys stay valid
            return {"n_first": self.n_first, "n_last": self.n_last, "layers": list(self.layers)}
        d: dict[str, Any] = {"kind": self.kind, "budget": self.budget.to_dict()}
        if self.kind == "streaming":
            d["n_sink"] = self.n_sink
        else:
            d.update(window=self.window, kernel=self.kernel, pooling=self.pooling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVPolicy:
        kind = d.get("kind", "first_last")
        if kind == "first_last":
            return cls(n_first=int(d["n_first"]), n_last=int(d["n_last"]), layers=tuple(d["layers"]))
        extra = {k: d[k] for k in ("n_sink", "window", "kernel", "pooling") if k in d}
        return cls(kind=kind, budget=KVBudget.from_dict(d["budget"]), **extra)

    def describe(self) -> str:
        """One line for tables, e.g. 'snapkv (window 32, max-pool 7), budget = first 16 + last 48 in 14 layers'."""
        if self.kind == "first_last":
            return "all positions" if not self.layers else f"first {self.n_first} + last {self.n_last} in layers {list(self.layers)}"
        b = self.budget
        if b.match is not None:
            size = "bytes of " + ("all positions" if b.match.keeps_all else
                                  f"first {b.match.n_first} + last {b.match.n_last} in {len(b.match.layers)} layers")
        else:
            size = f"{b.tokens} tokens per layer" if b.tokens else f"ratio {b.ratio:g} per layer"
        how = f"{self.n_sink} sinks + recent" if self.kind == "streaming" else f"window {self.window}, {self.pooling}-pool {self.kernel}, per KV head"
        return f"{self.kind} ({how}), budget = {size}"


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
        match = self.kv_policy.budget.match if self.kv_policy.budget is not None else None
        outside = sorted(set(match.layers) - set(self.decode_layers)) if match is not None else []
        if outside:
            raise ValueError(f"kv_policy.budget.match.layers {outside} are not decode layers {list(self.decode_layers)}")

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
