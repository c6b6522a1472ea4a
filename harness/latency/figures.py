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

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.latency.measure import DEFAULT_BANDWIDTHS_GBIT, Measurement, e2e_ms, percentile, summarize, transfer_ms


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
        if name in FIGURES:
            raise ValueError(f"latency figure {name!r} registered twice")
        FIGURES[name] = fn
        return fn
    return register


def compute(m: Measurement, bandwidths_gbit: Sequence[float] = DEFAULT_BANDWIDTHS_GBIT, **context: Any) -> dict[str, float]:
    """Every registered figure of `m` (`context`: the other `FigureInputs` fields)."""
    inputs = FigureInputs(m, tuple(bandwidths_gbit), **context)
    out: dict[str, float] = {}
    for name, fn in FIGURES.items():
        values = fn(inputs)
        stray = [k for k in values if not k.startswith(name)]
        if stray:
            raise ValueError(f"latency figure {name!r} returned {stray}: each value's name must start with {name!r}")
        out.update({k: float(v) for k, v in values.items()})
    return out


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
