"""Stage objectives: how far a PD configuration's next-token distributions drift from the dense model's.

On calibration sequences split into a prompt and a continuation (teacher-forced), the objective
is the mean over continuation tokens of KL(p_dense || p_pruned):

- `prefill(R)`: prompt and continuation both run by the model without blocks `R` (E_P(R));
- `decode(R_D, R_P)`: prompt run by the model without `R_P` (the prefill stage; its last
  position predicts the first continuation token), continuation by the model without `R_D`
  over the prompt's KV (the decode stage) (E_D(R_D | R_P)). `decode(R, R) == prefill(R)`.

Searches evaluate many sets that differ from the last accepted one in a few blocks, so each
objective keeps the hidden states entering every layer under a *base* set and resumes a
candidate's forward at the first layer where it differs from the base; decode objectives reuse
one prefilled prompt cache per `R_P` and rerun only the short continuation.

Moving the base to the set a greedy step accepted costs no forward: the lowest-valued candidate
evaluated since the last move keeps the layer inputs its own forward produced (the layers before
its first difference are the base's, shared), and those are exactly what a forward of the new base
would compute (same layers, same inputs, same batches). Otherwise the new base resumes from the
old one at their first difference.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.batching import TokenBatch, pad_tokens
from harness.pd.cache import PDCache
from harness.pd.engine import final_logits, run_layers
from harness.pd.plan import PruningPlan
from harness.pd.stages import StagedModel


@dataclass
class CalibSplit:
    """Calibration sequences as (prompt tokens, continuation tokens) pairs."""

    prompts: list[list[int]]
    conts: list[list[int]]

    @classmethod
    def from_calibration(cls, input_ids: list[list[int]], n_samples: int, max_cont: int, seed: int) -> CalibSplit:
        """Take `n_samples` sequences (seeded); the continuation is the last min(max_cont, len // 2) tokens."""
        rows = [r for r in input_ids if len(r) >= 4]
        if not rows:  # else every objective divides by zero continuation tokens
            longest = max((len(r) for r in input_ids), default=0)
            raise UsageError(f"pdtrim: its objective needs calibration sequences of at least 4 tokens (a prompt and a "
                             f"continuation); the longest here has {longest}: raise calib.max_tokens")
        rows = random.Random(seed).sample(rows, min(n_samples, len(rows)))
        prompts, conts = [], []
        for r in rows:
            c = min(max_cont, len(r) // 2)
            prompts.append(r[:-c])
            conts.append(r[-c:])
        return cls(prompts, conts)

    @property
    def n_cont_tokens(self) -> int:
        return sum(len(c) for c in self.conts)


@dataclass
class Teacher:
    """The dense model's next-token distributions p on N continuation tokens, kept as what
    KL(p || q) needs: Σ_t KL_t = Σ_t Σ_v p log p  -  Σ_t Σ_v p z  +  Σ_t logsumexp(z) for student
    logits z = W n + b (n: the final-normed hidden state). With a float32 LM head the middle term is
    (pᵀW)·n + p·b, so no (N, vocab) array is read but the student's logits (one matmul and one
    logsumexp per evaluation, instead of a log-softmax and a KL pass over the vocabulary)."""

    neg_entropy: torch.Tensor  # (N,) float64 Σ_v p log p
    u: torch.Tensor | None  # (N, hidden) float32 pᵀW, with a float32 LM head whose weights are resident
    pb: torch.Tensor | None  # (N,) float64 p·b, with u and an LM-head bias
    p: torch.Tensor | None  # (N, vocab) otherwise (a narrower or offloaded head)

    @classmethod
    def of(cls, model, logp: torch.Tensor) -> Teacher:
        head, p = arch.lm_head(model), logp.exp()
        neg = torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1).double()
        # an LM head offloaded by --device-map holds `meta` weights outside its forward, and `p @ meta` is an
        # uninitialised CPU tensor, not an error: the student's logits (its forward loads them) serve instead
        if head.weight.dtype == torch.float32 and head.weight.device.type != "meta":
            bias = getattr(head, "bias", None)
            return cls(neg, p @ head.weight, (p @ bias.float()).double() if bias is not None else None, None)
        return cls(neg, None, None, p)

    def __getitem__(self, idx) -> Teacher:
        if isinstance(idx, torch.Tensor):  # the teacher sits beside the LM head: maybe another GPU than the indices
            idx = idx.to(self.neg_entropy.device)
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Teacher(self.neg_entropy[idx], pick(self.u), pick(self.pb), pick(self.p))


@dataclass
class _Batch:
    full: TokenBatch  # (B, S) prompt + continuation[:-1], right-padded
    rows: torch.Tensor  # (Nc,) batch row of each continuation token's predicting position
    cols: torch.Tensor  # (Nc,) its column in the full sequence
    prompt: TokenBatch  # (B, T) prompts only
    dec: TokenBatch  # (B, M) continuation[:-1] at positions after the prompt (M = max cont - 1, may be 0)
    dec_rows: torch.Tensor  # continuation tokens 2.. : their row and column in the decode input
    dec_cols: torch.Tensor
    first: torch.Tensor  # (B,) index (in continuation-token order) of each row's first token
    rest: torch.Tensor  # (Nc,) bool: not a first token
    teacher: Teacher = field(default=None)  # the dense distributions of the Nc continuation tokens, in order

    @property
    def tokens(self) -> int:
        return int(self.full.valid.sum())


def token_budget_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group at most `max_rows` rows and `max_tokens` padded
    positions (rows × longest row; a single longer row is its own group). Calibration lengths vary
    widely (tens to hundreds of tokens), and fixed-size batches would mostly compute padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and len(g) < max_rows and (len(g) + 1) * lengths[g[0]] <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


class StageObjective:
    """E_P and E_D on a fixed calibration split, with resumable forwards. Counts the work it does."""

    def __init__(self, model, split: CalibSplit, batch_size: int = 16, max_batch_tokens: int = 512) -> None:
        self.model = model
        self.n_layers = arch.n_layers(model)
        self.device = arch.model_device(model)
        self.batches: list[_Batch] = []
        for idx in token_budget_batches([len(p) + len(c) - 1 for p, c in zip(split.prompts, split.conts)],
                                        batch_size, max_batch_tokens):
            self.batches.append(self._make_batch([split.prompts[i] for i in idx], [split.conts[i] for i in idx]))
        self.evaluations = 0  # objective evaluations (each a forward over all calibration batches, maybe partial)
        self.layer_token_passes = 0  # Σ layers run × tokens run through them
        self.full_tokens = sum(b.tokens for b in self.batches)
        self._pbase: tuple[frozenset, list[dict[int, torch.Tensor]]]  # set by _dense_forward
        self._prompt: dict[frozenset, list[tuple[PDCache, torch.Tensor]]] = {}
        self._dbase: tuple[frozenset, frozenset, list[dict[int, torch.Tensor]]] | None = None
        # the lowest-valued candidate since the base last moved: (value, set(s), per-batch layer inputs)
        self._pbest: tuple[float, frozenset, list[dict]] | None = None
        self._dbest: tuple[float, tuple[frozenset, frozenset], list[dict]] | None = None
        self._dense_forward()

    @torch.inference_mode()
    def _dense_forward(self) -> None:
        """The dense teacher, once; the same forward's layer inputs are the first prefill base."""
        per_batch = self._scratch_inputs(frozenset(), count=False)  # the teacher is not search work
        for b, inputs in zip(self.batches, per_batch):
            h = inputs["out"]
            b.teacher = Teacher.of(self.model, F.log_softmax(final_logits(self.model, h[b.rows, b.cols]), dim=-1))
        self._pbase = (frozenset(), per_batch)

    def _scratch_inputs(self, target: frozenset, count: bool = True) -> list[dict]:
        """Per batch, every layer's input under `target` and the output ("out"), from the embeddings."""
        layers, per_batch = self._kept(target), []
        for b in self.batches:
            inputs: dict = {}
            h = run_layers(self.model, layers, b.full.ids, b.full.positions, b.full.valid, PDCache(retain=()),
                           collect=inputs)
            per_batch.append(self._complete(inputs, h))
            if count:
                self.layer_token_passes += len(layers) * b.tokens
        return per_batch

    def _make_batch(self, prompts: list[list[int]], conts: list[list[int]]) -> _Batch:
        full = pad_tokens([p + c[:-1] for p, c in zip(prompts, conts)], self.device)
        rows, cols, drows, dcols = [], [], [], []
        for r, (p, c) in enumerate(zip(prompts, conts)):
            rows += [r] * len(c)
            cols += range(len(p) - 1, len(p) - 1 + len(c))
            drows += [r] * (len(c) - 1)
            dcols += range(len(c) - 1)
        prompt = pad_tokens(prompts, self.device)
        dec = pad_tokens([c[:-1] for c in conts], self.device, start=prompt.lengths)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        first = t([0, *torch.tensor([len(c) for c in conts], device="cpu").cumsum(0)[:-1].tolist()])
        rest = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        rest[first] = False
        return _Batch(full, t(rows), t(cols), prompt, dec, t(drows), t(dcols), first, rest)

    # -- shared pieces ------------------------------------------------------------------------
    def _kept(self, removed: Iterable[int]) -> tuple[int, ...]:
        r = set(removed)
        return tuple(i for i in range(self.n_layers) if i not in r)

    def _staged(self, removed_decode: frozenset, removed_prefill: frozenset, model=None) -> StagedModel:
        """The PD deployment without `removed_prefill` in prefill and `removed_decode` in decode (all KV sent),
        on `model` (default: the objective's own; a screening copy shares its layer indices)."""
        plan = PruningPlan("objective", self.n_layers, self._kept(removed_prefill), self._kept(removed_decode))
        return StagedModel(self.model if model is None else model, plan)

    @staticmethod
    def _first_difference(a: frozenset, b: frozenset, n: int) -> int:
        diff = a ^ b
        return min(diff) if diff else n

    def _kl(self, teacher: Teacher, hidden: torch.Tensor, model=None) -> torch.Tensor:
        """Σ over rows of KL(teacher || student) for student hidden rows (N, hidden), float64; the final norm
        and LM head are `model`'s (default: the objective's own)."""
        model = self.model if model is None else model
        normed = arch.decoder(model).norm(hidden)
        z = arch.lm_head(model)(normed).float()
        normed = normed.to(z.device)  # a model spread over GPUs: the norm's device may not be the head's (the teacher's)
        pz = (teacher.u * normed.float()).sum(-1).double() if teacher.u is not None else (teacher.p * z).sum(-1).double()
        if teacher.pb is not None:  # set with u only
            pz = pz + teacher.pb
        return (teacher.neg_entropy - pz + torch.logsumexp(z, dim=-1).double()).sum().to(hidden.device)

    def _complete(self, inputs: dict, out: torch.Tensor) -> dict:
        """Fill in removed layers' inputs (each equals the input of the next kept layer, or the
        output) and the output under "out", so a candidate can resume at any layer."""
        nxt = out
        for i in reversed(range(self.n_layers)):
            if i in inputs:
                nxt = inputs[i]
            else:
                inputs[i] = nxt
        inputs["out"] = out
        return inputs

    # -- E_P ----------------------------------------------------------------------------------
    @property
    def n_scored(self) -> int:
        """Continuation tokens the objectives average over."""
        return sum(len(b.rows) for b in self.batches)

    @torch.inference_mode()
    def prefill(self, removed: Iterable[int]) -> float:
        """E_P(R): mean KL on continuation tokens, prompt and continuation run without `removed`."""
        target = frozenset(removed)
        total, inputs = self._prefill_forward(target)
        self.evaluations += 1
        value = float(total) / self.n_scored
        if self._pbest is None or value < self._pbest[0]:
            self._pbest = (value, target, inputs)
        return value

    def _prefill_forward(self, target: frozenset, kl: bool = True, screen=None) -> tuple[torch.Tensor, list[dict]]:
        """Resume every batch's forward under `target` from the base at their first difference.

        Returns the summed KL (float64; zero when `kl` is False) and, per batch, every layer's
        input under `target` and the output under "out" (the base's tensors below the difference).
        With `screen` (`methods/pdtrim/screen.py`), the layers are its narrow model's, the base's
        inputs are cast to its dtype, nothing is kept (no inputs returned) and the work is its own."""
        model, dtype = (self.model, None) if screen is None else (screen.model, screen.dtype)
        base_set, base_inputs = self._pbase
        start = self._first_difference(target, base_set, self.n_layers)
        layers = [i for i in self._kept(target) if i >= start]
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed where the KLs are
        per_batch = []
        for b, base in zip(self.batches, base_inputs):
            inputs = {i: base[i] for i in range(start)} if screen is None else None
            h = base[start] if start < self.n_layers else base["out"]
            h = run_layers(model, layers, None, b.full.positions, b.full.valid, PDCache(retain=()),
                           hidden=h if dtype is None else h.to(dtype), collect=inputs)
            if kl:
                total += self._kl(b.teacher, h[b.rows, b.cols], model).double()
            if screen is None:
                per_batch.append(self._complete(inputs, h))
            (screen or self).layer_token_passes += len(layers) * b.tokens
        return total, per_batch

    @torch.inference_mode()
    def set_prefill_base(self, removed: Iterable[int], from_scratch: bool = False) -> None:
        """Keep every layer's input (and the output) under `removed` for later resumption.
        `from_scratch` computes them from the embeddings (the same values; a reference for tests)."""
        target = frozenset(removed)
        if from_scratch:
            per_batch = self._scratch_inputs(target)
        elif self._pbest is not None and self._pbest[1] == target:
            per_batch = self._pbest[2]  # the accepted candidate's own forward
        else:  # resumed from the current base (the dense forward's inputs are the first one)
            per_batch = self._prefill_forward(target, kl=False)[1]
        self._pbase, self._pbest = (target, per_batch), None

    # -- E_D ----------------------------------------------------------------------------------
    def _prompt_state(self, removed_prefill: frozenset) -> list[tuple[PDCache, torch.Tensor]]:
        """Per batch: the prefill cache of prompts without `removed_prefill`, and first-token KL sums."""
        if removed_prefill not in self._prompt:
            self._prompt = {}  # keep one prompt state: searches fix R_P while they vary R_D
            staged = self._staged(removed_prefill, removed_prefill)  # its cache keeps every prefill layer's KV
            layers = staged.plan.prefill_layers
            states = []
            for b in self.batches:
                out = staged.prefill(b.prompt)
                states.append((out.cache, self._kl(b.teacher[b.first], out.last_hidden).double()))
                self.layer_token_passes += len(layers) * int(b.prompt.valid.sum())
            self._prompt[removed_prefill] = states
        return self._prompt[removed_prefill]

    @torch.inference_mode()
    def decode(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> float:
        """E_D(R_D | R_P): prompt through the model without R_P, continuation without R_D ⊇ R_P."""
        rd, rp = self.decode_sets(removed_decode, removed_prefill)
        total, inputs = self._decode_forward(rd, rp)
        self.evaluations += 1
        value = float(total) / self.n_scored
        if self._dbest is None or value < self._dbest[0]:
            self._dbest = (value, (rd, rp), inputs)
        return value

    def decode_sets(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> tuple[frozenset, frozenset]:
        """(R_D, R_P) as sets, checked (R_P ⊆ R_D), with the decode base moved to R_P's prompts if it is on others."""
        rd, rp = frozenset(removed_decode), frozenset(removed_prefill)
        if not rp <= rd:
            raise ValueError(f"decode removal {sorted(rd)} must contain prefill removal {sorted(rp)}")
        if self._dbase is None or self._dbase[1] != rp:
            self.set_decode_base(rp, rp)
        return rd, rp

    def _decode_forward(self, rd: frozenset, rp: frozenset, kl: bool = True, screen=None) -> tuple[torch.Tensor, list[dict]]:
        """Resume the decode stage under (rd, rp) from the decode base (same `rp`) at their first
        difference; the prompt caches stay as they are. Returns the summed KL (first tokens included;
        zero when `kl` is False) and per batch the layer inputs under `rd` (empty without continuation).
        With `screen`, as in `_prefill_forward`, over the prompt caches in its dtype."""
        states = self._prompt_state(rp)
        base_set, _, base_inputs = self._dbase
        start = self._first_difference(rd, base_set, self.n_layers)
        layers = [i for i in self._kept(rd) if i >= start]
        model, dtype = (self.model, None) if screen is None else (screen.model, screen.dtype)
        staged = self._staged(rd, rp, model)
        caches = [c for c, _ in states] if screen is None else screen.prompt_caches(rp, states)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed where the KLs are
        per_batch = []
        for b, (_, first_kl), cache, base in zip(self.batches, states, caches, base_inputs):
            total += first_kl
            if b.dec.ids.shape[1] == 0:
                per_batch.append({})
                continue
            inputs = {i: base[i] for i in range(start)} if screen is None else None
            h = base[start] if start < self.n_layers else base["out"]
            h = staged.decode(cache.frozen(), b.dec, start=start, hidden=h if dtype is None else h.to(dtype), collect=inputs)
            if kl:
                total += self._kl(b.teacher[b.rest], h[b.dec_rows, b.dec_cols], model).double()
            if screen is None:
                per_batch.append(self._complete(inputs, h))
            (screen or self).layer_token_passes += len(layers) * int(b.dec.valid.sum())
        return total, per_batch

    @torch.inference_mode()
    def set_decode_base(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> None:
        rd, rp = frozenset(removed_decode), frozenset(removed_prefill)
        if self._dbest is not None and self._dbest[1] == (rd, rp):
            per_batch = self._dbest[2]  # the accepted candidate's own forward
        elif self._dbase is not None and self._dbase[1] == rp:
            per_batch = self._decode_forward(rd, rp, kl=False)[1]
        else:
            states, staged = self._prompt_state(rp), self._staged(rd, rp)
            layers, per_batch = staged.plan.decode_layers, []
            for b, (cache, _) in zip(self.batches, states):
                inputs: dict = {}
                if b.dec.ids.shape[1]:
                    h = staged.decode(cache.frozen(), b.dec, collect=inputs)
                    self._complete(inputs, h)
                    self.layer_token_passes += len(layers) * int(b.dec.valid.sum())
                per_batch.append(inputs)
        self._dbase, self._dbest = (rd, rp, per_batch), None

    def work(self) -> dict[str, float]:
        """Evaluations and full-forward equivalents (layer-token passes / (layers · calibration tokens))."""
        return {"evaluations": self.evaluations, "layer_token_passes": self.layer_token_passes,
                "full_forward_equivalents": self.layer_token_passes / (self.n_layers * self.full_tokens)}
