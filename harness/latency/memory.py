"""Whether a latency workload can fit at all, from the model's config alone, before its weights load.

`--prompt-tokens 100000000` on random:tiny ended, after the model had loaded, in the allocator's "can't allocate
memory: you tried to allocate 25600000000 bytes" from the embedding. A prefill of any plan holds at least the
prompts' token ids, the embeddings' output and one layer's prompt K and V at once (a plan's stages each run a layer
at least): that floor, against the memory the device has free, refuses such a workload with exit 2 naming both
figures. It is a floor, not an estimate: the weights, the other layers' KV and the attention's work are left out,
so a workload it lets through may still not fit, and one it refuses never does.

A workload longer than the model's context (`max_position_embeddings`) is not refused here: it is measured on
purpose, with a warning (`measure.beyond_context`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from harness.errors import UsageError
from harness.latency.measure import Workload
from harness.pd.engine import expected_kv_bytes

GB = 1e9


def bytes_per_prompt_token(config, dtype: torch.dtype) -> int:
    """Bytes one prompt token holds in any plan's prefill: its id (int64), its embedding (hidden_size) and one
    layer's KV, in `dtype`: K and V (2 · kv_heads · head_dim), or for a latent-KV model (DeepSeek-V2/V3) the latent
    and rotary key part (kv_lora_rank + qk_rope_head_dim), what transformers 5.24 caches (`arch.latent_kv`). The
    engine's own count, `expected_kv_bytes`, for one layer and token."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv = expected_kv_bytes(config, layers=1, tokens=1, dtype=dtype)
    return torch.empty((), dtype=torch.int64).element_size() + int(config.hidden_size) * elem + kv


def free_bytes(device: torch.device, spread: bool) -> tuple[int, str]:
    """(bytes free now, the memory that is, in words): the GPU's free memory (`_gpu_free_bytes`); for a model
    spread by --device-map every GPU's and the host's together (layers may go anywhere); on a CPU the host's."""
    if spread or device.type != "cuda":
        host, words = _host_free_bytes()
        if not spread or not torch.cuda.is_available():
            return host, words
        gpus = sum(_gpu_free_bytes(i) for i in range(torch.cuda.device_count()))
        return gpus + host, f"the {torch.cuda.device_count()} GPU(s) and {words} together"
    return _gpu_free_bytes(device), str(device)


def _gpu_free_bytes(device: torch.device | int) -> int:
    """The GPU's free memory (`torch.cuda.mem_get_info`) plus what this process's caching allocator holds and no
    tensor uses (reserved - allocated): the prefill reuses those blocks, which a `[run]` section before the latency
    one (`check`, `--config`) leaves cached and `mem_get_info` counts as taken."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _host_free_bytes() -> tuple[int, str]:
    """The host's MemAvailable + SwapFree (/proc/meminfo: what can be allocated without killing anything), else
    its physical memory (not Linux: an upper bound, so the floor still never refuses what would fit)."""
    try:
        with open("/proc/meminfo") as f:
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return (kib["MemAvailable"] + kib.get("SwapFree", 0)) * 1024, "the host (MemAvailable + SwapFree)"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the host (all its physical memory)"


def refuse_unfit(config, workloads: Sequence[Workload], dtype: torch.dtype, device: torch.device,
                 spread: bool = False) -> None:
    """UsageError (exit 2) naming the largest workload whose floor (`bytes_per_prompt_token` · batch · prompt
    tokens) exceeds the memory free on `device`, and both figures in GB."""
    per_token = bytes_per_prompt_token(config, dtype)
    w = max(workloads, key=lambda w: w.batch_size * w.prompt_tokens)
    need = per_token * w.batch_size * w.prompt_tokens
    free, where = free_bytes(device, spread)
    if need <= free:
        return
    raise UsageError(
        f"--prompt-tokens {w.prompt_tokens} --batch-size {w.batch_size}: one prefill holds at least {need / GB:,.1f} GB "
        f"(token ids, embeddings and one layer's K and V in {str(dtype).removeprefix('torch.')}: "
        f"{w.batch_size} x {w.prompt_tokens} tokens x {per_token} B, before the weights), and {free / GB:,.1f} GB is "
        f"free on {where}; give a --prompt-tokens x --batch-size of at most {free // per_token:,} tokens")
