"""Per-stage latency of a plan in a PD deployment: TTFT, ITL/TPOT, handoff, modelled transfer, E2E.

Importable without lm-eval. One measurement = one (plan, workload): a batch of `batch_size`
random prompts of `prompt_tokens` tokens is prefilled by the plan's prefill layers and the first
token is taken from the last position (TTFT); the handoff packs the decode layers' KV under the
plan's KV policy and unpacks it (handoff time, bytes counted from the tensors); the decode stage
then runs `decode_tokens - 1` greedy steps, each timed on its own (ITL samples; EOS ignored).
TPOT is the mean ITL of one run. Every stage is timed directly, never by subtraction: on CUDA
with events around the stage (after warm-up runs; a model spread over several GPUs by the host's
clock between synchronisations of all of them), on CPU with `time.perf_counter_ns`, and the
clock used is recorded.

Transfer time is modelled: bytes · 8 / link bandwidth, for each bandwidth in Gbit/s, using the
bytes rounded to 16-token pages (what a paged KV transfer moves); E2E = TTFT + transfer +
(decode_tokens − 1) · TPOT.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from harness.pd import arch
from harness.pd.batching import TokenBatch
from harness.pd.engine import PAGE_TOKENS
from harness.pd.plan import PruningPlan
from harness.pd.stages import StagedModel

DEFAULT_BANDWIDTHS_GBIT = (25.0, 100.0, 400.0)
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    decode_tokens: int  # tokens generated per request, the first one by the prefill stage
    batch_size: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.decode_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"workload needs positive sizes, got {self}")


def beyond_context(workloads: Sequence[Workload], config: Any) -> str | None:
    """Words for the workloads whose positions (prompt_tokens + decode_tokens - 1) exceed the model's context
    (`max_position_embeddings` of its config), else None. They are measured all the same: a layer's cost does not
    depend on which positions it computes, but no deployment of the model serves such a request."""
    context = getattr(config, "max_position_embeddings", None)
    over = [w for w in workloads if context and w.prompt_tokens + w.decode_tokens - 1 > context]
    if not over:
        return None
    shown = ", ".join(sorted({f"{w.prompt_tokens}+{w.decode_tokens}" for w in over}))
    return (f"{len(over)} workload(s) need more positions than the model's context of {context} tokens "
            f"(prompt+decode {shown}): measured all the same, though the model was not trained to serve them")


class Clock:
    """Times a callable, in milliseconds: CUDA events on one GPU; for a model spread over several GPUs
    (`--device-map`), the host's clock between synchronisations of all of them (an event pair times one
    device's stream only); perf_counter_ns otherwise."""

    def __init__(self, device: torch.device, devices: Sequence[torch.device] = ()) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        gpus = list(dict.fromkeys(d for d in (device, *devices) if d.type == "cuda"))
        self.gpus = gpus if len(gpus) > 1 else []
        self.name = "cuda_synchronize" if self.gpus else "cuda_events" if self.cuda else "perf_counter_ns"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.gpus:
            for d in self.gpus:
                torch.cuda.synchronize(d)
            t0 = time.perf_counter_ns()
            out = fn()
            for d in self.gpus:
                torch.cuda.synchronize(d)
            return out, (time.perf_counter_ns() - t0) / 1e6
        if self.cuda:
            # on the measured device: an event records on the *current* device's stream (cuda:0 unless set), so a
            # model on cuda:1 was timed by an idle stream; `fn`'s own streams (a graph's capture) are made there too
            with torch.cuda.device(self.device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                return out, float(start.elapsed_time(end))
        t0 = time.perf_counter_ns()
        out = fn()
        return out, (time.perf_counter_ns() - t0) / 1e6


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not samples:
        raise ValueError("no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(name: str, samples: Sequence[float]) -> dict[str, float]:
    """{name_p50: .., name_p90: .., name_p99: .., name_mean: ..} (name carries the unit, e.g. ttft_ms)."""
    out = {f"{name}_p{q}": percentile(samples, q) for q in PERCENTILES}
    out[f"{name}_mean"] = statistics.fmean(samples)
    return out


def transfer_ms(kv_bytes: int, gbit_per_s: float) -> float:
    """Time to move `kv_bytes` over a link of `gbit_per_s` (10^9 bit/s), in ms."""
    if gbit_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return kv_bytes * 8 / (gbit_per_s * 1e9) * 1e3


def e2e_ms(ttft: float, transfer: float, tpot: float, decode_tokens: int) -> float:
    return ttft + transfer + (decode_tokens - 1) * tpot


@dataclass
class Measurement:
    """Raw samples of one (plan, workload); all times in ms, bytes per batch."""

    method: str
    workload: Workload
    clock: str
    ttft_ms: list[float] = field(default_factory=list)  # one per measured run
    handoff_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)  # every decode step of every measured run
    tpot_ms: list[float] = field(default_factory=list)  # mean ITL of each measured run
    kv_bytes: int = 0
    kv_bytes_paged: int = 0
    decode_mode: str = "eager"
    graph_capture_ms: list[float] = field(default_factory=list)  # graph mode: capture time per measured run
    handoff: Any = field(default=None, repr=False, compare=False)  # the last run's Handoff (not serialised)
    # the last run's greedy tokens, (B, decode_tokens) int64 on the CPU (not serialised): decode paths must agree
    tokens: Any = field(default=None, repr=False, compare=False)

    def extend(self, other: Measurement) -> None:
        """Add `other`'s runs (the same plan and workload, measured later): samples appended, bytes checked."""
        if (other.workload, other.decode_mode, other.clock) != (self.workload, self.decode_mode, self.clock):
            raise ValueError(f"cannot merge a {other.workload}/{other.decode_mode} measurement into {self.workload}/{self.decode_mode}")
        if self.ttft_ms and (other.kv_bytes, other.kv_bytes_paged) != (self.kv_bytes, self.kv_bytes_paged):
            raise RuntimeError(f"{self.method}: the same handoff sent {self.kv_bytes} B, then {other.kv_bytes} B")
        for f in ("ttft_ms", "handoff_ms", "itl_ms", "tpot_ms", "graph_capture_ms"):
            getattr(self, f).extend(getattr(other, f))
        self.kv_bytes, self.kv_bytes_paged, self.handoff, self.tokens = other.kv_bytes, other.kv_bytes_paged, other.handoff, other.tokens

    def figures(self, bandwidths_gbit: Sequence[float] = DEFAULT_BANDWIDTHS_GBIT, **context: Any) -> dict[str, float]:
        """Every registered latency figure (`harness.latency.figures`): stage percentiles, modelled transfer and E2E."""
        from harness.latency.figures import compute  # that module imports this one

        return compute(self, bandwidths_gbit, **context)

    def to_dict(self) -> dict[str, Any]:
        # field by field: asdict would deep-copy the handoff's KV tensors (GBs on a GPU at batch 8) only to drop them
        d = {f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v for f in fields(self) if f.name not in ("handoff", "tokens")}
        d["workload"] = asdict(self.workload)
        return d


DECODE_MODES = ("eager", "static", "graph")


def _eager_steps(clock, staged: StagedModel, dcache, tok, lengths, step_valid, n: int, generated: list) -> list[float]:
    """The n - 1 decode steps after the prefill's token on the growing cache: each step's ms (each step's
    tokens, (B,), appended to `generated`)."""
    itl = []
    for step in range(1, n):
        def eager_step(tok=tok, step=step):
            return staged.step(dcache, tok, lengths + step - 1, step_valid).argmax(-1)

        tok, dt = clock.time(eager_step)
        itl.append(dt)
        generated.append(tok)
    return itl


def _static_steps(clock, model, plan: PruningPlan, dcache, tok, lengths, n: int, graph: bool,
                  generated: list) -> tuple[list[float], float | None]:
    """The n - 1 decode steps on preallocated buffers (fixed shapes), captured as a CUDA graph when
    `graph`: (each step's ms, the capture's ms or None; capture is never counted in a step; each step's
    tokens, (B,), appended to `generated`: copies, as a graph writes every step into one buffer). Both step
    loops run inside `measure`'s inference mode: with autograd on, the static steps recorded a graph through
    the KV buffers (every step's index_copy_ chained to the last) and were timed with its overhead."""
    from harness.pd.static_decode import GraphDecoder, StaticKV, decode_step

    if n <= 1:
        return [], None
    skv = StaticKV(dcache, n - 1)
    itl, capture, decoder = [], None, None
    if graph:  # the first decode step's position is T
        decoder, capture = clock.time(lambda: GraphDecoder(model, plan.decode_layers, skv, tok[:, None], lengths[:, None].clone()))
    for step in range(1, n):
        pos = (lengths + step - 1)[:, None]
        if decoder is not None:
            tok, dt = clock.time(lambda tok=tok, pos=pos: decoder.step(tok[:, None], pos))
        else:
            def static_step(tok=tok, pos=pos):
                out = decode_step(model, plan.decode_layers, tok[:, None], pos, skv)
                skv.advance()
                return out

            tok, dt = clock.time(static_step)
        itl.append(dt)
        generated.append(tok.clone())  # after the step's clock: not timed
    return itl, capture


def _prompts(vocab: int, workload: Workload, seed: int, device: torch.device) -> TokenBatch:
    """`batch_size` random prompts of `prompt_tokens` ids, (B, T) on `device`: built before any timing, so only stage
    work is inside the clocks; drawn on the host (the generator's device) so every device gets the same prompts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (workload.batch_size, workload.prompt_tokens), generator=g, device="cpu")
    return TokenBatch.dense(ids.to(device))


def _keep_run(m: Measurement, ttft: float, handoff_ms: float, itl: list[float], capture: float | None, sent,
              generated: list) -> None:
    """Append one measured run's samples to `m` (ms; `capture` None but in graph mode), its bytes and its tokens."""
    if capture is not None:
        m.graph_capture_ms.append(capture)
    m.ttft_ms.append(ttft)
    m.handoff_ms.append(handoff_ms)
    m.itl_ms += itl
    if itl:
        m.tpot_ms.append(statistics.fmean(itl))
    m.kv_bytes, m.kv_bytes_paged = sent.kv_bytes, sent.kv_bytes_paged(PAGE_TOKENS)
    m.tokens = torch.stack(generated, 1).cpu()


@torch.inference_mode()  # every stage, the prefill's LM head, the handoff's packing and unpacking too: no autograd timed
def measure(
    model, plan: PruningPlan, workload: Workload, *, warmup: int = 1, repeats: int = 3, seed: int = 0,
    decode_mode: str = "eager",
) -> Measurement:
    """Time prefill (TTFT), handoff and every decode step of `repeats` runs after `warmup` runs.

    `decode_mode`: `eager` (growing cache, the engine's path), `static` (preallocated buffers,
    fixed shapes; `harness.pd.static_decode`) or `graph` (the static step captured as a CUDA graph
    once per run; capture time is recorded apart and never counted in ITL).
    """
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    device = arch.model_device(model)
    clock = Clock(device, arch.execution_devices(model))
    if decode_mode == "graph" and clock.gpus:
        raise ValueError(f"decode_mode 'graph' captures one GPU's stream; the model is spread over {len(clock.gpus)} GPUs "
                         "(use eager or static)")
    batch = _prompts(model.config.vocab_size, workload, seed, device)
    B, n, lengths = workload.batch_size, workload.decode_tokens, batch.lengths
    step_valid = torch.ones((B, 1), dtype=torch.bool, device=device)
    staged = StagedModel(model, plan)
    m = Measurement(plan.method, workload, clock.name, decode_mode=decode_mode)

    def prefill():  # a SnapKV-style policy's window scores are prefill work, timed with it
        out = staged.prefill(batch)
        return out, staged.logits(out.last_hidden).argmax(-1)

    for run in range(warmup + repeats):
        (out, tok), ttft = clock.time(prefill)
        sent, handoff = clock.time(lambda out=out: staged.handoff(out))
        dcache, unpack = clock.time(lambda sent=sent: staged.receive(sent))
        generated, capture = [tok], None
        if decode_mode == "eager":
            itl = _eager_steps(clock, staged, dcache, tok, lengths, step_valid, n, generated)
        else:
            itl, capture = _static_steps(clock, model, plan, dcache, tok, lengths, n, decode_mode == "graph", generated)
        if run >= warmup:
            _keep_run(m, ttft, handoff + unpack, itl, capture, sent, generated)
        # the prompt KV (prefill cache, handoff, decode cache) is released before the next run prefills: kept
        # through it, a GPU held five copies at once (llama2-7b, batch 8, 2048 tokens: 5 x 8 GiB); the last
        # measured run's handoff stays with the measurement
        m.handoff = sent if run >= warmup and run == warmup + repeats - 1 else None
        del out, sent, dcache, generated
    return m
