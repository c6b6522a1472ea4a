"""How the latency gate's ratios behave under CPU load: figures, not a test (timings are not asserted).

Runs `python -m harness latency` on one spec twice, quiet and beside N busy loops, then prints each
plan's TTFT and TPOT ratio to unpruned (fastest repeat, what `check` compares) in both runs, their
quotient and the gate's verdict at the default tolerance. Repeat it to see the spread on a machine.

    python benchmarks/latency_gate_load.py                       # random:tiny, 2 busy loops
    python benchmarks/latency_gate_load.py --model smollm2-135m --prompt-tokens 256 --decode-tokens 8 --burners 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--methods", default="unpruned,manual")
    p.add_argument("--set", action="append", default=["manual.decode_layers=0,3"])
    p.add_argument("--prompt-tokens", default="128")
    p.add_argument("--decode-tokens", default="16")
    p.add_argument("--repeats", default="5")
    p.add_argument("--burners", type=int, default=2)
    args = p.parse_args()

    from harness.cli.latency import cmd_latency
    from harness.store.records import load_dir
    from harness.store.regress import RATIO_TOLERANCE, _ratio, check

    base = ["--model", args.model, "--device", "cpu", "-q", "--methods", args.methods, "--prompt-tokens", args.prompt_tokens,
            "--decode-tokens", args.decode_tokens, "--batch-size", "1", "--repeats", args.repeats,
            *[x for s in args.set for x in ("--set", s)]]
    tmp = Path(tempfile.mkdtemp(prefix="gate-load-"))
    assert cmd_latency([*base, "--out", str(tmp / "quiet")]) == 0
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners)]
    try:
        assert cmd_latency([*base, "--out", str(tmp / "loaded")]) == 0
    finally:
        for b in burners:
            b.kill()
            b.wait()
    runs = {k: {r.method: r for r in load_dir(tmp / k)} for k in ("quiet", "loaded")}
    print(f"\n{'plan':12s} {'workload':24s} {'figure':12s} {'quiet':>8s} {'loaded':>8s} {'loaded/quiet':>13s}")
    for name, r in runs["quiet"].items():
        if name == "unpruned":
            continue
        for label in r.latency:
            for fig in ("ttft_ms_p50", "tpot_ms_p50"):
                a, _ = _ratio(r, runs["quiet"]["unpruned"], label, fig)
                b, _ = _ratio(runs["loaded"][name], runs["loaded"]["unpruned"], label, fig)
                print(f"{name:12s} {label:24s} {fig:12s} {a:8.3f} {b:8.3f} {b / a:13.2f}")
    res = check(tmp / "quiet", tmp / "loaded")
    print(f"\ngate at tolerance {RATIO_TOLERANCE} ({1 + RATIO_TOLERANCE:g}×): {'passed' if res.ok else 'FAILED'}")
    for f in res.failures:
        print("  FAIL", f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
