"""Batches on a CPU, against full padded batches, on SmolLM2: the batch cut where padding its shorter
prompts costs more than a forward (`batching.chunk_bounds`), and in disaggregated mode the decode
stage's continuations in groups of like length (`batching.length_groups`).

1. The fixed cost of one forward in tokens: decode forwards of 16 rows × q tokens over a 48-token
   prompt, fastest of 5 each, fitted as `ms = fixed + per_token × tokens`; `fixed ÷ per_token` is
   what `scoring.FORWARD_TOKENS["cpu"]` rounds up.
2. Multiple-choice tasks through lm-eval, each twice in one process (full batches and one padded
   decode forward, as on a GPU; then the CPU's cuts and groups): wall seconds, prompt tokens and
   decode tokens computed (padding included) and needed, the largest |Δ log-likelihood| of a
   request between the two, and both accuracies.

    python benchmarks/cpu_batches.py --tasks hellaswag,piqa,boolq --limit 100 --modes disaggregated,unified --json out.json
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


def evaluate(loaded, task: str, tm, limit: int, batch_size: int, mode: str, forward_tokens: float) -> dict:
    from lm_eval import simple_evaluate

    from harness.pd.plan import PruningPlan
    from harness.quality import scoring
    from harness.quality.lm import PDLM

    lm = PDLM(loaded.model, loaded.tokenizer, PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers),
              mode, batch_size=batch_size, progress=False)
    lm.scorer.forward_tokens = forward_tokens
    tokens = {f"{k}_tokens_{c}": 0 for k in ("prompt", "decode") for c in ("computed", "needed")}
    pad = scoring.pad_tokens

    def counting(rows, device, **kw):  # prompt blocks start at 0; continuations after their prompt
        batch = pad(rows, device, **kw)
        kind = "prompt" if kw.get("start") is None else "decode"
        tokens[f"{kind}_tokens_computed"] += batch.ids.numel()
        tokens[f"{kind}_tokens_needed"] += int(batch.lengths.sum())
        return batch

    scoring.pad_tokens = counting
    try:
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True, bootstrap_iters=0)
        seconds = time.perf_counter() - t0
    finally:
        scoring.pad_tokens = pad
    samples = out["samples"][task]
    return {"seconds": seconds, **tokens, "acc": out["results"][task]["acc,none"],
            "loglik": [r[0][0] for s in samples for r in s["resps"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="hellaswag,piqa,arc_challenge")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", default="disaggregated", help="comma-separated: disaggregated, unified")
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
    print(f"a decode forward, 16 rows: {cost['fixed_ms']:.1f} ms fixed + {cost['per_token_ms']:.2f} ms a token "
          f"= {cost['fixed_in_tokens']:.0f} tokens fixed (FORWARD_TOKENS['cpu'] = {FORWARD_TOKENS['cpu']:g})")
    tasks = args.tasks.split(",")
    tm = task_manager(tasks, Path(args.data_dir))
    rows = []
    print(f"{'task':14s} {'mode':13s} {'full s':>7s} {'cut s':>6s} {'ratio':>6s} {'prompt tok: needed':>18s} {'full':>6s} "
          f"{'cut':>6s} {'decode tok: needed':>18s} {'full':>6s} {'cut':>6s} {'max |Δ loglik|':>14s} {'acc full':>8s} {'cut':>6s}")
    for task in tasks:
        for mode in args.modes.split(","):
            full = evaluate(loaded, task, tm, args.limit, args.batch_size, mode, math.inf)
            cut = evaluate(loaded, task, tm, args.limit, args.batch_size, mode, FORWARD_TOKENS["cpu"])
            diff = max(abs(a - b) for a, b in zip(full.pop("loglik"), cut.pop("loglik")))
            rows.append({"task": task, "mode": mode, "full": full, "cut": cut, "max_abs_loglik_diff": diff})
            print(f"{task:14s} {mode:13s} {full['seconds']:7.1f} {cut['seconds']:6.1f} {cut['seconds'] / full['seconds']:6.2f} "
                  f"{full['prompt_tokens_needed']:18d} {full['prompt_tokens_computed']:6d} {cut['prompt_tokens_computed']:6d} "
                  f"{full['decode_tokens_needed']:18d} {full['decode_tokens_computed']:6d} {cut['decode_tokens_computed']:6d} "
                  f"{diff:14.2e} {full['acc']:8.3f} {cut['acc']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "limit": args.limit, "batch_size": args.batch_size,
                                         "forward_tokens": FORWARD_TOKENS["cpu"],
                                         "forward_cost": cost, "tasks": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
