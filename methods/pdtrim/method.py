"""`pdtrim`: stage-specific block removal and token-aware KV pruning for PD disaggregation.

PDTrim (Zhang, Lyu et al., "Targeted Pruning for Prefill-Decode Disaggregation in Inference",
arXiv 2509.04467). No code was released; this follows the reading in `../shared/PDTRIM.md` §2,
every choice an option (docs/pdtrim.md):

- Prefill stage: runs the model without `R_P`, the `k_prefill` blocks found by greedy removal on
  the prefill objective E_P (KL to the dense model on calibration continuations).
- Decode stage: runs the model without `R_D ⊇ R_P`, extended greedily to `k_decode` blocks on the
  decode objective E_D(R_D | R_P).
- Candidates come from the pruning set P = {i : s_i >= d_t} (s_i = mean cos(h_in, h_out) of block
  i) while it has any left, then from the distillation set D (the rest).
- KV: decode layers whose decode queries put at least `tau` of their attention on the first
  `n_first` and last `n_last` prompt positions receive only those positions' KV.
- Unified mode: one set R (R_P = R_D), `k_unified` blocks, greedy on E_P, no KV pruning.
- Optional: simulated-annealing refinement of each greedy set (swap moves, geometric cooling,
  seeded); healing of blocks after removed runs that contain distillation-set blocks
  (`methods/pdtrim/healing.py`), installed by `apply` and undone on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import KVPolicy, PruningPlan
from methods import bars, cached
from methods.base import Method, Options, content_key, prefill_depth
from methods.cached import DiskMemo, parse_set, set_key
from methods.depth.blocks import block_cosines
from methods.registry import register

READING = "PDTRIM.md section 2 (harness reading v1)"
# The options a search state's values depend on (block scores, sets, objective values, step-1 priors);
# the rest (k_*, KV selection, annealing, healing) only choose what to read from it.
SEARCH_FIELDS = ("d_t", "search_samples", "max_cont", "batch_size", "batch_tokens", "seed", "sensitivity",
                 "sensitivity_samples", "sensitivity_blocks", "lazy", "min_exact")
SENSITIVITY_BLOCKS = ("candidates", "all")
_SHARED_STATES: dict[tuple, _SearchState] = {}
# Bump when the objective values (methods/pdtrim/objectives.py, whose source digest is in the key
# too) give other numbers: invalidates the values kept on disk.
SEARCH_CACHE_VERSION = "1"


def search_cache_key(model, calib, c) -> dict:
    """What a search's objective values depend on: model, calibration set, and the options that choose
    and batch the search sequences (batching only regroups rows, but float sums follow the grouping)."""
    from methods.pdtrim import objectives

    return cached.stat_key("pdtrim-search", model, calib, SEARCH_CACHE_VERSION, [objectives],
                           search_samples=c.search_samples, max_cont=c.max_cont, seed=c.seed, batch_size=c.batch_size,
                           batch_tokens=c.batch_tokens, sensitivity_samples=c.sensitivity_samples)


@register
class PDTrim(Method):
    name = "pdtrim"
    summary = "stage-specific greedy block removal (R_prefill ⊆ R_decode) + first/last-token KV in selected layers"
    doc_row = ("greedy removal of `k_prefill` blocks (default 4) on the prefill objective, candidates from the pruning set `s_i ≥ d_t` first",
               "extends the prefill set to `k_decode` blocks (default 8) on the decode objective",
               "first `n_first` + last `n_last` prompt positions in decode layers whose attention share on them is ≥ `tau`")
    needs_calibration = True
    why_no_stage_variant = "pdtrim searches each stage itself"

    @dataclass(frozen=True)
    class Config(Options):
        k_prefill: int = 4  # blocks removed from the prefill stage
        k_decode: int = 8  # blocks removed from the decode stage (>= k_prefill)
        k_unified: int = 8  # blocks removed in unified mode
        prefill_ratio: float | None = None  # when set, k_prefill = floor(prefill_ratio · k_decode) (depth sweeps)
        d_t: float = 0.95  # pruning-set threshold on the block cosine s_i
        search_samples: int = 32  # calibration sequences the stage objectives use
        max_cont: int = 32  # continuation tokens per sequence (at most half of it)
        batch_size: int = 16  # rows per forward (block scores and search)
        batch_tokens: int = 512  # padded positions per search forward (short calibration rows are grouped)
        anneal_steps: int = 0  # simulated-annealing swap proposals per stage; 0 = greedy only
        anneal_t0: float = 0.05  # initial temperature, relative to the current objective
        anneal_cooling: float = 0.9  # geometric cooling factor per proposal
        seed: int = 0  # sampling of search sequences and probe prompts (and annealing, unless anneal_seed is set)
        anneal_seed: int | None = None  # annealing proposals only (None: use seed)
        kv_pruning: bool = True
        n_first: int = 16
        n_last: int = 48
        tau: float = 0.5  # minimum attention share on first+last positions for a layer to be selected
        probe_prompts: int = 8
        probe_tokens: int = 512  # probe prompts are calibration texts packed to this length
        probe_steps: int = 8  # greedy decode steps whose attention is measured
        sensitivity: bool = True  # single-block prefill/decode damage as step-1 priorities and record (on sensitivity_samples sequences)
        sensitivity_samples: int = 8  # search sequences behind the sensitivity record and step-1 priorities; 0 = all
        # "candidates": only blocks a greedy step may take (the pruning set; others once reached), the
        # priorities the lazy search reads; "all": every block, the full per-block record (2 n objectives)
        sensitivity_blocks: str = "candidates"
        lazy: bool = True  # lazy greedy (stale values as lower bounds); False: every candidate at every step
        min_exact: int = 3  # candidates evaluated exactly per lazy step, at least
        heal: bool = False  # train the block after each removed run with a distillation-set block (methods/pdtrim/healing.py)
        heal_steps: int = 100  # Adam steps per healed block
        heal_lr: float = 1e-4
        heal_samples: int = 64  # calibration sequences used for healing

        @classmethod
        def for_layers(cls, n: int) -> PDTrim.Config:
            """Block counts, search and probe sizes scaled down for `n` layers (the defaults from 32 on)."""
            d, k = cls(), min(cls.k_decode, n // 2)
            return dataclasses.replace(
                d, k_prefill=min(d.k_prefill, k // 2), k_decode=k, k_unified=min(d.k_unified, n // 2),
                search_samples=min(d.search_samples, 2 * n), max_cont=min(d.max_cont, 2 * n),
                probe_prompts=min(d.probe_prompts, n // 2), probe_tokens=min(d.probe_tokens, 16 * n),
                probe_steps=min(d.probe_steps, n), n_first=min(d.n_first, n // 2), n_last=min(d.n_last, 3 * n // 2))

    def validate_config(self, c) -> None:
        if c.prefill_ratio is not None and not 0 <= c.prefill_ratio <= 1:
            raise UsageError(f"pdtrim.prefill_ratio={c.prefill_ratio}: must be within [0, 1] (k_prefill = floor(ratio · k_decode))")
        if not 0 <= prefill_depth(c) <= c.k_decode:
            raise UsageError(f"pdtrim: need 0 <= k_prefill <= k_decode (R_prefill ⊆ R_decode), got {c.k_prefill}, {c.k_decode}")
        if c.k_unified < 0:
            raise UsageError(f"pdtrim.k_unified={c.k_unified}: must be >= 0")
        if c.search_samples < 1 or c.max_cont < 1 or c.batch_size < 1 or c.batch_tokens < 1:
            raise UsageError("pdtrim: search_samples, max_cont, batch_size and batch_tokens must be >= 1")
        if not -1 <= c.d_t <= 1:  # a threshold on a cosine; NaN fails this too
            raise UsageError(f"pdtrim.d_t={c.d_t}: must be within [-1, 1] (a threshold on the block cosine s_i)")
        if not 0 <= c.tau <= 1 or c.n_first < 0 or c.n_last < 0 or (c.kv_pruning and c.n_first + c.n_last < 1):
            raise UsageError("pdtrim: need 0 <= tau <= 1 and n_first, n_last >= 0 with n_first + n_last >= 1")
        if c.heal_steps < 0 or c.heal_lr <= 0 or c.heal_samples < 1:
            raise UsageError("pdtrim: need heal_steps >= 0, heal_lr > 0, heal_samples >= 1")
        if c.sensitivity_blocks not in SENSITIVITY_BLOCKS:
            raise UsageError(f"pdtrim.sensitivity_blocks={c.sensitivity_blocks!r}: choose from {', '.join(SENSITIVITY_BLOCKS)}")
        if c.sensitivity_samples < 0 or c.min_exact < 1:
            raise UsageError("pdtrim: need sensitivity_samples >= 0 (0 = all search sequences) and min_exact >= 1")
        if c.anneal_steps < 0 or not 0 < c.anneal_cooling <= 1 or c.anneal_t0 < 0:
            raise UsageError("pdtrim: need anneal_steps >= 0, 0 < anneal_cooling <= 1, anneal_t0 >= 0")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._state: _SearchState | None = None
        self._healed: dict[tuple, dict] = {}  # (prefill layers, decode layers) -> {block: healed module}

    def needs_replan_on_resume(self) -> bool:
        return self.config.heal  # healed weights live in this instance, made by plan()

    @contextlib.contextmanager
    def apply(self, model, plan: PruningPlan) -> Iterator[PruningPlan]:
        from methods.pdtrim.healing import installed

        healed = self._healed.get((plan.prefill_layers, plan.decode_layers), {}) if self.config.heal else {}
        if self.config.heal and plan.info.get("healing", {}).get("blocks") and not healed:
            raise RuntimeError("pdtrim: this plan needs healed blocks; call plan() on this instance first")
        with installed(model, healed):
            yield plan

    # -- planning ---------------------------------------------------------------------------
    def plan(self, model, calib, mode: str) -> PruningPlan:
        c, n = self.config, arch.n_layers(model)
        k = c.k_unified if mode == "unified" else c.k_decode
        if k >= n:
            raise UsageError(f"pdtrim: {'k_unified' if mode == 'unified' else 'k_decode'}={k} must be < the model's {n} layers")
        st = self._search_state(model, calib)
        t0 = time.perf_counter()
        st.mark()
        if mode == "unified":
            removed = st.greedy_prefill(c.k_unified)
            removed = st.anneal(removed, frozenset(), "prefill", c)
            keep = tuple(i for i in range(n) if i not in removed)
            info = st.info(mode, removed, removed, t0)
            plan = PruningPlan(self.name, n, keep, keep, info=info)
            return self._heal(model, calib, plan, removed, st)
        rp = st.greedy_prefill(prefill_depth(c))
        rp = st.anneal(rp, frozenset(), "prefill", c)
        rd = st.greedy_decode(rp, c.k_decode)
        rd = st.anneal(rd, rp, "decode", c)
        plan = PruningPlan(self.name, n, tuple(i for i in range(n) if i not in rp), tuple(i for i in range(n) if i not in rd))
        info = st.info(mode, rp, rd, t0)
        if c.kv_pruning:
            plan, info["kv_selection"] = self._select_kv_layers(model, calib, plan)
        return self._heal(model, calib, plan.replace(info=info), rp, st)

    def _heal(self, model, calib, plan: PruningPlan, removed_both: frozenset, st: _SearchState) -> PruningPlan:
        """Healing (off by default): blocks removed from both stages, healed only where the block
        after the removed run is kept by the decode stage too, so one healed copy serves both stages."""
        c = self.config
        if not c.heal:
            return plan.replace(info={**plan.info, "healing": {"enabled": False}})
        from methods.pdtrim.healing import heal, healing_runs

        runs = [(r, j) for r, j in healing_runs(sorted(removed_both), st.distill_set, st.n) if j in plan.decode_layers]
        t0 = time.perf_counter()
        rows = random.Random(c.seed).sample(calib.input_ids, min(c.heal_samples, len(calib.input_ids)))
        sub = type(calib)(texts=[], input_ids=rows)
        healed, report = heal(model, list(sub.batches(c.batch_size, arch.model_device(model))), runs,
                              c.heal_steps, c.heal_lr, c.seed)
        self._healed[(plan.prefill_layers, plan.decode_layers)] = healed
        info = {"enabled": True, "blocks": report, "runs": [[list(r), j] for r, j in runs], "seconds": time.perf_counter() - t0,
                "rule": "runs of blocks removed from both stages that contain a distillation-set block; the next block, "
                        "kept by both stages, is trained (hidden-state MSE to the dense output of run + block)"}
        return plan.replace(info={**plan.info, "healing": info})

    def _search_state(self, model, calib) -> _SearchState:
        """The search state for (model, calibration set, search options), shared by both modes and by
        every instance in this process whose options differ only in what the search does not read
        (block counts, KV selection, annealing, healing): a swept `k_decode=4,6,8` extends one greedy
        path, its shorter prefixes answered from the memoised objective values without a forward."""
        key = (*content_key(model, calib), *(getattr(self.config, f) for f in SEARCH_FIELDS))
        if self._state is None or self._state.key != key:
            hit = _SHARED_STATES.get(key)
            if hit is None:
                hit = _SearchState(key, model, calib, self.config)
                _SHARED_STATES.clear()  # one held at a time: it keeps the teacher and every layer's input
                _SHARED_STATES[key] = hit
            self._state = hit
        return self._state

    def _select_kv_layers(self, model, calib, plan: PruningPlan) -> tuple[PruningPlan, dict]:
        from methods.pdtrim.attention_probe import cached_shares

        c = self.config
        prompts = pack_prompts(calib.input_ids, c.probe_prompts, c.probe_tokens, c.seed)
        with bars.stage(f"pdtrim: attention probe ({len(prompts)} prompts)"):
            shares = cached_shares(model, calib, plan, prompts, c)
        selected = tuple(layer for layer in plan.decode_layers if shares[layer] >= c.tau)
        detail = {"shares": {str(k): v for k, v in shares.items()}, "selected": list(selected), "tau": c.tau,
                  "n_first": c.n_first, "n_last": c.n_last, "probe_prompts": len(prompts),
                  "probe_tokens": [len(p) for p in prompts], "probe_steps": c.probe_steps,
                  "share_definition": "head-averaged share of each decode query's attention mass on prompt "
                                      "positions [0, n_first) ∪ [T - n_last, T)"}
        policy = KVPolicy(c.n_first, c.n_last, selected) if selected else KVPolicy()
        return plan.replace(kv_policy=policy), detail


def pack_prompts(input_ids: list[list[int]], n: int, tokens: int, seed: int) -> list[list[int]]:
    """Concatenate calibration sequences (seeded order) into up to `n` prompts of `tokens` tokens."""
    order = list(range(len(input_ids)))
    random.Random(seed).shuffle(order)
    prompts, cur = [], []
    for i in order:
        cur += input_ids[i]
        while len(cur) >= tokens and len(prompts) < n:
            prompts.append(cur[:tokens])
            cur = cur[tokens:]
    if not prompts and cur:
        prompts.append(cur)
    return prompts


def _bar(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class _SearchState:
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
        self.disk = DiskMemo("pdtrim-search", search_cache_key(model, calib, c))
        if self.disk.loaded:
            cached.announce(f"search values: {self.disk.loaded} pdtrim objective values")
        self._pending: dict[str, Callable[[], None]] = {}  # stage -> a rebase deferred to the next memo miss
        self.memo_p: dict[frozenset, float] = {}
        self.memo_d: dict[tuple[frozenset, frozenset], float] = {}
        for k, v in self.disk.values.items():  # "p:<R>" and "d:<R_D>|<R_P>" (sensitivity: "sp:", "sd:")
            kind, _, sets = k.partition(":")
            if kind == "p":
                self.memo_p[parse_set(sets)] = v
            elif kind == "d":
                rd, _, rp = sets.partition("|")
                self.memo_d[(parse_set(rd), parse_set(rp))] = v
        self.trace: dict[str, list] = {}
        self.sensitivity: dict[str, list[float]] | None = None
        self.search_s = 0.0
        # The sensitivity record (and, for the lazy search, the first step's priorities) comes from
        # the first `sensitivity_samples` search sequences: 60 single-block objectives over all of
        # them would cost more than the whole lazy search.
        sub = c.sensitivity_samples
        self._sens_separate = bool(sub and sub < len(split.prompts))
        self.split_desc["sensitivity_sequences"] = sub if self._sens_separate else len(split.prompts)
        if c.sensitivity:
            t0 = time.perf_counter()
            self.sensitivity = {"prefill": [None] * self.n, "decode": [None] * self.n}
            blocks = range(self.n) if c.sensitivity_blocks == "all" else sorted(self._candidates(frozenset()))
            for i in _bar(blocks, "pdtrim: prefill sensitivity"):
                self.single_block("prefill", i)
            for i in _bar(blocks, "pdtrim: decode sensitivity"):
                self.single_block("decode", i)
            self.search_s += time.perf_counter() - t0

    def single_block(self, stage: str, i: int) -> float:
        """E_P({i}) or E_D({i} | ∅) on the sensitivity sequences, computed once and kept in the record."""
        v = self.sensitivity[stage][i]
        if v is None:
            ep, ed = (self._sens_ep, self._sens_ed) if self._sens_separate else (self.ep, self.ed)
            v = self.sensitivity[stage][i] = ep({i}) if stage == "prefill" else ed({i}, frozenset())
        return v

    @property
    def obj(self):
        """The search objective (StageObjective), built on first use: its dense teacher costs a forward."""
        if self._obj is None:
            with bars.stage("pdtrim: search objectives (dense reference forwards)"):
                self._obj = self._make_obj(self._split)
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

    def _sens_ep(self, removed) -> float:
        return self._stored(f"sp:{set_key(removed)}", lambda: self.sens_obj.prefill(removed))

    def _sens_ed(self, removed, removed_prefill) -> float:
        return self._stored(f"sd:{set_key(removed)}|{set_key(removed_prefill)}", lambda: self.sens_obj.decode(removed, removed_prefill))

    def _stored(self, key: str, compute: Callable[[], float]) -> float:
        """The disk memo's value for `key`, else `compute()` (after any deferred rebase), then written through."""
        if key in self.disk:
            return float(self.disk.get(key))
        stage = "prefill" if key.startswith(("p:", "sp:")) else "decode"
        if stage in self._pending:
            self._pending.pop(stage)()
        v = compute()
        self.disk.put(key, v)
        return v

    def _defer(self, stage: str, rebase: Callable[[], None]) -> None:
        """Rebase `stage`'s objective before its next forward, not now: a replay from the memo needs none."""
        self._pending[stage] = rebase

    def work(self) -> dict[str, float]:
        """Both objectives' work; full-forward equivalents in units of the search sequences (zeros
        when every value came from the disk memo and no objective was built)."""
        zero = {"evaluations": 0, "layer_token_passes": 0, "full_forward_equivalents": 0.0}
        w = self._obj.work() if self._obj is not None else dict(zero)
        if self._sens_separate:
            s = self._sens.work() if self._sens is not None else zero
            full = sum(len(p) + len(c) - 1 for p, c in zip(self._split.prompts, self._split.conts))  # obj.full_tokens
            passes = w["layer_token_passes"] + s["layer_token_passes"]
            w = {"evaluations": w["evaluations"] + s["evaluations"], "layer_token_passes": passes,
                 "full_forward_equivalents": passes / (self.n * full),
                 "sensitivity_evaluations": s["evaluations"]}
        return w

    def mark(self) -> None:
        """Remember the work counters, so `info` can report this mode's share."""
        self._mark = self.work()

    def ep(self, removed: Iterable[int]) -> float:
        key = frozenset(removed)
        if key not in self.memo_p:
            self.memo_p[key] = self._stored(f"p:{set_key(key)}", lambda: self.obj.prefill(key))
        return self.memo_p[key]

    def ed(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> float:
        key = (frozenset(removed_decode), frozenset(removed_prefill))
        if key not in self.memo_d:
            self.memo_d[key] = self._stored(f"d:{set_key(key[0])}|{set_key(key[1])}", lambda: self.obj.decode(*key))
        return self.memo_d[key]

    def _candidates(self, removed: frozenset) -> list[int]:
        """Pruning-set blocks first; the distillation set only once the pruning set is used up."""
        return [i for i in self.pruning_set if i not in removed] or [i for i in self.distill_set if i not in removed]

    def _greedy(self, start: frozenset, target: int, objective: Callable[[frozenset], float], rebase, name: str,
                prior: Callable[[int], float] | None = None) -> frozenset:
        """Greedy removal from `start` to `target` blocks: each step removes the candidate j with the
        lowest objective(removed ∪ {j}) (ties: lower j). `prior(j)` estimates a value never evaluated."""
        t0 = time.perf_counter()
        removed, steps = start, []
        bound: dict[int, float] = {}  # j -> a value known for (a subset of removed) ∪ {j}, or its prior
        while len(removed) < target:
            cands = self._candidates(removed)
            if self.c.lazy and prior is not None:
                bound.update({j: prior(j) for j in cands if j not in bound})
            desc = f"pdtrim: {name} step {len(removed) + 1}/{target}"
            if self.c.lazy and all(j in bound for j in cands):
                scored = self._lazy_step(removed, cands, objective, bound)
            else:
                scored = {j: objective(removed | {j}) for j in _bar(cands, desc)}
            bound.update(scored)
            best = min(scored, key=lambda j: (scored[j], j))
            removed = removed | {best}
            rebase(removed)
            step = {"removed": best, "objective": scored[best], "candidates": {str(j): v for j, v in scored.items()}}
            if len(scored) < len(cands):
                step["not_evaluated"] = {str(j): bound[j] for j in cands if j not in scored}
            steps.append(step)
        self.trace[name] = steps
        self.search_s += time.perf_counter() - t0
        return removed

    def _lazy_step(self, removed: frozenset, cands: list[int], objective, bound: dict[int, float]) -> dict[int, float]:
        """Evaluate candidates in order of their last known value (from an earlier step, or the
        step-1 prior) until the best value found is below every unevaluated candidate's.

        Removing more blocks has never lowered a candidate's objective in our traces, so an earlier
        step's value is a lower bound and the step then picks what evaluating every candidate would
        (the classic lazy greedy); `min_exact` guards the first step's prior, which is estimated on
        fewer sequences. `lazy=false` evaluates every candidate."""
        scored: dict[int, float] = {}
        for j in sorted(cands, key=lambda j: (bound[j], j)):
            if len(scored) >= self.c.min_exact and min(scored.values()) < bound[j]:
                break
            scored[j] = objective(removed | {j})
        return scored

    def greedy_prefill(self, k: int) -> frozenset:
        prior = (lambda j: self.single_block("prefill", j)) if self.sensitivity else None  # noqa: E731
        rebase = lambda r: self._defer("prefill", lambda: self.obj.set_prefill_base(r))  # noqa: E731
        with bars.SearchBars(f"pdtrim: prefill k={k}", k) as b:
            return self._greedy(frozenset(), k, b.counted(self.ep), b.stepped(rebase), f"prefill_k{k}", prior)

    def greedy_decode(self, rp: frozenset, k: int) -> frozenset:
        # E_D({j} | ∅) <= E_D(R_P ∪ {j} | R_P): the dense prompt and fewer removed blocks drift less
        prior = (lambda j: self.single_block("decode", j)) if self.sensitivity else None  # noqa: E731
        rebase = lambda r: self._defer("decode", lambda: self.obj.set_decode_base(r, rp))  # noqa: E731
        with bars.SearchBars(f"pdtrim: decode k={k}", k - len(rp)) as b:
            return self._greedy(rp, k, b.counted(lambda r: self.ed(r, rp)), b.stepped(rebase), f"decode_k{k}", prior)

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
                "blocks": "every block" if self.c.sensitivity_blocks == "all" else
                          "the search's candidates (null: not measured; sensitivity_blocks=all measures every block)"},
            "search_sequences": self.split_desc,
            # cumulative over this search state: both modes share block scores, sensitivity and the
            # memoised objective values (the unified search reuses the prefill search's first steps)
            "work": {**self.work(), "score_seconds": self.score_s, "search_seconds": self.search_s,
                     "block_score_forwards": 1, "cumulative_over_modes": True,
                     "this_mode": {"plan_seconds": time.perf_counter() - t0,
                                   **{k: v - self._mark.get(k, 0) for k, v in self.work().items()}}},
            "mode": mode,
        }
