"""GPU check: per-stage latency of dense, ShortGPT-like and PDTrim-like plans on model shapes.

Needs only PyTorch and transformers (5.17 or newer); random weights in the shape of each preset
(latency and KV bytes do not depend on weight values). For each shape, plan, batch size and
decode path (eager; CUDA graph on GPU, the uncaptured static path on CPU) it prints TTFT and TPOT
(p50), the KV bytes handed over, the decode bound (weight bytes a decode step reads ÷ measured
copy bandwidth), TTFT/TPOT versus dense, and writes everything (raw samples included) as JSON.

Plans (n layers, k = round(n / 4)):
- dense: every layer in both stages;
- shortgpt-like: the k deepest blocks before the last one removed from both stages;
- pdtrim-like: the k // 2 deepest of those removed from prefill, all k from decode, and
  first 16 + last 48 prompt positions kept in the decode layers of the upper two thirds.

    python benchmarks/gpu_check.py                      # H100/H200: llama3-8b and smollm2-135m, prompt 2048, batch 1 and 8
    python benchmarks/gpu_check.py --shapes tiny --prompt-tokens 64 --decode-tokens 8 --device cpu   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama3-8b,smollm2-135m")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default="gpu_check.json")
    args = p.parse_args()

    import torch
    import transformers

    from harness.latency.measure import Workload, measure
    from harness.pd.models import load_model
    from harness.pd.static_decode import copy_bandwidth_bytes_per_s, weight_bytes
    from harness.run.env import device_info

    device = torch.device(args.device)
    modes = ("eager", "graph") if device.type == "cuda" else ("eager", "static")
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device_info(),
           "args": vars(args), "rows": []}
    bw = copy_bandwidth_bytes_per_s(device)
    out["copy_bandwidth_bytes_per_s"] = bw
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {out['device'].get('gpu_name', 'cpu')}; "
          f"copy bandwidth (read + write) {bw / 1e9:.0f} GB/s", flush=True)
    head = (f"{'shape':14s} {'plan':14s} {'B':>2s} {'decode':6s} {'TTFT ms':>9s} {'TPOT ms':>8s} {'bound ms':>8s} "
            f"{'TPOT/bound':>10s} {'KV MiB':>8s} {'TTFT vs dense':>13s} {'removed prefill':>15s} {'TPOT vs dense':>13s}")
    print(head)
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        loaded = load_model(f"random:{shape}", device=args.device, dtype=args.dtype)
        model = loaded.model
        n = model.config.num_hidden_layers
        print(f"# {shape}: {n} layers, built in {time.perf_counter() - t0:.1f}s", flush=True)
        dense_ref: dict = {}
        for (name, plan), b, mode in ((x, b, m) for x in plans(n).items() for b in map(int, args.batch_sizes.split(","))
                                      for m in modes):
            m = measure(model, plan, Workload(args.prompt_tokens, args.decode_tokens, b), warmup=args.warmup,
                        repeats=args.repeats, decode_mode=mode)
            ttft, tpot = statistics.median(m.ttft_ms), statistics.median(m.tpot_ms)
            bound = weight_bytes(model, plan.decode_layers) / bw * 1e3
            if name == "dense":
                dense_ref[(b, mode)] = (ttft, tpot)
            dt, dp = dense_ref[(b, mode)]
            removed = 1 - len(plan.prefill_layers) / n
            row = {"shape": shape, "plan": name, "batch": b, "decode_mode": mode, "ttft_ms_p50": ttft, "tpot_ms_p50": tpot,
                   "decode_bound_ms": bound, "kv_bytes": m.kv_bytes, "kv_bytes_paged": m.kv_bytes_paged,
                   "ttft_reduction": 1 - ttft / dt, "removed_prefill_fraction": removed, "tpot_vs_dense": tpot / dp,
                   "prefill_layers": list(plan.prefill_layers), "decode_layers": list(plan.decode_layers),
                   "kv_policy": plan.kv_policy.to_dict(), "samples": m.to_dict()}
            out["rows"].append(row)
            print(f"{shape:14s} {name:14s} {b:2d} {mode:6s} {ttft:9.2f} {tpot:8.3f} {bound:8.3f} {tpot / bound:10.2f} "
                  f"{m.kv_bytes / 2**20:8.1f} {100 * (1 - ttft / dt):12.1f}% {100 * removed:14.1f}% {tpot / dp:13.3f}", flush=True)
        del model, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
