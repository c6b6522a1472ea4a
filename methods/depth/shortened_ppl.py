"""`shortened_ppl`: Shortened LLaMA's perplexity criterion (Kim et al., arXiv 2402.02834).

"Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining Methods".
One-shot: for every eligible block, the calibration perplexity of the model without that one
block is measured; blocks are ranked by it (lowest first: their removal hurts least) and the
first `k` are removed. The ranking is the removal order `stage:shortened_ppl` uses.

Prefill stage: the kept blocks. Decode stage: the same kept blocks. KV: every prompt position of
every kept block is sent.

Choices and departures from the paper:
- The "+" rule (the authors' code applies it to either criterion unless told not to): the first
  `keep_first = 4` and last `keep_last = 2` blocks are never removed; 0 and 0 turn it off.
- Calibration data: the paper uses 10 BookCorpus samples of 128 tokens; here `samples`
  sequences (seeded) of this harness's calibration set (PIQA + MMLU, `harness/quality/calibration.py`).
- No retraining: the paper follows pruning with LoRA (or continued pretraining); this baseline is
  evaluated one-shot, like every other method here.
- Blocks are removed by running the kept blocks (`methods/depth/perplexity.py`); each candidate's
  forward resumes at the candidate block from the dense model's cached hidden states. Only
  eligible blocks are scored. Ties go to the lower block index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from methods.depth.perplexity import calibration_evaluator
from methods.depth.ranked import Ranking, SampledOptions, SampledRankedMethod, progress
from methods.registry import register


@register
class ShortenedPPL(SampledRankedMethod):
    name = "shortened_ppl"
    summary = "remove the k blocks whose single removal gives the lowest calibration perplexity (first 4, last 2 kept)"
    doc_row = ("drops the `k` blocks whose single removal hurts calibration perplexity least; first 4 and last 2 kept "
               "(Shortened LLaMA, arXiv 2402.02834)", "same blocks", "all positions")
    baseline_doc = ("Shortened LLaMA, arXiv 2402.02834", "lowest calibration perplexity with the single block removed; first 4 / last 2 kept",
                    "`samples` sequences")

    @dataclass(frozen=True)
    class Config(SampledOptions):
        """The "+" rule (first 4, last 2 blocks kept) and 64 sequences: `SampledOptions`' defaults."""

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        ev, n_rows = calibration_evaluator(self.name, model, calib, self.config)
        dense = ev.nll(())
        nll = {j: ev.nll({j}) for j in progress(eligible, "shortened_ppl: blocks")}
        order = sorted(eligible, key=lambda j: (nll[j], j))
        return Ranking(order, {
            "criterion": "calibration perplexity with the single block removed (lowest first)",
            "ppl_without_block": {str(j): math.exp(v) for j, v in nll.items()},
            "nll_without_block": {str(j): v for j, v in nll.items()},
            "dense_nll": dense, "dense_ppl": math.exp(dense), "calibration_sequences": n_rows, "work": ev.work()})
