"""A latency record's figures, from its samples: computed after the rounds, and brought up to date on reuse.

Each registered figure (`harness.latency.figures`) is computed on its own (`compute_each`), so a plug-in figure that
raises on a measurement leaves the samples and the other figures in the record, with its failure (error, workloads,
traceback) in `extra.figure_failures`; the next run that reuses the record computes it again from the samples, and
drops the entry once it works (`latency_run.run_latency` reports the failures, `plugin_faults.Faults`).
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any

from harness.latency.measure import Workload
from harness.store import records as rec
from harness.store.latency import WorkloadLatency
from methods.plugin_code import module_code

FigureErrors = dict[str, tuple[Exception, list[str]]]  # figure -> its first error and the workloads it failed on


def figure_code() -> dict[str, dict[str, str]]:
    """{figure name: digests of its plug-in code} for the registered latency figures that are plug-ins."""
    from harness.latency.figures import FIGURES

    return {name: code for name, fn in FIGURES.items() if (code := module_code({fn.__module__}))}


def measured_figures(bandwidths_gbit, measured: dict, bound_ms: float) -> tuple[dict, dict, dict, FigureErrors]:
    """(figures and samples, kv, measured ms, the figures that failed) by label, from one method's measurements
    (label -> (Measurement, what a real transfer moved or None))."""
    from harness.latency.figures import compute_each, merged

    latency, kv, timing, errors = {}, {}, {}, {}
    for label, (m, moved) in measured.items():
        samples = m.to_dict()
        if moved is not None:
            samples["real_transfer"] = moved
        values, failed = compute_each(m, bandwidths_gbit, decode_bound_ms=bound_ms, real_transfer=moved)
        _note(errors, failed, label)
        latency[label] = WorkloadLatency(merged(values), samples)
        w = m.workload
        kv[label] = {"kv_bytes": m.kv_bytes, "kv_bytes_paged": m.kv_bytes_paged, "handoffs": w.batch_size,
                     "prompt_tokens": w.batch_size * w.prompt_tokens}
        timing[label] = sum(m.ttft_ms) + sum(m.itl_ms) + sum(m.handoff_ms)
    return latency, kv, timing, errors


def _note(errors: FigureErrors, failed: dict[str, Exception], label: str) -> None:
    for name, e in failed.items():
        errors.setdefault(name, (e, []))[1].append(label)


def keep_failures(record: rec.RunRecord, errors: FigureErrors) -> bool:
    """Write `errors` into `record.extra["figure_failures"]` (figure -> its code, error, workloads and traceback),
    removing the key when there are none, and leave the failed figures' digests out of `extra.figure_code`, so that
    the next run computes them again (`refresh_figures`: a figure whose digest differs is recomputed); whether the
    record changed."""
    from harness.latency.figures import FIGURES

    before = record.extra.get("figure_failures"), record.extra.get("figure_code")
    if errors and isinstance(before[1], dict):
        record.extra["figure_code"] = {n: c for n, c in before[1].items() if n not in errors}
    kept: dict[str, Any] = {}
    for name, (e, labels) in errors.items():
        cause = e.__cause__ or e  # the figure's own exception, not the harness's wrapping of it
        fn = FIGURES.get(name)
        kept[name] = {"figure": f"{fn.__module__}.{fn.__qualname__}" if fn else name,
                      "error_type": type(cause).__name__, "error": str(cause)[:2000], "workloads": labels,
                      "traceback": "".join(traceback.format_exception(e))[-8000:]}
    if kept:
        record.extra["figure_failures"] = kept
    else:
        record.extra.pop("figure_failures", None)
    return before != (record.extra.get("figure_failures"), record.extra.get("figure_code"))


def refresh_figures(cfg, record: rec.RunRecord, errors: FigureErrors | None = None) -> list[str]:
    """Bring `record`'s figures (in place) up to the registered figures, computed from its raw samples: those
    registered since it was made, and a plug-in figure's whose code changed since (`extra.figure_code`); the names
    of the values added or changed. The package's figures it holds stay as measured; a workload whose samples are
    incomplete is left as it is. The figures that fail go into `errors` (and are left out). `cfg`: the run's
    `LatencyConfig` (its link bandwidths)."""
    from harness.latency.figures import compute_each, merged
    from harness.latency.measure import Measurement

    bound = record.extra.get("decode_bound") or {}
    bound_ms = bound["weight_bytes"] / bound["copy_bandwidth_bytes_per_s"] * 1e3 \
        if bound.get("weight_bytes") and bound.get("copy_bandwidth_bytes_per_s") else None
    code, then = figure_code(), record.extra.get("figure_code") or {}
    stale = [n for n, c in code.items() if then.get(n) != c]
    changed: set[str] = set()
    for label, wl in record.latency.items():
        fields = {f.name for f in dataclasses.fields(Measurement)} - {"handoff", "workload"}
        try:
            m = Measurement(**{k: v for k, v in wl.samples.items() if k in fields}, workload=Workload(**wl.samples["workload"]))
        except (KeyError, TypeError, ValueError):  # these samples' layout (an older one)
            code = {n: c for n, c in code.items() if n not in stale} | {n: c for n, c in then.items() if n in stale}
            continue  # left as it is, and its stale figures' old digests kept: a later run tries again
        values, failed = compute_each(m, cfg.bandwidths_gbit, decode_bound_ms=bound_ms,
                                      real_transfer=wl.samples.get("real_transfer"))
        _note(errors if errors is not None else {}, failed, label)
        now = merged(values)
        redo = {k for n in stale for k in values.get(n, {})}  # the keys an edited figure returns, no other's
        # a value an edited figure no longer returns stays: which figure returned a key is not recorded, and a name's
        # prefix does not tell (a plug-in `ttft` beside the package's `ttft_ms`)
        new = {k: v for k, v in now.items() if (k not in wl.figures or k in redo) and wl.figures.get(k) != v}
        wl.figures.update(new)
        changed |= set(new)
    if code or "figure_code" in record.extra:
        record.extra["figure_code"] = code
    return sorted(changed)

