"""How faithfully PDTrim's screens rank candidates: figures, not a test.

Walks the greedy path of a stored exhaustive search trace (`lazy=false`: the float32 value of every
candidate at every step), screens every candidate of every step, and prints per step the rank the
screen gives the float32 best, the largest relative error, how much the screen errors of near
candidates (within 10 % of the best) differ from the best's, and the margin the float32 best needs
to be evaluated (its screened value over the lowest, less 1), which `screen_margin` / `subset_margin`
must cover. `--screen bfloat16`: `methods/pdtrim/screen.py` on the same search sequences;
`--screen subset`: the float32 objective on the first `sensitivity_samples` search sequences, its
base moved along the path as the search moves it. Writes the values as JSON.

    python benchmarks/pdtrim_screen_fidelity.py --json results/issue16/screening_bf16.json
    python benchmarks/pdtrim_screen_fidelity.py --screen subset --json results/issue16/screening_subset.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(ROOT / "results/issue3/limit1000/pdtrim__disaggregated.json"),
                   help="a pdtrim record searched with lazy=false and the default search options")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--screen", choices=("bfloat16", "subset"), default="bfloat16")
    p.add_argument("--json", help="write the values here")
    args = p.parse_args()

    import torch

    import methods
    from harness.pd.models import load_model
    from harness.quality.calibration import CalibConfig, build_calibration
    from methods.pdtrim.objectives import CalibSplit, StageObjective
    from methods.pdtrim.screen import Screen, screen_copy

    record = json.loads(Path(args.trace).read_text())
    info = record["plan"]["info"]
    loaded = load_model(args.model, "cpu", "float32")
    calib = build_calibration(loaded.tokenizer, Path(args.data_dir), CalibConfig())
    c = methods.get("pdtrim").Config()
    split = CalibSplit.from_calibration(calib.input_ids, c.search_samples, c.max_cont, c.seed)
    obj = StageObjective(loaded.model, split, c.batch_size, c.batch_tokens)
    if args.screen == "bfloat16":
        scr = Screen(obj, screen_copy(loaded.model, torch.bfloat16))
    else:  # the subset objective stands in for the screen: its own bases, moved as the search moves them
        n = c.sensitivity_samples
        scr = sub = StageObjective(loaded.model, CalibSplit(split.prompts[:n], split.conts[:n]), c.batch_size, c.batch_tokens)
    trace = info["search_trace"]
    prefill, decode = f"prefill_k{len(info['removed_prefill'])}", f"decode_k{len(info['removed_decode'])}"
    steps, removed = [], frozenset()
    for stage, name in (("prefill", prefill), ("decode", decode)):
        rp = removed
        for s in trace[name]:
            exact = {int(j): v for j, v in s["candidates"].items()}
            t0 = time.perf_counter()
            if stage == "prefill":
                obj.set_prefill_base(removed)
                sub.set_prefill_base(removed) if args.screen == "subset" else None
                screened = {j: scr.prefill(removed | {j}) for j in exact}
            else:
                obj.set_decode_base(removed, rp)
                sub.set_decode_base(removed, rp) if args.screen == "subset" else None
                screened = {j: scr.decode(removed | {j}, rp) for j in exact}
            steps.append(_summary(stage, sorted(removed), exact, screened, time.perf_counter() - t0))
            removed = removed | {s["removed"]}
    if args.json:
        Path(args.json).write_text(json.dumps({"trace": args.trace, "model": args.model, "screen": args.screen,
                                               "steps": steps}, indent=1))
    return 0


def _summary(stage: str, removed: list[int], exact: dict, screened: dict, seconds: float) -> dict:
    best = min(exact, key=lambda j: (exact[j], j))
    order = sorted(screened, key=lambda j: (screened[j], j))
    rb = exact[best] / screened[best]
    near = [j for j in exact if j != best and exact[j] <= 1.1 * exact[best]]
    dev = max((abs(exact[j] / screened[j] / rb - 1) for j in near), default=0.0)
    row = {"stage": stage, "removed_before": removed, "float32_best": best, "screen_rank_of_float32_best": order.index(best) + 1,
           "max_relative_error": max(abs(screened[j] / exact[j] - 1) for j in exact),
           "near_error_gap": dev, "needed_margin": screened[best] / min(screened.values()) - 1,
           "within_10pct": sum(v <= 1.1 * min(screened.values()) for v in screened.values()),
           "seconds": seconds, "float32": exact, "screen": screened}
    print(f"{stage} after {removed}: float32 best {best}, screen rank {row['screen_rank_of_float32_best']}, "
          f"max rel. error {row['max_relative_error']:.4f}, near candidates' error gap {dev:.4f}, "
          f"needed margin {row['needed_margin']:.4f} ({seconds:.0f} s)")
    return row


if __name__ == "__main__":
    sys.exit(main())
