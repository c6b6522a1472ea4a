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
      part above the floor is 1/β of the average and the first's 2 - 1/β.
    - `reserve_window`: the paper's split (default): every layer first keeps its observation
      window, f = min(window, T, floor(B / n)) positions, and β shares out only the rest, as
      PyramidKV's code does with `capacity - window`. False: f = 1 (a record without the option
      means False: the records made before it existed).
    Split rule (exact integers): every layer first gets f positions; the remaining R = B - n·f are
    shared in proportion to the weights, capped at T - f per layer (water-filling: layers whose
    share would pass the cap get T - f, the rest is re-shared among the others); each share is
    rounded down and the leftover positions go, one each, to the largest fractional parts (ties
    to the earlier layer). The counts sum to B(T) exactly, each is in [f, T], and they do not
    increase with depth.
    """

    beta: float = 20.0
    reserve_window: bool = True

    name = "pyramidkv"
    method_name = "pyramidkv"
    method_summary = ("base plan's layers (default pdtrim); SnapKV's per-head selection with layer budgets "
                      "decreasing linearly with depth, at the base's KV bytes")
    dict_defaults = {"reserve_window": False}  # the split before the option existed
    method_defaults = {"reserve_window": True}  # the method runs the paper's split
    budget_rule = ("per request: B(T) layer-positions (the base policy's count on this plan, or keep_tokens / "
                   "keep_ratio per layer); each decode layer first gets min(window, T, B/n) (reserve_window, the "
                   "paper's) or 1, the rest shared by arithmetic weights from 2 - 1/beta (first decode layer) to "
                   "1/beta (last), capped at T, rounded down, leftovers to the largest remainders; that many per KV head")

    def validate(self) -> None:
        super().validate()
        if not self.beta >= 1.0:
            raise ValueError(f"KVPolicy: need beta >= 1, got {self.beta}")

    def layer_budgets(self, decode_layers: tuple[int, ...], T: int) -> list[int]:
        total, n = self.budget.total(tuple(decode_layers), T), len(decode_layers)
        floor = max(1, min(self.window, T, total // n)) if self.reserve_window else 1
        return pyramid_split(total, n, T, self.beta, floor)

    def how(self) -> str:
        above = " above each layer's window" if self.reserve_window else ""
        return f"pyramid beta {self.beta:g}{above}, " + super().how()


def pyramid_split(total: int, n: int, T: int, beta: float, floor: int = 1) -> list[int]:
    """n layer budgets in [floor, T] summing to `total` (n·floor <= total <= n·T, 1 <= floor <= T), decreasing
    linearly above the floor (see `PyramidKV`)."""
    if not (1 <= floor <= T and n * floor <= total <= n * T):
        raise ValueError(f"pyramid_split: need n·floor <= total <= n·T and 1 <= floor <= T, got n={n}, "
                         f"total={total}, T={T}, floor={floor}")
    b = Fraction(repr(float(beta)))
    top, low = 2 - 1 / b, 1 / b
    weights = [top - (top - low) * i / (n - 1) for i in range(n)] if n > 1 else [Fraction(1)]
    cap, rest = T - floor, Fraction(total - n * floor)
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
    left = total - n * floor - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: (-(share[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return [floor + c for c in counts]
