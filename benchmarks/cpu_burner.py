"""A CPU load like another PyTorch job: a multi-threaded matmul loop for a given time.

What `.ci/run` and the latency gate were shown under (docs/specs.md, "Regression checks"): unlike
Python busy loops, its OpenMP threads compete with the harness's own for the same cores.

    python benchmarks/cpu_burner.py 1500 --threads 2 &   # then run .ci/run or a latency check beside it
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seconds", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=768)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    a, end = torch.randn(args.size, args.size), time.time() + args.seconds
    while time.time() < end:
        for _ in range(50):
            a = torch.tanh(a @ a * 1e-3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
