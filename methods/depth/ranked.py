"""Depth pruning by a removal order: the shared base of the block-ranking baselines.

A `RankedDepthMethod` ranks decoder blocks into a *removal order* (most removable first):
a one-shot scorer sorts blocks by its criterion, an iterative one (SLEB) records the order in
which its greedy search removed them. Its plan removes the first `k` blocks of that order from
both stages, since these baselines prune one model for both (prefill == decode layers, every KV
position sent). `methods/depth/stage.py` builds the stage-aware variant of any of them
(`stage:<name>`): the prefill stage removes the first `k_prefill` blocks of the same order and
the decode stage the first `k_decode`, so `R_prefill ⊆ R_decode` holds by construction.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import PruningPlan
from methods import cached
from methods.bars import progress  # noqa: F401 - re-exported: the depth methods' bar
from methods.base import DepthOptions, Method, calibration_fingerprint, fit_counts, model_fingerprint
from methods.plugin_code import code_digest


@dataclass
class Ranking:
    """A removal order and the evidence behind it.

    `order`: block indices, most removable first; at least as many as were asked for (one-shot
    scorers give every eligible block). `info`: scores, criterion and work, for the plan record.
    """

    order: list[int]
    info: dict[str, Any] = field(default_factory=dict)


# Rankings shared by every instance of a method in this process, so `sleb` and `stage:sleb` (which
# holds its own `sleb` instance) search once per run. Keyed by what the ranking depends on, not by
# object ids (which Python reuses once an object is freed, and which differ for equal inputs):
# (method, options except k, model fingerprint, calibration fingerprint); see `ranking_key`.
_SHARED: OrderedDict[tuple, Ranking] = OrderedDict()
_SHARED_MAX = 8
# Rankings also go to the on-disk cache (methods/cached.py), so another process (a rerun, `latency`
# after a quality run) reuses them; bump when this module's ranking rules change results.
RANKING_VERSION = "1"


def check_counts(name: str, config, fields: tuple[str, ...]) -> None:
    """UsageError unless every named option of `config` is an int >= 0 (or >= 1 for sizes)."""
    for f in fields:
        v = getattr(config, f)
        least = 1 if f in ("samples", "batch_size", "batch_tokens") else 0
        if v < least:
            raise UsageError(f"{name}.{f}={v}: must be >= {least}")


class RankedDepthMethod(Method):
    """A depth-pruning method whose plan removes the first `k` blocks of a removal order.

    Subclasses implement `_rank(model, calib, k, eligible)`. Options `keep_first` and `keep_last`
    (when the Config has them) make the first and last blocks ineligible for removal. Their Config
    should derive from `DepthOptions`, whose `for_layers(n)` fits `k` and the other counts to a
    small model; one that does not gets the same fitting (`config_for_layers`).
    """

    needs_calibration = True
    stage_variant = True  # the removal order nests, so `stage:<name>` exists (methods/depth/stage.py)
    ranking_version = "1"  # bump in a subclass when its `_rank` gives other results (invalidates cached rankings)

    def __init__(self, config: Any | None = None) -> None:
        super().__init__(config)
        # every ranked method's counts, also those of a subclass whose own validate_config checks others or none
        check_counts(self.name, self.config, tuple(f for f in ("k", "keep_first", "keep_last") if hasattr(self.config, f)))

    @classmethod
    def config_for_layers(cls, n: int) -> Any:
        for_layers = getattr(cls.Config, "for_layers", None)
        return for_layers(n) if for_layers is not None else fit_counts(cls.Config, n)

    @abc.abstractmethod
    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        """The removal order over `eligible` blocks; at least its first `k` entries."""

    def eligible(self, n_layers: int) -> list[int]:
        """Blocks that may be removed (all but the first `keep_first` and the last `keep_last`)."""
        first = getattr(self.config, "keep_first", 0)
        last = getattr(self.config, "keep_last", 0)
        return list(range(first, n_layers - last))

    def eligibility_rule(self) -> str:
        first = getattr(self.config, "keep_first", 0)
        last = getattr(self.config, "keep_last", 0)
        return f"the first {first} and last {last} blocks are never removed" if first or last else "any block may be removed"

    def ranking(self, model, calib, k: int, label: str | None = None) -> Ranking:
        """The removal order (at least `k` long), memoised per (model, calibration set).

        `label` names the option asking for `k`, for the error when too few blocks are eligible.
        """
        n = arch.n_layers(model)
        eligible = self.eligible(n)
        self.check_eligible(k, n, label)
        key = self.ranking_key(model, calib)
        hit = _SHARED.get(key)
        if hit is None or len(hit.order) < k:
            disk_key = self._disk_key(model, calib)  # once: a plug-in's lazy import in _rank must not change it
            ranking = self._stored_ranking(disk_key, k, n)
            if ranking is None:
                t0 = time.perf_counter()
                ranking = self._rank(model, calib, k, eligible)
                ranking.info.setdefault("work", {})["rank_seconds"] = time.perf_counter() - t0
                ranking.info["eligible"] = eligible
                cached.save("ranking", disk_key, {"order": ranking.order, "info": ranking.info})
            _SHARED[key] = ranking
            while len(_SHARED) > _SHARED_MAX:
                _SHARED.popitem(last=False)
            return ranking
        _SHARED.move_to_end(key)
        # the very same ranking, its info unchanged: the plan is the first k of it whichever cell computed it, but its
        # evidence (SLEB's steps, the work) may run deeper than k when an earlier cell or run asked for more
        return hit

    def ranking_key(self, model, calib) -> tuple:
        """What a ranking depends on: the method (name and defining class), its options except `k`
        (a longer order serves every shorter `k`), the model and the calibration set."""
        opts = {f: v for f, v in dataclasses.asdict(self.config).items() if f != "k"}
        return (self.name, f"{type(self).__module__}.{type(self).__qualname__}", json.dumps(opts, sort_keys=True, default=str),
                model_fingerprint(model), calibration_fingerprint(calib), code_digest(self))

    def _disk_key(self, model, calib) -> dict:
        """`ranking_key` for the on-disk cache, with the ranking code's version and source digest."""
        opts = {f: v for f, v in dataclasses.asdict(self.config).items() if f != "k"}
        return cached.stat_key("ranking", model, calib, f"{RANKING_VERSION}.{self.ranking_version}",
                               [sys.modules[type(self).__module__], sys.modules[__name__]],
                               method=self.name, cls=f"{type(self).__module__}.{type(self).__qualname__}", **opts,
                               **({"plugin_code": code} if (code := code_digest(self)) else {}))  # a plug-in's helpers

    def _stored_ranking(self, disk_key: dict, k: int, n: int) -> Ranking | None:
        """The ranking a previous process stored under `disk_key` (at least `k` long), marked as reused; None if none,
        or if what is stored is not a removal order of the model's n blocks (warned: it is recomputed)."""
        hit = cached.load("ranking", disk_key)
        if hit is None:
            return None
        if not (isinstance(hit, dict) and cached.block_indices(hit.get("order"), n)):
            cached.reject("ranking", disk_key, f"no removal order of {n} distinct block indices")
            return None
        if len(hit["order"]) < k:
            return None
        info = dict(hit.get("info") or {})
        info["work"] = {**info.get("work", {}), "reused_from_cache": True}  # its seconds were spent by an earlier run
        cached.announce(f"block ranking: {self.name}, {len(hit['order'])} blocks in order",
                        "calibration" if self.needs_calibration else "planning")  # tail, random: no calibration to speak of
        return Ranking([int(i) for i in hit["order"]], info)

    def removal_order(self, model, calib, k: int | None = None) -> list[int]:
        """The first `k` (default: this method's `k`) blocks of the removal order."""
        k = self.config.k if k is None else k
        return list(self.ranking(model, calib, k).order[:k])

    def check_eligible(self, k: int, n: int, label: str | None = None) -> None:
        """A `UsageError` when fewer than `k` of `n` blocks may be removed (`label`: the option asking for `k`)."""
        if k > len(eligible := self.eligible(n)):
            raise UsageError(f"{label or f'{self.name}.k={k}'}: at most {len(eligible)} of the model's {n} blocks "
                             f"can be removed ({self.name}: {self.eligibility_rule()})")

    def check_depth(self, n: int, mode: str) -> None:
        k = self.config.k
        if k >= n:
            raise self.too_deep("k", k, n)
        self.check_eligible(k, n)

    def plan(self, model, calib, mode: str) -> PruningPlan:
        n, k = arch.n_layers(model), self.config.k
        self.check_depth(n, mode)
        ranking = self.ranking(model, calib, k)  # the plan does not depend on the mode
        order = list(ranking.order[:k])
        keep = tuple(i for i in range(n) if i not in order)
        info = {**ranking.info, "removal_order": order, "removed": sorted(order), "mode": mode}
        return PruningPlan(self.name, n, keep, keep, info=info)


@dataclass(frozen=True)
class SampledOptions(DepthOptions):
    """Options of a ranking computed on `samples` seeded calibration sequences (Shortened LLaMA's two
    criteria, SLEB). The defaults keep the "+" rule of Shortened LLaMA (first 4, last 2 blocks kept);
    a method with another rule redeclares `keep_first` / `keep_last` (field order is kept)."""

    k: int = 8  # blocks removed
    keep_first: int = 4  # the first blocks are never removed
    keep_last: int = 2  # nor the last ones
    samples: int = 64  # calibration sequences the criterion is computed on
    seed: int = 0  # which calibration sequences
    batch_size: int = 16  # rows per forward
    batch_tokens: int = 512  # padded positions per forward (bounds activation memory)


class SampledRankedMethod(RankedDepthMethod):
    """A `RankedDepthMethod` whose criterion is computed on calibration sequences; its `Config`
    derives from `SampledOptions`, whose counts must be >= 0 (sizes >= 1)."""

    needs_calibration = True

    def validate_config(self, config) -> None:
        check_counts(self.name, config, ("k", "keep_first", "keep_last", "samples", "batch_size", "batch_tokens"))
