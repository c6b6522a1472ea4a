"""Long-context workloads the harness runs itself: `pd_ppl` and `passkey`.

Short multiple-choice prompts send almost every KV position anyway, so a KV token policy only
shows what it costs and saves on long prompts. Both tasks build their requests as token lists
(exact prompt lengths, hence exact byte arithmetic) and go through the same `Scorer` as lm-eval
tasks, in either PD setting; the KV bytes of each prompt length are counted separately.

- `pd_ppl`: the first `T` tokens of a WikiText-2 test article are the prompt (prefill stage), the
  next `cont_tokens` tokens are scored (the first by the prefill stage, the rest by the decode
  stage over the handed-over cache). Metric `ppl_T{T}` = exp(mean NLL per scored token) for each
  T, `ppl` pooled over all T. Articles are those (in file order) with at least
  max(T) + cont_tokens tokens, so every T scores the same articles.
- `passkey`: a 5-digit key hidden at a relative depth in repeated filler text of exactly `L`
  tokens, then "What is the pass key? The pass key is"; greedy generation (EOS ignored, at most
  `max_new_tokens`), exact match of the first digit run with the key. Metric `acc_L{L}` per length,
  `acc` over all samples. Keys are drawn from a seeded RNG: the same samples for every method.

`--limit N` caps the number of articles (pd_ppl) and of samples (passkey; grid cells are taken
round-robin, so every length and depth stays represented).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import LONG_TASKS
from harness.errors import UsageError

__all__ = ["LONG_TASKS", "CONFIGS", "evaluate"]
VERSION = {"pd_ppl": 1, "passkey": 1}


@dataclass(frozen=True)
class PplConfig:
    prompt_tokens: tuple[int, ...] = (512, 1024, 2048)  # T: prompt lengths
    cont_tokens: int = 128  # tokens scored after the prompt
    docs: int = 16  # WikiText-2 test articles (one window each: its first T + cont_tokens tokens)
    batch_size: int = 4  # requests per forward (long rows: keep small)

    def __post_init__(self) -> None:
        if not self.prompt_tokens or min(self.prompt_tokens) < 1 or self.cont_tokens < 1 or self.docs < 1 or self.batch_size < 1:
            raise ValueError("pd_ppl: prompt_tokens must be non-empty and positive; cont_tokens, docs, batch_size >= 1")


@dataclass(frozen=True)
class PasskeyConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # L: prompt tokens in total
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits in the filler (0 = start)
    repeats: int = 2  # samples per (length, depth), each with its own key
    max_new_tokens: int = 10
    seed: int = 1234  # key RNG (fixed, so every method and run sees the same samples)
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("passkey: lengths must be non-empty and each >= 64 tokens")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("passkey: depths must be non-empty and within [0, 1]")
        if self.repeats < 1 or self.max_new_tokens < 5 or self.batch_size < 1:
            raise ValueError("passkey: repeats >= 1, max_new_tokens >= 5 (a key has 5 digits), batch_size >= 1")


CONFIGS = {"pd_ppl": PplConfig, "passkey": PasskeyConfig}


# -- request construction (no model needed) ---------------------------------------------------
def ppl_windows(tokenizer, data_dir: Path, c: PplConfig, limit: int | None) -> list[list[int]]:
    """Token windows of max(T) + cont_tokens tokens: the start of each eligible article."""
    from harness.offline_tasks import wikitext_pages

    path = Path(data_dir) / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise UsageError(f"pd_ppl needs {path} (WikiText-2 test, raw) in the data dir")
    need = max(c.prompt_tokens) + c.cont_tokens
    n = min(c.docs, limit) if limit else c.docs
    windows = []
    for page in wikitext_pages(path.read_text(encoding="utf-8")):
        ids = tokenizer.encode(page, add_special_tokens=False)
        if len(ids) >= need:
            windows.append(ids[:need])
            if len(windows) == n:
                break
    if not windows:
        raise UsageError(f"pd_ppl: no WikiText-2 test article has {need} tokens; lower pd_ppl.prompt_tokens")
    return windows


INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    length: int
    depth: float
    key: str
    tokens: tuple[int, ...]


def passkey_samples(tokenizer, c: PasskeyConfig, limit: int | None) -> list[PasskeySample]:
    """Samples of exactly `length` tokens; the key follows round(depth · units) whole filler units."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    intro, unit, question = enc(INTRO), enc(FILLER), enc(QUESTION)
    grid = [(rep, L, d) for rep in range(c.repeats) for L in c.lengths for d in c.depths]
    if limit:
        grid = grid[:limit]
    out = []
    for rep, L, d in grid:
        rng = random.Random(f"{c.seed}/{L}/{d}/{rep}")
        key = str(rng.randint(10000, 99999))
        key_ids = enc(KEY.format(key=key))
        n_fill = L - len(intro) - len(key_ids) - len(question)
        if n_fill < len(unit):
            raise UsageError(f"passkey: length {L} leaves no room for filler; use lengths >= {L - n_fill + len(unit)}")
        filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
        before = round(d * (n_fill // len(unit))) * len(unit)
        toks = intro + filler[:before] + key_ids + filler[before:] + question
        assert len(toks) == L
        out.append(PasskeySample(L, d, key, tuple(toks)))
    return out


def passkey_correct(generated: str, key: str) -> bool:
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == key


# -- evaluation through a Scorer --------------------------------------------------------------
@contextlib.contextmanager
def _batch_size(scorer, n: int) -> Iterator[None]:
    old = scorer.batch_size
    scorer.batch_size = min(old, n)
    try:
        yield
    finally:
        scorer.batch_size = old


def _kv_delta(scorer, fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    before = scorer.tally.as_dict()
    out = fn()
    return out, scorer.tally.since(before)


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def evaluate_pd_ppl(scorer, tokenizer, data_dir: Path, c: PplConfig, limit: int | None, progress: bool = False) -> dict:
    """Scores {ppl, ppl_T...}: value and stderr (delta method over per-article mean NLL)."""
    windows = ppl_windows(tokenizer, data_dir, c, limit)
    if scorer.max_length < max(c.prompt_tokens) + c.cont_tokens - 1:
        raise UsageError(f"pd_ppl: prompts of {max(c.prompt_tokens)} + {c.cont_tokens} tokens exceed max_length {scorer.max_length}")
    scores, kv_by, nll_all = {}, {}, []
    with _batch_size(scorer, c.batch_size):
        for T in c.prompt_tokens:
            reqs = [(w[:T], w[T : T + c.cont_tokens]) for w in windows]
            res, kv_by[f"T{T}"] = _kv_delta(scorer, lambda reqs=reqs: scorer.loglikelihood(reqs, progress=progress))
            nll = [-lp / c.cont_tokens for lp, _ in res]  # per-article mean NLL per token
            nll_all += nll
            m, se = _mean_se(nll)
            scores[f"ppl_T{T}"] = {"value": math.exp(m), "stderr": None if se is None else math.exp(m) * se}
    m, se = _mean_se(nll_all)
    scores = {"ppl": {"value": math.exp(m), "stderr": None if se is None else math.exp(m) * se}, **scores}
    return {"scores": scores, "n_samples": len(windows) * len(c.prompt_tokens), "kv_by": kv_by,
            "details": {"articles": len(windows), "prompt_tokens": list(c.prompt_tokens), "cont_tokens": c.cont_tokens,
                        "source": "wikitext2/wiki.test.raw, articles split at top-level titles, file order"}}


def evaluate_passkey(scorer, tokenizer, c: PasskeyConfig, limit: int | None, progress: bool = False) -> dict:
    samples = passkey_samples(tokenizer, c, limit)
    if scorer.max_length < max(s.length for s in samples) + c.max_new_tokens:
        raise UsageError(f"passkey: {max(s.length for s in samples)} + {c.max_new_tokens} tokens exceed max_length {scorer.max_length}")
    scores, kv_by, hits, per_sample = {}, {}, [], []
    with _batch_size(scorer, c.batch_size):
        for L in sorted({s.length for s in samples}):
            group = [s for s in samples if s.length == L]
            gens, kv_by[f"L{L}"] = _kv_delta(scorer, lambda g=group: scorer.generate(
                [list(s.tokens) for s in g], c.max_new_tokens, progress=progress))
            ok = [passkey_correct(tokenizer.decode(g), s.key) for s, g in zip(group, gens)]
            m, se = _mean_se([float(x) for x in ok])
            scores[f"acc_L{L}"] = {"value": m, "stderr": se}
            hits += ok
            per_sample += [{"length": s.length, "depth": s.depth, "key": s.key, "output": tokenizer.decode(g), "correct": x}
                           for s, g, x in zip(group, gens, ok)]
    m, se = _mean_se([float(x) for x in hits])
    by_depth = {}
    for d in sorted({s["depth"] for s in per_sample}):
        xs = [float(s["correct"]) for s in per_sample if s["depth"] == d]
        by_depth[f"acc_depth{d:g}"] = {"value": sum(xs) / len(xs), "stderr": _mean_se(xs)[1]}
    return {"scores": {"acc": {"value": m, "stderr": se}, **scores, **by_depth}, "n_samples": len(samples),
            "kv_by": kv_by, "details": {"samples": per_sample, "scoring": "first digit run of the greedy output == key"}}


def evaluate(task: str, scorer, tokenizer, data_dir: Path | None, options: Any, limit: int | None, progress: bool = False) -> dict:
    """Run one long-context task; returns scores, n_samples, per-setting KV deltas and details."""
    if task == "pd_ppl":
        if data_dir is None:
            raise UsageError("pd_ppl reads WikiText-2 from local data: pass --data-dir (or set HARNESS_DATA_DIR)")
        out = evaluate_pd_ppl(scorer, tokenizer, data_dir, options, limit, progress)
    elif task == "passkey":
        out = evaluate_passkey(scorer, tokenizer, options, limit, progress)
    else:
        raise KeyError(task)
    out["harness_task"] = {"version": VERSION[task], "options": dataclasses.asdict(options)}
    return out
