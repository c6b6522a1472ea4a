"""Moving a handoff for real between two processes: a prefill process sends, a decode process receives.

`transfer_between_processes`: `torch.distributed` point-to-point: gloo on CPU, NCCL across two
GPUs (each process on its own GPU). The sender first sends a small
header (JSON: layer, tensor kind, shape, dtype of every tensor, then the metadata tensors), then
each K and V tensor in turn; the receiver allocates and receives them, counts the bytes of the K
and V tensors it received, and times the transfer from its first to its last receive. The
positions/counts tensors (the handoff's bookkeeping) are sent too and reported apart from the KV
bytes.

`transfer_shared`: two processes on one device, no network stack: on a GPU the sender's tensors
are opened by the receiver through CUDA IPC (NCCL needs two GPUs), on CPU they travel in shared
memory; the receiver copies each into its own memory, counts the bytes and times the handoff
from the sender's put to the end of its own copies (one monotonic clock, one machine). The sender
puts once the receiver says it is up (its CUDA context made): a process's start is not the handoff's.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.pd.engine import Handoff

SHARED_TIMEOUT_S = 180  # a handoff of a few GB takes seconds; a process that waits longer lost its peer
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(h: Handoff) -> list[tuple[str, int, torch.Tensor]]:
    """(kind, layer, tensor) in a fixed order: K and V of each layer, then positions and counts."""
    out = []
    for layer in sorted(h.keys):
        out += [("k", layer, h.keys[layer]), ("v", layer, h.values[layer])]
    for layer in sorted(h.keys):
        out += [("pos", layer, h.positions[layer]), ("cnt", layer, h.counts[layer])]
    return out


def handoffs_equal(a: Handoff, b: Handoff) -> bool:
    """Whether two handoffs hold the same tensors (K, V, positions, counts of the same layers), bit for bit."""
    ta, tb = _tensors(a), _tensors(b)
    return [(k, layer) for k, layer, _ in ta] == [(k, layer) for k, layer, _ in tb] and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()) for (_, _, x), (_, _, y) in zip(ta, tb))


def _send_bytes(data: bytes, dst: int, device: torch.device) -> None:
    t = torch.tensor(list(data), dtype=torch.uint8, device=device)  # gloo: host tensors; NCCL: this rank's GPU
    dist.send(torch.tensor([t.numel()], dtype=torch.int64, device=device), dst)
    dist.send(t, dst)


def _recv_bytes(src: int, device: torch.device) -> bytes:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, src)
    t = torch.empty(int(n), dtype=torch.uint8, device=device)
    dist.recv(t, src)
    return bytes(t.tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # NCCL sends and receives are asynchronous
        torch.cuda.synchronize(device)


def _worker(rank: int, port: int, handoff_path: str, result_path: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")  # NCCL: one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        if rank == 0:  # prefill process
            h: Handoff = torch.load(handoff_path, weights_only=False)
            items = [(k, layer, t.to(device).contiguous()) for k, layer, t in _tensors(h)]
            header = [{"kind": k, "layer": layer, "shape": list(t.shape), "dtype": str(t.dtype)} for k, layer, t in items]
            _send_bytes(json.dumps({"n_requests": h.n_requests, "tensors": header}).encode(), 1, device)
            dist.barrier()
            t0 = time.perf_counter_ns()
            for _, _, t in items:
                dist.send(t, 1)
            _sync(device)
            sent_ms = (time.perf_counter_ns() - t0) / 1e6
            dist.barrier()
            Path(result_path + ".sender").write_text(json.dumps({"send_ms": sent_ms}))
        else:  # decode process
            header = json.loads(_recv_bytes(0, device))
            bufs = [torch.empty(d["shape"], dtype=_DTYPES[d["dtype"]], device=device) for d in header["tensors"]]
            dist.barrier()
            t0 = time.perf_counter_ns()
            for b in bufs:
                dist.recv(b, 0)
            _sync(device)
            recv_ms = (time.perf_counter_ns() - t0) / 1e6
            bufs = [b.cpu() for b in bufs]
            dist.barrier()
            kv = sum(b.numel() * b.element_size() for d, b in zip(header["tensors"], bufs) if d["kind"] in ("k", "v"))
            meta = sum(b.numel() * b.element_size() for d, b in zip(header["tensors"], bufs) if d["kind"] not in ("k", "v"))
            got = Handoff(
                keys={d["layer"]: b for d, b in zip(header["tensors"], bufs) if d["kind"] == "k"},
                values={d["layer"]: b for d, b in zip(header["tensors"], bufs) if d["kind"] == "v"},
                positions={d["layer"]: b for d, b in zip(header["tensors"], bufs) if d["kind"] == "pos"},
                counts={d["layer"]: b for d, b in zip(header["tensors"], bufs) if d["kind"] == "cnt"},
                n_requests=header["n_requests"])
            torch.save(got, result_path + ".handoff")
            Path(result_path).write_text(json.dumps({"kv_bytes_received": kv, "metadata_bytes_received": meta,
                                                     "recv_ms": recv_ms, "tensors": len(bufs)}))
    finally:
        dist.destroy_process_group()


def transfer_between_processes(handoff: Handoff, backend: str = "gloo") -> dict[str, Any]:
    """Send `handoff` from a prefill process to a decode process; returns what the receiver measured.

    Keys: kv_bytes_received, metadata_bytes_received, recv_ms (receiver wall time from first to last
    receive), send_ms, clock, backend, and `received` (the Handoff as the decode process got it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        hp, rp = str(Path(tmp) / "handoff.pt"), str(Path(tmp) / "result.json")
        torch.save(Handoff({k: v.cpu() for k, v in handoff.keys.items()}, {k: v.cpu() for k, v in handoff.values.items()},
                           {k: v.cpu() for k, v in handoff.positions.items()}, {k: v.cpu() for k, v in handoff.counts.items()},
                           handoff.n_requests), hp)
        mp.start_processes(_worker, args=(_free_port(), hp, rp, backend), nprocs=2, join=True, start_method="spawn")
        out = json.loads(Path(rp).read_text())
        out.update(json.loads(Path(rp + ".sender").read_text()))
        out["received"] = torch.load(rp + ".handoff", weights_only=False)
    out.update(clock="perf_counter_ns", backend=backend)
    return out


def _shared_sender(handoff_path: str, device: str, queue, done, ready=None) -> None:
    h: Handoff = torch.load(handoff_path, weights_only=False)
    items = [(k, layer, t.to(device).contiguous()) for k, layer, t in _tensors(h)]
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)  # the tensors' device (a bare synchronize() waits for the current one only)
    if ready is not None:  # the clock starts once the decode process is up, as a serving decode process is
        ready.get(timeout=SHARED_TIMEOUT_S)
    # CUDA tensors pickle as IPC handles, CPU tensors move to shared memory (torch.multiprocessing)
    queue.put({"n_requests": h.n_requests, "t0_ns": time.perf_counter_ns(), "items": items})
    done.get(timeout=SHARED_TIMEOUT_S)  # the receiver reads the sender's memory: keep it alive until the copies are done


def _shared_receiver(device: str, queue, done, result_path: str, ready=None) -> None:
    if ready is not None:
        if device.startswith("cuda"):  # its CUDA context, made now: unpickling the first IPC handle made it inside
            torch.zeros(1, device=device)  # the handoff's clock (torch.multiprocessing's rebuild_cuda_tensor: _lazy_init)
            torch.cuda.synchronize(device)
        ready.put(True)
    msg = queue.get(timeout=SHARED_TIMEOUT_S)
    t_got = time.perf_counter_ns()
    own = [(k, layer, t.clone()) for k, layer, t in msg["items"]]  # the copy into the decode process's memory
    if device.startswith("cuda"):  # the copies' device: on cuda:1, a bare synchronize() waited for cuda:0, and the
        torch.cuda.synchronize(device)  # sender could free its memory while they still read it
    t1 = time.perf_counter_ns()
    t0, n_requests = msg["t0_ns"], msg["n_requests"]
    del msg  # release the sender's memory (IPC handles) before the sender may free it
    done.put(True)
    kv = sum(t.numel() * t.element_size() for k, _, t in own if k in ("k", "v"))
    meta = sum(t.numel() * t.element_size() for k, _, t in own if k not in ("k", "v"))
    parts: dict[str, dict[int, torch.Tensor]] = {"k": {}, "v": {}, "pos": {}, "cnt": {}}
    for k, layer, t in own:
        parts[k][layer] = t.cpu()
    torch.save(Handoff(parts["k"], parts["v"], parts["pos"], parts["cnt"], n_requests), result_path + ".handoff")
    Path(result_path).write_text(json.dumps({"kv_bytes_received": kv, "metadata_bytes_received": meta, "tensors": len(own),
                                             "handoff_ms": (t1 - t0) / 1e6, "recv_ms": (t1 - t_got) / 1e6,
                                             "device": device}))


def _join_failing_fast(procs, timeout_s: float) -> None:
    """Wait for the sender and the receiver; once one exits with an error, stop the other at once (it would wait
    for its peer's message until SHARED_TIMEOUT_S: minutes of a GPU run lost to a refused CUDA IPC)."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    running = list(procs)
    while running and not any(p.exitcode for p in procs) and time.monotonic() < deadline:
        wait([p.sentinel for p in running], timeout=max(0.0, deadline - time.monotonic()))
        running = [p for p in running if p.exitcode is None]
    for p in running:
        p.terminate()
        p.join()


def transfer_shared(handoff: Handoff, device: str = "cpu", timeout_s: float = SHARED_TIMEOUT_S + 60) -> dict[str, Any]:
    """Hand `handoff` from a prefill process to a decode process on one `device` (CUDA IPC or shared memory).
    Both processes are stopped after `timeout_s` (a hung peer: a run with a time budget passes less).

    Keys: kv_bytes_received, metadata_bytes_received, tensors, handoff_ms (sender's put to the
    receiver's last copy), recv_ms (the receiver's copies), device, backend (cuda_ipc or
    shared_memory), clock, and `received`.
    """
    ctx = mp.get_context("spawn")
    queue, done, ready = ctx.Queue(), ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        hp, rp = str(Path(tmp) / "handoff.pt"), str(Path(tmp) / "result.json")
        torch.save(Handoff({k: v.cpu() for k, v in handoff.keys.items()}, {k: v.cpu() for k, v in handoff.values.items()},
                           {k: v.cpu() for k, v in handoff.positions.items()}, {k: v.cpu() for k, v in handoff.counts.items()},
                           handoff.n_requests), hp)
        procs = [ctx.Process(target=_shared_sender, args=(hp, device, queue, done, ready)),
                 ctx.Process(target=_shared_receiver, args=(device, queue, done, rp, ready))]
        for p in procs:
            p.start()
        _join_failing_fast(procs, timeout_s)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"shared-memory handoff failed: exit codes {[p.exitcode for p in procs]} "
                               f"(a negative code: stopped by a signal, e.g. after {timeout_s:.0f} s)")
        out = json.loads(Path(rp).read_text())
        out["received"] = torch.load(rp + ".handoff", weights_only=False)
    out.update(clock="perf_counter_ns", backend="cuda_ipc" if device.startswith("cuda") else "shared_memory")
    return out


def transfer_backend(clock: str, gpus: int) -> str:
    """How `--real-transfer` moves a handoff: gloo on CPU; on GPU, NCCL across two GPUs, else CUDA IPC
    (NCCL refuses two ranks on one GPU)."""
    if not clock.startswith("cuda"):  # cuda_events, or cuda_synchronize for a model spread over GPUs
        return "gloo"
    return "nccl" if gpus >= 2 else "cuda_ipc"
