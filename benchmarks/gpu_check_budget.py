"""The budget guard of `benchmarks/gpu_check.py`: rates measured at start, and what each step should cost.

Estimates are upper bounds built from the device's measured matmul rate and copy bandwidth, the
CPU's fp32 matmul rate (section (a)'s reference) and the eager decode's launch cost per layer
from ../shared/GPU_REFERENCE.md (HF eager on an H100: 25.2 ms a step over 32 layers); every plan
is costed as the dense one.
"""

from __future__ import annotations

import time

EAGER_LAUNCH_S_PER_LAYER = {"cuda": 0.8e-3, "cpu": 0.3e-3}


class Budget:
    """Wall-clock guard: a step runs only if the time spent plus its estimate fits the budget."""

    def __init__(self, budget_s: float, out: dict) -> None:
        self.budget_s, self.t0, self.out = budget_s, time.perf_counter(), out
        out.setdefault("skipped", [])

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, step: str, estimate_s: float) -> bool:
        if self.elapsed_s() + estimate_s <= self.budget_s:
            return True
        reason = f"budget: {self.elapsed_s():.0f} s spent + {estimate_s:.0f} s estimated > {self.budget_s:.0f} s"
        self.out["skipped"].append({"step": step, "reason": reason})
        print(f"# skipped {step} ({reason})", flush=True)
        return False


def best_s(fn, device, runs: int) -> float:
    """The fastest of `runs` calls of `fn`, in seconds: host clock, with `device` synchronised before and after each
    call on CUDA (the work `fn` queues, not only its launch)."""
    import torch

    best = float("inf")
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure_rates(device, dtype) -> dict:
    """Matmul rate (FLOP/s) in `dtype` and copy bandwidth (bytes/s, read + write) on `device`; CPU fp32 matmul rate."""
    import torch

    from harness.pd.static_decode import copy_bandwidth_bytes_per_s

    def matmul_rate(dev, dt, n):
        a = torch.randn(n, n, device=dev).to(dt)
        return 2 * n**3 / best_s(lambda: a @ a, dev, 4)

    cuda = device.type == "cuda"
    return {"copy_bandwidth_bytes_per_s": copy_bandwidth_bytes_per_s(device, nbytes=(1024 if cuda else 64) * 2**20),
            "matmul_flop_per_s": matmul_rate(device, dtype, 8192 if cuda else 512),
            "cpu_fp32_matmul_flop_per_s": matmul_rate(torch.device("cpu"), torch.float32, 1024),
            "eager_launch_s_per_layer": EAGER_LAUNCH_S_PER_LAYER["cuda" if cuda else "cpu"]}


def shape_sizes(shape: str) -> dict:
    """Parameters per layer and in the LM head, KV bytes per token and layer per element byte (no weights)."""
    from harness.pd.models import PRESETS

    s = PRESETS[shape]
    h, f, heads, kvh = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    return {"layer_params": 2 * h * h + 2 * h * kvh * d + 3 * h * f, "head_params": s["vocab_size"] * h,
            "n_layers": s["num_hidden_layers"], "kv_elems_per_token_layer": 2 * kvh * d}


def estimate_latency_row_s(shape: str, batch: int, mode: str, args, rates: dict, elem: int) -> float:
    """Seconds one (shape, plan, batch, mode) row takes, for the dense plan (pruned plans take less)."""
    z = shape_sizes(shape)
    params = z["layer_params"] * z["n_layers"] + z["head_params"]
    prefill_s = 2 * params * batch * args.prompt_tokens / rates["matmul_flop_per_s"]
    step_bytes = params * elem + z["kv_elems_per_token_layer"] * z["n_layers"] * batch * args.prompt_tokens * elem
    step_s = step_bytes / rates["copy_bandwidth_bytes_per_s"]
    if mode != "graph":
        step_s = max(step_s, rates["eager_launch_s_per_layer"] * z["n_layers"])
    run_s = prefill_s + (args.decode_tokens - 1) * step_s + (0.5 if mode == "graph" else 0.0)
    return (args.warmup + args.repeats) * run_s


def estimate_agreement_s(shape: str, args, rates: dict) -> float:
    """CPU fp32 forward of the agreement requests for each plan, plus building and copying the model."""
    z = shape_sizes(shape)
    params = z["layer_params"] * z["n_layers"] + z["head_params"]
    tokens = args.agreement_requests * (args.agreement_context + args.agreement_cont)
    forward_s = 2 * params * tokens / rates["cpu_fp32_matmul_flop_per_s"]
    if args.device == "cpu":  # the candidate is a float64 copy on the CPU too, some 4 times the fp32 cost
        forward_s *= 5
    # two plans; the weights copied to the host at ~2 GB/s; each plan's decode paths (a few short runs on the candidate)
    return 2 * forward_s + params * 4 / 2e9 + 5.0 + 2 * 5.0


def estimate_total_s(args, rates: dict, device) -> float:
    """The whole run's estimate (every plan costed as dense, so an upper bound), printed and recorded up front."""
    modes = ("eager", "static", "graph") if device.type == "cuda" else ("eager", "static")
    elem = 2 if args.dtype in ("bfloat16", "bf16", "float16", "fp16", "auto") and device.type == "cuda" else 4
    total = 0.0
    if "b" in args.sections:
        total += sum(3 * estimate_latency_row_s(s, b, m, args, rates, elem) + 5.0 / (len(args.batch_sizes) * len(modes))
                     for s in args.latency_shapes for b in args.batch_sizes for m in modes)
    if "d" in args.sections:
        total += 30.0
    if "a" in args.sections:
        total += sum(estimate_agreement_s(s, args, rates) for s in args.agreement_shapes)
    return total
