"""Batched log-likelihood scoring and greedy generation, in the two PD settings.

- `unified`: one layer set, an ordinary forward of the model (its own `forward`, with the plan's
  layers swapped in) over context + continuation, as stock lm-eval scores a request. Greedy
  generation runs the engine (prefill, then steps) in both settings; unified steps read the prefill's
  whole cache (no handoff, no KV policy).
- `disaggregated`: the context runs through the prefill stage, whose last-position logits score
  the first continuation token; the handoff ships the (pruned) KV of the decode layers; the decode
  stage scores the remaining continuation tokens over that cache.

Log-probabilities are computed only at scored positions (never full-vocabulary logits for
every position), which keeps memory flat on long contexts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.batching import chunk_bounds, length_groups, pad_tokens
from harness.pd.cache import PDCache
from harness.pd.plan import PruningPlan
from harness.pd.stages import PrefillOut, StagedModel
from harness.quality import autobatch

MODES = ("unified", "disaggregated")

# The fixed cost of one forward, in tokens of forward work, by device type. On the 2-core CPUs
# of this project a forward reads every weight once: 62-73 ms against 1.3-1.4 ms a token at 16 rows,
# i.e. 47-51 tokens (SmolLM2-135M decode forwards, benchmarks/cpu_batches.py; a prefill forward reads
# the same weights); rounded up, so a split must save more.
FORWARD_TOKENS = {"cpu": 64.0}

TokenRequest = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


@dataclass
class KVTally:
    """Running totals of what the handoffs sent over an evaluation."""

    kv_bytes: int = 0
    kv_bytes_paged: int = 0
    handoffs: int = 0
    prompt_tokens: int = 0

    def add(self, kv_bytes: int, kv_bytes_paged: int, requests: int, prompt_tokens: int) -> None:
        self.kv_bytes += kv_bytes
        self.kv_bytes_paged += kv_bytes_paged
        self.handoffs += requests
        self.prompt_tokens += prompt_tokens

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was sent after the snapshot `before` (an earlier `as_dict()`)."""
        return {k: v - before[k] for k, v in self.as_dict().items()}

    def as_dict(self) -> dict[str, int]:
        return {
            "kv_bytes": self.kv_bytes,
            "kv_bytes_paged": self.kv_bytes_paged,
            "handoffs": self.handoffs,
            "prompt_tokens": self.prompt_tokens,
        }


def truncate(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Left-truncate so that len(ctx) + len(cont) - 1 <= max_length (lm-eval's HFLM rule)."""
    ctx, cont = list(ctx), list(cont)
    if not ctx or not cont:
        raise ValueError("a scoring request needs a non-empty context and continuation")
    if len(cont) > max_length:
        raise UsageError(f"a continuation of {len(cont)} tokens exceeds the context length max_length={max_length}; "
                         f"give --max-length {len(cont)} or more (or leave it at the model's)")
    if len(ctx) + len(cont) > max_length + 1:
        ctx = ctx[-(max_length + 1 - len(cont)) :]
    return ctx, cont


class Scorer:
    """Scores token requests for one (model, plan, mode); counts KV bytes of every handoff."""

    def __init__(
        self,
        model: nn.Module,
        plan: PruningPlan,
        mode: str,
        *,
        max_length: int,
        batch_size: int | str = 8,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "unified" and plan.prefill_layers != plan.decode_layers:
            raise ValueError(f"{plan.method}: unified mode needs one layer set, the plan has two")
        self.model, self.plan, self.mode = model, plan, mode
        self.max_length = max_length
        self.device = arch.model_device(model)
        # auto: batch_size is where the search starts (autobatch.parse); long tasks may cap it lower
        self.batch_size, self.auto_times = autobatch.parse(batch_size, self.device.type)
        self.sizes_used: list[int] = []  # distinct batch sizes used, in order (the record keeps them per task)
        self._fitted: dict[tuple[int, int, int], int] = {}
        self.staged = StagedModel(model, plan)
        # one more forward, in tokens of forward work (batching.length_groups, chunk_bounds); a device
        # not measured keeps batches of the batch size and one padded decode forward per batch
        self.forward_tokens = FORWARD_TOKENS.get(self.device.type, float("inf"))
        self.tally = KVTally()
        self.label = f"{plan.method}/{mode}"  # the progress bar's name; the pipeline adds the task's

    def _size_for(self, ctx: list[int], cont: list[int]) -> int:
        """The batch size for requests up to this long: fixed, or found by `--batch-size auto` on a GPU."""
        size = self.batch_size
        if self.auto_times:  # 0 on a CPU (autobatch.parse): a fixed size there
            key = (len(ctx), len(cont), self.batch_size)
            if key not in self._fitted:
                self._fitted[key] = autobatch.fit_batch_size(lambda n: self._probe(ctx, cont, n), self.batch_size)
            size = self._fitted[key]
        if size not in self.sizes_used:
            self.sizes_used.append(size)
        return size

    def _probe(self, ctx: list[int], cont: list[int], n: int) -> None:
        """Score `n` distinct requests as long as (ctx, cont); the KV they send is not counted."""
        before = self.tally.as_dict()
        chunk = autobatch.distinct_copies(ctx, cont, n, self.model.config.vocab_size)
        try:
            self._score_unified(chunk) if self.mode == "unified" else self._score_disaggregated(chunk)
        finally:
            for k, v in before.items():
                setattr(self.tally, k, v)

    # -- log-likelihood -----------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[TokenRequest], progress: bool = False) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is greedy) for each request, in order."""
        reqs = [truncate(c, x, self.max_length) for c, x in requests]
        if self.mode == "unified":  # longest input first, as HFLM batches
            def key(i):
                return -(len(reqs[i][0]) + len(reqs[i][1])), reqs[i][0], reqs[i][1]
        else:  # longest context first, identical contexts adjacent: they share one prefill
            def key(i):
                return -len(reqs[i][0]), reqs[i][0], -len(reqs[i][1]), reqs[i][1]
        order = sorted(range(len(reqs)), key=key)
        out: list[tuple[float, bool] | None] = [None] * len(reqs)
        bar = tqdm(total=len(reqs), desc=self.label, disable=not progress, leave=False)
        for idx in self._chunks(reqs, order):
            chunk = [reqs[i] for i in idx]
            scored = self._score_unified(chunk) if self.mode == "unified" else self._score_disaggregated(chunk)
            for i, s in zip(idx, scored):
                out[i] = s
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _chunks(self, reqs: Sequence[tuple[list[int], list[int]]], order: list[int]) -> Iterator[list[int]]:
        """The request indices of each forward, taken from `order` (longest row first).

        On a device with a measured forward cost (the CPU) a fixed batch size is a cap: a batch is
        cut where padding its shorter rows to the longest would cost more than one more forward
        (`batching.chunk_bounds`; BoolQ's passages vary: at --limit 100 in batches of 16, 22 % of
        its prefill tokens were padding). Elsewhere batches of the size, `auto:N` searching again at its points.
        """
        if order and not self.auto_times and math.isfinite(self.forward_tokens):
            size = self._size_for(*reqs[order[0]])
            rows = [self._row(*reqs[i]) for i in order]
            new_row = [j == 0 or rows[j] != rows[j - 1] for j in range(len(rows))]
            for s, e in chunk_bounds([len(r) for r in rows], new_row, size, self.forward_tokens):
                yield order[s:e]
            return
        searches, size, start = autobatch.search_points(len(order), self.auto_times) or [0], 0, 0
        while start < len(order):
            if searches and start >= searches[0]:  # auto:N: found again on the longest request left
                searches.pop(0)
                size = self._size_for(*reqs[order[start]])
            idx = order[start : start + size]
            start += len(idx)
            yield idx

    def _row(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The input row a request needs, shared by the requests with the same one: its prompt when
        disaggregated (one prefill per distinct prompt), context + continuation[:-1] when unified."""
        return ctx if self.mode == "disaggregated" else ctx + cont[:-1]

    def _logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, normed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and greedy flag of each target token, from hidden rows (N, hidden)."""
        logits = arch.lm_head(self.model)(hidden).float() if normed else self.staged.logits(hidden)
        logp = F.log_softmax(logits, dim=-1)
        targets = targets.to(logits.device)  # the LM head's device (a model spread over GPUs)
        return logp.gather(1, targets[:, None])[:, 0], logits.argmax(dim=-1) == targets

    @staticmethod
    def _per_request(tok_lp: torch.Tensor, greedy: torch.Tensor, sizes: Sequence[int]) -> list[tuple[float, bool]]:
        res, at = [], 0
        for n in sizes:
            res.append((float(tok_lp[at : at + n].double().sum()), bool(greedy[at : at + n].all())))
            at += n
        return res

    def _score_unified(self, chunk: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Requests whose input (context + continuation[:-1]) is identical, e.g. the one-token
        # answers of a multiple-choice item, share one row of the forward (as HFLM does).
        seqs: list[list[int]] = []
        where: dict[tuple[int, ...], int] = {}
        row_of = []
        for c, x in chunk:
            key = tuple(self._row(c, x))
            if key not in where:
                where[key] = len(seqs)
                seqs.append(list(key))
            row_of.append(where[key])
        batch = pad_tokens(seqs, self.device)
        with arch.layers_swapped(self.model, self.plan.prefill_layers):
            hidden = arch.decoder(self.model)(input_ids=batch.ids, attention_mask=batch.valid.long(),
                                              use_cache=False).last_hidden_state
        rows, cols, targets = [], [], []
        for (c, x), r in zip(chunk, row_of):
            rows += [r] * len(x)
            cols += range(len(c) - 1, len(c) - 1 + len(x))
            targets += x
        h = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        lp, greedy = self._logprobs(h, torch.tensor(targets, device=self.device), normed=True)
        return self._per_request(lp, greedy, [len(x) for _, x in chunk])

    def _prefill(self, prompts: Sequence[list[int]]) -> PrefillOut:
        """Prefill stage over P distinct prompts (right-padded)."""
        return self.staged.prefill(pad_tokens(prompts, self.device))

    def _handoff(self, out: PrefillOut, rows: torch.Tensor) -> PDCache:
        """Decode-side cache of requests `rows` (R,): the shipped (pruned) KV when disaggregated,
        the prefill cache's rows when unified (one deployment, nothing is sent)."""
        if self.mode == "unified":
            return out.cache.select_rows(rows)
        sent = self.staged.handoff(out, rows)
        self.tally.add(sent.kv_bytes, sent.kv_bytes_paged(), sent.n_requests, int(out.lengths.index_select(0, rows).sum()))
        return self.staged.receive(sent)

    def _score_disaggregated(self, chunk: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        prompts: list[list[int]] = []
        where: dict[tuple[int, ...], int] = {}
        rows_l = []
        for c, x in chunk:
            key = tuple(self._row(c, x))
            if key not in where:
                where[key] = len(prompts)
                prompts.append(c)
            rows_l.append(where[key])
        rows = torch.tensor(rows_l, device=self.device)
        out = self._prefill(prompts)
        dcache = self._handoff(out, rows)
        conts = [x for _, x in chunk]
        hd = self._decode(dcache, conts, out.lengths.index_select(0, rows))
        last = out.last_hidden
        hs, targets = [], []
        for r, x in enumerate(conts):
            hs.append(last[rows_l[r]][None])  # the first continuation token is scored by the prefill
            if len(x) > 1:
                hs.append(hd[r])
            targets += x
        lp, greedy = self._logprobs(torch.cat(hs), torch.tensor(targets, device=self.device), normed=False)
        return self._per_request(lp, greedy, [len(x) for x in conts])

    def _decode(self, cache: PDCache, conts: Sequence[list[int]], req_len: torch.Tensor) -> list[torch.Tensor | None]:
        """Decode-stage hidden states (len(x) - 1, hidden) of each continuation x after its first
        token, over its row of `cache` (R rows; `req_len` (R,) the prompt lengths), None for a
        one-token x. Continuations of unequal length run in groups of like length
        (`batching.length_groups`): padding a 5-token answer to a 40-token one costs more than
        another forward on a CPU (half the decode tokens of HellaSwag and PIQA were padding)."""
        need = [len(x) - 1 for x in conts]
        out: list[torch.Tensor | None] = [None] * len(conts)
        if math.isfinite(self.forward_tokens):
            groups = length_groups(need, self.forward_tokens)
        else:  # a device not measured: one forward over every row (one-token answers padded), no copy of cache rows
            groups = [list(range(len(conts)))] if max(need) > 0 else []
        for group in groups:
            if len(group) == len(conts):  # every row, in order: the cache as it is
                part, idx = cache, None
            else:
                idx = torch.tensor(group, device=self.device)
                part = cache.select_rows(idx)
            start = req_len if idx is None else req_len.index_select(0, idx)
            hidden = self.staged.decode(part, pad_tokens([conts[r][:-1] for r in group], self.device, start=start))
            for j, r in enumerate(group):
                out[r] = hidden[j, : need[r]]
        return out

    # -- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        contexts: Sequence[Sequence[int]],
        max_new_tokens: int,
        should_stop: Callable[[int, list[int]], bool] | None = None,
        progress: bool = False,
    ) -> list[list[int]]:
        """Greedy continuation tokens for each context (EOS handling is the caller's `should_stop`): at most
        `max_new_tokens` each. Every context needs a token (PDLM gives an empty one the prefix token, as
        lm-eval's loglikelihood does)."""
        if max_new_tokens < 0 or not all(contexts):
            raise ValueError(f"generate needs max_new_tokens >= 0 (got {max_new_tokens}) and a token in every context "
                             f"(context {next((i for i, c in enumerate(contexts) if not c), '-')} is empty)")
        if max_new_tokens == 0:
            return [[] for _ in contexts]
        ctxs = [list(c)[-max(1, self.max_length - max_new_tokens) :] for c in contexts]
        order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
        out: list[list[int]] = [[] for _ in ctxs]
        bar = tqdm(total=len(ctxs), desc=f"{self.label} generate", disable=not progress, leave=False)
        # auto: a scoring forward over context + max_new_tokens holds at least what generating them does
        size = self._size_for(ctxs[order[0]], [0] * max_new_tokens) if ctxs else self.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            gens = self._generate_batch([ctxs[i] for i in idx], max_new_tokens, should_stop, idx)
            for i, g in zip(idx, gens):
                out[i] = g
            bar.update(len(idx))
        bar.close()
        return out

    def _generate_batch(self, prompts, max_new_tokens, should_stop, ids_for_stop) -> list[list[int]]:
        n = len(prompts)
        out = self._prefill(prompts)
        cache, lengths = self._handoff(out, torch.arange(n, device=self.device)), out.lengths
        tok = self.staged.logits(out.last_hidden).argmax(dim=-1)  # first token: from the prefill stage
        gens = [[int(t)] for t in tok]
        done = [should_stop is not None and should_stop(ids_for_stop[r], gens[r]) for r in range(n)]
        for step in range(1, max_new_tokens):
            if all(done):
                break
            tok = self.staged.step(cache, tok, lengths + step - 1).argmax(dim=-1)
            for r in range(n):
                if not done[r]:
                    gens[r].append(int(tok[r]))
                    done[r] = should_stop is not None and should_stop(ids_for_stop[r], gens[r])
        return gens
