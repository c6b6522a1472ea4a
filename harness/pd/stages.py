"""A model run as a PD deployment of a plan: the prefill stage, the handoff and the decode stage.

`StagedModel(model, plan)` is the one place that writes the sequence

    out = staged.prefill(batch)          # prefill layers over the prompts; PD cache + hidden states
    sent = staged.handoff(out, rows)     # pack the decode layers' KV under the plan's KV policy
    cache = staged.receive(sent)         # unpack on the decode side
    h = staged.decode(cache, cont)       # decode layers over continuation tokens
    logits = staged.step(cache, tok, p)  # or one greedy step at a time

so scoring, latency, the attention probe and the stage objectives cannot forget a part of it (the
prefill of a SnapKV-style policy must run inside `kv_select.observe_prefill`, or the handoff has
no window scores). It only calls the engine's public functions; the model is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.pd.arch import check_policy_fits, n_layers
from harness.pd.batching import TokenBatch
from harness.pd.cache import PDCache
from harness.pd.engine import Handoff, final_logits, make_handoff, run_layers
from harness.pd.kv_select import observe_prefill
from harness.pd.plan import PruningPlan


@dataclass
class PrefillOut:
    """What the prefill stage produced for P prompts of at most T tokens.

    Attributes:
        last_hidden: (P, hidden) output of the last prefill layer at each prompt's last token,
            before the final norm: it predicts the first new token.
        cache: the prefill `PDCache`: K/V (P, kv_heads, T, head_dim) of the plan's decode layers
            with positions (P, T), -1 in padding columns; for a policy that reads the prefill's
            attention also its `window_scores`.
        lengths: (P,) long prompt tokens per row.
        hidden: (P, T, hidden) that output at every position, only if asked for (`keep_hidden`):
            callers score the last position, and holding every position through decoding would
            raise peak memory by P · T · hidden elements.
    """

    last_hidden: torch.Tensor
    cache: PDCache
    lengths: torch.Tensor
    hidden: torch.Tensor | None = None


class StagedModel:
    """`model` served as a PD deployment of `plan`: prefill, handoff, receive, decode.

    Hidden states are returned before the final norm (callers gather the rows they score and only
    then apply `logits`, so full-vocabulary logits are never built for every position).
    """

    def __init__(self, model: nn.Module, plan: PruningPlan) -> None:
        if plan.n_layers != n_layers(model):  # a plan of another depth would silently skip or miss blocks
            raise ValueError(f"{plan.method}: the plan is for a {plan.n_layers}-layer model, this model has {n_layers(model)}")
        check_policy_fits(model.config, plan.kv_policy, plan.method)  # a per-head policy on a latent KV cache
        self.model, self.plan = model, plan

    @torch.inference_mode()
    def prefill(self, batch: TokenBatch, *, keep_hidden: bool = False) -> PrefillOut:
        """Run the prompts `batch` (P, T) through the prefill layers into a fresh PD cache.

        Every prompt has at least one token (`last_hidden` is each row's column `length - 1`).

        The cache keeps only the decode layers' KV (the rest is never sent). The KV policy's
        prefill observation is installed around the forward (a no-op unless the policy reads the
        prefill's attention); the hidden states are the same either way.
        """
        cache = PDCache(retain=self.plan.decode_layers)
        with observe_prefill(self.model, self.plan, cache, batch.lengths):
            h = run_layers(self.model, self.plan.prefill_layers, batch.ids, batch.positions, batch.valid, cache)
        last = h[torch.arange(h.shape[0], device=h.device), batch.lengths - 1]
        return PrefillOut(last, cache, batch.lengths, h if keep_hidden else None)

    def handoff(self, out: PrefillOut, rows: torch.Tensor | None = None) -> Handoff:
        """Pack the KV the decode stage receives, under the plan's KV policy (`engine.make_handoff`).

        `rows` (R,) long: the prefill row of each request (several requests may share one prompt);
        default one request per prompt. The `Handoff`'s byte counts are taken from its tensors.
        """
        return make_handoff(out.cache, self.plan, out.lengths, rows)

    @staticmethod
    def receive(sent: Handoff) -> PDCache:
        """Unpack a handoff on the decode side: a padded `PDCache` (R rows) that decoding extends."""
        return sent.to_cache()

    @torch.inference_mode()
    def decode(
        self, cache: PDCache, batch: TokenBatch, *, start: int = 0, hidden: torch.Tensor | None = None,
        collect: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run tokens (R, q) through the decode layers over `cache`; returns hidden (R, q, hidden).

        `batch.positions` must continue each row's prompt (`pad_tokens(..., start=lengths)`), and
        `cache` is extended with the new tokens (pass `cache.frozen()` to keep it as is). To resume
        a forward, `hidden` (R, q, hidden) is the input of the first decode layer >= `start` and
        only those layers run (`batch.ids` is then unused). `collect` receives each layer's input
        (`engine.run_layers`).
        """
        layers = tuple(i for i in self.plan.decode_layers if i >= start)
        return run_layers(self.model, layers, None if hidden is not None else batch.ids, batch.positions, batch.valid,
                          cache, hidden=hidden, collect=collect)

    @torch.inference_mode()
    def step(
        self, cache: PDCache, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One decode step: tokens (R,) at positions (R,) -> next-token logits (R, vocab), float32.

        `valid` (R, 1) bool, default all True, may be passed in to keep its allocation out of a
        timed step. `cache` grows by one column per layer.
        """
        tokens = tokens.to(positions.device)  # the argmax of `logits`: on the LM head's device, maybe another GPU
        if valid is None:
            valid = torch.ones((tokens.shape[0], 1), dtype=torch.bool, device=tokens.device)
        h = run_layers(self.model, self.plan.decode_layers, tokens[:, None], positions[:, None], valid, cache)
        return self.logits(h[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden (..., hidden) -> logits (..., vocab), float32."""
        return final_logits(self.model, hidden)

