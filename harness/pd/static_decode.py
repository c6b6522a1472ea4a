"""A fixed-shape decode path: preallocated KV buffers, so a decode step can be a CUDA graph.

The eager decode path grows every layer's cache by concatenation, and its mask logic checks
tensor values on the host; neither can be captured. Here the handed-over prompt KV of each
decode layer is copied once into a buffer with room for `max_new` decode tokens; a decode step
writes its K/V and position at column `base_l + step` with `index_copy_` (the step is a device
tensor advanced in place), and each layer's mask is computed from its positions buffer on the
device. Every tensor shape is fixed, so on CUDA the whole step (embedding, layers, final norm,
head, argmax) is captured once per plan and replayed (`GraphDecoder`); on CPU the same step runs
uncaptured (`static` mode), which tests compare with the eager path.

Unwritten columns hold position -1, so they are masked like padding; the positions a KV policy
dropped are simply not in the buffer. Per-head selections (SnapKV-style) keep per-KV-head
positions buffers (B, kv_heads, W_l + max_new) and per-head masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.pd import arch
from harness.pd.cache import PDCache
from harness.pd.engine import attention_mask, final_logits


class StaticKV:
    """Per decode layer: K/V (B, kv_heads, W_l + max_new, head_dim) and positions (B, W_l + max_new),
    or (B, kv_heads, W_l + max_new) for a per-head selection.

    Layers handed one positions tensor (one keep pattern: every layer of a dense plan) share one positions
    buffer, so a step writes it, and `decode_step` builds its mask, once for all of them: on Llama-3-8B's 32
    layers that is about 250 fewer kernels a step, each a few µs even inside a CUDA graph."""

    def __init__(self, handed: PDCache, max_new: int) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}  # shared by the layers handed one positions tensor
        self.base: dict[int, torch.Tensor] = {}
        self._column: dict[int, torch.Tensor] = {}  # per layer, this step's column: set by begin_step
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        device = None
        for layer in handed.layers:
            k, v, p = handed.keys[layer], handed.values[layer], handed.positions[layer]
            b, h, w, d = k.shape
            device = k.device
            self.keys[layer] = torch.cat([k, k.new_zeros((b, h, max_new, d))], dim=2)
            # V's own width: a latent cache (DeepSeek-V3's multi-head latent attention) holds K and V of unequal widths
            self.values[layer] = torch.cat([v, v.new_zeros((*v.shape[:2], max_new, v.shape[-1]))], dim=2)
            if id(p) not in shared:
                shared[id(p)] = (torch.cat([p, p.new_full((*p.shape[:-1], max_new), -1)], dim=-1), torch.tensor([w], device=device))
            self.positions[layer], self.base[layer] = shared[id(p)]
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # advanced in place, outside any graph
        self.max_new = max_new

    def begin_step(self, positions: torch.Tensor) -> None:
        """Write this step's positions (B, 1) into every positions buffer, and fix every layer's column."""
        done: dict[int, torch.Tensor] = {}
        for layer, pos in self.positions.items():
            if id(pos) not in done:
                done[id(pos)] = self.base[layer] + self.step.to(self.base[layer].device)
                step = positions if pos.dim() == 2 else positions[:, None, :].expand(-1, pos.shape[1], -1)
                pos.index_copy_(pos.dim() - 1, done[id(pos)].to(pos.device), step)
            self._column[layer] = done[id(pos)]

    def layer_positions(self, layer_idx: int) -> torch.Tensor:
        return self.positions[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        idx = self._column[layer_idx].to(key_states.device)
        self.keys[layer_idx].index_copy_(2, idx, key_states)
        self.values[layer_idx].index_copy_(2, idx, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self) -> None:
        self.step += 1


def decode_step(model, layers: Sequence[int], tok: torch.Tensor, pos: torch.Tensor, cache: StaticKV) -> torch.Tensor:
    """One greedy step at fixed shapes: tok, pos (B, 1) -> next token (B,). No host synchronisation."""
    dec = arch.decoder(model)
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    groups = model.config.num_attention_heads // arch.kv_heads_and_dim(model.config)[0]
    h = dec.embed_tokens(tok)
    rot = dec.rotary_emb(h, position_ids=pos)
    cache.begin_step(pos)
    valid = torch.ones_like(pos, dtype=torch.bool)
    cache_kw = arch.cache_kwarg(type(dec.layers[layers[0]]))
    masks: dict[int, torch.Tensor] = {}  # one per positions buffer: layers that share one share their mask
    for i in layers:
        p = cache.positions[i]
        if id(p) not in masks:
            masks[id(p)] = attention_mask(p, pos, valid, h.dtype, impl, groups)
        mask = masks[id(p)]
        out = dec.layers[i](h, attention_mask=mask, position_embeddings=rot, position_ids=pos, **{cache_kw: cache})
        h = out[0] if isinstance(out, tuple) else out
    return final_logits(model, h[:, 0]).argmax(-1)


def can_capture(device: torch.device) -> bool:
    """Whether decode steps on `device` can be captured as a CUDA graph (tests simulate graphs on the CPU)."""
    return device.type == "cuda"


class GraphDecoder:
    """Decode steps replayed from one CUDA graph captured for (model, layers, cache shapes)."""

    def __init__(self, model, layers: Sequence[int], cache: StaticKV, tok: torch.Tensor, pos: torch.Tensor,
                 warmup: int = 2) -> None:
        if not can_capture(tok.device):
            raise RuntimeError("CUDA graphs need a CUDA device; use the static or eager decode path on CPU")
        self.cache = cache
        self.tok, self.pos = tok.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # writes the current step's column; replays overwrite it
                decode_step(model, layers, self.tok, self.pos, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = decode_step(model, layers, self.tok, self.pos, cache)
        # the first launch uploads the graph to the device: paid here, with the capture, not by the first timed step.
        # It computes what the warm-up did (the same tokens, positions and column: the step counter has not moved)
        self.graph.replay()

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run one step for tokens `tok` at positions `pos` (B, 1); returns the next tokens (B,)."""
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        self.cache.advance()
        return self.out


def weight_bytes(model, layers: Sequence[int]) -> int:
    """Bytes a decode step must read: the given layers' weights, the final norm and the LM head."""
    mods = [arch.decoder_layers(model)[i] for i in layers] + [arch.decoder(model).norm, arch.lm_head(model)]
    seen, total = set(), 0
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def copy_bandwidth_bytes_per_s(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured device-to-device copy rate counting read + write (2 · bytes / time), best of `repeats`."""
    import time

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            with torch.cuda.device(device):  # events record on the current device's stream: the copy's device
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        best = min(best, t)
    return 2 * nbytes / best
