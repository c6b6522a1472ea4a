"""Latency figures as plug-ins: one function per figure, registered by name.

A figure function takes the `FigureInputs` of one (plan, workload) — the raw `Measurement`, the link
bandwidths, and what the run knows besides the clocks (the decode bound, a real transfer) — and
returns `{value_name: value}`; every value's name starts with the figure's name and carries the unit
(`ttft_ms` gives `ttft_ms_p50`, `ttft_ms_p90`, ...). It returns `{}` when it does not apply (no
decode steps, no real transfer). `compute` runs every registered figure in registration order; the
latency runner stores the result as `RunRecord.latency[workload].figures` next to the raw samples,
and `summary.csv`, the reports and the regression check read figures by name. Adding a figure is
one decorated function here (see docs/adding.md, "A latency figure").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import PluginContractError, UsageError
from harness.latency.measure import DEFAULT_BANDWIDTHS_GBIT, Measurement, Workload, e2e_ms, percentile, summarize, transfer_ms
from harness.registration import check_callable_as, same_definition


@dataclass(frozen=True)
class FigureInputs:
    m: Measurement
    bandwidths_gbit: tuple[float, ...] = DEFAULT_BANDWIDTHS_GBIT
    decode_bound_ms: float | None = None  # the plan's decode weight bytes / device copy rate (latency_run)
    real_transfer: dict[str, Any] | None = None  # what `harness.latency.transfer` measured, when asked


FigureFn = Callable[[FigureInputs], dict[str, float]]
FIGURES: dict[str, FigureFn] = {}


def figure(name: str) -> Callable[[FigureFn], FigureFn]:
    """Register `fn` as the figure `name` (a unit-carrying prefix of the names it returns)."""
    def register(fn: FigureFn) -> FigureFn:
        check_callable_as(f"latency figure {name!r} ({fn.__module__}.{fn.__qualname__})", fn,
                          f"{getattr(fn, '__name__', 'figure')}(inputs)")
        old = FIGURES.get(name)
        if old is not None and not same_definition(old, fn):  # a reload replaces
            raise ValueError(f"latency figure {name!r} registered twice")
        FIGURES[name] = fn
        return fn
    return register


def compute(m: Measurement, bandwidths_gbit: Sequence[float] = DEFAULT_BANDWIDTHS_GBIT, **context: Any) -> dict[str, float]:
    """Every registered figure of `m` (`context`: the other `FigureInputs` fields), in registration order; the first
    figure that fails raises its error (`compute_each`)."""
    values, failed = compute_each(m, bandwidths_gbit, **context)
    if failed:
        raise next(iter(failed.values()))
    return merged(values)


def merged(values: dict[str, dict[str, float]]) -> dict[str, float]:
    """`compute_each`'s {figure: its values} as one {value name: number} (a record's `figures`)."""
    return {k: v for figure_values in values.values() for k, v in figure_values.items()}


def compute_each(m: Measurement, bandwidths_gbit: Sequence[float] = DEFAULT_BANDWIDTHS_GBIT,
                 **context: Any) -> tuple[dict[str, dict[str, float]], dict[str, UsageError]]:
    """({figure name: its values}, {figure name: why it failed}) for every registered figure of `m`, each on its own:
    one that fails leaves the others' values (the latency runner keeps them and the samples). A figure that raises is
    a `UsageError` naming it and its module, raised from its own exception; one that returns anything but {name
    starting with the figure's: a finite number} a `PluginContractError`."""
    inputs = FigureInputs(m, tuple(bandwidths_gbit), **context)
    values: dict[str, dict[str, float]] = {}
    failed: dict[str, UsageError] = {}
    for name, fn in FIGURES.items():
        try:
            values[name] = _unclaimed(name, fn, _checked(name, fn, inputs), values)
        except UsageError as e:
            failed[name] = e
    return values, failed


def _unclaimed(name: str, fn: FigureFn, returned: dict[str, float], earlier: dict[str, dict[str, float]]) -> dict[str, float]:
    """`returned`, unless it names a value an earlier figure returned: a record holds one number per name, so a plug-in
    figure `tpot` returning `tpot_ms_p50` (its name is a prefix of that value's too) silently replaced the package's
    measured TPOT in the record, the efficiency table and the regression check. The later figure fails instead."""
    for other, its in earlier.items():
        taken = sorted(set(returned) & set(its))
        if taken:
            owner = FIGURES[other]
            raise PluginContractError(
                f"latency figure {name!r} returned {taken}, which latency figure {other!r} "
                f"({owner.__module__}.{owner.__qualname__}) returns already: a value name belongs to one figure; "
                f"give the figure a name no other figure's values start with ({fn.__module__}.{fn.__qualname__})")
    return returned


def _checked(name: str, fn: FigureFn, inputs: FigureInputs) -> dict[str, float]:
    """The values of figure `name` on `inputs`, checked."""
    where, its = f"latency figure {name!r}", f" ({fn.__module__}.{fn.__qualname__})"
    try:
        values = fn(inputs)
    except Exception as e:  # noqa: BLE001 - a figure's own error, named
        raise UsageError(f"{where} failed: {type(e).__name__}: {e}{its}; fix it, or leave its module out") from e
    if not isinstance(values, dict):
        raise PluginContractError(f"{where} returned a {type(values).__name__}; expected a dict of {{value name: number}}{its}")
    stray = [k for k in values if not str(k).startswith(name)]
    if stray:
        raise PluginContractError(f"{where} returned {stray}: each value's name must start with {name!r}{its}")
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise PluginContractError(f"{where} returned {bad}: each value must be a finite number (leave a value out "
                                  f"instead){its}")
    return {k: float(v) for k, v in values.items()}


def check(bandwidths_gbit: Sequence[float] = DEFAULT_BANDWIDTHS_GBIT) -> None:
    """Run every figure on a small made-up measurement (two runs of two decode steps), so that a figure that fails
    does so before minutes of measuring, not after (`compute`'s UsageError)."""
    m = Measurement("check", Workload(8, 3, 1), "perf_counter_ns", ttft_ms=[2.0, 2.5], handoff_ms=[0.1, 0.2],
                    itl_ms=[1.0, 1.1, 1.2, 1.3], tpot_ms=[1.05, 1.25], kv_bytes=4096, kv_bytes_paged=8192)
    compute(m, bandwidths_gbit, decode_bound_ms=0.5)


def _tpot_median(m: Measurement) -> float:
    return statistics.median(m.tpot_ms) if m.tpot_ms else 0.0


@figure("ttft_ms")
def ttft(x: FigureInputs) -> dict[str, float]:
    """Prefill plus the first token, per measured run: p50, p90, p99, mean."""
    return summarize("ttft_ms", x.m.ttft_ms)


@figure("handoff_ms")
def handoff(x: FigureInputs) -> dict[str, float]:
    """Packing the decode layers' KV under the plan's policy plus unpacking it."""
    return summarize("handoff_ms", x.m.handoff_ms)


@figure("itl_ms")
def itl(x: FigureInputs) -> dict[str, float]:
    """Every decode step of every measured run (none for a one-token workload)."""
    return summarize("itl_ms", x.m.itl_ms) if x.m.itl_ms else {}


@figure("tpot_ms")
def tpot(x: FigureInputs) -> dict[str, float]:
    """Mean decode step of each measured run."""
    return summarize("tpot_ms", x.m.tpot_ms) if x.m.itl_ms else {}


@figure("transfer_ms")
def transfer(x: FigureInputs) -> dict[str, float]:
    """Modelled: the paged KV bytes over each link bandwidth."""
    return {f"transfer_ms@{bw:g}gbit": transfer_ms(x.m.kv_bytes_paged, bw) for bw in x.bandwidths_gbit}


@figure("e2e_ms")
def e2e(x: FigureInputs) -> dict[str, float]:
    """TTFT p50 + modelled transfer + (decode_tokens − 1) · median TPOT, per bandwidth."""
    ttft_p50 = percentile(x.m.ttft_ms, 50)
    return {f"e2e_ms_p50@{bw:g}gbit": e2e_ms(ttft_p50, transfer_ms(x.m.kv_bytes_paged, bw), _tpot_median(x.m),
                                              x.m.workload.decode_tokens) for bw in x.bandwidths_gbit}


@figure("decode_bound_ms")
def decode_bound(x: FigureInputs) -> dict[str, float]:
    """Lower bound of one decode step: reading the decode weights once at the device's copy rate."""
    return {} if x.decode_bound_ms is None else {"decode_bound_ms": x.decode_bound_ms}


@figure("real_transfer_recv_ms")
def real_transfer(x: FigureInputs) -> dict[str, float]:
    """Receiving one handoff moved between two processes (`--real-transfer`)."""
    return {} if x.real_transfer is None else {"real_transfer_recv_ms": x.real_transfer["recv_ms"]}
