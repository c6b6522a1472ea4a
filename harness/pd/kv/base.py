"""The `KVPolicy` interface, its byte budget `KVBudget`, and `TokenSelection`, the base of budgeted policies.

A policy is a frozen dataclass whose fields are its options. It validates them (`validate`, from
`__post_init__`), says how many prompt positions each decode layer keeps (`layer_budgets`), which
ones (`keep`), what it must observe of the prefill's attention to choose (`observation`), and
reads and writes itself (`to_dict`/`from_dict`) and describes itself (`describe`). Its class
docstring documents every option as "- `name`: ..." (tests/test_kv_policies.py checks it).

`KVPolicy(...)` called on this base class is the pre-plug-in constructor: `kind` (default
`first_last`) picks the registered class, the other arguments go to it, so
`KVPolicy(16, 48, (12, 13))` is a first_last policy and `KVPolicy(kind="streaming", budget=b)` a
streaming one.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar


def as_integer(value: Any) -> int | None:
    """`value` as an int when it is an integer (int, numpy's, a 0-d integer tensor), else None: `int()` would also take
    1.7 (as 1), "2" and True, so a stored layer index or count that is none would silently become another."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_integer_options(options: Any) -> None:
    """ValueError unless every option of the dataclass `options` annotated `int` (or `tuple[int, ...]`) holds integers
    (`as_integer`; stored as int): a 1.5 would otherwise pass the range checks, then keep 1.5 positions or fail
    inside a forward."""
    for f in dataclasses.fields(options):
        kind = _annotation(f.type)
        if kind not in ("int", "tuple[int, ...]"):
            continue
        value, many = getattr(options, f.name), kind != "int"
        items = tuple(value) if many and isinstance(value, (tuple, list)) else None if many else (value,)
        ints = None if items is None else tuple(as_integer(v) for v in items)
        if ints is None or None in ints:
            raise ValueError(f"{type(options).__name__}.{f.name}={value!r}: need {'integers' if many else 'an integer'}")
        object.__setattr__(options, f.name, ints if many else ints[0])


def _annotation(t: Any) -> str:
    """A field's annotation as written: a string under `from __future__ import annotations`, else the type itself (a
    plug-in policy's module without that import: `int`, `tuple[int, ...]`)."""
    return t if isinstance(t, str) else "int" if t is int else repr(t)


@dataclass(frozen=True)
class Observation:
    """What a policy needs the prefill to record of its attention, per observed (decode) layer.

    The record is, per request and prompt key column, the causal softmax attention of some prompt
    queries summed over those queries (float32):
    - `queries`: the last `queries` prompt positions of each request (fewer for shorter prompts);
      None means every prompt position (H2O's accumulated attention).
    - `per_query_head`: False: averaged over the query heads of each KV head's group, shape
      (requests, kv_heads, C); True: kept per query head, (requests, kv_heads, group, C).
    """

    queries: int | None
    per_query_head: bool = False


class _PolicyMeta(ABCMeta):
    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is KVPolicy:  # the abstract base as a constructor: `kind` picks the class
            from harness.pd.kv import get_policy

            target = get_policy(kwargs.pop("kind", "first_last"))
            unknown = sorted(set(kwargs) - set(target.option_names()))
            if unknown:
                raise ValueError(f"KVPolicy: a {target.name} policy has no {', '.join(unknown)} "
                                 f"(its options: {', '.join(target.option_names())})")
            return target(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class KVPolicy(metaclass=_PolicyMeta):
    """Which prompt positions of which decode layers the handoff sends (abstract; see `harness.pd.kv`)."""

    name: ClassVar[str] = ""
    # KV-baseline method wrapping this policy (methods/kv/baselines.py); "" = not offered as a method
    method_name: ClassVar[str] = ""
    method_summary: ClassVar[str] = ""
    # whether a `KVBudget(match=...)` can take this policy's per-layer counts as its total
    matchable: ClassVar[bool] = False
    # the value an option takes when a stored dict lacks it (an option added after records existed)
    dict_defaults: ClassVar[dict[str, Any]] = {}
    # the KV-baseline method's default for such an option when it is not the dict_defaults value (a new default
    # for new runs: the option is then written in the run key, so older records are recomputed, not reused)
    method_defaults: ClassVar[dict[str, Any]] = {}
    # options `example` sets, sized for prompts of about a dozen tokens (windows smaller than the prompt)
    example_options: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        check_integer_options(self)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for inconsistent options."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def example(cls, decode_layers: tuple[int, ...]) -> KVPolicy:
        """A small valid policy of this kind for a plan with `decode_layers` and prompts of about a
        dozen tokens, sending fewer positions than the prompt has (tests run every registered policy
        with it); `example_options` sizes its options."""
        return cls(**cls.example_options)

    @property
    def kind(self) -> str:
        """The registered name (the `kind` key of the serialised form)."""
        return self.name

    @property
    @abstractmethod
    def keeps_all(self) -> bool:
        """True when the handoff sends every prompt position of every decode layer, whatever T."""

    @property
    def per_head(self) -> bool:
        """True when the KV heads of one layer keep different positions (the handoff packs them per head)."""
        return False

    def observation(self) -> Observation | None:
        """What the prefill must record for `keep` (`harness.pd.kv_select.observe_prefill`); None: nothing."""
        return None

    @property
    def needs_prefill_attention(self) -> bool:
        return self.observation() is not None

    def check_layers(self, decode_layers: tuple[int, ...]) -> None:
        """Raise ValueError if the policy names layers that are not decode layers of the plan."""

    def remap_layers(self, index: dict[int, int]) -> KVPolicy:
        """The same policy with every layer index it names renumbered by `index` (export manifest)."""
        return self

    @abstractmethod
    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        """Positions each decode layer keeps for a T-token prompt (same order as `decode_layers`)."""

    @abstractmethod
    def keep(self, layer: int, positions, lengths, k, observed):
        """Which columns of `layer` to send.

        Args:
            positions: (requests, C) long, original position of each prefill column (-1 = padding),
                in position order.
            lengths: (requests,) prompt tokens T. k: (requests,) `layer_budgets` of this layer.
            observed: None, or this layer's `Observation` record for these requests.
        Returns: bool (requests, C), or (requests, kv_heads, C) when `per_head`, with exactly
            k[r] True per request (and head). A head-shared policy's mask depends only on
            positions, lengths and k when `observation()` is None (the engine reuses it).
        """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVPolicy:
        """From `to_dict()`; on the base class, the registered class named by `kind`."""
        from harness.pd.kv import policy_from_dict

        return policy_from_dict(d)

    @abstractmethod
    def describe(self) -> str:
        """One line for tables and manifests."""

    def table_text(self) -> str:
        """The text of the plans table (reports/tables.py)."""
        return self.describe()

    def budget_text(self) -> str:
        """What a `KVBudget(match=self)` spends, for `describe` of the matching policy."""
        raise NotImplementedError(f"a {self.name} policy cannot be matched")


@dataclass(frozen=True)
class KVBudget:
    """How many prompt positions a token-selection policy keeps per request.

    Exactly one of the three is set:
    - `match`: a matchable policy (first_last) of the same plan; the request's total of kept
      layer-positions B(T) is what that policy sends, for first_last
      (|K_D| - |S|)·T + |S|·min(T, n_first + n_last), spread over every decode layer by the
      token-selection policy's `layer_budgets`. Equal layer-positions mean equal bytes.
    - `tokens`: every decode layer keeps min(T, tokens) positions.
    - `ratio`: every decode layer keeps min(T, max(1, ceil(ratio · T))) positions (ratio read as the
      decimal it prints as, so 0.07 · 100 is exactly 7, where floats give 7.000000000000001 and ceil 8).
    """

    match: KVPolicy | None = None
    tokens: int = 0
    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_integer_options(self)
        given = [self.match is not None, self.tokens != 0, self.ratio != 0.0]
        if sum(given) != 1:
            raise ValueError("KVBudget: set exactly one of match, tokens, ratio")
        if self.match is not None and not self.match.matchable:
            raise ValueError(f"KVBudget.match must be a first_last policy, got {self.match.kind!r}")
        if self.tokens < 0 or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"KVBudget: need tokens >= 1 or 0 < ratio <= 1, got tokens={self.tokens}, ratio={self.ratio}")

    def total(self, decode_layers: tuple[int, ...], T: int) -> int:
        """Layer-positions one request with a T-token prompt keeps over `decode_layers`."""
        if self.match is not None:
            return sum(self.match.layer_budgets(tuple(decode_layers), T))
        return len(decode_layers) * self.per_layer(T)

    def per_layer(self, T: int) -> int:
        """Positions per layer for `tokens` and `ratio` budgets."""
        if self.tokens:
            return min(T, self.tokens)
        return min(T, max(1, math.ceil(Fraction(repr(self.ratio)) * T)))

    @property
    def keeps_all(self) -> bool:
        return (self.match is not None and self.match.keeps_all) or self.ratio == 1.0

    def describe(self) -> str:
        if self.match is not None:
            return "bytes of " + self.match.budget_text()
        return f"{self.tokens} tokens per layer" if self.tokens else f"ratio {self.ratio:g} per layer"

    def to_dict(self) -> dict[str, Any]:
        if self.match is not None:
            return {"match": self.match.to_dict()}
        return {"tokens": self.tokens} if self.tokens else {"ratio": self.ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVBudget:
        if "match" in d:
            return cls(match=KVPolicy.from_dict(d["match"]))
        return cls(tokens=d.get("tokens", 0), ratio=float(d.get("ratio", 0.0)))  # tokens checked, not truncated


@dataclass(frozen=True)
class TokenSelection(KVPolicy):
    """Base of policies that keep, in every decode layer, a budgeted number of positions chosen by a rule.

    - `budget`: a `KVBudget` (match a first_last policy's bytes, or tokens, or ratio per layer).
    Serialised as {"kind": name, "budget": ..., then the subclass's options in field order}; an
    option equal to its `dict_defaults` value is left out (so adding an option keeps old dicts).
    """

    budget: KVBudget | None = None

    def validate(self) -> None:
        if self.budget is None:
            raise ValueError(f"KVPolicy: a {self.name} policy needs a budget")

    @property
    def keeps_all(self) -> bool:
        return self.budget.keeps_all

    @classmethod
    def example(cls, decode_layers: tuple[int, ...]) -> KVPolicy:
        """The bytes of the first_last example on the same layers, with `example_options`."""
        match = next(c for c in _registered() if c.matchable).example(decode_layers)
        return cls(budget=KVBudget(match=match), **cls.example_options)

    def check_layers(self, decode_layers: tuple[int, ...]) -> None:
        match = self.budget.match
        outside = sorted(set(getattr(match, "layers", ())) - set(decode_layers)) if match is not None else []
        if outside:
            raise ValueError(f"kv_policy.budget.match.layers {outside} are not decode layers {list(decode_layers)}")

    def remap_layers(self, index: dict[int, int]) -> KVPolicy:
        if self.budget.match is None:
            return self
        return dataclasses.replace(self, budget=KVBudget(match=self.budget.match.remap_layers(index)))

    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        """Split the total B(T) (`KVBudget.total`) as evenly as integers allow.

        Every layer gets floor(B / n), and the first B mod n decode layers (in layer order) one
        more, so the sum is exactly B(T). Each count is in [1, T] when B(T) >= n.
        """
        base, extra = divmod(self.budget.total(tuple(decode_layers), T), len(decode_layers))
        return [base + (i < extra) for i in range(len(decode_layers))]

    def options(self) -> dict[str, Any]:
        """The policy's own options (not `budget`) as serialised: dict_defaults values left out."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "budget" and not (f.name in self.dict_defaults and v == self.dict_defaults[f.name]):
                out[f.name] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "budget": self.budget.to_dict(), **self.options()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVPolicy:
        if cls is not get_registered(d.get("kind")):
            return KVPolicy.from_dict(d)
        names = [n for n in cls.option_names() if n != "budget"]
        extra = {n: d[n] if n in d else cls.dict_defaults[n] for n in names if n in d or n in cls.dict_defaults}
        return cls(budget=KVBudget.from_dict(d["budget"]), **extra)

    def how(self) -> str:
        """The selection rule's parameters, for `describe`."""
        return ""

    def describe(self) -> str:
        return f"{self.name} ({self.how()}), budget = {self.budget.describe()}"


def _registered() -> list[type]:
    from harness.pd.kv import _POLICIES

    return list(_POLICIES.values())


def get_registered(name: str | None) -> type | None:
    from harness.pd.kv import _POLICIES

    return _POLICIES.get(name) if name else None
