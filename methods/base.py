"""The `Method` contract: `plan` decides (pure), the engine applies (reversibly).

A method never sees the runner: it gets the model (read-only), an optional calibration set and
the mode, and returns a `PruningPlan`. Its options are a frozen dataclass `Config`, set from the
CLI as `--set <name>.<field>=<value>` and recorded with every result.

A method is a plug-in: one module that defines the class and decorates it with
`methods.registry.register`. Everything else (the contract test, the `stage:` wrapper, `--help`,
the generated method tables) reads the class: `Config.for_layers(n)` gives options that fit a
small model (tests run every method on a 4-layer one), `stage_variant` says whether `stage:<name>`
exists, and `summary` / `doc_row` describe it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import reprlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from harness.errors import PluginContractError, UsageError
from harness.pd import arch
from harness.pd.plan import PlanError, PruningPlan


def model_fingerprint(model) -> str:
    """A digest of the model's class, source, dtype and parameters (names, shapes, and the values `arch.strided_sample` takes
    of each, as `harness.run.inputs.weights_fingerprint` does): equal for the same
    weights, different for another checkpoint or seed. Only the first and last 8 values were read before, so weights
    edited anywhere else behind the same path reused the on-disk statistics of the old ones. Sampling keeps it cheap
    on large models; offloaded (meta) parameters contribute their shape only."""
    h = hashlib.sha256(f"{type(model).__qualname__}|{getattr(getattr(model, 'config', None), '_name_or_path', '')}".encode())
    arch.hash_parameters(h, model, arch.strided_sample, with_dtype=True)
    return h.hexdigest()[:16]


def calibration_fingerprint(calib) -> str | None:
    """The calibration set's description (it carries a digest of its tokens) or, without one, a digest
    of its token ids; None when there is no calibration set."""
    if calib is None:
        return None
    desc = getattr(calib, "description", None)
    if desc:
        return json.dumps(desc, sort_keys=True, default=str)
    return hashlib.sha256(json.dumps(getattr(calib, "input_ids", repr(calib))).encode()).hexdigest()[:16]


def content_key(model, calib) -> tuple[str, str | None]:
    """What a method's memo of work on (model, calibration set) is keyed by: their content digests,
    never `id()`s (Python reuses an id once its object is freed, and equal inputs have different ids)."""
    return model_fingerprint(model), calibration_fingerprint(calib)


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """`opt.step()`, with tensors it makes without a device on the CPU: Adam keeps its step counter there
    by design, but torch < 2.13 makes it without a device, i.e. on the default device (torch 2.11, the
    GPU machine's, failed under a meta default). Every method that trains steps through this."""
    with torch.device("cpu"):
        opt.step()


class Options:
    """Mixin for a method's `Config` dataclass: `for_layers(n)`, options that fit an `n`-layer model.

    The default is the Config's defaults; a method whose defaults are sized for real models
    (e.g. `k = 8` blocks removed) overrides it, so tests can run every registered method on a
    tiny model without a table of per-method options.
    """

    @classmethod
    def for_layers(cls, n: int) -> Any:
        """Options for a model of `n` decoder layers (default: the defaults)."""
        return cls()


class DepthOptions(Options):
    """`for_layers(n)` shrinks the usual count options to fit `n` layers, and leaves the rest.

    `k` (blocks removed) to at most n // 2; `keep_first`, `keep_last` (blocks never removed) to
    at most n // 4 each, so `k` blocks stay removable; `samples` (calibration sequences) to at
    most 3 n, so a small model gets a quick search. From 32 layers on these are the defaults.
    """

    @classmethod
    def for_layers(cls, n: int) -> Any:
        return fit_counts(cls, n)


def fit_counts(config_cls: type, n: int) -> Any:
    """`config_cls`'s defaults with the count options capped for `n` layers (see `DepthOptions`)."""
    default = config_cls()
    limits = {"k": n // 2, "keep_first": n // 4, "keep_last": n // 4, "samples": 3 * n}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return dataclasses.replace(default, **{f: min(getattr(default, f), cap) for f, cap in limits.items() if f in fields})


class Method(abc.ABC):
    """Base class of pruning-method adapters. Subclasses set `name` and a nested `Config`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # True when the method gives a nested removal order (methods/depth/ranked.py), so `stage:<name>` exists
    stage_variant: ClassVar[bool] = False
    # why there is no `stage:<name>`, for the error when one is asked for
    why_no_stage_variant: ClassVar[str] = "it has no removal order to nest"
    # The method's rows in the generated tables (methods/catalog.py; None: made from `summary`).
    # docs/methods.md's methods table: (prefill stage, decode stage, KV handoff), markdown.
    doc_row: ClassVar[tuple[str, str, str] | None] = None
    # docs/baselines.md's table of depth-pruning baselines: (paper, criterion, calibration used).
    baseline_doc: ClassVar[tuple[str, str, str] | None] = None

    @dataclasses.dataclass(frozen=True)
    class Config(Options):
        pass

    @classmethod
    def config_for_layers(cls, n: int) -> Any:
        """`Config.for_layers(n)`, or the Config's defaults when it is not an `Options`."""
        for_layers = getattr(cls.Config, "for_layers", None)
        return for_layers(n) if for_layers is not None else cls.Config()

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()
        try:
            self.validate_config(self.config)
        except UsageError:
            raise
        except (ValueError, TypeError) as e:  # documented as UsageError: a plug-in's ValueError left a traceback (exit 1)
            raise UsageError(f"--set {self.name}: {e}") from e

    def validate_config(self, config: Any) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise `UsageError` for option values that can never be valid (independent of the model)."""

    @abc.abstractmethod
    def plan(self, model: nn.Module, calib: Any | None, mode: str) -> PruningPlan:
        """Decide what to prune for `mode` ('unified' or 'disaggregated'). Must not modify `model`."""

    @contextlib.contextmanager
    def apply(self, model: nn.Module, plan: PruningPlan) -> Iterator[PruningPlan]:
        """Install `plan` on `model` for the duration of the block.

        The PD engine runs a plan's layers directly, with no change to the model, so the default
        installs nothing; a method that must alter the model (e.g. healed weights) overrides this
        and undoes its change on exit.
        """
        yield plan

    def make_plan(self, model: nn.Module, calib: Any | None, mode: str) -> PruningPlan:
        """`plan(...)`, checked to be a `PruningPlan` the record can keep: what the runners call. A plan that is not
        one broke the method's contract (a `PluginContractError` naming its module, exit 2 "fix the plug-in"): a
        TypeError failed the cell as a crash (exit 1, "rerun to retry"), in `latency` naming no module."""
        where = f"{self.name}.plan(...) ({type(self).__module__})"
        try:
            plan = self.plan(model, calib, mode)
        except PlanError as e:  # a plan against its rules: the method's contract broken (exit 2), not a crash to retry
            raise PluginContractError(f"{where} made an invalid plan: {e}") from None
        if not isinstance(plan, PruningPlan):
            raise PluginContractError(f"{where} returned {_shown(plan)}; it must return a PruningPlan "
                                      "(PruningPlan(self.name, arch.n_layers(model), prefill_layers, decode_layers))")
        if plan.method != self.name:  # the record's plan would name another method than the record
            raise PluginContractError(f"{where} returned a plan named {plan.method!r}; name it {self.name!r} "
                                      "(PruningPlan(self.name, ...))")
        if plan.n_layers != arch.n_layers(model):  # its layer indices would name other layers than the model's
            raise PluginContractError(f"{where} returned a plan for {plan.n_layers} layers; the model has "
                                      f"{arch.n_layers(model)} (PruningPlan(self.name, arch.n_layers(model), ...))")
        if mode == "unified" and not plan.is_unified:  # an ordinary forward cannot run two layer sets or a handoff
            raise PluginContractError(f"{where} returned a plan with two layer sets or KV pruning for mode 'unified'; "
                                      "it must return one layer set for both stages and no KV policy there")
        try:  # the record stores it: fail now, naming it, not after the evaluation
            json.dumps(plan.to_dict(), sort_keys=True)  # as the record writer does (mixed key types fail there)
        except (TypeError, ValueError) as e:
            raise PluginContractError(f"{where} returned a plan that cannot be stored as JSON ({e}); it must keep "
                                      "numbers, strings, lists and dicts with string keys in its info") from None
        return plan

    def check_config(self, config: Any, mode: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise the `UsageError` that `plan(model, calib, mode)` would raise for a model of this `config` (the text
        model's), without its weights: a run asks every method before the weights load (`refuse_unfit`), so a KV
        baseline whose policy selects per KV head is refused for a model with a latent KV cache at once, not after
        an 8B model's minutes of loading. The default refuses nothing."""

    def check_depth(self, n: int, mode: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise the `UsageError` that `plan(model, calib, mode)` would raise on an `n`-layer model for a count option
        too deep for it (`too_deep`), without planning: a latency run asks every method first, so `tail.k=8` on 4
        layers is refused at once, not after another method's minute-long search. The default refuses nothing (a
        plug-in's option named `k` need not be a layer count); a method whose `plan` refuses counts overrides it and
        calls it from `plan`, so the two cannot disagree."""

    # the method whose options hold this one's (a KV baseline's `base_options`): it words the `--set` of a hint
    outer: Method | None = None

    def too_deep(self, option: str, value: int, n: int) -> UsageError:
        """The error for count `option` = `value` on an `n`-layer model (at least one layer must stay), with the
        options `config_for_layers(n)` gives for that model where they differ, e.g. `--set shortgpt.k=2`: the
        defaults are sized for real models (k = 8 of 30), so random:tiny failed every cell with nothing to try."""
        fit = self.fitted_counts(n, option)
        given = self.outer.set_args_for_base(fit) if self.outer is not None and fit else \
            " ".join(f"--set {self.name}.{k}={v}" for k, v in fit.items())
        hint = f"; for {n} layers try {given}" if given else ""
        whose = f"{self.outer.name}'s base " if self.outer is not None else ""  # `--methods h2o` named pdtrim alone
        return UsageError(f"{whose}{self.name}.{option}={value}: must be < the model's {n} layers (at least one must "
                          f"stay){hint}")

    def fitted_counts(self, n: int, option: str | None = None) -> dict[str, int]:
        """The depth counts (k, k_decode, keep_last, ...) this config exceeds where `config_for_layers(n)` shrank them
        below the defaults, and `option` (the one too deep) also where the default fits (k=30 of 30 layers: k=8)."""
        fit, default = dataclasses.asdict(self.config_for_layers(n)), dataclasses.asdict(self.Config())
        mine = dataclasses.asdict(self.config)
        depth = [k for k in fit if k == "k" or k.startswith("k_")]  # a count that fits is < n (for_layers may not fit)
        return {k: v for k, v in fit.items() if (k in depth and v < n or k.startswith("keep_"))
                and type(v) is int and (v != default.get(k) or k == option) and mine.get(k, v) > v}

    def set_args_for_base(self, fit: dict[str, int]) -> str:
        """The `--set` that gives this wrapper's base the counts `fit` (a KV baseline overrides it)."""
        return ""

    def needs_replan_on_resume(self) -> bool:
        """True when `apply` needs state that only `plan` builds (e.g. trained weights), so a
        resumed run must call `plan` again rather than reuse the stored plan alone."""
        return False

    def options(self) -> dict[str, Any]:
        """The options as stored in records: every option, less those at their `omitted_defaults` value."""
        omitted = self.omitted_defaults()
        return {k: v for k, v in dataclasses.asdict(self.config).items() if not (k in omitted and v == omitted[k])}

    def omitted_defaults(self) -> dict[str, Any]:
        """Option -> the value at which `options()` leaves it out (so an option added later keeps old run keys): what
        a stored record without that option means, which may differ from today's Config default."""
        return {}


class WrapperMethod(Method):
    """A method that runs another one, `self.inner`: `stage:<base>` (methods/depth/stage.py) and the KV
    baselines. The inner method is built with `methods.registry.instantiate`; the wrapper installs
    what it installs and re-plans on resume when it must (e.g. trained weights live in it)."""

    inner: Method

    def needs_replan_on_resume(self) -> bool:
        return self.inner.needs_replan_on_resume()

    def apply(self, model: nn.Module, plan: PruningPlan) -> contextlib.AbstractContextManager[PruningPlan]:
        return self.inner.apply(model, plan)


def prefill_depth(c) -> int:
    """Blocks the prefill stage removes under stage options `c`: `k_prefill`, or floor(prefill_ratio ·
    k_decode) when `c.prefill_ratio` is set, so a depth sweep over `k_decode` (`--set
    pdtrim.k_decode=2,4,6,8,10 --set pdtrim.prefill_ratio=0.5`) keeps the stages' proportion."""
    ratio = getattr(c, "prefill_ratio", None)
    return c.k_prefill if ratio is None else int(ratio * c.k_decode + 1e-9)


def check_stage_depths(name: str, c) -> None:
    """The stage options `c` of a stage-aware method (PDTrim, stage:<method>), checked once for both: a
    `prefill_ratio` within [0, 1] (`prefill_depth` would leave 0..k_decode), `R_prefill ⊆ R_decode` (0 <= k_prefill,
    or prefill_ratio's, <= k_decode; the refusal says what fits: a k_decode below the default k_prefill 4, `--set
    pdtrim.k_decode=2` or a depth sweep's small values, needs one of them), and `k_unified >= 0`."""
    if c.prefill_ratio is not None and not 0 <= c.prefill_ratio <= 1:
        raise UsageError(f"{name}.prefill_ratio={c.prefill_ratio}: must be within [0, 1] (k_prefill = floor(ratio · k_decode))")
    k_prefill = prefill_depth(c)
    if not 0 <= k_prefill <= c.k_decode:
        fix = (f"; set {name}.k_prefill={c.k_decode} or less too, or {name}.prefill_ratio (k_prefill = floor(ratio · "
               f"k_decode), e.g. {name}.prefill_ratio=0.5, which fits every k_decode of a depth sweep)") if k_prefill > c.k_decode >= 0 else ""
        raise UsageError(f"{name}: need 0 <= k_prefill <= k_decode (R_prefill ⊆ R_decode), got k_prefill={k_prefill}, "
                         f"k_decode={c.k_decode}{fix}")
    if c.k_unified < 0:
        raise UsageError(f"{name}.k_unified={c.k_unified}: must be >= 0")


def refuse_unfit(methods: dict, config: Any, modes: tuple[str, ...] = ("disaggregated",)) -> None:
    """Every method's `check_config` against the model's config in each of `modes`, before the weights load
    (`_ask_every`)."""
    _ask_every(methods, modes, lambda method, mode: method.check_config(config, mode))


def refuse_too_deep(methods: dict, n_layers: int, modes: tuple[str, ...] = ("disaggregated",)) -> None:
    """Every method's counts against the model's depth in each of `modes` (`Method.check_depth`), before any method
    plans: `--set tail.k=8` on a 4-layer model was refused only once the methods before it had planned (PDTrim's search:
    minutes), and a quality run's only in tail's cell, after the cells before it had scored their tasks."""
    _ask_every(methods, modes, lambda method, mode: method.check_depth(n_layers, mode))


def _ask_every(methods: dict, modes: tuple[str, ...], ask) -> None:
    """`ask(method, mode)` for every method in each of `modes`, its `UsageError` raised. A check that fails otherwise
    is left to `plan()`, where a plug-in's failure is its own (noted, and the other methods measured)."""
    for method, mode in ((m, mode) for m in methods.values() for mode in modes):
        try:
            ask(method, mode)
        except UsageError:
            raise
        except Exception:  # noqa: BLE001 - plan() raises it again, as the plug-in's failure
            continue


def _shown(value: object) -> str:
    """What a plug-in returned, briefly: `None`, or its type and a shortened repr (`a dict ({'prefill': [0, 1]})`)."""
    return "None" if value is None else f"a {type(value).__name__} ({reprlib.repr(value)})"
