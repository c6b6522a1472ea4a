"""`stage:<base>`: a depth-pruning baseline with PDTrim's stage-aware scheme wrapped around it.

PDTrim (arXiv 2509.04467) reports its baselines also "with the stage-aware scheme": the prefill
and decode stages get separately pruned models with `R_prefill ⊆ R_decode`. Our reading: the base
method provides a removal order (`RankedDepthMethod.removal_order`: the ranking by its criterion
for one-shot scorers, the greedy order for SLEB); then

- disaggregated mode: the prefill stage removes the first `k_prefill` blocks of that order and
  the decode stage the first `k_decode` (defaults 4 and 8, like `pdtrim`), so the subset rule
  holds by construction; every prompt position of every decode layer is sent (no KV policy);
- unified mode: the first `k_unified` blocks (default 8) are removed from both stages, which is
  the base method at `k = k_unified`.

The wrapper's options are `k_prefill`, `k_decode`, `k_unified`, `prefill_ratio` (when set, `k_prefill` is
floor(prefill_ratio · k_decode), for depth sweeps over `k_decode`) and the base's own options except
its `k` (`--set stage:sleb.samples=32`). A base has a wrapper when its class says
`stage_variant = True` (every `RankedDepthMethod` does); the others (`streamline`, whose best run
moves with its length; `pdtrim`, stage-aware already; `manual`, `unpruned`) say why not in
`why_no_stage_variant`.

This module registers the `stage:` family with the registry (`registry.register_wrapper`), which
resolves `stage:<base>` through it; the registry never imports this module.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import PruningPlan
from methods import registry
from methods.base import Method, Options, WrapperMethod, check_stage_depths, prefill_depth
from methods.depth.ranked import RankedDepthMethod

PREFIX = "stage:"
STAGE_OPTIONS = (("k_prefill", 4), ("k_decode", 8), ("k_unified", 8))


class StageAware(WrapperMethod):
    """Prefill removes the first `k_prefill` of the base's removal order, decode the first `k_decode`."""

    base: ClassVar[type[RankedDepthMethod]]
    inner: RankedDepthMethod

    def __init__(self, config=None) -> None:
        super().__init__(config)
        own = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.base.Config) if f.name != "k"}
        self.inner = registry.instantiate(self.name, self.base, own)  # type: ignore[assignment]

    def validate_config(self, c) -> None:
        check_stage_depths(self.name, c)  # prefill_ratio, k_prefill <= k_decode, k_unified

    def fitted_counts(self, n: int, option: str | None = None) -> dict[str, int]:
        """As `Method.fitted_counts`, less `k_prefill` when `prefill_ratio` derives it (and a set `k_prefill` is unused)."""
        fit = super().fitted_counts(n, option)
        if getattr(self.config, "prefill_ratio", None) is not None:
            fit.pop("k_prefill", None)
        return fit

    def _asked(self, mode: str) -> dict[str, int]:
        """The counts `mode` removes, k_decode first: it is >= k_prefill, so a too-deep error names the count the user
        set (k_prefill may come from prefill_ratio)."""
        c = self.config
        return {"k_unified": c.k_unified} if mode == "unified" else {"k_decode": c.k_decode, "k_prefill": prefill_depth(c)}

    def check_depth(self, n: int, mode: str) -> None:
        asked, eligible = self._asked(mode), len(self.inner.eligible(n))
        for opt, k in asked.items():  # every count too deep first: its error has the hint (k_prefill=3 was
            if k >= n:  # "at most 0 removable", naming neither the k_decode nor the keep_first that fit)
                raise self.too_deep(opt, k, n)
        for opt, k in asked.items():
            if k > eligible:
                raise UsageError(f"{self.name}.{opt}={k}: at most {eligible} of the model's {n} blocks can be removed "
                                 f"({self.base.name}: {self.inner.eligibility_rule()})")

    def plan(self, model, calib, mode: str) -> PruningPlan:
        c, n = self.config, arch.n_layers(model)
        kp, asked = prefill_depth(c), self._asked(mode)
        self.check_depth(n, mode)
        eligible = len(self.inner.eligible(n))
        # one ranking, long enough for both modes, serves both (SLEB's greedy order is a prefix-stable search)
        longest = max([k for k in (kp, c.k_decode, c.k_unified) if k <= eligible and k < n], default=0)
        ranking = self.inner.ranking(model, calib, longest)
        order = list(ranking.order[:longest])
        rp = order[: asked.get("k_prefill", c.k_unified)]
        rd = order[: asked.get("k_decode", c.k_unified)]
        info = {"base": self.base.name, "removal_order": order, "removed_prefill": sorted(rp), "removed_decode": sorted(rd),
                "rule": "prefill removes the first k_prefill blocks of the base's removal order, decode the first k_decode "
                        "(unified: the first k_unified in both)",
                "base_info": ranking.info, "mode": mode}
        return PruningPlan(self.name, n, tuple(i for i in range(n) if i not in rp), tuple(i for i in range(n) if i not in rd),
                           info=info)


def supports(cls: type[Method]) -> bool:
    """True when `cls` gives a nested removal order (`stage_variant`), so `stage:<cls.name>` exists."""
    return isinstance(cls, type) and issubclass(cls, RankedDepthMethod) and cls.stage_variant


class StageOptions(Options):
    """Options of a `stage:<base>` class: `for_layers(n)` takes the base's counts for `n` layers."""

    _stage_base: ClassVar[type[Method]]

    @classmethod
    def for_layers(cls, n: int) -> Any:
        """k_decode = k_unified = the defaults capped at n // 2 and, where the base shrank its own `k` for `n`
        layers, at that; k_prefill half of it; the base's other options as its `for_layers(n)` gives them. (Capping
        at the base's `k` itself made a base whose default `k` is below 8, e.g. a plug-in's 4, give a stage variant
        smaller than its defaults on real models.)"""
        inner = cls._stage_base.config_for_layers(n)
        fitted = getattr(inner, "k", n // 2)
        shrunk = fitted < getattr(cls._stage_base.Config(), "k", fitted + 1)  # the base's k did not fit n layers
        k = min(n // 2, dict(STAGE_OPTIONS)["k_decode"], *([fitted] if shrunk else []))
        own = {f.name: getattr(inner, f.name) for f in dataclasses.fields(inner) if f.name != "k"}
        return cls(k_prefill=min(k // 2, dict(STAGE_OPTIONS)["k_prefill"]), k_decode=k,
                   k_unified=min(k, dict(STAGE_OPTIONS)["k_unified"]), **own)


def wrapper(base: type[RankedDepthMethod]) -> type[StageAware]:
    """The `stage:<base.name>` class (the registry builds it once per base and hands it out)."""
    hints = typing.get_type_hints(base.Config)
    fields = [(name, int, dataclasses.field(default=default)) for name, default in STAGE_OPTIONS]
    # when set, k_prefill = floor(prefill_ratio · k_decode): a sweep over k_decode keeps the stages' proportion
    fields.append(("prefill_ratio", float | None, dataclasses.field(default=None)))
    for f in dataclasses.fields(base.Config):
        if f.name == "k":
            continue
        default = (dataclasses.field(default_factory=f.default_factory) if f.default is dataclasses.MISSING
                   else dataclasses.field(default=f.default))
        fields.append((f.name, hints[f.name], default))
    config = dataclasses.make_dataclass("Config", fields, bases=(StageOptions,), frozen=True,
                                        namespace={"__module__": __name__, "_stage_base": base})
    name = f"{PREFIX}{base.name}"
    summary = (f"{base.name}'s removal order, stage-aware: prefill removes its first k_prefill blocks, decode its "
               f"first k_decode (unified: k_unified)")
    return type(f"StageAware_{base.__name__}", (StageAware,),
                {"name": name, "base": base, "Config": config, "summary": summary,
                 "needs_calibration": base.needs_calibration, "__module__": __name__, "__doc__": summary})


def doc_row(bases: list[str]) -> tuple[str, str, str]:
    """The `stage:<base>` row of docs/methods.md's methods table (methods/catalog.py)."""
    d = dict(STAGE_OPTIONS)
    return (f"first `k_prefill` blocks (default {d['k_prefill']}) of the base's removal order "
            f"(`base` = {', '.join(f'`{b}`' for b in bases)})", f"first `k_decode` (default {d['k_decode']}) of the same order",
            "all positions")


registry.register_wrapper(registry.Wrapper(prefix=PREFIX, supports=supports, build=wrapper, why_not=lambda cls: cls.why_no_stage_variant,
                                           title="stage-aware variant", doc_row=doc_row))
