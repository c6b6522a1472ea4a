"""Calibration NLL of a model with some decoder blocks removed, with resumable forwards.

Shared by `sleb` and `shortened_ppl`. The NLL is the mean over calibration tokens of
-log p(token | prefix), every token of a sequence but its first predicted from the previous
position, padding excluded; perplexity is exp(NLL), so ranking by either is the same. Blocks are
removed by running the engine's layer-subset forward (`harness.pd.engine.run_layers`) over the kept
blocks: no weight is copied and the model is not touched.

Many evaluations differ from one *base* removal set in a block or two (SLEB's candidates extend
the blocks already removed; Shortened LLaMA's extend the empty set), so the hidden state entering
every block under the base is kept and a candidate's forward resumes at the first block where
it differs from the base, the same reuse as `methods/pdtrim/objectives.py`.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.batching import pad_tokens
from harness.pd.cache import PDCache
from harness.pd.engine import final_logits, run_layers
from methods import cached
from methods.cached import DiskMemo, set_key
from methods.pdtrim.objectives import token_budget_batches

NLL_VERSION = "1"  # bump when CalibNLL's numbers change (invalidates the memoised values on disk)


def calibration_rows(input_ids: list[list[int]], samples: int, seed: int) -> list[list[int]]:
    """`samples` calibration sequences of at least 2 tokens, drawn seeded (all of them if fewer)."""
    rows = [r for r in input_ids if len(r) >= 2]
    if samples >= len(rows):
        return rows
    return random.Random(seed).sample(rows, samples)


@dataclass
class _Batch:
    ids: torch.Tensor  # (B, T) right-padded
    pos: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool
    rows: torch.Tensor  # (N,) row of each predicting position
    cols: torch.Tensor  # (N,) its column
    targets: torch.Tensor  # (N,) the token it predicts

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


def make_batches(rows: list[list[int]], device, batch_size: int, batch_tokens: int) -> list[_Batch]:
    """Right-padded batches (grouped by length under a token budget) with next-token targets."""
    out = []
    for group in token_budget_batches([len(r) for r in rows], batch_size, batch_tokens):
        seqs = [rows[i] for i in group]
        padded = pad_tokens(seqs, device)
        r = [j for j, s in enumerate(seqs) for _ in range(len(s) - 1)]
        c = [t for s in seqs for t in range(len(s) - 1)]
        tgt = [tok for s in seqs for tok in s[1:]]
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        out.append(_Batch(padded.ids, padded.positions, padded.valid, t(r), t(c), t(tgt)))
    return out


class CalibNLL:
    """Mean next-token NLL on fixed calibration rows for any set of removed blocks. Counts its work.

    With a `memo` (methods/cached.py), values computed by any earlier run on the same rows come from
    it with no forward, and every new value is written to it; `set_base` is then only a promise kept
    by the first evaluation that misses the memo, so replaying an interrupted search costs nothing.
    """

    def __init__(self, model, rows: list[list[int]], batch_size: int = 16, batch_tokens: int = 512,
                 memo: DiskMemo | None = None) -> None:
        self.model = model
        self.n_layers = arch.n_layers(model)
        self.batches = make_batches(rows, arch.model_device(model), batch_size, batch_tokens)
        self.n_targets = sum(len(b.targets) for b in self.batches)
        self.full_tokens = sum(b.tokens for b in self.batches)
        self.evaluations = 0
        self.layer_token_passes = 0  # Σ layers run × tokens run through them
        self._base: tuple[frozenset, list[dict]] | None = None
        self._pending_base: frozenset | None = None  # set_base's target, built by the next memo miss
        self.memo = memo

    def _kept(self, removed: frozenset) -> list[int]:
        return [i for i in range(self.n_layers) if i not in removed]

    def _start(self, target: frozenset) -> tuple[int, list[dict]]:
        """First block where `target` differs from the base (n if none), and the base's inputs."""
        if self._base is None:
            self._build_base(frozenset())
        base_set, inputs = self._base
        diff = target ^ base_set
        return (min(diff) if diff else self.n_layers), inputs

    def set_base(self, removed: Iterable[int]) -> None:
        """Resume later evaluations from the model with `removed` blocks removed (built on the next
        evaluation that needs a forward: a value is the same from any base)."""
        self._pending_base = frozenset(removed)

    @torch.inference_mode()
    def _build_base(self, target: frozenset) -> None:
        """Keep the input of every block (and the output) with `target` blocks removed, reusing the
        previous base's states up to the first block where the two sets differ."""
        start, old = (0, None) if self._base is None else self._start(target)
        per_batch = []
        for bi, b in enumerate(self.batches):
            inputs = {i: old[bi][i] for i in range(start)} if old is not None else {}
            layers = [i for i in self._kept(target) if i >= start]
            h = old[bi][start] if old is not None and start < self.n_layers else None
            if old is not None and start == self.n_layers:
                h = old[bi]["out"]
            got: dict = {}
            h = run_layers(self.model, layers, b.ids if h is None else None, b.pos, b.valid, PDCache(retain=()),
                           hidden=h, collect=got)
            self.layer_token_passes += len(layers) * b.tokens
            nxt = h  # a removed block's input is the input of the next kept block (or the output)
            for i in reversed(range(start, self.n_layers)):
                nxt = got.get(i, nxt)
                inputs[i] = nxt
            inputs["out"] = h
            per_batch.append(inputs)
        self._base = (target, per_batch)

    def nll(self, removed: Iterable[int]) -> float:
        """Mean NLL (nats/token) with blocks `removed` removed (from the memo when it has it)."""
        target = frozenset(removed)
        key = set_key(target)
        if self.memo is not None and key in self.memo:
            return float(self.memo.get(key))
        if self._pending_base is not None:
            self._build_base(self._pending_base)
            self._pending_base = None
        value = self._nll(target)
        if self.memo is not None:
            self.memo.put(key, value)
        return value

    @torch.inference_mode()
    def _nll(self, target: frozenset) -> float:
        start, inputs = self._start(target)
        layers = [i for i in self._kept(target) if i >= start]
        total = torch.zeros((), dtype=torch.float64, device="cpu")  # host sum of .cpu() terms
        for b, base in zip(self.batches, inputs):
            h = base[start] if start < self.n_layers else base["out"]
            h = run_layers(self.model, layers, None, b.pos, b.valid, PDCache(retain=()), hidden=h)
            logits = final_logits(self.model, h[b.rows, b.cols])
            total += F.cross_entropy(logits, b.targets.to(logits.device), reduction="sum").double().cpu()  # the LM head's device
            self.layer_token_passes += len(layers) * b.tokens
        self.evaluations += 1
        return float(total) / self.n_targets

    def work(self) -> dict[str, float]:
        """Evaluations and full-forward equivalents (layer-token passes / (layers · calibration tokens))."""
        return {"evaluations": self.evaluations, "layer_token_passes": self.layer_token_passes,
                "full_forward_equivalents": self.layer_token_passes / (self.n_layers * self.full_tokens),
                "calibration_tokens": self.full_tokens, "predicted_tokens": self.n_targets}


def calibration_evaluator(method: str, model, calib, config) -> tuple[CalibNLL, int]:
    """The evaluator a perplexity-scored method (sleb, shortened_ppl) ranks blocks with: `config.samples`
    seeded calibration rows, batched by `config.batch_size` / `config.batch_tokens`; and the row count.
    Its values are memoised on disk per (model, calibration set, those options), shared by both methods."""
    if calib is None:
        raise UsageError(f"{method} needs a calibration set")
    rows = calibration_rows(calib.input_ids, config.samples, config.seed)
    key = cached.stat_key("calib-nll", model, calib, NLL_VERSION, [sys.modules[__name__]], samples=config.samples,
                          seed=config.seed, batch_size=config.batch_size, batch_tokens=config.batch_tokens)
    memo = DiskMemo("calib-nll", key)
    if memo.loaded:
        cached.announce(f"calibration NLLs: {memo.loaded} block sets ({method})")
    return CalibNLL(model, rows, config.batch_size, config.batch_tokens, memo), len(rows)
