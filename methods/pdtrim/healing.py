"""Healing for depth pruning: train the block after a removed run to stand in for the run.

Reading of PDTRIM.md §2 ("for each removed block from D, train the following kept block to
reproduce the dense pair's output (hidden-state MSE) on the calibration texts"), generalised to
consecutive removals: for every maximal run of removed blocks `i..i+m` that contains a
distillation-set block and is followed by a kept block `j`, a copy of block `j` is trained so
that `j'(h_in(i)) ≈ h_out(j)` of the dense model, by Adam on the mean squared error over the
calibration tokens. Runs made only of pruning-set blocks (nearly identity) are not healed. The
trained copies are installed by `Method.apply` for the duration of an evaluation and the
original modules are put back on exit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from harness.pd import arch
from harness.pd.cache import PDCache
from harness.pd.engine import attention_mask, run_layers
from methods.base import optimizer_step


def healing_runs(removed: Sequence[int], distill: Sequence[int], n_layers: int) -> list[tuple[tuple[int, ...], int]]:
    """[(removed run, following kept block)] for runs with a distillation-set block and a successor."""
    rem, dset = set(removed), set(distill)
    runs, i = [], 0
    while i < n_layers:
        if i in rem:
            start = i
            while i < n_layers and i in rem:
                i += 1
            run = tuple(range(start, i))
            if i < n_layers and any(b in dset for b in run):
                runs.append((run, i))
        i += 1
    return runs


def _layer_forward(model, layer: nn.Module, h: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One decoder layer over full sequences (no cache), with gradients."""
    dec = arch.decoder(model)
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    step_pos = torch.where(valid, pos, torch.full_like(pos, -1))
    mask = attention_mask(step_pos, step_pos, valid, h.dtype, impl)
    rot = dec.rotary_emb(h, position_ids=pos)
    out = layer(h, attention_mask=mask, position_embeddings=rot, position_ids=pos,
                **{arch.cache_kwarg(type(layer)): None})
    return out[0] if isinstance(out, tuple) else out


def heal(model, batches: list[tuple[torch.Tensor, torch.Tensor]], runs: list[tuple[tuple[int, ...], int]],
         steps: int, lr: float, seed: int) -> tuple[dict[int, nn.Module], dict]:
    """Train a copy of each run's following block; returns ({block: healed copy}, report).

    `batches`: (input_ids, attention_mask) calibration batches (B, T). The report gives, per block,
    the MSE before and after training over those batches' valid tokens (token-weighted; training steps take
    one batch's mean each).
    """
    n = arch.n_layers(model)
    device = arch.model_device(model)
    inputs: list[dict] = []
    with torch.inference_mode():
        for ids, mask in batches:
            pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
            got: dict = {}
            out = run_layers(model, tuple(range(n)), ids, pos, mask.bool(), PDCache(retain=()), collect=got)
            got[n] = out
            inputs.append(got)
    torch.manual_seed(seed)
    healed, report = {}, {}
    for run, j in runs:
        layer = copy.deepcopy(arch.decoder_layers(model)[j]).float()
        layer.requires_grad_(True)
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        data = []
        for (ids, mask), got in zip(batches, inputs):
            pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
            data.append((got[run[0]].clone().float(), got[j + 1].clone().float(), pos.clone(), mask.bool().clone()))

        def loss_of(x, y, pos, valid, layer=layer):
            pred = _layer_forward(model, layer, x, pos, valid)  # on the block's device (a model spread over GPUs)
            return ((pred - y.to(pred.device)) ** 2)[valid.to(pred.device)].mean()

        before = _mse(loss_of, data)
        for step in range(steps):
            x, y, pos, valid = data[step % len(data)]
            opt.zero_grad()
            loss_of(x, y, pos, valid).backward()
            optimizer_step(opt)
        after = _mse(loss_of, data)
        layer.requires_grad_(False)
        layer.to(next(arch.decoder_layers(model)[j].parameters()).dtype)
        healed[j] = layer.eval()
        report[str(j)] = {"replaces_run": list(run), "mse_before": before, "mse_after": after, "steps": steps, "lr": lr}
    return healed, report


def _mse(loss_of, data: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean squared error over every valid token's hidden values of all batches: each batch's mean weighted by
    its valid tokens (a mean of batch means weighted a half-padded batch's tokens double)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for d in data:
            n = int(d[3].sum())
            total += float(loss_of(*d)) * n
            count += n
    return total / max(count, 1)


@contextlib.contextmanager
def installed(model, healed: dict[int, nn.Module]) -> Iterator[None]:
    """Put the healed copies in place of their blocks; restore the original modules on exit."""
    layers = arch.decoder_layers(model)
    original = {j: layers[j] for j in healed}
    try:
        for j, m in healed.items():
            layers[j] = m
        yield
    finally:
        for j, m in original.items():
            layers[j] = m
