"""`streamingllm` and `snapkv`: KV token-policy baselines at the PD handoff, at PDTrim's byte budget.

- StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
  arXiv 2309.17453): every decode layer receives the first `n_sink` prompt positions (attention
  sinks) and the most recent ones.
- SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
  arXiv 2404.14469): every decode layer receives, per KV head, the last `window` prompt positions
  and the prefix positions the window's queries attend to most in the prefill (pooled over
  neighbouring positions), chosen per request.

Both wrap a base method (`base`, default `pdtrim`, options in `base_options`): the prefill and
decode stages run the base plan's layers, and the base's KV policy is replaced. By default the
baseline keeps as many layer-positions per request as the base's policy sends on the same plan
and prompt (equal KV bytes; the rule is in docs/kv_policies.md); `keep_tokens` or `keep_ratio`
set an explicit per-layer budget instead. Unified mode has no handoff: the base's unified plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.config import build_options
from harness.errors import UsageError
from harness.plan import KVBudget, KVPolicy, PruningPlan
from methods.base import Method
from methods.registry import register


def parse_base_options(raw: str) -> dict[str, str]:
    """'k_decode=6 kv_layers=1,2' -> {'k_decode': '6', 'kv_layers': '1,2'} (items separated by spaces)."""
    out = {}
    for item in raw.split():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"base_options item {item!r}: expected NAME=VALUE (items separated by spaces)")
        out[key] = value
    return out


class KVBaseline(Method):
    """Base plan's layers, KV policy replaced by a token-selection policy at a byte budget."""

    kind: str = ""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        from methods import registry

        c = self.config
        if c.base in ("streamingllm", "snapkv"):
            raise UsageError(f"{self.name}.base={c.base}: the base must choose layers, not be a KV baseline itself")
        cls = registry.get(c.base)
        raw = parse_base_options(c.base_options)
        known = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = [k for k in raw if k not in known]
        if unknown:
            raise UsageError(f"{self.name}.base_options: {c.base} has no option {unknown[0]!r}; options: {', '.join(known) or 'none'}")
        self.base = cls(build_options(cls.Config, f"{self.name}.base_options", raw))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.base.needs_calibration

    def validate_config(self, c) -> None:
        if c.keep_tokens < 0 or not 0.0 <= c.keep_ratio <= 1.0 or (c.keep_tokens and c.keep_ratio):
            raise UsageError(f"{self.name}: set at most one of keep_tokens >= 1, 0 < keep_ratio <= 1 "
                             f"(neither: match the base plan's KV bytes); got {c.keep_tokens}, {c.keep_ratio}")

    def needs_replan_on_resume(self) -> bool:
        return self.base.needs_replan_on_resume()

    @contextlib.contextmanager
    def apply(self, model, plan: PruningPlan) -> Iterator[PruningPlan]:
        with self.base.apply(model, plan):  # e.g. pdtrim's healed blocks
            yield plan

    def budget(self, base_policy: KVPolicy) -> KVBudget:
        c = self.config
        if c.keep_tokens:
            return KVBudget(tokens=c.keep_tokens)
        if c.keep_ratio:
            return KVBudget(ratio=c.keep_ratio)
        if base_policy.kind != "first_last":
            raise UsageError(f"{self.name}: the base plan's KV policy is {base_policy.kind!r}; only a first_last policy can be matched")
        return KVBudget(match=base_policy)

    def policy(self, budget: KVBudget) -> KVPolicy:
        raise NotImplementedError

    def plan(self, model, calib, mode: str) -> PruningPlan:
        base_plan = self.base.plan(model, calib, mode)
        info: dict[str, Any] = {"base": {"method": base_plan.method, "options": self.base.options(),
                                         "kv_policy": base_plan.kv_policy.to_dict(), "info": base_plan.info}}
        if mode == "unified":
            return base_plan.replace(method=self.name, info=info)
        policy = self.policy(self.budget(base_plan.kv_policy))
        info["kv"] = {"policy": policy.describe(),
                      "budget_rule": "per request: B(T) layer-positions (the base policy's count on this plan, or "
                                     "keep_tokens / keep_ratio per layer); each decode layer keeps floor(B / |K_D|), "
                                     "the first B mod |K_D| decode layers one more; snapkv: that many per KV head"}
        try:
            return base_plan.replace(method=self.name, kv_policy=policy, info=info)
        except ValueError as e:
            raise UsageError(f"{self.name}: {e}") from e


@register
class StreamingLLM(KVBaseline):
    name = "streamingllm"
    kind = "streaming"
    summary = "base plan's layers (default pdtrim); every decode layer gets n_sink first + most recent positions, at the base's KV bytes"

    @dataclass(frozen=True)
    class Config:
        base: str = "pdtrim"  # method whose layer sets (and, by default, KV bytes) are used
        base_options: str = ""  # the base's options, "name=value" items separated by spaces
        keep_tokens: int = 0  # explicit budget: positions per decode layer (0: match the base's KV bytes)
        keep_ratio: float = 0.0  # explicit budget: fraction of the prompt per decode layer
        n_sink: int = 4  # attention-sink positions at the start of the prompt (StreamingLLM's 4)

    def validate_config(self, c) -> None:
        super().validate_config(c)
        if c.n_sink < 0:
            raise UsageError(f"streamingllm.n_sink={c.n_sink}: must be >= 0")

    def policy(self, budget: KVBudget) -> KVPolicy:
        return KVPolicy(kind="streaming", budget=budget, n_sink=self.config.n_sink)


@register
class SnapKV(KVBaseline):
    name = "snapkv"
    kind = "snapkv"
    summary = "base plan's layers (default pdtrim); per KV head, the window + prefix most attended by it in prefill, at the base's KV bytes"

    @dataclass(frozen=True)
    class Config:
        base: str = "pdtrim"
        base_options: str = ""
        keep_tokens: int = 0
        keep_ratio: float = 0.0
        window: int = 32  # observation window: last prompt positions, always kept (SnapKV's LongBench setting)
        kernel: int = 7  # pooling width over positions (odd)
        pooling: str = "max"  # "max" or "avg"

    def validate_config(self, c) -> None:
        super().validate_config(c)
        if c.window < 1 or c.kernel < 1 or c.kernel % 2 == 0 or c.pooling not in ("max", "avg"):
            raise UsageError(f"snapkv: need window >= 1, an odd kernel >= 1 and pooling max or avg; "
                             f"got {c.window}, {c.kernel}, {c.pooling!r}")

    def policy(self, budget: KVBudget) -> KVPolicy:
        c = self.config
        return KVPolicy(kind="snapkv", budget=budget, window=c.window, kernel=c.kernel, pooling=c.pooling)
