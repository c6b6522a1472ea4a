"""`python -m harness latency`: per-stage latency of each method's plan over a workload grid.

Writes one `RunRecord` per method (mode `disaggregated`; "tasks" are workloads named
`latency_T{prompt}_n{decode}_b{batch}`, "metrics" the figures such as `ttft_ms_p50`, KV bytes in
`kv`), raw samples in `extra.latency`, and `summary.csv`, like a quality run. Plans come from a
quality run's records (`--plans-from`, so a plan searched on real weights can be replayed on a
random-weight shape with the same layer count) or are made here by the methods themselves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.latency.measure import DEFAULT_BANDWIDTHS_GBIT, Workload, measure
from harness.pd.plan import PruningPlan
from harness.pd.static_decode import copy_bandwidth_bytes_per_s, weight_bytes
from harness.store import records as rec


@dataclass(frozen=True)
class LatencyConfig:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("unpruned", "shortgpt")
    prompt_tokens: tuple[int, ...] = (512, 2048, 8192)
    decode_tokens: tuple[int, ...] = (128,)
    batch_sizes: tuple[int, ...] = (1, 8)
    bandwidths_gbit: tuple[float, ...] = DEFAULT_BANDWIDTHS_GBIT
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None
    plans_from: str | None = None
    decode_modes: tuple[str, ...] = ("eager",)  # eager, static, graph (CUDA only)
    real_transfer: bool = False  # also move one handoff per workload between two processes
    overrides: tuple[str, ...] = ()

    def workloads(self) -> list[Workload]:
        return [Workload(t, n, b) for t, n, b in itertools.product(self.prompt_tokens, self.decode_tokens, self.batch_sizes)]

    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def identity(self, method: str, options: dict, plan: dict) -> str:
        canon = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("methods", "overrides", "plans_from")}
        canon.update(method=method, options=options, plan=plan)
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]


def workload_name(w: Workload, decode_mode: str = "eager") -> str:
    base = f"latency_T{w.prompt_tokens}_n{w.decode_tokens}_b{w.batch_size}"
    return base if decode_mode == "eager" else f"{base}_{decode_mode}"


def replayed_plans(plans_from: str, n_layers: int) -> dict[str, PruningPlan]:
    """Disaggregated plans of the records in `plans_from`, checked against the model's layer count."""
    folder = Path(plans_from)
    if not folder.is_dir():
        raise UsageError(f"--plans-from {plans_from}: not a folder of run records")
    out = {}
    for r in rec.load_dir(folder):
        if r.mode == "disaggregated":
            plan = PruningPlan.from_dict(r.plan)
            if plan.n_layers != n_layers:
                raise UsageError(f"--plans-from: {r.method}'s plan is for {plan.n_layers} layers, the model has {n_layers}")
            out[r.method] = plan
    return out


def run_latency(cfg: LatencyConfig, prepared, out_dir: Path, loaded, say: Callable[[str], None]) -> list[rec.RunRecord]:
    from harness.pd import arch
    from harness.quality.calibration import build_calibration
    from harness.run.env import env_info

    model = loaded.model
    n = arch.n_layers(model)
    replay = replayed_plans(cfg.plans_from, n) if cfg.plans_from else {}
    env = env_info(str(arch.model_device(model)))
    copy_bw = copy_bandwidth_bytes_per_s(arch.model_device(model))
    calib = None
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, method in prepared.methods.items():
        if name in replay:
            plan, source = replay[name], {"replayed_from": str(Path(cfg.plans_from).resolve())}
        else:
            if method.needs_calibration and calib is None:
                calib = build_calibration(loaded.tokenizer, Path(cfg.data_dir) if cfg.data_dir else None, prepared.calib_config)
            say(f"{name}: planning")
            plan, source = method.plan(model, calib, "disaggregated"), {"planned_on": cfg.model}
        key = cfg.identity(name, method.options(), plan.to_dict())
        path = out_dir / rec.record_filename(name, "disaggregated")
        old = rec.load(path) if path.exists() else None
        if old is not None and old.run_key == key:
            say(f"{name}: finished record found, reused")
            results.append(old)
            continue
        step_bytes = weight_bytes(model, plan.decode_layers)
        with method.apply(model, plan) as applied:
            scores, kv, raw, timing = _measure_workloads(cfg, model, applied, name, step_bytes / copy_bw * 1e3, say)
        bound = {"weight_bytes": step_bytes, "copy_bandwidth_bytes_per_s": copy_bw}
        record = _latency_record(cfg, name, method, key, plan, env, loaded.description, (scores, kv, raw, timing), bound, source)
        rec.save(record, out_dir)
        results.append(rec.load(path))
    rec.write_summary(rec.load_dir(out_dir), out_dir / "summary.csv")
    return results


def _latency_record(cfg: LatencyConfig, name: str, method, key: str, plan, env: dict, model_desc: dict, measured: tuple,
                    bound: dict, source: dict) -> rec.RunRecord:
    """The latency RunRecord of one method: figures as scores, raw samples in `extra.latency`."""
    scores, kv, raw, timing = measured
    return rec.RunRecord(
        method=name, mode="disaggregated", run_key=key,
        config={**dataclasses.asdict(cfg), "kind": "latency", "method_options": method.options()},
        plan=plan.to_dict(), environment=env, model=model_desc, calibration=None,
        scores=scores, kv=kv, n_samples={k: cfg.repeats for k in scores}, lm_eval={},
        timing_s={f"measured_{k}": v / 1e3 for k, v in timing.items()},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"latency": raw, "clock": next(iter(raw.values()))["clock"] if raw else None,
               "decode_bound": {**bound,
                                "definition": "bytes of the decode layers, final norm and LM head / device copy rate (read + write)"},
               "bandwidths_gbit": list(cfg.bandwidths_gbit), "plan_source": source},
    )

def _measure_workloads(cfg: LatencyConfig, model, applied, name: str, bound_ms: float, say: Callable[[str], None]):
    """Time the applied plan on every (workload, decode mode): (scores, kv, raw samples, measured ms) by label."""
    scores, kv, raw, timing = {}, {}, {}, {}
    for w, mode in itertools.product(cfg.workloads(), cfg.decode_modes):
        label = workload_name(w, mode)
        say(f"{name}: {label}")
        m = measure(model, applied, w, warmup=cfg.warmup, repeats=cfg.repeats, seed=cfg.seed, decode_mode=mode)
        figs = {**m.figures(cfg.bandwidths_gbit), "decode_bound_ms": bound_ms}
        scores[label] = {k: {"value": float(v), "stderr": None} for k, v in figs.items() if not k.startswith("kv_bytes")}
        kv[label] = {"kv_bytes": m.kv_bytes, "kv_bytes_paged": m.kv_bytes_paged, "handoffs": w.batch_size,
                     "prompt_tokens": w.batch_size * w.prompt_tokens}
        raw[label] = m.to_dict()
        if cfg.real_transfer:
            raw[label]["real_transfer"] = _real_transfer(m, f"{name} {label}")
            scores[label]["real_transfer_recv_ms"] = {"value": raw[label]["real_transfer"]["recv_ms"], "stderr": None}
        timing[label] = sum(m.ttft_ms) + sum(m.itl_ms) + sum(m.handoff_ms)
    return scores, kv, raw, timing


def _real_transfer(m, what: str) -> dict:
    """Move the measured handoff between two processes; the bytes received must equal the bytes counted."""
    import torch

    from harness.latency.transfer import transfer_backend, transfer_between_processes, transfer_shared

    backend = transfer_backend(m.clock, torch.cuda.device_count() if m.clock == "cuda_events" else 0)
    if backend == "cuda_ipc":
        moved = transfer_shared(m.handoff, str(next(iter(m.handoff.keys.values())).device))
    else:
        moved = transfer_between_processes(m.handoff, backend)
    moved.pop("received")
    if moved["kv_bytes_received"] != m.kv_bytes:
        raise RuntimeError(f"{what}: received {moved['kv_bytes_received']} KV bytes, counted {m.kv_bytes}")
    return moved
