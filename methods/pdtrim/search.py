"""PDTrim's search state: block scores, the two stage objectives with memoised (and disk-cached)
values, the lazy greedy steps and the optional annealing, and what the record says about them.

One state per (model, calibration set, search options) is shared in a process (`_SHARED_STATES`),
so both modes and every swept `k` read one greedy path; `methods/pdtrim/method.py` turns its
answers into plans.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

import torch

from harness.pd import arch
from methods import bars, cached
from methods.cached import DiskMemo, set_key
from methods.depth.blocks import block_cosines
from methods.pdtrim.memo_keys import exact_values, memo_key_ok
from methods.pdtrim.screen import Screen, screen_copy, screen_kind

READING = "PDTRIM.md section 2 (harness reading v1)"
# The options a search state's values depend on (block scores, sets, objective values, step-1 priors);
# the rest (k_*, KV selection, annealing, healing) only choose what to read from it.
SEARCH_FIELDS = ("d_t", "search_samples", "max_cont", "batch_size", "batch_tokens", "seed", "sensitivity",
                 "sensitivity_samples", "sensitivity_blocks", "lazy", "min_exact", "screen", "screen_margin",
                 "subset_margin")
SENSITIVITY_BLOCKS = ("candidates", "all")
_SHARED_STATES: dict[tuple, SearchState] = cached.holding_models({})  # emptied after an API run (cached.release_models)
# Bump when the objective values (methods/pdtrim/objectives.py, whose source digest is in the key
# too) give other numbers: invalidates the values kept on disk. 2: E_P and E_D pooled from the
# sensitivity sequences' sums and the other sequences' (the same means; other float rounding).
SEARCH_CACHE_VERSION = "2"


def search_cache_key(model, calib, c) -> dict:
    """What a search's objective values depend on: model, calibration set, and the options that choose
    and batch the search sequences (batching only regroups rows, but float sums follow the grouping)."""
    from methods.pdtrim import objectives, screen

    return cached.stat_key("pdtrim-search", model, calib, SEARCH_CACHE_VERSION, [objectives, screen],
                           search_samples=c.search_samples, max_cont=c.max_cont, seed=c.seed, batch_size=c.batch_size,
                           batch_tokens=c.batch_tokens, sensitivity_samples=c.sensitivity_samples)


class SearchState:
    """Block scores, objectives with memoised values, and the search steps taken (for the record)."""

    def __init__(self, key, model, calib, c) -> None:
        from methods.pdtrim.objectives import CalibSplit, StageObjective

        self.key, self.model, self.c = key, model, c
        self.n = arch.n_layers(model)
        t0 = time.perf_counter()
        self.cos = block_cosines(model, calib, c.batch_size, "pdtrim")
        self.score_s = time.perf_counter() - t0
        self.pruning_set = [i for i in sorted(range(self.n), key=lambda i: -self.cos[i]) if self.cos[i] >= c.d_t]
        self.distill_set = [i for i in sorted(range(self.n), key=lambda i: -self.cos[i]) if self.cos[i] < c.d_t]
        split = CalibSplit.from_calibration(calib.input_ids, c.search_samples, c.max_cont, c.seed)
        self.split_desc = {"sequences": len(split.prompts), "continuation_tokens": split.n_cont_tokens,
                           "prompt_tokens": sum(len(p) for p in split.prompts)}
        # The objectives are built (a dense forward each) by the first value the disk memo lacks.
        self._make_obj = lambda sp: StageObjective(model, sp, c.batch_size, c.batch_tokens)
        self._split, self._obj, self._sens = split, None, None
        self._screen_model, self._screens = None, {}  # the narrow model copy, and a Screen per objective
        self.disk = DiskMemo("pdtrim-search", search_cache_key(model, calib, c), key_ok=memo_key_ok)
        if self.disk.loaded:
            cached.announce(f"search values: {self.disk.loaded} pdtrim objective values")
        self._pending: dict[str, Callable[[], None]] = {}  # stage -> a rebase deferred to the next memo miss
        self.memo_p, self.memo_d = exact_values(self.disk.values)
        self.trace: dict[str, list] = {}
        self.sensitivity: dict[str, list[float]] | None = None
        self.search_s = 0.0
        # The sensitivity record (and, for the lazy search, the first step's priorities) comes from
        # the first `sensitivity_samples` search sequences: 60 single-block objectives over all of
        # them would cost more than the whole lazy search.
        # With fewer sensitivity sequences than search sequences, the search objective is pooled from two:
        # one on the sensitivity sequences (`sens_obj`) and one on the others (`obj`), so a value the
        # sensitivity record or the subset screen computed is never computed again as part of an exact one.
        sub = c.sensitivity_samples
        self._sens_separate = bool(sub and sub < len(split.prompts))
        self.split_desc["sensitivity_sequences"] = sub if self._sens_separate else len(split.prompts)
        # the screen: a bfloat16 copy of the model, or the objective on the sensitivity sequences (float32)
        self._screen = screen_kind(model, c.screen, self._sens_separate)
        self._margin = c.subset_margin if self._screen == "subset" else c.screen_margin
        if c.sensitivity:
            self._measure_sensitivity()

    def _measure_sensitivity(self) -> None:
        """Both stages' single-block values (`single_block`) of every block or of the candidates only."""
        t0 = time.perf_counter()
        self.sensitivity = {"prefill": [None] * self.n, "decode": [None] * self.n}
        blocks = range(self.n) if self.c.sensitivity_blocks == "all" else sorted(self._candidates(frozenset()))
        for i in bars.progress(blocks, "pdtrim: prefill sensitivity"):
            self.single_block("prefill", i)
        for i in bars.progress(blocks, "pdtrim: decode sensitivity"):
            self.single_block("decode", i)
        self.search_s += time.perf_counter() - t0

    def single_block(self, stage: str, i: int) -> float:
        """E_P({i}) or E_D({i} | ∅) on the sensitivity sequences (screened, when the search screens),
        computed once and kept in the record."""
        v = self.sensitivity[stage][i]
        if v is None:
            if self._screen == "bfloat16":
                ep, ed = self._screen_fns("sensitivity", "bs") if self._sens_separate else self._screen_fns("search", "b")
            else:
                ep, ed = (self._sens_ep, self._sens_ed) if self._sens_separate else (self.ep, self.ed)
            v = self.sensitivity[stage][i] = ep({i}) if stage == "prefill" else ed({i}, frozenset())
        return v

    def _screen_fns(self, which: str, kind: str) -> tuple[Callable, Callable]:
        """Screened E_P(R) and E_D(R_D | R_P) on the sequences of objective `which` ("search" or
        "sensitivity"), memoised under `kind` + "p:" / "d:"; the model copy is made by the first value the
        memo lacks."""
        def scr() -> Screen:
            if which not in self._screens:
                if self._screen_model is None:
                    with bars.stage("pdtrim: bfloat16 copy of the model for screening"):
                        self._screen_model = screen_copy(self.model, torch.bfloat16)
                self._screens[which] = Screen(self.obj if which == "search" else self.sens_obj, self._screen_model)
            return self._screens[which]

        if which == "search":  # pooled with the sensitivity sequences' screen, as E is
            hp, hd = self._screen_fns("sensitivity", "bs")
            return (lambda r: self._stored(f"{kind}p:{set_key(r)}", lambda: self._pooled(lambda: hp(r), lambda: scr().prefill(r))),
                    lambda rd, rp: self._stored(f"{kind}d:{set_key(rd)}|{set_key(rp)}",
                                                lambda: self._pooled(lambda: hd(rd, rp), lambda: scr().decode(rd, rp))))
        return (lambda r: self._stored(f"{kind}p:{set_key(r)}", lambda: scr().prefill(r)),
                lambda rd, rp: self._stored(f"{kind}d:{set_key(rd)}|{set_key(rp)}", lambda: scr().decode(rd, rp)))

    @property
    def obj(self):
        """The search objective (StageObjective) on the search sequences after the sensitivity ones (all of
        them when the sensitivity is measured on all), built on first use: its dense teacher costs a forward."""
        if self._obj is None:
            sub = self.c.sensitivity_samples if self._sens_separate else 0
            with bars.stage("pdtrim: search objectives (dense reference forwards)"):
                self._obj = self._make_obj(type(self._split)(self._split.prompts[sub:], self._split.conts[sub:]))
        return self._obj

    @property
    def sens_obj(self):
        """The objective on the first `sensitivity_samples` search sequences (`obj` itself when that is all)."""
        if not self._sens_separate:
            return self.obj
        if self._sens is None:
            sub = self.c.sensitivity_samples
            self._sens = self._make_obj(type(self._split)(self._split.prompts[:sub], self._split.conts[:sub]))
        return self._sens

    def _pooled(self, head: Callable[[], float], rest: Callable[[], float]) -> float:
        """The mean over all search sequences' continuation tokens: `rest()` (the objective on `obj`'s
        sequences) when those are all of them, else the token-weighted mean of the sensitivity sequences'
        `head()` and the other sequences' `rest()`."""
        if not self._sens_separate:
            return rest()
        head_v, n_head, n_rest = head(), self.sens_obj.n_scored, self.obj.n_scored
        return (head_v * n_head + rest() * n_rest) / (n_head + n_rest)

    def _sens_ep(self, removed) -> float:
        return self._stored(f"sp:{set_key(removed)}", lambda: self.sens_obj.prefill(removed))

    def _sens_ed(self, removed, removed_prefill) -> float:
        return self._stored(f"sd:{set_key(removed)}|{set_key(removed_prefill)}", lambda: self.sens_obj.decode(removed, removed_prefill))

    def _stored(self, key: str, compute: Callable[[], float]) -> float:
        """The disk memo's value for `key`, else `compute()` (after any deferred rebase), then written through."""
        if key in self.disk:
            return float(self.disk.get(key))
        stage = "prefill" if key.partition(":")[0].endswith("p") else "decode"
        if stage in self._pending:
            self._pending.pop(stage)()
        v = compute()
        self.disk.put(key, v)
        return v

    def _defer(self, stage: str, rebase: Callable[[], None]) -> None:
        """Rebase `stage`'s objective before its next forward, not now: a replay from the memo needs none."""
        self._pending[stage] = rebase

    def work(self) -> dict[str, float]:
        """Both objectives' float32 work and, when the search screens, the screen's apart; full-forward
        equivalents in units of the search sequences (zeros when every value came from the disk memo and
        no objective was built)."""
        zero = {"evaluations": 0, "layer_token_passes": 0, "full_forward_equivalents": 0.0}
        w = self._obj.work() if self._obj is not None else dict(zero)
        full = sum(len(p) + len(c) - 1 for p, c in zip(self._split.prompts, self._split.conts))  # obj.full_tokens
        if self._sens_separate:
            s = self._sens.work() if self._sens is not None else zero
            sens_screen = self._screens["sensitivity"].evaluations if "sensitivity" in self._screens else 0
            passes = w["layer_token_passes"] + s["layer_token_passes"]
            w = {"evaluations": w["evaluations"] + s["evaluations"], "layer_token_passes": passes,
                 "full_forward_equivalents": passes / (self.n * full),
                 # on the sensitivity sequences: the sensitivity record's, the subset screen's (or the bfloat16 one's)
                 # and the part of exact values no screen computed first; "evaluations" counts them and the others'
                 "sensitivity_evaluations": s["evaluations"] + sens_screen}
        if self._screen == "bfloat16":  # the subset screen's work is the sensitivity objective's, counted above
            passes = sum(scr.layer_token_passes for scr in self._screens.values())
            w.update(screen_evaluations=sum(scr.evaluations for scr in self._screens.values()),
                     screen_layer_token_passes=passes, screen_full_forward_equivalents=passes / (self.n * full))
        return w

    def mark(self) -> None:
        """Remember the work counters, so `info` can report this mode's share."""
        self._mark = self.work()

    def ep(self, removed: Iterable[int]) -> float:
        """E_P(R) on all search sequences (pooled from the sensitivity sequences' value when they are apart)."""
        key = frozenset(removed)
        if key not in self.memo_p:
            exact = lambda: self._pooled(lambda: self._sens_ep(key), lambda: self.obj.prefill(key))  # noqa: E731
            self.memo_p[key] = self._stored(f"p:{set_key(key)}", exact)
        return self.memo_p[key]

    def ed(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> float:
        """E_D(R_D | R_P) on all search sequences (pooled as `ep` is)."""
        key = (frozenset(removed_decode), frozenset(removed_prefill))
        if key not in self.memo_d:
            exact = lambda: self._pooled(lambda: self._sens_ed(*key), lambda: self.obj.decode(*key))  # noqa: E731
            self.memo_d[key] = self._stored(f"d:{set_key(key[0])}|{set_key(key[1])}", exact)
        return self.memo_d[key]

    def _candidates(self, removed: frozenset) -> list[int]:
        """Pruning-set blocks first; the distillation set only once the pruning set is used up."""
        return [i for i in self.pruning_set if i not in removed] or [i for i in self.distill_set if i not in removed]

    def _greedy(self, start: frozenset, target: int, objective: Callable[[frozenset], float], rebase, name: str,
                prior: Callable[[int], float] | None = None, screen: Callable[[frozenset], float] | None = None) -> frozenset:
        """Greedy removal from `start` to `target` blocks: each step removes the candidate j with the
        lowest objective(removed ∪ {j}) (ties: lower j). `prior(j)` estimates a value never evaluated.

        With `screen` (a cheaper estimate of the objective), the step screens the candidates (lazily, as it
        would evaluate them) and evaluates the objective only for those within `screen_margin` of the best
        screened value; the trace then gives both, the screen's under `screened`."""
        t0 = time.perf_counter()
        removed, steps = start, []
        bound: dict[int, float] = {}  # j -> a value (screened, with a screen) known for (a subset of removed) ∪ {j}, or its prior
        margin = self._margin if screen is not None else 0.0
        estimate = screen or objective
        while len(removed) < target:
            cands = self._candidates(removed)
            if self.c.lazy and prior is not None:
                bound.update({j: prior(j) for j in cands if j not in bound})
            desc = f"pdtrim: {name} step {len(removed) + 1}/{target}"
            if self.c.lazy and all(j in bound for j in cands):
                est = self._lazy_step(removed, cands, estimate, bound, margin)
            else:
                est = {j: estimate(removed | {j}) for j in bars.progress(cands, desc)}
            bound.update(est)
            lo = min(est.values())
            scored = est if screen is None else \
                {j: objective(removed | {j}) for j in sorted(est) if est[j] <= lo + margin * abs(lo)}
            best = min(scored, key=lambda j: (scored[j], j))
            removed = removed | {best}
            rebase(removed)
            step = {"removed": best, "objective": scored[best], "candidates": {str(j): v for j, v in scored.items()}}
            if screen is not None:
                step["screened"] = {str(j): v for j, v in est.items()}
            if len(est) < len(cands):
                step["not_evaluated"] = {str(j): bound[j] for j in cands if j not in est}
            steps.append(step)
        self.trace[name] = steps
        self.search_s += time.perf_counter() - t0
        return removed

    def _lazy_step(self, removed: frozenset, cands: list[int], objective, bound: dict[int, float],
                   margin: float = 0.0) -> dict[int, float]:
        """Evaluate candidates in order of their last known value (from an earlier step, or the
        step-1 prior) until the best value found (plus `margin` of it) is below every unevaluated
        candidate's.

        Removing more blocks rarely lowers a candidate's objective, so an earlier step's value is
        nearly a lower bound and the step picks what evaluating every candidate would (the classic
        lazy greedy) unless a skipped candidate dropped below the best: not guaranteed (in
        results/issue3/limit1000's prefill_k8 trace block 11 went 2.926 -> 2.899 at step 4 and
        3.260 -> 3.147 at step 7, far above the blocks chosen). `min_exact` guards the first step's
        prior, which is estimated on fewer sequences. `lazy=false` evaluates every candidate."""
        scored: dict[int, float] = {}
        for j in sorted(cands, key=lambda j: (bound[j], j)):
            if len(scored) >= self.c.min_exact:
                lo = min(scored.values())
                if lo + margin * abs(lo) < bound[j]:
                    break
            scored[j] = objective(removed | {j})
        return scored

    def _stage_screens(self) -> tuple[Callable | None, Callable | None]:
        """The screens of E_P(R) and E_D(R_D | R_P) for the greedy steps (None, None: no screen)."""
        if self._screen == "bfloat16":
            return self._screen_fns("search", "b")
        if self._screen == "subset":  # the same objective on the sensitivity sequences, its base moved along
            return self._sens_ep, self._sens_ed
        return None, None

    def _moving(self) -> list:
        """The objectives whose base follows the greedy path: both parts of a pooled objective."""
        return [self.obj, self.sens_obj] if self._sens_separate else [self.obj]

    def greedy_prefill(self, k: int) -> frozenset:
        prior = (lambda j: self.single_block("prefill", j)) if self.sensitivity else None  # noqa: E731
        rebase = lambda r: self._defer("prefill", lambda: [o.set_prefill_base(r) for o in self._moving()])  # noqa: E731
        screen = self._stage_screens()[0]
        with bars.SearchBars(f"pdtrim: prefill k={k}", k) as b:
            return self._greedy(frozenset(), k, b.counted(self.ep), b.stepped(rebase), f"prefill_k{k}", prior,
                                screen and b.counted(screen))

    def greedy_decode(self, rp: frozenset, k: int) -> frozenset:
        # E_D({j} | ∅) <= E_D(R_P ∪ {j} | R_P): the dense prompt and fewer removed blocks drift less
        prior = (lambda j: self.single_block("decode", j)) if self.sensitivity else None  # noqa: E731
        rebase = lambda r: self._defer("decode", lambda: [o.set_decode_base(r, rp) for o in self._moving()])  # noqa: E731
        screen = self._stage_screens()[1]
        with bars.SearchBars(f"pdtrim: decode k={k}", k - len(rp)) as b:
            return self._greedy(rp, k, b.counted(lambda r: self.ed(r, rp)), b.stepped(rebase), f"decode_k{k}", prior,
                                screen and b.counted(lambda r: screen(r, rp)))

    def anneal(self, removed: frozenset, fixed: frozenset, stage: str, c) -> frozenset:
        """Swap moves (one removed block back in, one kept block out); `fixed` blocks stay removed."""
        if c.anneal_steps == 0 or len(removed) == len(fixed):
            return removed
        t0 = time.perf_counter()
        rng = random.Random(c.seed if c.anneal_seed is None else c.anneal_seed)
        f = self.ep if stage == "prefill" else (lambda r: self.ed(r, fixed))
        cur, cur_v = removed, f(removed)
        best, best_v = cur, cur_v
        accepted = 0
        for step in range(c.anneal_steps):
            out = rng.choice(sorted(cur - fixed))
            into = rng.choice([i for i in range(self.n) if i not in cur])
            cand = (cur - {out}) | {into}
            v = f(cand)
            temp = c.anneal_t0 * c.anneal_cooling**step
            if v < cur_v or (temp > 0 and rng.random() < math.exp(-(v - cur_v) / (temp * max(cur_v, 1e-12)))):
                cur, cur_v, accepted = cand, v, accepted + 1
                if v < best_v:
                    best, best_v = cand, v
        self.trace[f"anneal_{stage}_{len(removed)}"] = [{"start": sorted(removed), "start_objective": f(removed),
                                                         "best": sorted(best), "best_objective": best_v,
                                                         "accepted": accepted, "proposals": c.anneal_steps}]
        self.search_s += time.perf_counter() - t0
        return best

    def _screen_info(self) -> dict | None:
        """What screened the search, for the record (None: every candidate evaluated in float32)."""
        if self._screen == "bfloat16":
            return {"dtype": "bfloat16", "option": self.c.screen, "margin": self.c.screen_margin,
                    "definition": "candidates screened in this dtype; float32 values for those within margin "
                                  "(relative) of the best screened, which the step compares"}
        if self._screen == "subset":
            return {"dtype": "float32", "option": self.c.screen, "margin": self.c.subset_margin,
                    "sequences": self.c.sensitivity_samples,
                    "definition": "candidates screened by the objective on the first `sequences` search sequences "
                                  "(the sensitivity sequences); values on all of them for those within margin "
                                  "(relative) of the best screened, which the step compares"}
        return None

    def info(self, mode: str, rp: frozenset, rd: frozenset, t0: float) -> dict:
        return {
            "reading": READING,
            "block_cosine": self.cos,
            "pruning_set": sorted(self.pruning_set),
            "distillation_set": sorted(self.distill_set),
            "removed_prefill": sorted(rp),
            "removed_decode": sorted(rd),
            "objective": {"E_P(R_prefill)": self.ep(rp), "E_D(R_decode|R_prefill)": self.ed(rd, rp)},
            "search_trace": {k: list(v) for k, v in self.trace.items()},  # a snapshot: later modes add steps
            "stage_sensitivity": {k: list(v) for k, v in self.sensitivity.items()} if self.sensitivity else None,
            "stage_sensitivity_definition": {
                "prefill": "E_P({i}): block i removed from the prefill stage (hence, by R_P ⊆ R_D, also from decode)",
                "decode": "E_D({i} | {}): block i removed from the decode stage only",
                "computed_in": "bfloat16 (the search's screen)" if self._screen == "bfloat16" else "float32",
                "blocks": "every block" if self.c.sensitivity_blocks == "all" else
                          "the search's candidates (null: not measured; sensitivity_blocks=all measures every block)"},
            "search_sequences": self.split_desc,
            "screen": self._screen_info(),
            # cumulative over this search state: both modes share block scores, sensitivity and the
            # memoised objective values (the unified search reuses the prefill search's first steps)
            "work": {**self.work(), "score_seconds": self.score_s, "search_seconds": self.search_s,
                     "block_score_forwards": 1, "cumulative_over_modes": True,
                     "this_mode": {"plan_seconds": time.perf_counter() - t0,
                                   **{k: v - self._mark.get(k, 0) for k, v in self.work().items()}}},
            "mode": mode,
        }
