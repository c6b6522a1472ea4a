"""Operations per static/graph decode step: what a CUDA graph of one step replays, counted on the CPU.

On a GPU each of these ops is at least one kernel, and inside a graph each still costs a few µs however small
(launch-free, not work-free): at batch 1 a Llama-3-8B step's ~1,500 small kernels are time of the order of its
weight reads (benchmarks/gpu_check.py (c)). The step is captured under the simulated CUDA graphs of
tests/simulated_cuda_graphs.py on a layer-for-layer Llama-3-8B (32 layers, 8 KV heads of 32) with small widths
(counts do not depend on widths) for gpu_check's three plans, in bfloat16 (the casts count there).

    python benchmarks/decode_step_ops.py          # a few seconds
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def small_llama3(dtype):
    import torch
    import transformers

    from harness.pd.models import PRESETS

    cfg = dict(PRESETS["llama3-8b"])
    cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **cfg)).to(dtype).eval()


def kernels(capture) -> tuple[int, collections.Counter]:
    """Ops of a capture that write memory (a new output or an in-place write): views and no-op casts excluded."""
    seen = collections.Counter()
    for func, _, _, _, fresh in capture.ops:
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if fresh or writes:
            seen[str(func)] += 1
    return sum(seen.values()), seen


def main(argv=None) -> int:
    import torch
    from gpu_check import plans
    from simulated_cuda_graphs import simulated_cuda_graphs

    from harness.pd.batching import TokenBatch
    from harness.pd.stages import StagedModel
    from harness.pd.static_decode import GraphDecoder, StaticKV

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of the dense plan")
    args = p.parse_args(argv)
    model = small_llama3(getattr(torch, args.dtype))
    print(f"{'plan':14s} {'decode layers':>13s} {'ops':>6s} {'kernels':>8s} {'per layer':>9s}")
    with torch.inference_mode():
        for name, plan in plans(model.config.num_hidden_layers).items():
            batch = TokenBatch.dense(torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)))
            staged = StagedModel(model, plan)
            out = staged.prefill(batch)
            tok = staged.logits(out.last_hidden).argmax(-1)
            with simulated_cuda_graphs():
                dec = GraphDecoder(model, plan.decode_layers, StaticKV(staged.receive(staged.handoff(out)), 4), tok[:, None],
                                   batch.lengths[:, None].clone())
            n, seen = kernels(dec.graph.capture)
            layers = len(plan.decode_layers)
            print(f"{name:14s} {layers:13d} {len(dec.graph.capture.ops):6d} {n:8d} {n / layers:9.1f}")
            if args.top and name == "dense":
                for op, count in seen.most_common(args.top):
                    print(f"    {count:5d} {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
