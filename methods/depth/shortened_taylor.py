"""`shortened_taylor`: Shortened LLaMA's Taylor+ criterion (Kim et al., arXiv 2402.02834).

"Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining Methods".
One-shot: block importance I_n = Σ_{W in block n} Σ_elements |W ⊙ ∂L/∂W|, the first-order Taylor
estimate of the loss change when the weights are zeroed, with L the mean next-token NLL of the
dense model on the calibration sequences. Blocks are ranked by I_n (least important first) and
the first `k` are removed; the ranking is the removal order `stage:shortened_taylor` uses.

Prefill stage: the kept blocks. Decode stage: the same kept blocks. KV: every prompt position of
every kept block is sent.

Choices and departures from the paper:
- The "+" rule: the first `keep_first = 4` and last `keep_last = 2` blocks are never removed
  (0 and 0 turn it off).
- "Weights" are a block's parameters named `*weight` (every projection and both norms), as in
  the authors' code, and a mixture-of-experts block's expert tensors, which transformers 5 names
  without the suffix (`arch.block_weights`); biases (Qwen2's q/k/v) are left out, as there.
- Calibration data: the paper uses 10 BookCorpus samples of 128 tokens; here `samples`
  sequences (seeded) of this harness's calibration set. L is the mean over all their predicted
  tokens (batches are accumulated with weights by token count), so the gradient does not depend
  on the batching.
- No retraining (the paper follows pruning with LoRA or continued pretraining).
- Gradients are taken only for decoder-block parameters; every parameter's `requires_grad` and
  `.grad` are put back exactly afterwards, so the model is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.errors import UsageError
from harness.pd import arch
from methods.depth.perplexity import calibration_rows, make_batches
from methods.depth.ranked import Ranking, SampledOptions, SampledRankedMethod, progress
from methods.registry import register


def taylor_scores(model, batches) -> tuple[list[float], float]:
    """Per block Σ |w · dL/dw| over its weights (`arch.block_weights`), and L (mean NLL), on `batches`.

    Leaves every parameter's `requires_grad` and `.grad` as they were.
    """
    layers = arch.decoder_layers(model)
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    weights = [[p for _, p in arch.block_weights(layer)] for layer in layers]
    n_targets = sum(len(b.targets) for b in batches)
    loss_total = 0.0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for ws in weights:
            for p in ws:
                p.requires_grad_(True)
        with torch.enable_grad():
            for b in progress(batches, "shortened_taylor: gradients"):
                hidden = arch.decoder(model)(input_ids=b.ids, attention_mask=b.valid.long(), use_cache=False).last_hidden_state
                # hidden: on the last block's device, logits on the LM head's (a model spread over GPUs)
                logits = arch.lm_head(model)(hidden[b.rows.to(hidden.device), b.cols.to(hidden.device)]).float()
                loss = F.cross_entropy(logits, b.targets.to(logits.device), reduction="sum") / n_targets
                loss.backward()
                loss_total += float(loss.detach())
        with torch.no_grad():
            scores = [float(sum((p.double() * p.grad.double()).abs().sum() for p in ws if p.grad is not None)) for ws in weights]
    finally:
        for p, rg, g in saved:
            p.grad = g
            p.requires_grad_(rg)
    return scores, loss_total


@register
class ShortenedTaylor(SampledRankedMethod):
    name = "shortened_taylor"
    summary = "remove the k blocks with the lowest first-order Taylor importance Σ|w·dL/dw| (first 4, last 2 kept)"
    doc_row = ("drops the `k` blocks with the lowest Taylor importance Σ\\|w·∂L/∂w\\|; first 4 and last 2 kept "
               "(Shortened LLaMA, arXiv 2402.02834)", "same blocks", "all positions")
    baseline_doc = ("Shortened LLaMA, arXiv 2402.02834", "lowest Σ \\|w · ∂L/∂w\\| over the block's weights; first 4 / last 2 kept",
                    "`samples` sequences")

    @dataclass(frozen=True)
    class Config(SampledOptions):
        """The "+" rule (first 4, last 2 blocks kept) and 64 sequences: `SampledOptions`' defaults."""

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        if calib is None:
            raise UsageError("shortened_taylor needs a calibration set")
        c = self.config
        arch.need_resident_weights(model, "shortened_taylor (the gradients of the weights)")  # else offloaded blocks score 0
        rows = calibration_rows(calib.input_ids, c.samples, c.seed)
        batches = make_batches(rows, arch.model_device(model), c.batch_size, c.batch_tokens)
        t0 = time.perf_counter()
        scores, loss = taylor_scores(model, batches)
        order = sorted(eligible, key=lambda j: (scores[j], j))
        return Ranking(order, {
            "criterion": "sum over the block's weights of |w * dL/dw|, L = mean calibration NLL of the dense model (lowest first)",
            "taylor_importance": scores, "dense_nll": loss, "calibration_sequences": len(rows),
            "work": {"forward_backward_passes": 1, "score_seconds": time.perf_counter() - t0}})
