"""One comparison three ways: a single process, `accelerate launch` with N data-parallel ranks, and a
`harness sweep` on Ray (or the local pool) with N workers. Prints the wall time of each and checks
that their records agree (plans, scores, KV bytes).

    python benchmarks/scale_out.py --workers 2 --out results/issue7/scale_out.json

The default workload is the CI spec's comparison (unpruned, shortgpt, pdtrim; 4 of 30 blocks; both
modes) on arc_easy, boolq and pd_ppl, with plans replayed from results/reference/quality so that
every variant does the same evaluation work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = ["calib.n_samples=32", "shortgpt.k=4", "pdtrim.k_prefill=2", "pdtrim.k_decode=4", "pdtrim.k_unified=4",
        "pdtrim.d_t=0.97", "pdtrim.search_samples=8", "pdtrim.max_cont=16", "pdtrim.sensitivity=false",
        "pdtrim.probe_prompts=2", "pdtrim.probe_tokens=256", "pdtrim.probe_steps=4", "pd_ppl.docs=2",
        "pd_ppl.prompt_tokens=512"]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def records(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*__*.json"))
            if not p.name.endswith((".partial.json", ".failed.json"))}


def differences(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    out = [f"missing {n}" for n in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if (x["plan"]["prefill_layers"], x["plan"]["decode_layers"]) != (y["plan"]["prefill_layers"], y["plan"]["decode_layers"]):
            out.append(f"{name}: plan")
        if x["kv"] != y["kv"]:
            out.append(f"{name}: kv bytes")
        for task, metrics in x["scores"].items():
            for m, v in metrics.items():
                w = y["scores"][task][m]["value"]
                if abs(w - v["value"]) > 1e-9 * max(1.0, abs(v["value"])):
                    out.append(f"{name}: {task} {m} {v['value']} vs {w}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", default="unpruned,shortgpt,pdtrim")
    p.add_argument("--tasks", default="arc_easy,boolq,pd_ppl")
    p.add_argument("--limit", default="60")
    p.add_argument("--plans-from", default="results/reference/quality")
    p.add_argument("--backend", default="ray", help="sweep backend: ray or local")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("WORLD_SIZE", None)
    common = ["--model", "smollm2-135m", "--methods", args.methods, "--tasks", args.tasks, "--limit", args.limit,
              "--mode", "both", "--device", "cpu", "--plans-from", str((ROOT / args.plans_from).resolve()), "-q",
              *[x for s in SETS for x in ("--set", s)]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls = {"single process": run([sys.executable, "-m", "harness", *common, "--out", str(tmp / "single")], env)}
        print(f"single process: {walls['single process']:.0f} s", file=sys.stderr, flush=True)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--multi_gpu", "--num_processes", str(args.workers), "-m", "harness"]
        key = f"accelerate, {args.workers} ranks"
        walls[key] = run([*launch, *common, "--out", str(tmp / "dp")], {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.workers))})
        print(f"{key}: {walls[key]:.0f} s", file=sys.stderr, flush=True)
        spec = tmp / "spec.toml"
        sets = ", ".join(json.dumps(s) for s in SETS)
        spec.write_text(f'[run]\nmodel = "smollm2-135m"\nmethods = {json.dumps(args.methods.split(","))}\n'
                        f'tasks = {json.dumps(args.tasks.split(","))}\nlimit = {args.limit}\nmode = "both"\ndevice = "cpu"\n'
                        f'plans_from = {json.dumps(str((ROOT / args.plans_from).resolve()))}\nset = [{sets}]\n'
                        f'out = {json.dumps(str(tmp / "sweep"))}\n')
        key = f"sweep, {args.backend}, {args.workers} workers"
        walls[key] = run([sys.executable, "-m", "harness", "sweep", str(spec), "--backend", args.backend,
                          "--workers", str(args.workers), "-q"], env)
        print(f"{key}: {walls[key]:.0f} s", file=sys.stderr, flush=True)
        ref = records(tmp / "single")
        diffs = {"accelerate": differences(ref, records(tmp / "dp")), "sweep": differences(ref, records(tmp / "sweep"))}
        n_cells = len(ref)
    print(f"{n_cells} cells ({args.methods} × both modes), tasks {args.tasks}, limit {args.limit}, 2 CPU cores\n")
    print("| how | wall (s) | ÷ single process | records equal to single process |")
    print("|---|---|---|---|")
    single = walls["single process"]
    for k, w in walls.items():
        d = diffs["accelerate"] if k.startswith("accelerate") else diffs["sweep"] if k.startswith("sweep") else []
        print(f"| {k} | {w:.0f} | {w / single:.2f} | {'yes' if not d else 'NO: ' + '; '.join(d[:5])} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "wall_s": walls, "differences": diffs,
                                        "cells": n_cells, "cpu_count": os.cpu_count(),
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    return 0 if not any(diffs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
