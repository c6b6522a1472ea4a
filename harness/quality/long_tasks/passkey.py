"""`passkey`: retrieval of a 5-digit key hidden in filler text, per prompt length.

A key sits at a relative depth in repeated filler text of exactly `L` tokens, then "What is the
pass key? The pass key is"; greedy generation (EOS ignored, at most `max_new_tokens`), exact match
of the first digit run with the key. Metric `acc_L{L}` per length, `acc` over all samples. Keys
are drawn from a seeded RNG: the same samples for every method. `--limit N` caps the number of
samples (grid cells are taken round-robin, so every length and depth stays represented).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.quality.long_tasks import register_task
from harness.quality.long_tasks.base import LongTask, batch_size, capped, kv_delta, mean_se, special_prefix
from harness.store.task_names import TaskPresentation


@dataclass(frozen=True)
class PasskeyConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # L: prompt tokens in total
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits in the filler (0 = start)
    # samples per (length, depth), each with its own key; 1 keeps the default run short (15 samples),
    # repeats=2 is the 30-sample grid of earlier runs
    repeats: int = 1
    max_new_tokens: int = 10
    seed: int = 1234  # key RNG (fixed, so every method and run sees the same samples)
    batch_size: int = 4

    def __post_init__(self) -> None:
        # depths as floats: each key's RNG is seeded with the depth's text, and 0 must draw the key 0.0 draws
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("passkey: lengths must be non-empty and each >= 64 tokens")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("passkey: depths must be non-empty and within [0, 1]")
        names = {f"{d:g}" for d in self.depths}  # acc_depth{d:g}: depths that print alike would share one score
        if len(set(self.lengths)) < len(self.lengths) or len(names) < len(self.depths):
            raise ValueError("passkey: each of lengths and depths must be given once (a repeat scores the same prompts "
                             f"twice and narrows the error bar; got lengths={list(self.lengths)}, depths={list(self.depths)}); "
                             "for more prompts per setting raise repeats")
        if self.repeats < 1 or self.max_new_tokens < 5 or self.batch_size < 1:
            raise ValueError("passkey: repeats >= 1, max_new_tokens >= 5 (a key has 5 digits; a tokenizer may need more), "
                             "batch_size >= 1")


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
    rep: int = 0

    @property
    def item_id(self) -> str:
        """What the sample is, not where it sits: paired comparisons match items by it (another --limit, same id)."""
        return f"passkey/L{self.length}/d{self.depth:g}/r{self.rep}"


def _round_robin(lengths: tuple[int, ...], depths: tuple[float, ...]) -> list[tuple[int, float]]:
    """Every (length, depth) cell once, lengths cycling fastest and each length's depth rotating, so any prefix
    (what --limit takes) spreads over the lengths first, then the depths: the j-th cell is length j mod nL with
    depth (j div nL + j mod nL) mod nD, a bijection onto the grid."""
    n_l, n_d = len(lengths), len(depths)
    return [(lengths[j % n_l], depths[(j // n_l + j % n_l) % n_d]) for j in range(n_l * n_d)]


def kept_cells(c: PasskeyConfig, limit: int | float | None) -> set[tuple[int, int, float]]:
    """The (repeat, length, depth) cells a --limit keeps: the first of the round-robin order over lengths and depths."""
    grid = [(rep, *cell) for rep in range(c.repeats) for cell in _round_robin(c.lengths, c.depths)]
    return set(grid[:capped(len(grid), limit)])


def passkey_samples(tokenizer, c: PasskeyConfig, limit: int | float | None) -> list[PasskeySample]:
    """Samples of exactly `length` tokens; the key follows round(depth · units) whole filler units. In (repeat, length,
    depth) order; a --limit keeps the first cells of the round-robin order (every length, then every depth)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    # a served prompt starts with the tokenizer's default prefix (Llama's BOS; none for SmolLM2): counted in the L tokens
    intro, unit, question = special_prefix(tokenizer) + enc(INTRO), enc(FILLER), enc(QUESTION)
    kept = kept_cells(c, limit)
    grid = [(rep, L, d) for rep in range(c.repeats) for L in c.lengths for d in c.depths if (rep, L, d) in kept]
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
        out.append(PasskeySample(L, d, key, tuple(toks), rep))
    _check_answer_room(enc, c, out)
    return out


def _check_answer_room(enc, c: PasskeyConfig, samples: list[PasskeySample]) -> None:
    """A UsageError when `max_new_tokens` cannot hold a key as the model would write it after "The pass key is":
    SmolLM2's tokenizer gives " 47778" 6 tokens (a space, then a digit each), so 5 cut every key to 4 digits and
    scored 0 % for a model that retrieves them all."""
    need = max((len(enc(" " + s.key)) for s in samples), default=0)
    if c.max_new_tokens < need:
        raise UsageError(f"passkey: max_new_tokens={c.max_new_tokens} cannot hold a key: this tokenizer writes \" <key>\" "
                         f"in up to {need} tokens; give passkey.max_new_tokens={need} or more")


def passkey_correct(generated: str, key: str) -> bool:
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == key


@register_task
class Passkey(LongTask):
    """Exact retrieval of a key from an L-token prompt, by greedy generation."""

    name = "passkey"
    Config = PasskeyConfig
    version = 2  # 2: the tokenizer's default prefix (BOS) starts each prompt
    reusable_without_prefix = (1,)  # the same prompts where the tokenizer prepends nothing (SmolLM2)
    presentation = TaskPresentation(
        title="passkey %", setting_prefix="acc_L", primary_metric="acc", metric_format="percent",
        caption="passkey %: exact retrieval of a 5-digit key from an L-token prompt", column_order=1)

    @classmethod
    def items(cls, options: PasskeyConfig, limit: int | float | None) -> int:
        """One generation per (repeat, length, depth), the first `limit` of them."""
        n = options.repeats * len(options.lengths) * len(options.depths)
        return capped(n, limit)

    @classmethod
    def check_tokenizer(cls, tokenizer, options: PasskeyConfig, limit: int | float | None) -> None:
        passkey_samples(tokenizer, options, limit)  # a length with no room for filler: the UsageError, before any cell

    @classmethod
    def check_max_length(cls, options: PasskeyConfig, max_length: int, limit: int | float | None = None) -> None:
        longest = max(L for _, L, _ in kept_cells(options, limit))  # the lengths the samples a --limit keeps have
        if max_length < longest + options.max_new_tokens:
            advice = cls.too_long_advice("lengths", options.lengths, max_length - options.max_new_tokens, 64)
            raise UsageError(f"passkey: {longest} + {options.max_new_tokens} tokens exceed max_length {max_length}{advice}")

    @classmethod
    def stale(cls, result: dict, options: PasskeyConfig, limit: int | float | None) -> str | None:
        """Results with positional item ids (`passkey/0`) come from versions that kept, under a --limit that cuts
        the grid, other cells than this one may: refused then. Without a cut they scored the same samples and are
        reused (their positional ids pair only with records of their own kind in `report --baseline`)."""
        ids = (result.get("items") or {}).get("ids") or []
        if ids and not ids[0].startswith("passkey/L") and cls.items(options, limit) < cls.items(options, None):
            return "passkey's items have positional ids, from a version whose --limit may have kept other samples"
        return None

    def evaluate(self, scorer, tokenizer, data_dir: Path | None, options: PasskeyConfig, limit: int | float | None,
                 progress: bool = False) -> dict:
        c = options
        samples = passkey_samples(tokenizer, c, limit)
        self.check_max_length(c, scorer.max_length, limit)
        scores, kv_by, hits, per_sample = {}, {}, [], []
        with batch_size(scorer, c.batch_size):
            for L in sorted({s.length for s in samples}):
                group = [s for s in samples if s.length == L]
                gens, kv_by[f"L{L}"] = kv_delta(scorer, lambda g=group: scorer.generate(
                    [list(s.tokens) for s in g], c.max_new_tokens, progress=progress))
                ok = [passkey_correct(tokenizer.decode(g), s.key) for s, g in zip(group, gens)]
                m, se = mean_se([float(x) for x in ok])
                scores[f"acc_L{L}"] = {"value": m, "stderr": se}
                hits += ok
                per_sample += [{"length": s.length, "depth": s.depth, "key": s.key, "output": tokenizer.decode(g), "correct": x,
                                "id": s.item_id} for s, g, x in zip(group, gens, ok)]
        m, se = mean_se([float(x) for x in hits])
        items = {"ids": [x["id"] for x in per_sample],  # by content: records of another --limit pair on what they share
                 "metrics": {"acc": [float(x["correct"]) for x in per_sample]}}
        return {"scores": {"acc": {"value": m, "stderr": se}, **scores, **_by_depth(per_sample)}, "n_samples": len(samples),
                "kv_by": kv_by, "details": {"samples": per_sample, "scoring": "first digit run of the greedy output == key",
                            "prompt": f"the tokenizer's default prefix {special_prefix(tokenizer)} (BOS; [] for none), "
                                      "then the prompt's tokens; no chat template"},
                "items": items, "samples": {self.name: [{"doc_id": i, **x} for i, x in enumerate(per_sample)]}}


def _by_depth(per_sample: list[dict]) -> dict:
    """acc_depth{d}: accuracy over the samples with the key at depth d (all lengths)."""
    out = {}
    for d in sorted({s["depth"] for s in per_sample}):
        xs = [float(s["correct"]) for s in per_sample if s["depth"] == d]
        out[f"acc_depth{d:g}"] = {"value": sum(xs) / len(xs), "stderr": mean_se(xs)[1]}
    return out
