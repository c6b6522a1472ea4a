"""`streamline`: LLM-Streamline's contiguous-run pruning (Chen et al., arXiv 2403.19135).

"Compressing Large Language Models by Streamlining the Unimportant Layer" (ICLR 2025 version:
"Streamlining Redundant Layers to Compress Large Language Models"). Layer pruning: among all
runs of `k` consecutive blocks i .. i+k-1, remove the one whose input (the hidden state entering
block i) and output (the hidden state leaving block i+k-1) are most similar, by mean cosine over
calibration tokens (padding excluded; the last block's output is taken before the final norm).
Layer replacement (`replace=ffn`, off by default): a lightweight network trained to map the
run's input to its output stands in for the removed run.

Prefill stage: the kept blocks (plus the replacement network, if trained). Decode stage: the same.
KV: every prompt position of every kept block is sent (the replacement network has no attention,
hence no KV).

Choices and departures from the paper:
- No training by default, so the plain rows compare one-shot removal with the other baselines;
  `replace=ffn` gives the paper's method with its FFN replacement.
- The replacement is the run's first block with its attention taken out (`LayerFFN`): its
  feed-forward half as the family computes it, h + MLP(RMSNorm(h)) in Llama's pre-norm layers
  (OLMo-2 norms the MLP's output instead, Granite scales it by `residual_multiplier`), initialised
  from that block (the slot the authors' code keeps; their transformer-layer variant is
  initialised from that block too) and trained with Adam on the hidden-state MSE, on every
  token of this harness's calibration set (the paper trains on far more general text, SlimPajama; with ~18k calibration tokens the
  pretrained initialisation and the residual form keep it from starting far off). The record
  gives the MSE before and after training. The transformer-layer replacement is not offered.
- The network is installed by `apply` as a forward hook on the block after the run (or, for a run
  that ends at the last block, on the block before it) and removed on exit; the trained weights
  live in this instance, so a resumed run re-plans (retrains) rather than reusing a stored plan.
- The run's position depends on its length, so there is no nested removal order and no
  `stage:streamline` (methods/depth/stage.py says so).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.cache import PDCache
from harness.pd.engine import run_layers
from harness.pd.plan import PruningPlan
from methods.bars import calib_batches
from methods.base import DepthOptions, Method, content_key, optimizer_step
from methods.depth.ranked import progress
from methods.registry import register

REPLACEMENTS = ("none", "ffn")
NETWORK = "block {block} without its attention (its FFN half: h + MLP(norm(h)) in pre-norm layers)"


class ZeroAttention(nn.Module):
    """Stands in for a decoder layer's attention in a replacement: adds exactly nothing (no weights, no KV)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class LayerFFN(nn.Module):
    """A copy of a decoder layer with its attention taken out, standing in for a removed run: the layer's
    feed-forward half as its family computes it, h + MLP(norm(h)) in Llama's pre-norm layers, h + norm(MLP(h)) in
    OLMo-2's post-norm ones, h + r · MLP(norm(h)) with Granite's `residual_multiplier` r. So it starts as that block's
    own FFN half, and the same layer with all-zero attention weights (the exported form) computes exactly it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attention = layer.self_attn
        layer.self_attn = ZeroAttention()  # swapped in for the copy only: the attention's weights are not copied
        try:
            self.layer = copy.deepcopy(layer)
        finally:
            layer.self_attn = attention

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, seq, hidden), or (tokens, hidden) rows in training, which go through as one sequence (a
        mixture-of-experts block unpacks three dimensions). The attention's inputs are not needed: none."""
        out = self.layer(h[None] if h.dim() == 2 else h, attention_mask=None, position_embeddings=None)
        out = out[0] if isinstance(out, tuple) else out
        # a copy of a placed block computes on that block's device; h comes from the block before the run
        return (out[0] if h.dim() == 2 else out).to(h.device)


@torch.inference_mode()
def run_cosines(model, calib, k: int, batch_size: int) -> list[float]:
    """Mean cos(input of block i, output of block i+k-1) over calibration tokens, for i = 0 .. n-k."""
    n, device = arch.n_layers(model), arch.model_device(model)
    sums = torch.zeros(n - k + 1, dtype=torch.float64, device="cpu")  # host sums of .cpu() terms
    count = 0
    for ids, mask in calib_batches(calib, batch_size, device, "streamline: run cosines"):
        valid = mask.bool()
        pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
        states: dict = {}
        states[n] = run_layers(model, tuple(range(n)), ids, pos, valid, PDCache(retain=()), collect=states)
        for i in range(n - k + 1):
            a = states[i].float()  # each block's input is on the device of the block before it (a model spread over GPUs)
            cos = F.cosine_similarity(a, states[i + k].float().to(a.device), dim=-1)
            sums[i] += cos[valid.to(a.device)].double().sum().cpu()
        count += int(valid.sum())
    return (sums / count).tolist()


@torch.inference_mode()
def run_pairs(model, calib, start: int, k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of block `start`, output of block start+k-1) for every calibration token: (N, hidden) each."""
    device = arch.model_device(model)
    xs, ys = [], []
    for ids, mask in calib_batches(calib, batch_size, device, "streamline: run inputs and outputs"):
        valid = mask.bool()
        pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
        states: dict = {}
        states[start + k] = run_layers(model, tuple(range(start + k)), ids, pos, valid, PDCache(retain=()), collect=states)
        # each block's input is on the device of the block before it (a model spread over GPUs)
        xs.append(states[start][valid.to(states[start].device)].float())
        ys.append(states[start + k][valid.to(states[start + k].device)].float())
    return torch.cat(xs), torch.cat(ys).to(xs[0].device)


def train_replacement(model, block: int, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_tokens: int,
                      seed: int) -> tuple[LayerFFN, dict]:
    """Block `block`'s feed-forward half (`LayerFFN`), trained by Adam on MSE(ffn(x), y); x, y: (tokens, hidden)."""
    layer = arch.decoder_layers(model)[block]
    if not isinstance(getattr(layer, "self_attn", None), nn.Module):
        raise UsageError(f"streamline.replace=ffn: a {type(layer).__name__} has no `self_attn` to take out of a copy "
                         "of the block; use replace=none with this model")
    ffn = LayerFFN(layer).float()
    ffn.requires_grad_(True)
    opt = torch.optim.Adam(ffn.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def mse() -> float:
        with torch.no_grad():
            return float(sum(F.mse_loss(ffn(a), b, reduction="sum").double() for a, b in zip(x.split(4096), y.split(4096))) / y.numel())

    before = mse()
    with torch.enable_grad():
        for _ in progress(range(steps), "streamline: training the replacement"):
            idx = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=gen, device="cpu").to(x.device)
            opt.zero_grad()
            F.mse_loss(ffn(x[idx]), y[idx]).backward()
            optimizer_step(opt)
    after = mse()
    ffn.requires_grad_(False)
    ffn.to(next(layer.parameters()).dtype)
    return ffn.eval(), {"mse_before": before, "mse_after": after, "tokens": int(x.shape[0]), "steps": steps, "lr": lr,
                        "batch_tokens": batch_tokens, "initialised_from_block": block}


@contextlib.contextmanager
def installed(model, run: list[int], ffn: nn.Module) -> Iterator[None]:
    """Run `ffn` where the removed `run` was: before the block after it (or after the block before
    it, when the run ends at the last block). The hook is removed on exit."""
    layers, n = arch.decoder_layers(model), arch.n_layers(model)
    after = run[-1] + 1
    if after < n:
        def pre(module, args, kwargs):
            if args:
                return (ffn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": ffn(kwargs["hidden_states"])}

        handle = layers[after].register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, args, output):
            return (ffn(output[0]), *output[1:]) if isinstance(output, tuple) else ffn(output)

        handle = layers[run[0] - 1].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@register
class Streamline(Method):
    name = "streamline"
    summary = "remove the contiguous run of k blocks whose input and output are most similar (cosine); optional trained FFN replacement"
    doc_row = ("drops the run of `k` consecutive blocks whose input and output are most similar; optional trained FFN in its place "
               "(LLM-Streamline, arXiv 2403.19135)", "same blocks", "all positions")
    baseline_doc = ("LLM-Streamline, arXiv 2403.19135", "the contiguous run of k blocks with the most similar input and output",
                    "whole set, 1 forward")
    needs_calibration = True
    why_no_stage_variant = "its removed run moves with its length, so it has no nested removal order"

    @dataclass(frozen=True)
    class Config(DepthOptions):
        k: int = 8  # length of the removed run
        batch_size: int = 16  # calibration forward batch
        replace: str = "none"  # none | ffn: train a residual FFN to stand in for the run
        replace_steps: int = 200  # Adam steps
        replace_lr: float = 1e-4
        replace_batch_tokens: int = 1024  # tokens per training step (drawn with replacement)
        seed: int = 0  # training draws

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._memo: tuple | None = None
        self._trained: dict[tuple[int, ...], nn.Module] = {}  # kept layers -> trained replacement
        self._reports: dict[tuple, dict] = {}  # (model, calibration, kept layers) -> training report

    def validate_config(self, c) -> None:
        if c.k < 0 or c.batch_size < 1:
            raise UsageError(f"streamline: need k >= 0 and batch_size >= 1, got k={c.k}, batch_size={c.batch_size}")
        if c.replace not in REPLACEMENTS:
            raise UsageError(f"streamline.replace={c.replace!r}: expected one of {', '.join(REPLACEMENTS)}")
        if c.replace_steps < 0 or not c.replace_lr > 0 or c.replace_batch_tokens < 1:
            raise UsageError("streamline: need replace_steps >= 0, replace_lr > 0, replace_batch_tokens >= 1")

    def needs_replan_on_resume(self) -> bool:
        return self.config.replace != "none"  # the trained replacement lives in this instance

    def check_depth(self, n: int, mode: str) -> None:
        if self.config.k >= n:
            raise self.too_deep("k", self.config.k, n)

    def plan(self, model, calib, mode: str) -> PruningPlan:
        c, n = self.config, arch.n_layers(model)
        self.check_depth(n, mode)
        if calib is None:
            raise UsageError("streamline needs a calibration set")
        key = (*content_key(model, calib), c.k)
        if self._memo is None or self._memo[0] != key:  # the plan does not depend on the mode
            t0 = time.perf_counter()
            cos = run_cosines(model, calib, c.k, c.batch_size) if c.k else []
            self._memo = (key, cos, time.perf_counter() - t0)
        cos, seconds = self._memo[1], self._memo[2]
        start = max(range(len(cos)), key=lambda i: (cos[i], -i)) if c.k else None
        run = list(range(start, start + c.k)) if c.k else []
        keep = tuple(i for i in range(n) if i not in run)
        info = {"criterion": "max over runs i..i+k-1 of mean cos(input of block i, output of block i+k-1)",
                "run_cosine": {str(i): v for i, v in enumerate(cos)}, "start": start, "removed": run, "mode": mode,
                "work": {"full_forward_equivalents": 1 if c.k else 0, "score_seconds": seconds}}
        info["replacement"] = self._replace(model, calib, run, keep) if c.replace == "ffn" and run else {"enabled": False}
        return PruningPlan(self.name, n, keep, keep, info=info)

    def _replace(self, model, calib, run: list[int], keep: tuple[int, ...]) -> dict:
        c = self.config
        key = (*content_key(model, calib), keep)
        if key in self._reports:  # both modes remove the same run: train once
            return self._reports[key]
        arch.need_resident_weights(model, "streamline.replace=ffn (training a copy of a block's MLP)")
        t0 = time.perf_counter()
        x, y = run_pairs(model, calib, run[0], len(run), c.batch_size)
        ffn, report = train_replacement(model, run[0], x, y, c.replace_steps, c.replace_lr, c.replace_batch_tokens, c.seed)
        self._trained[keep] = ffn
        n = arch.n_layers(model)
        where = f"before block {run[-1] + 1}" if run[-1] + 1 < n else f"after block {run[0] - 1}"
        self._reports[key] = {"enabled": True, "kind": "ffn", "network": NETWORK.format(block=run[0]), "installed": where, **report,
                              "seconds": time.perf_counter() - t0}
        return self._reports[key]

    @contextlib.contextmanager
    def apply(self, model, plan: PruningPlan) -> Iterator[PruningPlan]:
        if not plan.info.get("replacement", {}).get("enabled"):
            yield plan
            return
        ffn = self._trained.get(plan.prefill_layers)
        if ffn is None:
            raise RuntimeError("streamline: this plan needs its trained replacement network; call plan() on this instance first")
        with installed(model, plan.info["removed"], ffn):
            yield plan
