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
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from harness.errors import UsageError
from harness.pd import arch
from harness.pd.plan import KVPolicy, PruningPlan
from methods import bars
from methods.base import Method, Options, check_stage_depths, content_key, prefill_depth
from methods.pdtrim.screen import SCREEN_DTYPES
from methods.pdtrim.search import _SHARED_STATES, SEARCH_FIELDS, SENSITIVITY_BLOCKS, SearchState
from methods.registry import register


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
        min_exact: int = 3  # candidates evaluated (screened, with a screen) per lazy step, at least
        # screen each step's candidates (methods/pdtrim/screen.py) and evaluate on all search sequences only those
        # within the margin of the best screened value. "bfloat16": on a bfloat16 copy of a float32 model;
        # "subset": by the objective on the sensitivity sequences alone (when fewer than the search's);
        # "auto": bfloat16 where the device computes it in hardware (AVX512-BF16/AMX CPU, bf16 GPU), else subset
        # (always subset for a model placed with --device-map: it is never copied);
        # "none": every candidate on all sequences
        screen: str = "auto"
        screen_margin: float = 0.015  # relative; 2.3x the largest gap between two near candidates' screen errors on SmolLM2
        subset_margin: float = 0.10  # relative; the subset screen's, 1.6x the most any float32 best needed on SmolLM2
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
                probe_prompts=max(1, min(d.probe_prompts, n // 2)), probe_tokens=min(d.probe_tokens, 16 * n),
                probe_steps=max(1, min(d.probe_steps, n)), n_first=min(d.n_first, n // 2), n_last=min(d.n_last, 3 * n // 2))

    def validate_config(self, c) -> None:
        check_stage_depths(self.name, c)  # prefill_ratio, k_prefill <= k_decode, k_unified
        if c.search_samples < 1 or c.max_cont < 1 or c.batch_size < 1 or c.batch_tokens < 1:
            raise UsageError("pdtrim: search_samples, max_cont, batch_size and batch_tokens must be >= 1")
        if not -1 <= c.d_t <= 1:  # a threshold on a cosine; NaN fails this too
            raise UsageError(f"pdtrim.d_t={c.d_t}: must be within [-1, 1] (a threshold on the block cosine s_i)")
        if not 0 <= c.tau <= 1 or c.n_first < 0 or c.n_last < 0 or (c.kv_pruning and c.n_first + c.n_last < 1):
            raise UsageError("pdtrim: need 0 <= tau <= 1 and n_first, n_last >= 0 with n_first + n_last >= 1")
        if c.kv_pruning and min(c.probe_prompts, c.probe_tokens, c.probe_steps) < 1:  # the probe runs after the search
            raise UsageError(f"pdtrim: need probe_prompts, probe_tokens, probe_steps >= 1 (got {c.probe_prompts}, "
                             f"{c.probe_tokens}, {c.probe_steps}), or kv_pruning=false")
        if c.heal_steps < 0 or c.heal_lr <= 0 or c.heal_samples < 1:
            raise UsageError("pdtrim: need heal_steps >= 0, heal_lr > 0, heal_samples >= 1")
        if c.sensitivity_blocks not in SENSITIVITY_BLOCKS:
            raise UsageError(f"pdtrim.sensitivity_blocks={c.sensitivity_blocks!r}: choose from {', '.join(SENSITIVITY_BLOCKS)}")
        if c.screen not in SCREEN_DTYPES or not 0 <= c.screen_margin < 1 or not 0 <= c.subset_margin < 1:
            raise UsageError(f"pdtrim: need screen in {', '.join(SCREEN_DTYPES)} (got {c.screen!r}) and "
                             f"0 <= screen_margin, subset_margin < 1 (got {c.screen_margin}, {c.subset_margin})")
        if c.sensitivity_samples < 0 or c.min_exact < 1:
            raise UsageError("pdtrim: need sensitivity_samples >= 0 (0 = all search sequences) and min_exact >= 1")
        if c.anneal_steps < 0 or not 0 < c.anneal_cooling <= 1 or c.anneal_t0 < 0:
            raise UsageError("pdtrim: need anneal_steps >= 0, 0 < anneal_cooling <= 1, anneal_t0 >= 0")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._state: SearchState | None = None
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
    def check_depth(self, n: int, mode: str) -> None:
        k = self.config.k_unified if mode == "unified" else self.config.k_decode  # k_prefill <= k_decode (validated)
        if k >= n:
            raise self.too_deep("k_unified" if mode == "unified" else "k_decode", k, n)

    def plan(self, model, calib, mode: str) -> PruningPlan:
        c, n = self.config, arch.n_layers(model)
        self.check_depth(n, mode)
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

    def _heal(self, model, calib, plan: PruningPlan, removed_both: frozenset, st: SearchState) -> PruningPlan:
        """Healing (off by default): blocks removed from both stages, healed only where the decode stage sees the
        same removed run (it keeps the block after the run and the one before it), so one healed copy serves both."""
        c = self.config
        if not c.heal:
            return plan.replace(info={**plan.info, "healing": {"enabled": False}})
        from methods.pdtrim.healing import heal, healing_runs

        arch.need_resident_weights(model, "pdtrim.heal=true (training copies of blocks)")

        decode = set(plan.decode_layers)  # a decode-only removal next to the run would feed the copy another input
        runs = [(r, j) for r, j in healing_runs(sorted(removed_both), st.distill_set, st.n)
                if j in decode and (r[0] == 0 or r[0] - 1 in decode)]
        t0 = time.perf_counter()
        rows = random.Random(c.seed).sample(calib.input_ids, min(c.heal_samples, len(calib.input_ids)))
        sub = type(calib)(texts=[], input_ids=rows)
        healed, report = heal(model, list(sub.batches(c.batch_size, arch.model_device(model))), runs,
                              c.heal_steps, c.heal_lr, c.seed)
        self._healed[(plan.prefill_layers, plan.decode_layers)] = healed
        info = {"enabled": True, "blocks": report, "runs": [[list(r), j] for r, j in runs], "seconds": time.perf_counter() - t0,
                "rule": "runs of blocks removed from both stages that contain a distillation-set block; the next block, "
                        "kept by both stages, is trained (hidden-state MSE to the dense output of run + block); a run "
                        "whose preceding block only the decode stage removes is not healed"}
        return plan.replace(info={**plan.info, "healing": info})

    def _search_state(self, model, calib) -> SearchState:
        """The search state for (model, calibration set, search options), shared by both modes and by
        every instance in this process whose options differ only in what the search does not read
        (block counts, KV selection, annealing, healing): a swept `k_decode=4,6,8` extends one greedy
        path, its shorter prefixes answered from the memoised objective values without a forward."""
        key = (*content_key(model, calib), *(getattr(self.config, f) for f in SEARCH_FIELDS))
        if self._state is None or self._state.key != key:
            hit = _SHARED_STATES.get(key)
            if hit is None:
                hit = SearchState(key, model, calib, self.config)
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
