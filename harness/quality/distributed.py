"""Data-parallel evaluation: processes started by `accelerate launch` (or `torchrun`) share the work.

Each rank loads the model and runs the same cells in the same order. lm-eval splits every task's
documents across ranks itself (`build_all_requests(rank=, world_size=)`) and gathers the per-document
metrics on rank 0; `PDLM` supplies the collectives it calls. The harness's own long-context tasks
are split here (`ShardedScorer`, requests round-robin by rank, results all-gathered in order). KV
byte counts are summed over ranks, so a record holds the same totals as a single-process run.
Only rank 0 writes records; every rank reads them back after a barrier.

The process group is accelerate's (`PartialState`): NCCL on GPUs, gloo on CPU. On a CPU-only machine
start it with `accelerate launch --multi_gpu --num_processes N -m harness ...` (accelerate's `--cpu`
multi-process path needs MPI) or `torchrun --nproc-per-node N -m harness ...`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness import stops

# How long a rank whose collective failed waits for a stop signal of its own before raising the transport's error.
# The launcher stops a group by signalling every rank (SIGTERM from torchrun/accelerate, a terminal's SIGINT); a rank
# that took its signal first and left breaks the collective the others are in ('Connection closed by peer' from
# gloo), and under load rank 0's own signal came after that error: it then printed the transport error, not the one
# 'interrupted' line with what was kept. A peer that crashed costs this wait once before its error is raised.
PEER_LOST_GRACE_S = 3.0


def _collective(fn, *args: Any) -> None:
    """`fn(*args)` (a torch.distributed collective); on its RuntimeError (DistBackendError is one), wait up to
    `PEER_LOST_GRACE_S` for this process's stop signal, whose handler raises KeyboardInterrupt (SIGINT, or SIGTERM
    under `sigterm_as_ctrl_c`) out of the sleep, or raise it at once for a stop that came earlier and that a library
    swallowed (`harness.stops`); without one, the error."""
    try:
        fn(*args)
    except RuntimeError as err:
        deadline = time.monotonic() + PEER_LOST_GRACE_S
        while not stops.noted() and time.monotonic() < deadline:
            time.sleep(0.05)
        if stops.noted():
            raise KeyboardInterrupt from err
        raise


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group (rank 0 of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops on one process) ------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            _collective(torch.distributed.barrier)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _collective(torch.distributed.all_gather_object, out, obj)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        _collective(torch.distributed.gather_object, obj, out, dst)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        _collective(torch.distributed.broadcast_object_list, box, src)
        return box[0]

    def all_gather_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks of `t` (a 0-d tensor counts as shape (1,))."""
        t = t.reshape(-1) if t.dim() else t.reshape(1)
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        _collective(torch.distributed.all_gather, parts, t.contiguous())
        return torch.cat(parts)

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Key-wise sum of integer counters over ranks (every rank gets the total)."""
        if not self.enabled:
            return dict(counts)
        total: dict[str, int] = {}
        for part in self.all_gather_object(counts):
            for k, v in part.items():
                total[k] = total.get(k, 0) + int(v)
        return total


def in_doc_order(parts: list[Any]) -> list[Any]:
    """lm-eval's per-rank gathers (`{task: [logged sample, ...]}` or `{task: {(metric, filter): [value per doc]}}`)
    rearranged so that its concatenation over ranks lists the documents in a single process's order.

    Rank r holds documents r, r + W, r + 2W, ... (lm-eval's `doc_iterator`), so interleaving the ranks' lists
    restores document order; the merged lists go to the first part, the others keep their keys with empty lists.
    Rank-by-rank order changed what depends on order: a bootstrap stderr (LAMBADA's perplexity: 4.7e19 in one
    process, 7.1e19 over 2 ranks) and the lines of `--log-samples` files."""
    def merge(xs: list[Any]) -> Any:
        if isinstance(xs[0], dict):
            return {k: merge([x[k] for x in xs if k in x]) for k in dict.fromkeys(k for x in xs for k in x)}
        if isinstance(xs[0], list) and xs[0] and isinstance(xs[0][0], dict) and "filter" in xs[0][0]:
            filters = list(dict.fromkeys(s["filter"] for x in xs for s in x))  # samples: one run of docs per filter
            return [s for f in filters for s in _interleave([[s for s in x if s["filter"] == f] for x in xs])]
        return _interleave(xs)

    def empty(x: Any) -> Any:
        return {k: empty(v) for k, v in x.items()} if isinstance(x, dict) else []

    if len(parts) < 2 or not all(isinstance(p, dict) for p in parts):
        return parts
    return [merge(parts), *(empty(p) for p in parts[1:])]


def _interleave(lists: list[list[Any]]) -> list[Any]:
    """Round-robin over `lists` (rank r's list holds documents r, r + W, ...): the documents in order."""
    return [x[i] for i in range(max(map(len, lists), default=0)) for x in lists if i < len(x)]


_CURRENT: Dist | None = None


def launched_world_size() -> int:
    """WORLD_SIZE set by the launcher (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_items_per_rank(limit: int | float | None, lm_eval_tasks: list[str], num_fewshot: int = 0) -> None:
    """lm-eval gives each rank a share of a task's items and fails on a rank with none, while the other
    ranks wait for it forever: refuse a --limit below the number of ranks before any work. Refuse few-shot
    runs too: each rank's few-shot sampler starts afresh on its own share of the items, so the prompts (and
    scores) differ from a single process's under the same run key."""
    from harness.errors import UsageError

    n = launched_world_size()
    if n > 1 and lm_eval_tasks and num_fewshot:
        raise UsageError(f"--num-fewshot {num_fewshot} with {n} data-parallel ranks: each rank would draw other few-shot "
                         "examples than one process does (same run key, other prompts); run it in one process")
    if n > 1 and lm_eval_tasks and isinstance(limit, int) and limit < n:
        raise UsageError(f"--limit {limit} with {n} data-parallel ranks: each rank needs at least one item of "
                         f"every task ({', '.join(lm_eval_tasks)}); give --limit {n} or more, or start fewer ranks")


def current() -> Dist:
    """The data-parallel group of this process, initialised on first use via accelerate."""
    global _CURRENT
    if _CURRENT is None:
        if launched_world_size() > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            _CURRENT = Dist(state.process_index, state.num_processes, state.local_process_index)
        else:
            _CURRENT = Dist()
    return _CURRENT


def device_for(device: str, d: Dist) -> str:
    """`--device auto` on a multi-GPU launch means this rank's own GPU."""
    if d.enabled and device == "auto" and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return device


class ShardedScorer:
    """A `Scorer` whose requests are split round-robin over ranks and whose results are all-gathered.

    Every rank calls it with the same requests and gets every result, in order. `tally` holds the
    KV bytes all ranks' handoffs sent through this wrapper.
    """

    def __init__(self, scorer, d: Dist) -> None:
        from harness.quality.scoring import KVTally

        self._inner, self._dist = scorer, d
        self.tally = KVTally()

    def __getattr__(self, name: str) -> Any:  # max_length, mode, plan, ... of the wrapped scorer
        return getattr(self._inner, name)

    @property
    def batch_size(self) -> int:
        return self._inner.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._inner.batch_size = value

    def _sharded(self, items: list, fn) -> list:
        """`fn(this rank's items, their indices in items)` on every rank, the results all-gathered in items' order."""
        mine = list(range(self._dist.rank, len(items), self._dist.world_size))
        before = self._inner.tally.as_dict()
        res = fn([items[i] for i in mine], mine)
        parts = self._dist.all_gather_object((mine, res, self._inner.tally.since(before)))
        out: list[Any] = [None] * len(items)
        for idx, vals, sent in parts:
            for i, v in zip(idx, vals):
                out[i] = v
            self.tally.add(sent["kv_bytes"], sent["kv_bytes_paged"], sent["handoffs"], sent["prompt_tokens"])
        return out

    def loglikelihood(self, requests, progress: bool = False):
        return self._sharded(list(requests), lambda part, _: self._inner.loglikelihood(part, progress=progress))

    def generate(self, contexts, max_new_tokens: int, should_stop=None, progress: bool = False):
        def run(part: list, mine: list[int]):  # should_stop(i, tokens) names i in the caller's list, not in this part
            stop = None if should_stop is None else (lambda j, gen: should_stop(mine[j], gen))
            return self._inner.generate(part, max_new_tokens, stop, progress=progress)

        return self._sharded(list(contexts), run)
