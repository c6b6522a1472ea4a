"""How closely `unpruned` in disaggregated mode reproduces unified mode, request by request.

Runs lm-eval on the first `--limit` items of each task in both modes and prints, per model and
task, the largest absolute difference of a request's log-likelihood, whether accuracies are
identical, and the KV bytes the disaggregated run handed over.

    python benchmarks/mode_agreement.py --models random:tiny,smollm2-135m --tasks boolq,arc_easy --limit 50
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="random:tiny,smollm2-135m")
    p.add_argument("--tasks", default="boolq,arc_easy")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from harness.run.quiet import quiet_libraries

    quiet_libraries()
    from lm_eval import simple_evaluate

    from harness.pd.models import load_model
    from harness.pd.plan import PruningPlan
    from harness.quality.lm import PDLM
    from harness.quality.tasks import task_manager

    tasks = args.tasks.split(",")
    tm = task_manager(tasks, Path(args.data_dir))
    print(f"{'model':16s} {'task':10s} {'requests':>8s} {'max |Δ loglik|':>15s} {'acc unified':>11s} {'acc disagg':>10s}")
    for spec in args.models.split(","):
        loaded = load_model(spec, "cpu", "float32")
        plan = PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers)
        outs, lms = {}, {}
        for mode in ("unified", "disaggregated"):
            lms[mode] = PDLM(loaded.model, loaded.tokenizer, plan, mode, batch_size=args.batch_size, progress=False)
            outs[mode] = simple_evaluate(model=lms[mode], tasks=tasks, limit=args.limit, task_manager=tm,
                                         log_samples=True, bootstrap_iters=0)
        for task in tasks:
            uni, dis = outs["unified"]["samples"][task], outs["disaggregated"]["samples"][task]
            diffs = [abs(a[0][0] - b[0][0]) for su, sd in zip(uni, dis) for a, b in zip(su["resps"], sd["resps"])]
            acc_u = outs["unified"]["results"][task]["acc,none"]
            acc_d = outs["disaggregated"]["results"][task]["acc,none"]
            print(f"{spec:16s} {task:10s} {len(diffs):8d} {max(diffs):15.2e} {acc_u:11.3f} {acc_d:10.3f}")
        print(f"{spec:16s} {'(all)':10s} KV bytes sent in disaggregated mode: {lms['disaggregated'].tally.kv_bytes:,} "
              f"({lms['disaggregated'].tally.handoffs} handoffs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
