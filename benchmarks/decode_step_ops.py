"""Operations per static/graph decode step: what a CUDA graph of one step replays.

On a GPU each of these ops is at least one kernel, and inside a graph each still costs a few µs however small
(launch-free, not work-free): at batch 1 a Llama-3-8B step's ~1,300 small kernels take time of the order of its
weight reads. benchmarks/gpu_check.py (c) records this count beside graph TPOT and the HBM bound, so a TPOT
well over the bound can be read as µs per op. Counted by dispatching one uncaptured static step (the ops a
capture records: those that write memory; views and no-op casts excluded). Here on a layer-for-layer Llama-3-8B
(32 layers, 8 KV heads of 32) with small widths (counts do not depend on widths), for gpu_check's three plans.

    python benchmarks/decode_step_ops.py [--dtype float32] [--top N]     # a few seconds, CPU
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


class OpCounter(TorchDispatchMode):
    """Counts, by name, the dispatched ops that write memory: a new output or an in-place write."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._fresh(func, args, kwargs, out) or any(a.alias_info is not None and a.alias_info.is_write
                                                       for a in func._schema.arguments):
            self.ops[str(func)] += 1
        return out

    @staticmethod
    def _fresh(func, args, kwargs, out) -> bool:
        """Whether an output is in new memory: by the memory (`to.dtype` and `reshape` are views in their schema
        and copy when they must); by the schema for tensors with no memory of their own (wrapper subclasses)."""
        try:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            return any(isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs
                       for t in tree_flatten(out)[0])
        except RuntimeError:  # "invalid python storage"
            return not any(r.alias_info is not None for r in func._schema.returns)


@torch.inference_mode()
def step_ops(model, plan, prompt_tokens: int = 128) -> collections.Counter:
    """Ops of one static decode step (batch 1) of `plan` on `model`, after a `prompt_tokens` prefill and handoff."""
    from harness.pd import arch
    from harness.pd.batching import TokenBatch
    from harness.pd.stages import StagedModel
    from harness.pd.static_decode import StaticKV, decode_step

    device = arch.model_device(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    batch = TokenBatch.dense(ids.to(device))
    staged = StagedModel(model, plan)
    out = staged.prefill(batch)
    tok = staged.logits(out.last_hidden).argmax(-1)
    skv = StaticKV(staged.receive(staged.handoff(out)), 2)
    with OpCounter() as counter:
        decode_step(model, plan.decode_layers, tok[:, None], batch.lengths[:, None], skv)
    return counter.ops


def small_kernel_s(device, n: int = 1000, repeats: int = 5, numel: int = 4096, dtype=torch.float32) -> float:
    """Seconds one small op costs when `n` run back to back (an in-place add to `numel` elements of `dtype`: one
    hidden state at batch 1, the size of a decode step's norm, rotary and residual pieces): replayed from one CUDA
    graph where graphs are available, the floor every small op of a graph step pays however little it computes;
    run eagerly elsewhere (a CPU's dispatch cost)."""
    from gpu_check_budget import best_s

    from harness.pd.static_decode import can_capture

    x = torch.zeros(numel, device=device, dtype=dtype)

    def ops() -> None:
        for _ in range(n):
            x.add_(1)

    run = ops
    if can_capture(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops()  # warm-up, as before any capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops()
        run = graph.replay
    return best_s(run, device, repeats + 1) / n


def small_llama3(dtype):
    import transformers

    from harness.pd.models import PRESETS

    cfg = dict(PRESETS["llama3-8b"])
    cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **cfg)).to(dtype).eval()


def main(argv=None) -> int:
    from gpu_check import plans

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="bfloat16 (default): the casts count")
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of the dense plan")
    args = p.parse_args(argv)
    model = small_llama3(getattr(torch, args.dtype))
    print(f"{'plan':14s} {'decode layers':>13s} {'ops':>6s} {'per layer':>9s}")
    for name, plan in plans(model.config.num_hidden_layers).items():
        ops = step_ops(model, plan)
        n, layers = sum(ops.values()), len(plan.decode_layers)
        print(f"{name:14s} {layers:13d} {n:6d} {n / layers:9.1f}")
        if args.top and name == "dense":
            for op, count in ops.most_common(args.top):
                print(f"    {count:5d} {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
