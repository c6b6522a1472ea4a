"""`first_last`: PDTrim's token-aware KV pruning (arXiv 2509.04467), the default policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.pd.kv import register_policy
from harness.pd.kv.base import KVPolicy


@register_policy
@dataclass(frozen=True)
class FirstLast(KVPolicy):
    """Selected decode layers send only the first and last prompt positions; the others send all.

    - `n_first`: prompt positions kept at the start, in every layer of `layers`.
    - `n_last`: prompt positions kept at the end, in every layer of `layers`.
    - `layers`: the selected decode layers (sorted, unique); empty means every decode layer sends
      every prompt position. A layer in `layers` sends `[0, n_first) ∪ [T - n_last, T)` of a
      T-token prompt (all of it when `T <= n_first + n_last`).
    Serialised as exactly {"n_first", "n_last", "layers"} (no `kind`: the pre-plug-in layout, so
    stored records and run keys stay valid).
    """

    n_first: int = 0
    n_last: int = 0
    layers: tuple[int, ...] = ()

    name = "first_last"
    matchable = True

    @classmethod
    def example(cls, decode_layers: tuple[int, ...]) -> KVPolicy:
        """First 2 + last 3 positions in the last two decode layers (the others send all)."""
        return cls(2, 3, tuple(decode_layers[-2:]))

    def validate(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.n_first < 0 or self.n_last < 0:
            raise ValueError(f"KVPolicy: n_first and n_last must be >= 0, got {self.n_first}, {self.n_last}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"KVPolicy.layers must be sorted and unique, got {self.layers}")
        if self.layers and self.n_first + self.n_last < 1:
            raise ValueError("KVPolicy: selected layers must keep at least one position (n_first + n_last >= 1)")

    @property
    def keeps_all(self) -> bool:
        return not self.layers

    def check_layers(self, decode_layers: tuple[int, ...]) -> None:
        outside = sorted(set(self.layers) - set(decode_layers))
        if outside:
            raise ValueError(f"kv_policy.layers {outside} are not decode layers {list(decode_layers)}")

    def remap_layers(self, index: dict[int, int]) -> KVPolicy:
        return dataclasses.replace(self, layers=tuple(index[i] for i in self.layers))

    def kept_positions(self, layer: int, T: int) -> int:
        """Prompt positions sent for `layer` of a T-token prompt."""
        return min(T, self.n_first + self.n_last) if layer in self.layers else T

    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        return [self.kept_positions(layer, T) for layer in decode_layers]

    def keep(self, layer, positions, lengths, k, observed):
        """Valid columns (requests, C); in a selected layer only positions < n_first or >= T - n_last."""
        valid = positions >= 0
        if layer not in self.layers:
            return valid
        first = positions < self.n_first
        last = positions >= (lengths - self.n_last)[:, None]
        return valid & (first | last)

    def to_dict(self) -> dict[str, Any]:
        return {"n_first": self.n_first, "n_last": self.n_last, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVPolicy:
        if d.get("kind", "first_last") != "first_last":
            return KVPolicy.from_dict(d)
        # checked, not converted (`check_integer_options`): int(1.5) would keep one position fewer than stored
        return cls(n_first=d["n_first"], n_last=d["n_last"], layers=tuple(d["layers"]))

    def describe(self) -> str:
        return "all positions" if not self.layers else f"first {self.n_first} + last {self.n_last} in layers {list(self.layers)}"

    def table_text(self) -> str:
        layers = " ".join(map(str, self.layers)) if self.layers else "—"
        return "all positions" if self.keeps_all else f"first {self.n_first} + last {self.n_last} in layers {layers}"

    def budget_text(self) -> str:
        return "all positions" if self.keeps_all else f"first {self.n_first} + last {self.n_last} in {len(self.layers)} layers"
