"""Decode-stage continuations in groups of like length (`batching.length_groups`) against one padded
decode forward per batch, on SmolLM2 in disaggregated mode.

1. The fixed cost of one decode forward in tokens: decode forwards of 16 rows × q tokens over a
   48-token prompt, fastest of 5 each, fitted as `ms = fixed + per_token × tokens`; `fixed ÷
   per_token` is what `scoring.FORWARD_TOKENS["cpu"]` rounds up.
2. Multiple-choice tasks through lm-eval, each twice in one process (one padded forward, then
   groups): wall seconds, decode tokens computed (padding included) and needed, the largest
   |Δ log-likelihood| of a request between the two, and both accuracies.

    python benchmarks/decode_groups.py --tasks hellaswag,piqa,arc_challenge --limit 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def forward_cost(loaded, reps: int = 5) -> dict:
    """Fit decode forward time (ms) = fixed + per_token × tokens over 16-row forwards."""
    import torch

    from harness.pd.batching import pad_tokens
    from harness.pd.plan import PruningPlan
    from harness.pd.stages import StagedModel

    staged = StagedModel(loaded.model, PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (48,), generator=g).tolist() for _ in range(16)]
    points = []
    with torch.inference_mode():
        out = staged.prefill(pad_tokens(prompts, "cpu"))
        for q in (1, 4, 8, 16, 32):
            times = []
            for _ in range(reps):
                cache = staged.receive(staged.handoff(out, torch.arange(16)))
                batch = pad_tokens([list(range(100, 100 + q))] * 16, "cpu", start=out.lengths)
                t0 = time.perf_counter()
                staged.decode(cache, batch)
                times.append(time.perf_counter() - t0)
            points.append((16 * q, 1e3 * min(times)))
    slope, fixed = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return {"points_tokens_ms": points, "fixed_ms": fixed, "per_token_ms": slope, "fixed_in_tokens": fixed / slope}


def evaluate(loaded, task: str, tm, limit: int, batch_size: int, forward_tokens: float) -> dict:
    from lm_eval import simple_evaluate

    from harness.pd.plan import PruningPlan
    from harness.quality.lm import PDLM

    lm = PDLM(loaded.model, loaded.tokenizer, PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers),
              "disaggregated", batch_size=batch_size, progress=False)
    scorer = lm.scorer
    scorer.forward_tokens = forward_tokens
    tokens, decode = {"computed": 0, "needed": 0}, scorer.staged.decode

    def counting(cache, batch, **kw):
        tokens["computed"] += batch.ids.numel()
        tokens["needed"] += int(batch.lengths.sum())
        return decode(cache, batch, **kw)

    scorer.staged.decode = counting
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = out["samples"][task]
    return {"seconds": seconds, "decode_tokens_computed": tokens["computed"], "decode_tokens_needed": tokens["needed"],
            "acc": out["results"][task]["acc,none"], "loglik": [r[0][0] for s in samples for r in s["resps"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="hellaswag,piqa,arc_challenge")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from harness.run.quiet import quiet_libraries

    quiet_libraries()
    from harness.pd.models import load_model
    from harness.quality.scoring import FORWARD_TOKENS
    from harness.quality.tasks import task_manager

    loaded = load_model(args.model, "cpu", "float32")
    cost = forward_cost(loaded)
    print(f"decode forward, 16 rows: {cost['fixed_ms']:.1f} ms fixed + {cost['per_token_ms']:.2f} ms a token "
          f"= {cost['fixed_in_tokens']:.0f} tokens fixed (FORWARD_TOKENS['cpu'] = {FORWARD_TOKENS['cpu']:g})")
    tasks = args.tasks.split(",")
    tm = task_manager(tasks, Path(args.data_dir))
    rows = []
    print(f"{'task':14s} {'one s':>7s} {'groups s':>8s} {'ratio':>6s} {'needed':>7s} {'computed one':>12s} {'groups':>7s} "
          f"{'max |Δ loglik|':>14s} {'acc one':>8s} {'groups':>7s}")
    for task in tasks:
        one = evaluate(loaded, task, tm, args.limit, args.batch_size, math.inf)
        grouped = evaluate(loaded, task, tm, args.limit, args.batch_size, FORWARD_TOKENS["cpu"])
        diff = max(abs(a - b) for a, b in zip(one.pop("loglik"), grouped.pop("loglik")))
        rows.append({"task": task, "one": one, "groups": grouped, "max_abs_loglik_diff": diff})
        print(f"{task:14s} {one['seconds']:7.1f} {grouped['seconds']:8.1f} {grouped['seconds'] / one['seconds']:6.2f} "
              f"{one['decode_tokens_needed']:7d} {one['decode_tokens_computed']:12d} {grouped['decode_tokens_computed']:7d} {diff:14.2e} "
              f"{one['acc']:8.3f} {grouped['acc']:7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "limit": args.limit, "batch_size": args.batch_size,
                                         "forward_cost": cost, "tasks": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
