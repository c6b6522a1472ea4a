"""KV token-policy baselines at the PD handoff, at PDTrim's byte budget: one method per token-selection policy.

Every registered KV policy (`harness/pd/kv/`) with a `method_name` gets a method of that name here
(`streamingllm` for `streaming`, `snapkv`, and any policy added later), with no edit to this file;
its options are the four budget options below plus the policy's own options. E.g.:

- StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
  arXiv 2309.17453): every decode layer receives the first `n_sink` prompt positions (attention
  sinks) and the most recent ones.
- SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
  arXiv 2404.14469): every decode layer receives, per KV head, the last `window` prompt positions
  and the prefix positions the window's queries attend to most in the prefill (pooled over
  neighbouring positions), chosen per request.

Each wraps a base method (`base`, default `pdtrim`, options in `base_options`): the prefill and
decode stages run the base plan's layers, and the base's KV policy is replaced. By default the
baseline keeps as many layer-positions per request as the base's policy sends on the same plan
and prompt (equal KV bytes; the rule is in docs/kv_policies.md); `keep_tokens` or `keep_ratio`
set an explicit per-layer budget instead. Unified mode has no handoff: the base's unified plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from harness.config import build_options
from harness.errors import UsageError
from harness.pd import arch
from harness.pd.kv import KVBudget, KVPolicy, get_policy, policy_names
from harness.pd.plan import PruningPlan
from harness.registration import same_definition
from methods.base import Method
from methods.registry import register


def parse_base_options(raw: str) -> dict[str, str]:
    """'k_decode=6 kv_layers=1,2' -> {'k_decode': '6', 'kv_layers': '1,2'} (items separated by spaces)."""
    out = {}
    for item in raw.split():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"base_options item {item!r}: expected NAME=VALUE (items separated by spaces)")
        if key in out:  # the last one would silently win
            raise UsageError(f"base_options: {key} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


# options every KV baseline has, before its policy's own: (name, type, default); the comments are in docs/kv_policies.md
BASE_OPTIONS = (("base", str, "pdtrim"), ("base_options", str, ""), ("keep_tokens", int, 0), ("keep_ratio", float, 0.0))


class KVBaseline(Method):
    """Base plan's layers, KV policy replaced by a token-selection policy at a byte budget.

    Subclasses (made by `baseline_method`) set `policy_cls`; their `Config` holds `BASE_OPTIONS`
    and the policy's options, whose defaults are the values a stored policy dict without them
    means (`KVPolicy.dict_defaults`, else the dataclass default), so records made before an
    option existed keep their run keys, unless the policy sets a new default (`KVPolicy.method_defaults`).
    """

    policy_cls: type = KVPolicy

    def __init__(self, config=None) -> None:
        super().__init__(config)
        from methods import registry

        c = self.config
        try:
            cls = registry.get(c.base)
        except UsageError as e:
            raise UsageError(f"{self.name}.base={c.base}: {e}") from None
        if issubclass(cls, KVBaseline):
            raise UsageError(f"{self.name}.base={c.base}: the base must choose layers, not be a KV baseline itself")
        try:
            raw = parse_base_options(c.base_options)
        except UsageError as e:  # its messages start "base_options"
            raise UsageError(f"{self.name}.{e}") from None
        known = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = [k for k in raw if k not in known]
        if unknown:
            raise UsageError(f"{self.name}.base_options: {c.base} has no option {unknown[0]!r}; options: {', '.join(known) or 'none'}")
        self.base = registry.instantiate(self.name, cls, build_options(cls.Config, f"{self.name}.base_options", raw))
        self.base.outer = self  # the base's hints name this method's base_options, not a --set scope of its own

    def set_args_for_base(self, fit: dict[str, int]) -> str:
        """`--set "h2o.base_options=k_prefill=1 k_decode=2"`: the base's counts `fit` over its other options as given
        (`--set pdtrim.k_decode=2` is refused where pdtrim is not a method of the run)."""
        items = {**parse_base_options(self.config.base_options), **{k: str(v) for k, v in fit.items()}}
        return f'--set "{self.name}.base_options={" ".join(f"{k}={v}" for k, v in items.items())}"'

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.base.needs_calibration

    def validate_config(self, c) -> None:
        if c.keep_tokens < 0 or not 0.0 <= c.keep_ratio <= 1.0 or (c.keep_tokens and c.keep_ratio):
            raise UsageError(f"{self.name}: set at most one of keep_tokens >= 1, 0 < keep_ratio <= 1 "
                             f"(neither: match the base plan's KV bytes); got {c.keep_tokens}, {c.keep_ratio}")
        try:  # the policy validates its own options (a placeholder budget: only the options are checked here)
            self.policy(KVBudget(tokens=1))
        except ValueError as e:
            raise UsageError(f"{self.name}: {e}") from e

    def omitted_defaults(self) -> dict[str, Any]:
        """A policy option at its `dict_defaults` value is left out, like in the policy's dict (an option added later
        must not change the run keys of earlier records)."""
        return dict(self.policy_cls.dict_defaults)

    def needs_replan_on_resume(self) -> bool:
        return self.base.needs_replan_on_resume()

    def check_depth(self, n: int, mode: str) -> None:
        self.base.check_depth(n, mode)  # its hint names this method's base_options (`outer`)

    @contextlib.contextmanager
    def apply(self, model, plan: PruningPlan) -> Iterator[PruningPlan]:
        with self.base.apply(model, self.base_view(plan)):  # e.g. pdtrim's healed blocks, streamline's FFN
            yield plan

    @staticmethod
    def base_view(plan: PruningPlan) -> PruningPlan:
        """`plan` with the base method's own `info` (what its `apply` reads, e.g. streamline's `replacement`):
        this method's plan keeps it under `info["base"]["info"]`."""
        base = plan.info.get("base")
        return plan.replace(info=base["info"]) if isinstance(base, dict) and isinstance(base.get("info"), dict) else plan

    def budget(self, base_policy: KVPolicy) -> KVBudget:
        c = self.config
        if c.keep_tokens:
            return KVBudget(tokens=c.keep_tokens)
        if c.keep_ratio:
            return KVBudget(ratio=c.keep_ratio)
        if not base_policy.matchable:
            raise UsageError(f"{self.name}: the base plan's KV policy is {base_policy.kind!r}; only a first_last policy can be matched")
        return KVBudget(match=base_policy)

    def policy(self, budget: KVBudget) -> KVPolicy:
        """The policy with this method's options at `budget`: the class registered under its kind now (a plug-in
        policy's module reloaded in a notebook has a new class; its records' code digests already name the new code)."""
        cls = get_policy(self.policy_cls.name)  # an option the reloaded class added keeps its default
        own = {n: getattr(self.config, n) for n in cls.option_names() if n != "budget" and hasattr(self.config, n)}
        return cls(budget=budget, **own)

    def check_config(self, config, mode: str) -> None:
        """A per-head policy on a latent KV cache (`arch.check_policy_fits`), refused before the weights load and before
        the base plans, not by the engine once the plan is made; then the base's own check."""
        if mode != "unified":  # the budget is a stand-in: per_head does not depend on it
            arch.check_policy_fits(config, self.policy(KVBudget(tokens=1)), self.name)
        self.base.check_config(config, mode)

    def plan(self, model, calib, mode: str) -> PruningPlan:
        self.check_config(model.config, mode)  # before the base's (minutes of) search
        base_plan = self.base.make_plan(model, calib, mode)  # checked: a plug-in base returning None is named
        info: dict[str, Any] = {"base": {"method": base_plan.method, "options": self.base.options(),
                                         "kv_policy": base_plan.kv_policy.to_dict(), "info": base_plan.info}}
        if mode == "unified":
            return base_plan.replace(method=self.name, info=info)
        policy = self.policy(self.budget(base_plan.kv_policy))
        info["kv"] = {"policy": policy.describe(),
                      "budget_rule": "per request: B(T) layer-positions (the base policy's count on this plan, or "
                                     "keep_tokens / keep_ratio per layer); each decode layer keeps floor(B / |K_D|), "
                                     "the first B mod |K_D| decode layers one more; snapkv: that many per KV head"}
        rule = getattr(policy, "budget_rule", None)
        if rule is not None:  # a policy with its own per-layer split says so (the default text is the even split's)
            info["kv"]["budget_rule"] = rule
        try:
            return base_plan.replace(method=self.name, kv_policy=policy, info=info)
        except ValueError as e:
            raise UsageError(f"{self.name}: {e}") from e


def baseline_method(policy_cls: type) -> type[KVBaseline]:
    """The KV-baseline method class of a token-selection policy class (named `policy_cls.method_name`)."""
    fields = [(n, t, dataclasses.field(default=d)) for n, t, d in BASE_OPTIONS]
    for f in dataclasses.fields(policy_cls):
        if f.name != "budget":
            default = policy_cls.method_defaults.get(f.name, policy_cls.dict_defaults.get(f.name, f.default))
            fields.append((f.name, type(default), dataclasses.field(default=default)))
    cls_name = f"{policy_cls.__name__}Baseline"  # a module attribute (below): importable and picklable by name
    if cls_name in globals():  # a plug-in policy class named like one of the package's: keep both importable
        cls_name += "_" + re.sub(r"\W", "_", policy_cls.method_name)
    config = dataclasses.make_dataclass("Config", fields, frozen=True, namespace={"__module__": __name__})
    config.__qualname__ = f"{cls_name}.Config"
    return type(cls_name, (KVBaseline,), {
        "name": policy_cls.method_name, "summary": policy_cls.method_summary, "policy_cls": policy_cls,
        "kind": policy_cls.name, "Config": config, "__module__": __name__,
        "__doc__": f"KV baseline: the base plan's layers with the `{policy_cls.name}` KV policy (harness/pd/kv/)."})


def register_baselines() -> list[str]:
    """Register the KV-baseline method of every registered policy with a `method_name` that has none yet:
    the package's policies when this module is imported, a plug-in's when `methods.load_plugins` has
    imported it (a plug-in policy needs nothing but `@register_policy`). Returns the names registered."""
    from methods import registry

    made = []
    for name in policy_names():
        policy_cls = get_policy(name)
        if not policy_cls.method_name:
            continue
        taken = registry.registered(policy_cls.method_name)
        if taken is not None:
            then = getattr(taken, "policy_cls", None)
            if then is not None and then is not policy_cls and same_definition(then, policy_cls):
                registry.unregister(policy_cls.method_name)  # the policy's module imported again: its new class
                taken = None
            elif then is not policy_cls:
                raise ValueError(f"KV policy {name!r} ({policy_cls.__module__}): its method_name {policy_cls.method_name!r} "
                                 f"is already a method ({taken.__module__}.{taken.__qualname__}); choose another")
        if taken is not None:
            continue
        cls = register(baseline_method(policy_cls))
        globals()[cls.__name__] = cls  # e.g. SnapKVBaseline: importable and picklable by name (sweep cells)
        made.append(cls.name)
    return made


register_baselines()
