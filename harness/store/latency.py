"""The latency part of a run record: figures per workload as a typed field, with the raw samples.

Torch-free (reports and the regression check read it). A latency record holds, per workload label
(`latency_T256_n8_b1`, `..._static`), a `WorkloadLatency`: the figures computed by the registered
figure functions of `harness/latency/figures.py` (the name carries the unit: `ttft_ms_p50`,
`transfer_ms@100gbit`) and the raw samples they came from (per-run TTFT, handoff and TPOT, every
decode step's ITL, the clock, the workload, the decode mode, a real transfer when one was made).

Schema 1 records stored figures as fake scores (`scores[workload][figure] = {"value", "stderr": None}`)
and the samples in `extra.latency`; `upgrade_v1` converts them when they are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkloadLatency:
    """Figures of one workload (ms unless the name says otherwise) and the raw samples behind them."""

    figures: dict[str, float] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)

    def get(self, figure: str) -> float | None:
        return self.figures.get(figure)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadLatency:
        return cls(figures={k: float(v) for k, v in d.get("figures", {}).items()}, samples=dict(d.get("samples", {})))


def upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record dict in schema-2 form (a new dict). A latency record's fake scores become
    `latency[workload].figures`, its `extra.latency[workload]` the samples; quality records only gain
    an empty `latency`."""
    out = {**d, "schema_version": 2, "latency": {}}
    if d.get("config", {}).get("kind") != "latency":
        return out
    extra = dict(d.get("extra", {}))
    raw = extra.pop("latency", {})
    out["latency"] = {
        label: {"figures": {m: v["value"] for m, v in metrics.items() if v.get("value") is not None},
                "samples": raw.get(label, {})}
        for label, metrics in d.get("scores", {}).items()
    }
    out["scores"], out["extra"] = {}, extra
    return out
