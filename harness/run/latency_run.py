"""`python -m harness latency`: per-stage latency of each method's plan over a workload grid.

Writes one `RunRecord` per method (mode `disaggregated`; per workload named
`latency_T{prompt}_n{decode}_b{batch}`: the registered figures (`harness.latency.figures`) such as
`ttft_ms_p50` and the raw samples in `latency[workload]`, KV bytes in `kv[workload]`), and
`summary.csv`, like a quality run. Plans come from a
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
from time import perf_counter
from typing import Any

from harness.errors import RoundsInterrupted, UsageError
from harness.latency.measure import DEFAULT_BANDWIDTHS_GBIT, Workload, beyond_context, measure
from harness.pd.static_decode import copy_bandwidth_bytes_per_s, weight_bytes
from harness.run.latency_figures import figure_code, keep_failures, measured_figures, refresh_figures
from harness.run.latency_plans import not_replayed, plans_to_time, replayed_plans
from harness.run.made_on import latency_measured_on
from harness.run.plugin_faults import Faults
from harness.run.progress import still_running
from harness.store import records as rec
from methods.plugin_code import plugin_code, policy_code

__all__ = ["LatencyConfig", "run_latency", "refresh_figures", "refuse_edited_plugins", "replayed_plans"]


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
    model_args: str | None = None  # from_pretrained options, canonical "key=value,..." (harness.pd.models.MODEL_ARGS)
    device_map: str | None = None  # --device-map: the model spread over GPUs (accelerate), timed by host + synchronize
    max_memory: str | None = None
    offload_folder: str | None = None  # a path: not part of a record's identity

    def placement(self):
        from harness.pd.models import Placement

        return Placement.parse(self.device_map, self.max_memory, self.offload_folder)

    def workloads(self) -> list[Workload]:
        return [Workload(t, n, b) for t, n, b in itertools.product(self.prompt_tokens, self.decode_tokens, self.batch_sizes)]

    def run_id(self, with_paths: bool = False, include_paths: bool = False) -> str:
        """The id in a default output folder's name; the data folder (calibration only: the plans are what count)
        is left out unless `with_paths`, the id of versions before, so a moved checkout finds its folder again.
        (`include_paths`: as `RunConfig.run_id` takes it; a latency run has no --include-path.)"""
        canon = _set_fields(dataclasses.asdict(self))
        if not with_paths:
            canon.pop("data_dir")
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def identity(self, method: str, options: dict, plan: dict) -> str:
        return latency_identity(dataclasses.asdict(self), method, options, plan)


# config keys that do not change a record; data_dir feeds only calibration, whose outcome (the plan) is in the key,
# and is a path: the same records in a clone elsewhere are the same measurements
NOT_IDENTITY = ("methods", "overrides", "plans_from", "kind", "method_options", "data_dir", "offload_folder")


# fields added later, left out of ids and identities when unset (old ones stay valid)
ADDED_UNSET = ("model_args", "device_map", "max_memory", "offload_folder")


def _set_fields(config: dict) -> dict:
    """`config` less the `ADDED_UNSET` fields it leaves unset (None)."""
    return {k: v for k, v in config.items() if not (k in ADDED_UNSET and v is None)}


def latency_identity(config: dict, method: str, options: dict, plan: dict) -> str:
    """The run key of one method's latency record: what is measured (configuration, method options, the plan's
    layer sets and KV policy), not how long planning took (a plan's `info` holds its timings)."""
    canon = {k: v for k, v in _set_fields(config).items() if k not in NOT_IDENTITY}
    canon.update(method=method, options=options, plan={k: v for k, v in plan.items() if k != "info"})
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_json(x: Any) -> Any:
    """`x` as a record stores it (tuples as lists, other objects as text): what identities compare."""
    return json.loads(json.dumps(x, default=str))


def record_identity(record: rec.RunRecord, method) -> str:
    """`record`'s identity as compared with `current_identity`: configuration fields and method options added since it was
    made count at their defaults (a new option must not invalidate a finished measurement)."""
    from harness.config import DTYPES
    from harness.run.reuse import with_defaults

    config = {**_as_json(dataclasses.asdict(LatencyConfig())), **record.config}
    config["dtype"] = DTYPES.get(config["dtype"], config["dtype"])  # "fp32" as versions before full names stored it
    return latency_identity(config, record.method, with_defaults(method, record.config.get("method_options", {})), record.plan)


def current_identity(cfg: LatencyConfig, name: str, method, plan: dict) -> str:
    """This run's identity of `name`'s record, comparable with `record_identity`: every option at its value, also
    those `method.options()` leaves out at their defaults (a KV baseline's policy options), as the stored side has."""
    from harness.run.reuse import with_defaults

    return latency_identity(_as_json(dataclasses.asdict(cfg)), name, with_defaults(method, method.options()), plan)


def workload_name(w: Workload, decode_mode: str = "eager") -> str:
    base = f"latency_T{w.prompt_tokens}_n{w.decode_tokens}_b{w.batch_size}"
    return base if decode_mode == "eager" else f"{base}_{decode_mode}"


def run_latency(cfg: LatencyConfig, prepared, out_dir: Path, loaded, say: Callable[[str], None],
                replay: dict | None = None) -> list[rec.RunRecord]:
    """Plan, measure and record every method (a finished record in `out_dir` is reused); the records, in the methods'
    order. A plug-in that fails leaves the others measured and recorded, and ends it with `PluginsFailed`
    (`harness.run.plugin_faults`) once every record is saved. `replay`: `latency_plans.plans_to_time`'s, when the
    caller checked the plans before loading the model."""
    from harness.pd import arch
    from harness.run.env import env_info

    model = loaded.model
    if words := beyond_context(cfg.workloads(), model.config):
        say(f"warning: {words}")
    env = env_info(str(arch.model_device(model)))
    copy_bw = copy_bandwidth_bytes_per_s(arch.model_device(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    faults = Faults(out_dir, say)
    results, todo = {}, []
    # every plan and its record's fate first: a record of another configuration is refused before anything is measured
    for name, method, plan, source, key, old in _planned(cfg, prepared, out_dir, loaded, say, faults, replay):
        if old is not None:
            results[name] = _reused(cfg, name, old, out_dir, say, faults)
        else:
            todo.append((name, method, plan, source, key))
    bounds = {name: weight_bytes(model, plan.decode_layers) for name, _, plan, _, _ in todo}
    faults.keys.update((name, key) for name, _, _, _, key in todo)  # for the note of a plan that fails measured
    try:
        measured = _measure_interleaved(cfg, model, [(n, m, p) for n, m, p, _, _ in todo], say, faults)
    except KeyboardInterrupt:  # not before: a model loading or a method planning has measured nothing yet
        raise RoundsInterrupted from None
    for name, method, plan, source, key in todo:
        if name not in measured:  # its plug-in failed: noted
            continue
        bound = {"weight_bytes": bounds[name], "copy_bandwidth_bytes_per_s": copy_bw}
        *figures, errors = measured_figures(cfg.bandwidths_gbit, measured[name], bounds[name] / copy_bw * 1e3)
        record = _latency_record(cfg, name, method, key, plan, env, loaded.description, figures, bound, source)
        keep_failures(record, errors)
        path = rec.save(record, out_dir)
        faults.clear(name)
        faults.figures(name, errors, path)
        results[name] = rec.load(path)
    rec.refresh_summary(out_dir)  # an unreadable record in the folder is named and skipped
    done = [results[name] for name in prepared.methods if name in results]
    faults.check(done)
    return done


def _reused(cfg: LatencyConfig, name: str, old: rec.RunRecord, out_dir: Path, say: Callable[[str], None],
            faults: Faults) -> rec.RunRecord:
    """A finished record, its figures brought up to date from its samples (saved when they changed)."""
    errors: dict = {}
    code_then = old.extra.get("figure_code")
    added = refresh_figures(cfg, old, errors)  # figures registered or edited since: computed from its samples
    failures_changed = keep_failures(old, errors)
    if added or failures_changed or old.extra.get("figure_code") != code_then:
        rec.save(old, out_dir)
    say(f"{name}: finished record found, reused" + (f"; figures added or recomputed from its samples: "
                                                      f"{', '.join(added)}" if added else ""))
    faults.clear(name)
    faults.figures(name, errors, out_dir / old.filename)
    return old


def refuse_edited_plugins(out_dir: Path, methods: dict) -> None:
    """A UsageError naming the latency records in `out_dir` that a plug-in method's older code measured (`methods`:
    name -> Method): checked before any work, as a spec checks its sections before the first runs."""
    from harness.run.reuse import other_code

    found = []
    for name, method in methods.items():
        path = Path(out_dir) / rec.record_filename(name, "disaggregated")
        try:
            old = rec.load(path) if path.exists() else None
        except rec.RecordError:
            continue  # unreadable: the run names it
        if old is not None and (edited := other_code(old, method)):
            found.append(f"{path.name} ({', '.join(edited)} changed since)")
    if found:
        raise UsageError(f"{out_dir} holds latency records measured with other code of a plug-in method: {', '.join(found)}; "
                         "use another out, or remove them to measure again")


def _planned(cfg: LatencyConfig, prepared, out_dir: Path, loaded, say: Callable[[str], None],
             faults: Faults | None = None, replay: dict | None = None) -> list[tuple]:
    """(name, method, plan, plan source, run key, the finished record to reuse or None) per method; a record of
    another configuration (another run's latency, or a quality run's record of the same name) raises `UsageError`,
    as a quality run refuses it, rather than being overwritten. A plug-in method whose planning fails is noted in
    `faults` and left out."""
    from harness.pd import arch
    from harness.quality.calibration import build_calibration

    model = loaded.model
    if replay is None:  # not checked before the weights loaded (the CLI does, from the config's depth)
        replay = plans_to_time(cfg.plans_from, arch.n_layers(model), prepared.methods)
    calib, out = None, []
    for name, method in prepared.methods.items():
        if name in replay:
            plan, source = replay[name], {"replayed_from": str(Path(cfg.plans_from).resolve())}
        else:
            if method.needs_calibration and calib is None:
                calib = build_calibration(loaded.tokenizer, Path(cfg.data_dir) if cfg.data_dir else None, prepared.calib_config)
            if cfg.plans_from:  # e.g. a folder without this method's disaggregated record: say so before the search
                say(f"{name}: {not_replayed(method, cfg.plans_from)}; planning afresh")
            say(f"{name}: planning")
            try:
                plan, source = method.make_plan(model, calib, "disaggregated"), {"planned_on": cfg.model}
            except Exception as e:  # noqa: BLE001 - a plug-in's failure is noted (the harness's own raised again)
                if faults is None:
                    raise
                faults.method(name, method, e)
                continue
        plan_json = _as_json(plan.to_dict())
        key = latency_identity(_as_json(dataclasses.asdict(cfg)), name, _as_json(method.options()), plan_json)
        path = out_dir / rec.record_filename(name, "disaggregated")
        old = rec.load_cell(path) if path.exists() else None  # an unreadable cell file: refused, not replaced
        kind = old.config.get("kind", "quality") if old is not None else None
        if old is not None and (kind != "latency" or record_identity(old, method) != current_identity(cfg, name, method, plan_json)):
            differs = _config_diff(old, cfg) if kind == "latency" else ""
            raise UsageError(f"{path} holds a {name}/disaggregated {kind} record of a different configuration "
                             f"(run_key {old.run_key}; this run's {key}{'; ' + differs if differs else ''}); use another "
                             "--out or remove it")
        if old is not None:
            latency_measured_on(path, old, arch.model_device(model).type)
            _refuse_other_placement(path, old, loaded.description.get("device_map"))
        out.append((name, method, plan, source, key, old))
    return out


def _config_diff(old: rec.RunRecord, cfg: LatencyConfig) -> str:
    """'device_map=None there, 'auto' here' for the identity's configuration fields that differ between `old` and this
    run ('' when only method options or the plan differ)."""
    from harness.config import DTYPES
    from harness.run.reuse import options_diff

    def fields(config: dict) -> dict:
        return {k: v for k, v in _set_fields(config).items() if k not in NOT_IDENTITY}

    then = {**_as_json(dataclasses.asdict(LatencyConfig())), **old.config}
    then = fields({**then, "dtype": DTYPES.get(then["dtype"], then["dtype"])})  # as record_identity reads it
    diff = options_diff(then, fields(_as_json(dataclasses.asdict(cfg))), "there", "here")
    return f"configuration: {diff}" if diff else ""


def _refuse_other_placement(path: Path, old: rec.RunRecord, now: dict | None) -> None:
    """A finished record of a model placed otherwise (`--device-map auto` spreads it over every GPU the machine has, so
    the same flags place it differently on another machine: on one GPU timed by CUDA events, over two by the host's
    clock) is not this run's measurement; `now`: this run's modules per device (None: not placed)."""
    then = (old.model or {}).get("device_map")
    if _as_json(then) != _as_json(now):
        raise UsageError(f"{path} holds a {old.method} latency record of the model placed {then or 'unplaced'} (modules "
                         f"per device), and this run places it {now or 'unplaced'}; use another --out (or the machine "
                         "and --max-memory it was measured with), or remove it")


def _latency_record(cfg: LatencyConfig, name: str, method, key: str, plan, env: dict, model_desc: dict, measured: tuple,
                    bound: dict, source: dict) -> rec.RunRecord:
    """The latency RunRecord of one method: figures and raw samples per workload in `latency`."""
    latency, kv, timing = measured
    clock = next(iter(latency.values())).samples["clock"] if latency else None
    return rec.RunRecord(
        method=name, mode="disaggregated", run_key=key,
        config={**dataclasses.asdict(cfg), "kind": "latency", "method_options": method.options()},
        plan=plan.to_dict(), environment=env, model=model_desc, calibration=None,
        scores={}, latency=latency, kv=kv, n_samples={k: cfg.repeats for k in latency}, lm_eval={},
        timing_s={f"measured_{k}": v / 1e3 for k, v in timing.items()},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"clock": clock,
               "decode_bound": {**bound,
                                "definition": "bytes of the decode layers, final norm and LM head / device copy rate (read + write)"},
               "bandwidths_gbit": list(cfg.bandwidths_gbit), "plan_source": source,
               **({"plugin_code": code} if (code := {**plugin_code(method), **policy_code(plan.to_dict())}) else {}),
               **({"figure_code": figs} if (figs := figure_code()) else {})},
    )

def _measure_interleaved(cfg: LatencyConfig, model, todo: list[tuple], say: Callable[[str], None],
                         faults: Faults | None = None) -> dict[str, dict]:
    """Per method, per label (workload and decode mode): the `Measurement` of `cfg.repeats` runs after
    `cfg.warmup`, and what a real handoff between two processes moved (None unless `cfg.real_transfer`).

    The plans are measured in rounds, one run of every (plan, label) per round (warm-up runs in the first
    round), so each plan's repeats sample the same stretches of the machine's load: on a shared machine
    another job slows ops by a factor that changes from minute to minute, and plans measured one after the
    other minutes apart then differ by the load, not by their layers. Applying a plan copies no weights.
    A plug-in method that fails while measured (its KV policy's `keep()`) is noted in `faults` and left out of the
    later rounds and of the result (without `faults`, or for the harness's own error, it is raised)."""
    out: dict[str, dict] = {name: {} for name, _, _ in todo}
    moved: dict[tuple[str, str], dict] = {}
    labels = [(w, mode, workload_name(w, mode)) for w, mode in itertools.product(cfg.workloads(), cfg.decode_modes)]
    eta = _Eta(cfg.repeats, [(name, label) for name, _, _ in todo for _, _, label in labels], cfg.real_transfer)
    for r in range(cfg.repeats):
        for name, method, plan in [t for t in todo if t[0] in out]:
            try:
                with method.apply(model, plan) as applied:
                    for w, mode, label in labels:
                        say(f"{name}: {label} (round {r + 1}/{cfg.repeats})" + eta.text(r, (name, label), out))
                        t0 = perf_counter()
                        with still_running(say, f"{name}: {label}"):
                            m = measure(model, applied, w, warmup=cfg.warmup if r == 0 else 0, repeats=1, seed=cfg.seed,
                                        decode_mode=mode)
                        eta.last_s[name, label] = (perf_counter() - t0) / (1 + (cfg.warmup if r == 0 else 0))
                        if cfg.real_transfer and r == cfg.repeats - 1:  # once, while the handoff's tensors exist
                            t0 = perf_counter()
                            moved[name, label] = _real_transfer(m, f"{name} {label}")
                            eta.transfer_s.append(perf_counter() - t0)
                        if label in out[name]:
                            out[name][label].extend(m)
                        else:
                            out[name][label] = m
                        out[name][label].handoff = None  # its KV tensors: not kept across rounds (GBs at long prompts)
            except Exception as e:  # noqa: BLE001 - a plug-in's failure is noted (the harness's own raised again)
                if faults is None:
                    raise
                faults.method(name, method, e)
                del out[name]  # its rounds so far: fewer than the record's n_samples says
    return {name: {label: (m, moved.get((name, label))) for label, m in by.items()} for name, by in out.items()}


@dataclass
class _Eta:
    """What each round line says of the time left: from the second round on, the rest of this round (this unit
    included) and the rounds after it, at each (method, label) unit's last time (round 1: warm-ups divided out).
    With `transfers`, the last round also moves each unit's handoff between two processes (seconds each: a
    process starts): at their mean time once one has been timed, else the line says they come on top."""

    repeats: int
    units: list[tuple[str, str]]  # in the rounds' order
    transfers: bool = False
    last_s: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    transfer_s: list[float] = dataclasses.field(default_factory=list)  # the real handoffs timed so far (last round)

    def text(self, r: int, unit: tuple[str, str], methods) -> str:
        """' · ETA ...' for `unit` in round `r` (from 0), over the units of `methods` (those still measured)."""
        from harness.run.progress import fmt_s

        if r == 0:  # one round only: no later round to estimate from
            return " · ETA after the first round" if self.repeats > 1 else ""
        live = [u for u in self.units if u[0] in methods]
        left = live[live.index(unit):]
        s = sum(self.last_s[u] for u in left) + (self.repeats - r - 1) * sum(self.last_s[u] for u in live)
        if not self.transfers:
            return f" · ETA {fmt_s(s)}"
        if self.transfer_s:  # only timed in the last round, where each unit left still moves its handoff
            return f" · ETA {fmt_s(s + len(left) * sum(self.transfer_s) / len(self.transfer_s))}"
        return f" · ETA {fmt_s(s)} + {len(live)} handoffs between processes"


def _real_transfer(m, what: str) -> dict:
    """Move the measured handoff between two processes; the bytes received must equal the bytes counted and
    the tensors received the ones sent (a byte count alone cannot see corrupted contents)."""
    import torch

    from harness.latency.transfer import handoffs_equal, transfer_backend, transfer_between_processes, transfer_shared

    backend = transfer_backend(m.clock, torch.cuda.device_count() if m.clock.startswith("cuda") else 0)
    if backend == "cuda_ipc":
        moved = transfer_shared(m.handoff, str(next(iter(m.handoff.keys.values())).device))
    else:
        moved = transfer_between_processes(m.handoff, backend)
    received = moved.pop("received")
    if moved["kv_bytes_received"] != m.kv_bytes:
        raise RuntimeError(f"{what}: received {moved['kv_bytes_received']} KV bytes, counted {m.kv_bytes}")
    moved["received_identical"] = handoffs_equal(received, m.handoff)
    if not moved["received_identical"]:
        raise RuntimeError(f"{what}: the decode process received other KV tensors than the prefill process sent")
    return moved
