"""`pyramidkv`: PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069) at the handoff: SnapKV's selection, budgets decreasing with depth."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from harness.pd.kv import register_policy
from harness.pd.kv.snapkv import SnapKV


@register_policy
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's per-KV-head selection in every decode layer, with per-layer budgets decreasing linearly with depth.

    - `budget`: the `KVBudget`; its total B(T) (e.g. a first_last policy's layer-positions) is
      split over the n decode layers by `pyramid_split`, not evenly.
    - `window`: observation window, always kept (as snapkv).
    - `kernel`: pooling width over positions (odd; as snapkv).
    - `pooling`: `max` or `avg` (as snapkv).
    - `order`: `pool_then_mean` (default, SnapKV's reference code) or `mean_then_pool` (as snapkv;
      always written in the dict).
    - `beta`: steepness (>= 1, the paper's β, default 20): the arithmetic weights run from
      2 - 1/β (first decode layer) down to 1/β (last), mean 1, so the last layer's share of the
      part above one position per layer is 1/β of the average and the first's 2 - 1/β.
    Split rule (exact integers): every layer first gets 1 position; the remaining R = B - n are
    shared in proportion to the weights, capped at T - 1 per layer (water-filling: layers whose
    share would pass the cap get T - 1, the rest is re-shared among the others); each share is
    rounded down and the leftover positions go, one each, to the largest fractional parts (ties
    to the earlier layer). The counts sum to B(T) exactly, each is in [1, T], and they do not
    increase with depth.
    """

    beta: float = 20.0

    name = "pyramidkv"
    method_name = "pyramidkv"
    method_summary = ("base plan's layers (default pdtrim); SnapKV's per-head selection with layer budgets "
                      "decreasing linearly with depth, at the base's KV bytes")
    dict_defaults = {}  # no records predate it: every option is written
    budget_rule = ("per request: B(T) layer-positions (the base policy's count on this plan, or keep_tokens / "
                   "keep_ratio per layer); one per decode layer, the rest shared by arithmetic weights from "
                   "2 - 1/beta (first decode layer) to 1/beta (last), capped at T, rounded down, leftovers to the "
                   "largest remainders; that many per KV head")

    def validate(self) -> None:
        super().validate()
        if not self.beta >= 1.0:
            raise ValueError(f"KVPolicy: need beta >= 1, got {self.beta}")

    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        return pyramid_split(self.budget.total(tuple(decode_layers), T), len(decode_layers), T, self.beta)

    def how(self) -> str:
        return f"pyramid beta {self.beta:g}, " + super().how()


def pyramid_split(total: int, n: int, T: int, beta: float) -> list[int]:
    """n layer budgets in [1, T] summing to `total` (n <= total <= n·T), decreasing linearly (see `PyramidKV`)."""
    if not n <= total <= n * T:
        raise ValueError(f"pyramid_split: need n <= total <= n·T, got n={n}, total={total}, T={T}")
    b = Fraction(repr(float(beta)))
    top, low = 2 - 1 / b, 1 / b
    weights = [top - (top - low) * i / (n - 1) for i in range(n)] if n > 1 else [Fraction(1)]
    cap, rest = T - 1, Fraction(total - n)
    share: list[Fraction | None] = [None] * n
    while True:  # water-filling: fix the layers whose proportional share passes the cap
        free = [i for i in range(n) if share[i] is None]
        w = sum(weights[i] for i in free)
        over = [i for i in free if rest * weights[i] / w > cap]
        if not over:
            break
        for i in over:
            share[i] = Fraction(cap)
        rest -= cap * len(over)
    for i in free:
        share[i] = rest * weights[i] / w
    counts = [int(s) for s in share]  # floor: shares are >= 0
    left = total - n - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: (-(share[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return [1 + c for c in counts]
