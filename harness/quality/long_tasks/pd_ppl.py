"""`pd_ppl`: perplexity of a continuation scored across the PD handoff, per prompt length.

The first `T` tokens of a WikiText-2 test article are the prompt (prefill stage), the next
`cont_tokens` tokens are scored (the first by the prefill stage, the rest by the decode stage over
the handed-over cache). Metric `ppl_T{T}` = exp(mean NLL per scored token) for each T, `ppl`
pooled over all T. Articles are those (in file order) with at least max(T) + cont_tokens tokens,
so every T scores the same articles. `--limit N` caps the number of articles.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessWarning, UsageError
from harness.quality.long_tasks import register_task
from harness.quality.long_tasks.base import LongTask, batch_size, capped, kv_delta, mean_se, special_prefix
from harness.store.task_names import TaskPresentation


@dataclass(frozen=True)
class PplConfig:
    prompt_tokens: tuple[int, ...] = (512, 1024, 2048)  # T: prompt lengths
    cont_tokens: int = 128  # tokens scored after the prompt
    # WikiText-2 test articles (one window each: its first T + cont_tokens tokens); 8 keeps the default run
    # short (3 x 8 x 128 = 3,072 scored tokens), docs=16 is the grid of earlier runs
    docs: int = 8
    batch_size: int = 4  # requests per forward (long rows: keep small)

    def __post_init__(self) -> None:
        if not self.prompt_tokens or min(self.prompt_tokens) < 1 or self.cont_tokens < 1 or self.docs < 1 or self.batch_size < 1:
            raise ValueError("pd_ppl: prompt_tokens must be non-empty and positive; cont_tokens, docs, batch_size >= 1")
        if len(set(self.prompt_tokens)) < len(self.prompt_tokens):
            raise ValueError(f"pd_ppl: each prompt_tokens value must be given once, got {list(self.prompt_tokens)}")


def ppl_windows(tokenizer, data_dir: Path, c: PplConfig, limit: int | float | None) -> list[list[int]]:
    """Token windows of max(T) + cont_tokens tokens: the start of each eligible article."""
    return [w for _, w in ppl_articles(tokenizer, data_dir, c, limit)]


def ppl_articles(tokenizer, data_dir: Path, c: PplConfig, limit: int | float | None) -> list[tuple[str, list[int]]]:
    """(title, window) of each eligible article: its title line (` = Title = `, stripped) and `ppl_windows`' window."""
    from harness.quality.tasks import wikitext_pages

    path = Path(data_dir) / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise UsageError(f"pd_ppl needs {path} (WikiText-2 test, raw) in the data dir")
    need = max(c.prompt_tokens) + c.cont_tokens
    n = capped(c.docs, limit)
    prefix = special_prefix(tokenizer)  # a served prompt's BOS (Llama's), counted in the T prompt tokens
    windows = []
    for page in wikitext_pages(path.read_text(encoding="utf-8")):
        ids = tokenizer.encode(page, add_special_tokens=False)
        if len(ids) >= need:  # the same articles with a prefix or without
            windows.append((page.strip().split("\n", 1)[0].strip(), (prefix + ids)[:need]))
            if len(windows) == n:
                break
    if not windows:
        raise UsageError(f"pd_ppl: no WikiText-2 test article has {need} tokens; lower pd_ppl.prompt_tokens")
    if len(windows) < n:  # the record's n_samples says so too; the plan announced n
        warnings.warn(f"pd_ppl: only {len(windows)} WikiText-2 test articles have {need} tokens, so {len(windows)} are scored, "
                      f"not the {n} asked for (pd_ppl.docs={c.docs})", HarnessWarning, stacklevel=2)
    return windows


@register_task
class PdPpl(LongTask):
    """Token perplexity of WikiText-2 continuations after T-token prompts."""

    name = "pd_ppl"
    data_files = ("wikitext2/wiki.test.raw",)  # what it reads from the data dir (its digest is recorded)
    Config = PplConfig
    version = 3  # 2: the pooled ppl's stderr over articles (each article's windows at every T are one sample); 3: the
    # tokenizer's default prefix (BOS) starts each window
    # versions 1 and 2 give the same perplexities where the tokenizer prepends nothing (SmolLM2; 1's pooled stderr is
    # the older, smaller one): their records (the committed tables') are still reused there, and refused for a
    # BOS-adding tokenizer (Llama's), whose windows they scored without it
    reusable_without_prefix = (1, 2)
    presentation = TaskPresentation(
        title="PPL", setting_prefix="ppl_T", primary_metric="ppl", metric_format="decimal", lower_is_better=True,
        caption="PPL: token perplexity of {cont_tokens|the} continuation tokens after a T-token WikiText-2 prompt (pd_ppl)",
        column_order=0)

    @classmethod
    def items(cls, options: PplConfig, limit: int | float | None) -> int:
        """One window per article and prompt length T (fewer if few articles are long enough)."""
        return capped(options.docs, limit) * len(options.prompt_tokens)

    @classmethod
    def check_data(cls, data_dir: Path | None) -> None:
        if data_dir is None:
            raise UsageError("pd_ppl reads WikiText-2 from local data: pass --data-dir (or set HARNESS_DATA_DIR)")

    @classmethod
    def check_max_length(cls, options: PplConfig, max_length: int, limit: int | float | None = None) -> None:
        if max_length < max(options.prompt_tokens) + options.cont_tokens - 1:
            advice = cls.too_long_advice("prompt_tokens", options.prompt_tokens, max_length - options.cont_tokens + 1, 1)
            raise UsageError(f"pd_ppl: prompts of {max(options.prompt_tokens)} + {options.cont_tokens} tokens exceed "
                             f"max_length {max_length}{advice}")

    def evaluate(self, scorer, tokenizer, data_dir: Path | None, options: PplConfig, limit: int | float | None,
                 progress: bool = False) -> dict:
        """Scores {ppl, ppl_T...}: value and stderr (delta method over per-article mean NLL). The pooled `ppl`'s
        stderr treats an article as one sample (the mean of its windows' NLL over every T): its windows share
        their text, so counting them as independent understated it (by ~30 % at 3 prompt lengths)."""
        c = options
        titled = ppl_articles(tokenizer, data_dir, c, limit)
        windows = [w for _, w in titled]
        self.check_max_length(c, scorer.max_length)
        scores, kv_by, nll_by_t, per_window = {}, {}, [], []
        with batch_size(scorer, c.batch_size):
            for T in c.prompt_tokens:
                reqs = [(w[:T], w[T : T + c.cont_tokens]) for w in windows]
                res, kv_by[f"T{T}"] = kv_delta(scorer, lambda reqs=reqs: scorer.loglikelihood(reqs, progress=progress))
                nll = [-lp / c.cont_tokens for lp, _ in res]  # per-article mean NLL per token
                nll_by_t.append(nll)
                per_window += [{"doc_id": i, "prompt_tokens": T, "cont_tokens": c.cont_tokens, "nll_per_token": x}
                               for i, x in enumerate(nll)]
                scores[f"ppl_T{T}"] = _ppl(nll)
        per_article = [sum(x) / len(x) for x in zip(*nll_by_t)]  # the mean over all windows is the mean of these
        scores = {"ppl": _ppl(per_article), **scores}
        # per article (the same articles for every method): exp of its mean NLL per token, for paired comparisons
        items = {"ids": [f"pd_ppl/{i}" for i in range(len(per_article))], "metrics": {"ppl": [math.exp(x) for x in per_article]}}
        return {"scores": scores, "n_samples": len(windows) * len(c.prompt_tokens), "kv_by": kv_by, "items": items,
                "samples": {self.name: per_window},  # written with --log-samples, not stored in the record
                "details": {"articles": len(windows), "prompt_tokens": list(c.prompt_tokens), "cont_tokens": c.cont_tokens,
                            "source": "wikitext2/wiki.test.raw, articles split at top-level titles, file order",
                            "titles": [t for t, _ in titled],  # which articles pd_ppl/0, pd_ppl/1, ... are
                            "prompt": f"the tokenizer's default prefix {special_prefix(tokenizer)} (BOS; [] for none), "
                                      "then the article's tokens; no chat template"}}


def _ppl(nll: list[float]) -> dict:
    """exp(mean NLL) and its stderr by the delta method."""
    m, se = mean_se(nll)
    return {"value": math.exp(m), "stderr": None if se is None else math.exp(m) * se}
