"""Scoring throughput of the PD-disaggregated path against stock lm-eval `HFLM`, same tasks and batch.

Each backend runs in its own process (so peak memory is its own) on the same model object type,
the same offline tasks, `--limit` items per task and `--batch-size`. Only the time spent inside
the LM's scoring calls is measured (task building is excluded for both). Prints requests/s,
tokens/s and peak RSS per backend, and the ratio.

    python benchmarks/throughput_vs_hflm.py --tasks arc_easy,boolq,hellaswag --limit 100 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(backend: str, args) -> dict:
    os.environ["TQDM_DISABLE"] = "1"
    from harness.run.quiet import quiet_libraries

    quiet_libraries()
    from lm_eval import simple_evaluate

    from harness.pd.models import load_model
    from harness.pd.plan import PruningPlan
    from harness.quality.lm import PDLM
    from harness.quality.tasks import task_manager

    loaded = load_model(args.model, "cpu", "float32")
    tasks = args.tasks.split(",")
    tm = task_manager(tasks, Path(args.data_dir))
    if backend == "hflm":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size)
    else:
        plan = PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers)
        lm = PDLM(loaded.model, loaded.tokenizer, plan, backend, batch_size=args.batch_size, progress=False)
    spent = {"seconds": 0.0, "requests": 0, "tokens": 0}
    inner = lm.loglikelihood

    def timed(requests, *a, **k):
        spent["requests"] += len(requests)
        spent["tokens"] += sum(len(lm.tok_encode(c + x)) for c, x in (r.args for r in requests))
        t0 = time.perf_counter()
        out = inner(requests, *a, **k)
        spent["seconds"] += time.perf_counter() - t0
        return out

    lm.loglikelihood = timed
    res = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=tm, bootstrap_iters=0, log_samples=False)
    spent["scores"] = {t: res["results"][t].get("acc,none") for t in tasks}
    spent["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend == "disaggregated":
        spent["kv_bytes"] = lm.tally.kv_bytes
    return spent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="arc_easy,boolq,hellaswag")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--backends", default="hflm,disaggregated,unified")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--one", backend, "--model", args.model, "--tasks", args.tasks,
               "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--data-dir", args.data_dir]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        results[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"model {args.model}, tasks {args.tasks}, limit {args.limit}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs; time inside loglikelihood only")
    print(f"{'backend':14s} {'requests':>8s} {'seconds':>8s} {'req/s':>7s} {'tok/s':>8s} {'peak RSS MiB':>12s}  scores")
    for name, r in results.items():
        print(f"{name:14s} {r['requests']:8d} {r['seconds']:8.1f} {r['requests'] / r['seconds']:7.2f} "
              f"{r['tokens'] / r['seconds']:8.0f} {r['peak_rss_mib']:12.0f}  {r['scores']}")
    if "hflm" in results:
        base = results["hflm"]["requests"] / results["hflm"]["seconds"]
        for name, r in results.items():
            if name != "hflm":
                print(f"{name} / hflm throughput: {r['requests'] / r['seconds'] / base:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
