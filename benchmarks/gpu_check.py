"""GPU check: the PD engine on one GPU, in four sections, written as one JSON and one Markdown table.

(a) agreement: the PD engine (disaggregated scoring: prefill, handoff, decode) on the same random
    weights on the device and on the CPU reference, fp32: per-request log-likelihood differences
    (pass: max ≤ --agreement-tol, 1e-3) and the KV bytes of every handoff (pass: identical). On
    CPU the candidate is a float64 copy of the model (identical KV elements, not bytes). Also on the
    candidate: the static and graph decode paths give the eager path's greedy tokens (pass: equal).
(b) latency: TTFT, TPOT (p50) per decode path (eager, static, graph; no graph on CPU), handoff
    time and KV bytes for dense, ShortGPT-like and PDTrim-like plans, per shape and batch size;
    every static/graph row says whether it sent the eager row's bytes.
(c) HBM bound: graph TPOT (static on CPU) against the bytes a decode step must read (decode
    layers' weights, final norm, LM head, the KV held) ÷ the copy bandwidth measured on the same
    device (read + write), and against that bound plus the ops one step replays (benchmarks/decode_step_ops.py) ×
    the cost of one tiny op replayed from a graph on the same device (the small-op floor) — pass on the first shape,
    dense, batch 1: TPOT ≤ 1.2 × (bound + floor). Each row also gives (TPOT − bound) ÷ ops.
(d) handoff between two processes on one device: the PDTrim-like handoff of the first shape at
    batch 1 moved by CUDA IPC (shared memory on CPU); pass: bytes received = bytes counted and
    every tensor equal.

Plans (n layers, k = round(n / 4)): dense; shortgpt-like (the k deepest blocks before the last
removed from both stages); pdtrim-like (the k // 2 deepest of those removed from prefill, all k
from decode; first 16 + last 48 prompt positions kept in the decode layers of the upper two thirds).

A budget guard (--budget-s, default 420 s) estimates each step from the rates measured at start
(matmul rate, copy bandwidth) and the eager launch cost per layer in ../shared/GPU_REFERENCE.md,
and skips, with the reason recorded, whatever would overrun; JSON and table are rewritten after
every step, so a killed run still leaves what it measured. Needs PyTorch and transformers only
(no lm-eval, no network); the device command is in benchmarks/README.md.

    python benchmarks/gpu_check.py --json gpu_check.json --md gpu_check.md      # one H100/H200, about 5 min
    python benchmarks/gpu_check.py --shapes tiny --prompt-tokens 40 --decode-tokens 4 --device cpu --dtype float32   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check_budget import Budget, estimate_agreement_s, estimate_latency_row_s, estimate_total_s, measure_rates  # noqa: E402
from gpu_check_report import markdown  # noqa: E402


def plans(n: int):
    from harness.pd.plan import KVPolicy, PruningPlan

    k = max(1, round(n / 4))
    deep = list(range(n - 1 - k, n - 1))
    keep = lambda r: tuple(i for i in range(n) if i not in r)  # noqa: E731
    pd_prefill, pd_decode = keep(deep[-(k // 2):] if k // 2 else []), keep(deep)
    upper = tuple(i for i in pd_decode if i >= n // 3)
    return {
        "dense": PruningPlan.dense("dense", n),
        "shortgpt-like": PruningPlan("shortgpt-like", n, keep(deep), keep(deep)),
        "pdtrim-like": PruningPlan("pdtrim-like", n, pd_prefill, pd_decode, kv_policy=KVPolicy(16, 48, upper)),
    }


def attempt(out: dict, step: str, fn):
    """fn()'s result, or None with the error recorded: one failing step (an OOM, a refused CUDA IPC) costs only itself."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded, printed, and the exit status says so
        record_failure(out, step, e)
        return None


def record_failure(out: dict, step: str, e: Exception) -> None:
    traceback.print_exc()
    out.setdefault("errors", []).append({"step": step, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(f"# FAILED {step}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def latency_rows(shape: str, loaded, args, budget: Budget, modes, after_row=None) -> None:
    """Section (b) for one shape: every plan × batch × decode mode that fits the budget, each row appended to
    out["latency"] and written (JSON and table) as soon as it is measured, as is a failed step; `after_row()` runs
    before each row is written ((c) from the rows so far)."""
    from harness.latency.measure import Workload, measure

    model, rows = loaded.model, budget.out["latency"]
    n = model.config.num_hidden_layers
    elem = next(model.parameters()).element_size()
    eager_bytes: dict = {}  # the eager rows' KV bytes, not their measurements: those hold the handoff's KV (GBs on a GPU)
    for name, plan in plans(n).items():
        for b in args.batch_sizes:
            for mode in modes:
                step = f"latency {shape} {name} B={b} {mode}"
                if not budget.allows(step, estimate_latency_row_s(shape, b, mode, args, budget.out["rates"], elem)):
                    continue
                m = attempt(budget.out, step, lambda plan=plan, b=b, mode=mode: measure(
                    model, plan, Workload(args.prompt_tokens, args.decode_tokens, b), warmup=args.warmup, repeats=args.repeats,
                    decode_mode=mode))
                if m is None:
                    save(budget.out, args)  # the failed step's error
                    continue
                if mode == "eager":
                    eager_bytes[(name, b)] = m.kv_bytes
                rows.append(latency_row(shape, name, plan, b, mode, m, eager_bytes.get((name, b)), n))
                print_row(rows[-1], rows)
                if name == "pdtrim-like" and b == args.batch_sizes[0] and mode == "eager" and shape == args.latency_shapes[0]:
                    budget.out["_handoff_for_ipc"] = (shape, m.handoff)  # (d) hands this one over
                del m  # its handoff's KV is not held while the next row is measured
                if after_row is not None:
                    after_row()
                save(budget.out, args)  # a run killed mid-shape keeps the rows it measured


def latency_row(shape, name, plan, b, mode, m, eager_kv_bytes, n) -> dict:
    ttft, tpot = statistics.median(m.ttft_ms), (statistics.median(m.tpot_ms) if m.tpot_ms else None)
    return {"shape": shape, "plan": name, "batch": b, "decode_mode": mode, "ttft_ms_p50": ttft, "tpot_ms_p50": tpot,
            "handoff_ms_p50": statistics.median(m.handoff_ms), "kv_bytes": m.kv_bytes, "kv_bytes_paged": m.kv_bytes_paged,
            "kv_bytes_equal_eager": None if eager_kv_bytes is None else m.kv_bytes == eager_kv_bytes,
            "removed_prefill_fraction": 1 - len(plan.prefill_layers) / n,
            "prefill_layers": list(plan.prefill_layers), "decode_layers": list(plan.decode_layers),
            "kv_policy": plan.kv_policy.to_dict(), "samples": m.to_dict()}


def print_row(row: dict, rows: list[dict]) -> None:
    dense = next((x for x in rows if x["shape"] == row["shape"] and x["plan"] == "dense" and x["batch"] == row["batch"]
                  and x["decode_mode"] == row["decode_mode"]), row)
    row["ttft_reduction"] = 1 - row["ttft_ms_p50"] / dense["ttft_ms_p50"]
    row["tpot_vs_dense"] = row["tpot_ms_p50"] / dense["tpot_ms_p50"] if row["tpot_ms_p50"] and dense["tpot_ms_p50"] else None
    tpot = f"{row['tpot_ms_p50']:8.3f}" if row["tpot_ms_p50"] is not None else f"{'-':>8s}"
    print(f"{row['shape']:14s} {row['plan']:14s} {row['batch']:2d} {row['decode_mode']:6s} {row['ttft_ms_p50']:9.2f} {tpot} "
          f"{row['handoff_ms_p50']:8.2f} {row['kv_bytes'] / 2**20:8.2f} {100 * row['ttft_reduction']:8.1f}% "
          f"{100 * row['removed_prefill_fraction']:8.1f}%  eager bytes: {row['kv_bytes_equal_eager']}", flush=True)


def hbm_bound(rows: list[dict], models: dict, bw: float, first_shape: str, small_op_s: float | None = None) -> dict:
    """Section (c): per graph row (static on CPU), TPOT against the bytes a step reads ÷ the copy bandwidth, and
    against that bound plus the step's ops × the small-op floor measured on the device (`expected`): the verdict.
    No implementation of ~1,300 unfused ops a step reaches the bound alone; one that is slower than bound + floor
    has something else slow (a kernel falling back to a slow path, a copy, a host wait)."""
    out = []
    for row in rows:
        if row["decode_mode"] != models["bound_mode"] or row["tpot_ms_p50"] is None:
            continue
        weights = models["weight_bytes"][(row["shape"], tuple(row["decode_layers"]))]
        steps = row["samples"]["workload"]["decode_tokens"] - 1
        per_token = models["kv_bytes_per_token"][row["shape"]] * len(row["decode_layers"]) * row["batch"]
        read = weights + row["kv_bytes"] + per_token * (steps + 1) / 2  # the KV grows by one token a step
        bound_ms = read / bw * 1e3
        ops = models["step_ops"].get((row["shape"], row["plan"]))  # µs per op over the bound: what small kernels cost
        floor_ms = ops * small_op_s * 1e3 if ops and small_op_s else None
        out.append({"shape": row["shape"], "plan": row["plan"], "batch": row["batch"], "decode_mode": row["decode_mode"],
                    "tpot_ms_p50": row["tpot_ms_p50"], "bytes_read_per_step": int(read), "bound_ms": bound_ms,
                    "tpot_over_bound": row["tpot_ms_p50"] / bound_ms, "ops_per_step": ops,
                    "us_per_op_over_bound": (row["tpot_ms_p50"] - bound_ms) * 1e3 / ops if ops else None, "floor_ms": floor_ms,
                    "tpot_over_expected": row["tpot_ms_p50"] / (bound_ms + floor_ms) if floor_ms is not None else None})
    return {"copy_bandwidth_bytes_per_s": bw, "small_op_s": small_op_s, "decode_mode": models["bound_mode"], "rows": out,
            "check": bound_check(out, first_shape, models["bound_mode"])}


def bound_now(out: dict, models: dict, args) -> None:
    """out["hbm_bound"]: section (c) from the latency rows measured so far; a failure is recorded once (not per row)."""
    try:
        out["hbm_bound"] = hbm_bound(out["latency"], models, out["rates"]["copy_bandwidth_bytes_per_s"], args.latency_shapes[0],
                                     out["rates"].get("small_op_s"))
    except Exception as e:  # noqa: BLE001 - recorded, as `attempt` does, and the run goes on
        if not any(x["step"] == "hbm bound" for x in out.get("errors", [])):
            record_failure(out, "hbm bound", e)


def bound_check(rows: list[dict], first_shape: str, mode: str) -> dict | None:
    """(c)'s verdict on the first shape, dense, batch 1: TPOT ≤ 1.2 × (bound + ops × small-op floor), on a graph."""
    head = next((x for x in rows if x["shape"] == first_shape and x["plan"] == "dense" and x["batch"] == 1), None)
    if head is None:
        return None
    check = {"row": f"{first_shape} dense B=1", "tpot_over_bound": head["tpot_over_bound"], "ops_per_step": head["ops_per_step"],
             "tpot_over_expected": head["tpot_over_expected"], "limit": 1.2, "pass": None}
    if mode != "graph":
        check["note"] = "no verdict: the bound is for a CUDA graph over HBM; on CPU the static path stands in"
    elif head["tpot_over_expected"] is None:
        check["note"] = "no verdict: the ops per step or the small-op floor could not be measured (see the failed steps)"
    else:
        check["pass"] = head["tpot_over_expected"] <= 1.2
    return check


def ipc_handoff(handoff, shape: str, device) -> dict:
    """Section (d): one handoff between two processes on `device`; bytes received against bytes counted."""
    from harness.latency.transfer import handoffs_equal, transfer_shared

    got = transfer_shared(handoff, str(device), timeout_s=90.0)  # two processes start and init CUDA in ~20 s; a hang costs 90
    equal = handoffs_equal(got.pop("received"), handoff)  # K, V, positions and counts of every layer, bit for bit
    got.update(shape=shape, plan="pdtrim-like", batch=handoff.n_requests, kv_bytes_counted=handoff.kv_bytes,
               tensors_equal=equal, **{"pass": equal and got["kv_bytes_received"] == handoff.kv_bytes})
    return got


def agreement_requests(vocab: int, args, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Requests with contexts longer than the PDTrim-like policy's 64 kept positions; pairs share a context."""
    rng = random.Random(seed)
    reqs = []
    for _ in range((args.agreement_requests + 1) // 2):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(args.agreement_context // 2, args.agreement_context))]
        for _ in range(2):
            reqs.append((ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, args.agreement_cont))]))
    return reqs[: args.agreement_requests]


def twin(model, device, dtype):
    """A copy of `model`'s weights and buffers on `device` in `dtype` (built empty, then copied)."""
    import torch

    with torch.device("meta"):
        copy = type(model)(model.config)
    copy = copy.to_empty(device=device)
    # every name, tied ones too (SmolLM2's LM head is its embedding): the copy may or may not share them
    src = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, t in [*copy.named_parameters(remove_duplicate=False), *copy.named_buffers(remove_duplicate=False)]:
            t.copy_(src[name])
    return copy.to(dtype).eval()


def agreement(shape: str, args, device, out: dict) -> None:
    """Section (a) for one shape: the candidate (device fp32, or CPU float64 on a CPU run) against CPU fp32; each
    plan's row appended to out["agreement"] and written as soon as it is measured."""
    import torch

    from harness.pd.models import load_model
    from harness.quality.scoring import Scorer

    t0 = time.perf_counter()
    cand = load_model(f"random:{shape}", device=str(device), dtype="float32").model
    on_cpu = device.type == "cpu"
    ref = twin(cand, torch.device("cpu"), torch.float32)
    if on_cpu:
        cand = twin(cand, device, torch.float64)
    reqs = agreement_requests(cand.config.vocab_size, args)
    rows = []
    for name, plan in plans(cand.config.num_hidden_layers).items():
        if name == "shortgpt-like":
            continue  # dense and pdtrim-like cover the engine's paths (one layer set; two sets and a KV policy)
        got = {}
        for who, model in (("reference", ref), ("candidate", cand)):
            s = Scorer(model, plan, "disaggregated", max_length=4096, batch_size=args.agreement_requests)
            got[who] = (s.loglikelihood(reqs), s.tally.as_dict())
        paths = decode_paths(cand, plan, args, out, f"agreement {shape} {name}")
        rows.append(agreement_row(shape, name, got, cand, on_cpu, args.agreement_tol, paths))
        print(f"# agreement {shape} {name}: max |Δ loglik| {rows[-1]['max_abs_diff']:.2e}, KV bytes {rows[-1]['kv_bytes_reference']} "
              f"vs {rows[-1]['kv_bytes_candidate']}, decode paths {rows[-1]['decode_paths_equal']}: "
              f"{'pass' if rows[-1]['pass'] else 'FAIL'}", flush=True)
        out["agreement"].append(rows[-1])
        save(out, args)
    rows[0]["seconds"] = time.perf_counter() - t0
    del cand, ref


def decode_paths(model, plan, args, out: dict, step: str) -> dict[str, bool]:
    """Per static/graph decode path on `model` (the candidate, fp32 or float64): whether it decodes the eager
    path's greedy tokens (batch 2, the longest agreement context, 16 tokens). A graph that replays stale buffers
    would still give plausible TPOTs in (b); in fp32 a near-tie flip is unlikely, so a difference is a finding.
    A path that fails (a capture refused) is False, its error recorded as step `step` + the path: the row's
    log-likelihoods, computed before, are kept."""
    from harness.latency.measure import Workload, measure
    from harness.pd.static_decode import can_capture

    w = Workload(args.agreement_context, 16, 2)
    paths = ("static", "graph") if can_capture(next(model.parameters()).device) else ("static",)
    eager = attempt(out, f"{step} eager decode path", lambda: measure(model, plan, w, warmup=0, repeats=1).tokens)
    if eager is None:
        return dict.fromkeys(paths, False)
    got = {p: attempt(out, f"{step} {p} decode path", lambda p=p: measure(model, plan, w, warmup=0, repeats=1, decode_mode=p).tokens)
           for p in paths}
    return {p: t is not None and bool(t.equal(eager)) for p, t in got.items()}


def agreement_row(shape, name, got, cand, on_cpu, tol, paths: dict[str, bool]) -> dict:
    (ll_r, kv_r), (ll_c, kv_c) = got["reference"], got["candidate"]
    diffs = [abs(a[0] - b[0]) for a, b in zip(ll_r, ll_c)]
    elem_c = next(cand.parameters()).element_size()
    same_kv = kv_c["kv_bytes"] * 4 == kv_r["kv_bytes"] * elem_c  # bytes per element 4 (fp32) against the candidate's
    return {"shape": shape, "plan": name, "reference": "cpu float32", "candidate": f"{'cpu float64' if on_cpu else str(cand.device) + ' float32'}",
            "requests": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": statistics.fmean(diffs), "tolerance": tol,
            "greedy_equal": [a[1] for a in ll_r] == [b[1] for b in ll_c], "kv_bytes_reference": kv_r["kv_bytes"],
            "kv_bytes_candidate": kv_c["kv_bytes"], "kv_identical": same_kv, "kv_compared": "elements" if on_cpu else "bytes",
            "decode_paths_equal": paths, "pass": max(diffs) <= tol and same_kv and all(paths.values())}


def parse_args(argv=None):
    from harness.cli.flags import nonneg_int, positive_int  # (imports neither torch nor lm-eval)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="shapes for every section (overrides the two below)")
    p.add_argument("--latency-shapes", default="llama3-8b,llama2-7b", help="(b), (c), (d) shapes; the first is (c)'s check and (d)'s handoff")
    p.add_argument("--agreement-shapes", default="smollm2-135m,llama3-8b", help="(a) shapes")
    p.add_argument("--sections", default="a,b,c,d", help="which sections to run (c and d need b)")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3, help="measured runs per row (medians need one)")
    p.add_argument("--agreement-requests", type=int, default=6)
    p.add_argument("--agreement-context", type=int, default=160, help="longest (a) context; the shortest is half of it")
    p.add_argument("--agreement-cont", type=int, default=12, help="longest (a) continuation")
    p.add_argument("--agreement-tol", type=float, default=1e-3, help="largest |Δ log-likelihood| per request")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="(b)-(d) dtype; (a) is always fp32")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; steps that would overrun it are skipped")
    p.add_argument("--json", default="gpu_check.json")
    p.add_argument("--md", default="gpu_check.md")
    args = p.parse_args(argv)
    if args.shapes:
        args.latency_shapes = args.agreement_shapes = args.shapes
    args.latency_shapes, args.agreement_shapes = args.latency_shapes.split(","), args.agreement_shapes.split(",")
    from harness.pd.models import PRESETS

    unknown = sorted(set(args.latency_shapes + args.agreement_shapes) - set(PRESETS))
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(sorted(PRESETS))}")
    args.batch_sizes, args.sections = [int(b) for b in args.batch_sizes.split(",")], set(args.sections.split(","))
    return args


def save(out: dict, args) -> None:
    """Rewrite the JSON and the table, each replaced whole (a run killed mid-write keeps the previous ones)."""
    from harness.store.files import atomic_write

    atomic_write(Path(args.json), json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=1, default=str))
    atomic_write(Path(args.md), markdown(out))


def run_latency(args, device, budget: Budget, out: dict) -> dict:
    """Sections (b) and (c)'s inputs: latency rows, and per shape the weight bytes of each decode layer set."""
    from decode_step_ops import step_ops

    from harness.pd.arch import kv_heads_and_dim
    from harness.pd.models import load_model
    from harness.pd.static_decode import can_capture, weight_bytes

    modes = ("eager", "static", "graph") if can_capture(device) else ("eager", "static")
    if "graph" not in modes:
        out["skipped"].append({"step": "latency graph rows", "reason": "CUDA graphs need a CUDA device (static stands in)"})
    models = {"weight_bytes": {}, "step_ops": {}, "kv_bytes_per_token": {}, "bound_mode": "graph" if device.type == "cuda" else "static"}
    print(f"{'shape':14s} {'plan':14s} {'B':>2s} {'decode':6s} {'TTFT ms':>9s} {'TPOT ms':>8s} {'hand ms':>8s} {'KV MiB':>8s} "
          f"{'TTFT cut':>9s} {'removed':>9s}", flush=True)
    for shape in args.latency_shapes:
        loaded = attempt(out, f"load {shape}", lambda shape=shape: load_model(f"random:{shape}", device=str(device), dtype=args.dtype))
        if loaded is None:
            free(device)
            save(out, args)
            continue
        model = loaded.model
        for name, plan in plans(model.config.num_hidden_layers).items():
            models["weight_bytes"][(shape, plan.decode_layers)] = weight_bytes(model, plan.decode_layers)
            ops = attempt(out, f"ops per step {shape} {name}", lambda model=model, plan=plan: sum(step_ops(model, plan).values()))
            models["step_ops"][(shape, name)] = ops
        kvh, d = kv_heads_and_dim(model.config)
        models["kv_bytes_per_token"][shape] = 2 * kvh * d * next(model.parameters()).element_size()
        # (c) is recomputed after every row: a run cut short (the device's time limit) keeps the verdict of the rows
        # it measured; computed once after (b), a kill in the second shape lost the first shape's verdict
        latency_rows(shape, loaded, args, budget, modes, after_row=(lambda: bound_now(out, models, args)) if "c" in args.sections else None)
        save(out, args)
        del model, loaded
        free(device)
    return models


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from harness.pd.models import resolve_dtype
    from harness.run.env import device_info

    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")  # (a) compares fp32 arithmetic: no TF32 on the GPU
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device_info(),
           "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}, "latency": [], "agreement": [],
           "hbm_bound": None, "ipc_handoff": None}
    budget = Budget(args.budget_s, out)
    out["rates"] = measure_rates(device, resolve_dtype(args.dtype, device))
    from decode_step_ops import small_kernel_s

    out["rates"]["small_op_s"] = attempt(out, "small-op floor",  # (c)'s floor per op: one Llama-3-8B hidden state
                                         lambda: small_kernel_s(device, numel=4096, dtype=resolve_dtype(args.dtype, device)))
    bw = out["rates"]["copy_bandwidth_bytes_per_s"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {out['device'].get('gpu_name', 'cpu')}; copy bandwidth "
          f"(read + write) {bw / 1e9:.0f} GB/s, matmul {out['rates']['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s", flush=True)
    out["estimate_s"] = estimate_total_s(args, out["rates"], device)
    work = {"b": f"(b) {', '.join(args.latency_shapes)} × 3 plans × batch {args.batch_sizes} × decode paths, prompt {args.prompt_tokens}, "
                 f"{args.decode_tokens} tokens, {args.warmup} + {args.repeats} runs", "c": "(c) bound", "d": "(d) one handoff",
            "a": f"(a) {', '.join(args.agreement_shapes)}"}
    print(f"plan: {'; '.join(w for k, w in work.items() if k in args.sections)}; estimated ≤ {out['estimate_s']:.0f} s, "
          f"budget {args.budget_s:.0f} s", flush=True)
    save(out, args)  # the device, versions and rates, whatever happens next
    models = run_latency(args, device, budget, out) if "b" in args.sections else None
    if "c" in args.sections and models is not None:
        bound_now(out, models, args)  # (also after every row of (b))
        save(out, args)
    if "d" in args.sections and "_handoff_for_ipc" not in out:
        out["skipped"].append({"step": "ipc handoff", "reason": "no pdtrim-like eager row of (b) to hand off"})
    elif "d" in args.sections and budget.allows("ipc handoff", 30.0):
        d = out["ipc_handoff"] = attempt(out, "ipc handoff", lambda: ipc_handoff(out["_handoff_for_ipc"][1], out["_handoff_for_ipc"][0], device))
        if d:
            print(f"# ipc handoff: {d['kv_bytes_received']} B received, {d['kv_bytes_counted']} counted, {d['handoff_ms']:.1f} ms "
                  f"({d['backend']})", flush=True)
        save(out, args)
    for shape in args.agreement_shapes if "a" in args.sections else []:
        if budget.allows(f"agreement {shape}", estimate_agreement_s(shape, args, out["rates"])):
            attempt(out, f"agreement {shape}", lambda shape=shape: agreement(shape, args, device, out))
            free(device)
            save(out, args)
    out["seconds"] = budget.elapsed_s()
    save(out, args)
    print(f"wrote {args.json} and {args.md} ({out['seconds']:.0f} s){'; FAILED steps: ' + str(len(out['errors'])) if out.get('errors') else ''}")
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
