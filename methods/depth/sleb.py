"""`sleb`: SLEB, iterative block elimination by calibration perplexity (Song et al., arXiv 2402.09025).

"SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks".
Greedy and iterative: at each step every remaining eligible block is tried, the one whose removal
(together with the blocks already removed) gives the lowest calibration NLL, i.e. perplexity, is
removed, and the next step starts from the model without it. `k` steps remove `k` blocks; the
order in which they were removed is the removal order `stage:sleb` uses (methods/depth/stage.py).

Prefill stage: the kept blocks. Decode stage: the same kept blocks (SLEB prunes one model for
both stages). KV: every prompt position of every kept block is sent.

Choices and departures from the paper:
- Calibration data: the paper scores on 128 WikiText-2 sequences of 2048 tokens; here the NLL is
  computed on `samples` sequences (seeded) of this harness's calibration set (PIQA + MMLU,
  `harness/quality/calibration.py`, at most 512 tokens each), the data every method of a run shares.
  The default (64 sequences) keeps the k = 8 search on SmolLM2 within minutes on a CPU.
- The first and last blocks are never removed (`keep_first = keep_last = 1`, as the authors'
  code's early/late barrier); setting them to 0 makes every block a candidate.
- Blocks are removed by running the kept blocks (`methods/depth/perplexity.py`): the hidden states
  entering every block under the current removal set are kept, and each candidate's forward
  resumes at the candidate block, so a step costs about half a forward per candidate.
- Ties (equal NLL) go to the lower block index. No weights are updated (SLEB is training-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from methods.depth.perplexity import calibration_evaluator
from methods.depth.ranked import Ranking, SampledOptions, SampledRankedMethod, progress
from methods.registry import register


@register
class SLEB(SampledRankedMethod):
    name = "sleb"
    summary = "greedy: repeatedly remove the block whose removal gives the lowest calibration perplexity; same blocks in both stages"
    doc_row = ("greedy: `k` times, drops the block whose removal gives the lowest calibration perplexity (SLEB, arXiv 2402.09025)",
               "same blocks", "all positions")
    baseline_doc = ("SLEB, arXiv 2402.09025", "greedy: lowest calibration perplexity with the block (and those already chosen) removed",
                    "`samples` sequences")

    @dataclass(frozen=True)
    class Config(SampledOptions):
        keep_first: int = 1  # the first blocks are never removed (the authors' early barrier)
        keep_last: int = 1  # nor the last ones

    def _rank(self, model, calib, k: int, eligible: list[int]) -> Ranking:
        ev, n_rows = calibration_evaluator(self.name, model, calib, self.config)
        dense = ev.nll(())
        removed: list[int] = []
        steps = []
        for step in range(k):
            cands = [j for j in eligible if j not in removed]
            scored = {j: ev.nll({*removed, j}) for j in progress(cands, f"sleb: step {step + 1}/{k}")}
            best = min(scored, key=lambda j: (scored[j], j))
            removed.append(best)
            ev.set_base(removed)
            steps.append({"removed": best, "nll": scored[best], "ppl": math.exp(scored[best]),
                          "candidates": {str(j): v for j, v in scored.items()}})
        return Ranking(removed, {
            "criterion": "greedy: lowest mean calibration NLL (nats/token) with the block and those already chosen removed",
            "dense_nll": dense, "dense_ppl": math.exp(dense), "steps": steps,
            "calibration_sequences": n_rows, "work": ev.work()})
