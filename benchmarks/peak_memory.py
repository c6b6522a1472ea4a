"""Peak memory of a comparison against the model's own size, for growing numbers of methods.

Each configuration runs `python -m harness` in a fresh process under GNU time (`/usr/bin/time -v`)
and reads its "Maximum resident set size". The model's size is its parameter bytes; a baseline
process that only loads the model gives the fixed cost (Python, torch, the model). Applying a plan
never copies weights, so the peak must not grow with the number of methods.

    python benchmarks/peak_memory.py --limit 2 --out results/issue7/peak_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD_SETS = ["unpruned", "unpruned,shortgpt", "unpruned,shortgpt,pdtrim,tail", "unpruned,shortgpt,pdtrim,tail,random,stage:shortgpt"]
LOAD_ONLY = ("from harness.pd.models import load_model; m = load_model({model!r}, 'cpu', 'float32'); "
             "print(sum(p.numel() * p.element_size() for p in m.model.parameters()))")


def measure(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """(max RSS in bytes, wall seconds, stdout) of `cmd` under GNU time."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if m is None:
        raise SystemExit("GNU time printed no 'Maximum resident set size' (install the Debian package `time`)")
    return int(m.group(1)) * 1024, wall, r.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=METHOD_SETS, help="comma-separated method lists, one per measurement")
    p.add_argument("--limit", default="2", help="items per task (default 2: memory, not scores, is measured)")
    p.add_argument("--tasks", default="standard,long", help="the default comparison's tasks (default: standard,long)")
    p.add_argument("--plans-from", default="results/issue3/default", help="replay stored plans (skips PDTrim's search)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if not shutil.which("/usr/bin/time"):
        raise SystemExit("needs GNU time at /usr/bin/time (Debian package `time`)")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    model_bytes_s = subprocess.run([sys.executable, "-c", LOAD_ONLY.format(model=args.model)], cwd=ROOT, env=env,
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    base_rss, base_wall, _ = measure([sys.executable, "-c", LOAD_ONLY.format(model=args.model)], env)
    rows = [{"methods": "(load the model only)", "n_methods": 0, "cells": 0, "max_rss_bytes": base_rss, "wall_s": base_wall}]
    for methods in args.methods:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "harness", "--model", args.model, "--methods", methods, "--tasks", args.tasks,
                   "--limit", args.limit, "--mode", "both", "--device", "cpu", "--out", out, "-q"]
            if args.plans_from and Path(args.plans_from).is_dir():
                cmd += ["--plans-from", args.plans_from]
            rss, wall, _ = measure(cmd, env)
        n = len(methods.split(","))
        rows.append({"methods": methods, "n_methods": n, "cells": 2 * n, "max_rss_bytes": rss, "wall_s": wall})
        print(f"{methods}: {rss / 2**20:.0f} MiB in {wall:.0f} s", file=sys.stderr, flush=True)
    model_bytes = int(model_bytes_s)
    print(f"model {args.model}: parameters {model_bytes / 2**20:.0f} MiB (float32); tasks {args.tasks}, limit {args.limit}, "
          "both modes\n")
    print("| methods | cells | max RSS (MiB) | ÷ model size | above load-only (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['methods']} | {r['cells']} | {r['max_rss_bytes'] / 2**20:.0f} | {r['max_rss_bytes'] / model_bytes:.2f} | "
              f"{(r['max_rss_bytes'] - base_rss) / 2**20:.0f} | {r['wall_s']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "model_param_bytes": model_bytes, "limit": args.limit,
                                        "tasks": args.tasks, "rows": rows, "measured_with": "/usr/bin/time -v",
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
