"""CUDA graphs simulated on a CPU: the `graph` decode path (`harness.pd.static_decode.GraphDecoder`) run where
there is no GPU, with a graph's semantics enforced rather than assumed.

What a real capture does, and this one too:
- **Nothing runs at capture.** Kernels are recorded, not executed: tensors that existed before the capture hold
  their old contents after it, and tensors made inside it hold garbage until the first replay. Here every op
  runs (to get its outputs' shapes); when the capture ends, each older tensor it wrote is restored, and every
  tensor it made is filled with garbage (NaN, or -777 for integers, True for booleans).
- **A replay re-runs the recorded kernels on the recorded memory, with the recorded arguments.** Python is not
  re-run: a Python number read at capture (a step counter, a length) is frozen, and a tensor bound to a name
  after the capture is not what the graph reads. Here a replay calls each recorded op again on the very tensors
  (and Python values) it was recorded with, and copies its results into the recorded outputs.
- **Nothing may wait for the device while it captures.** A capture that reads a value on the host (`.item()`,
  `bool(t)`, `torch.equal`, `.tolist()`), makes a data-dependent shape (`nonzero`, a boolean mask index, `unique`) or copies
  host data to the device (`torch.tensor(...)`) fails with the RuntimeError a GPU gives ("operation not permitted
  when stream is capturing").

Not modelled: the graph's private memory pool, streams (one CPU "stream"), and CPU ops inside a capture (on a
GPU they would run once at capture and not be replayed; here every tensor is a CPU tensor, so all are replayed).

    with simulated_cuda_graphs():           # GraphDecoder and torch.cuda.graph work on CPU tensors
        m = measure(model, plan, workload, decode_mode="graph")
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
NOT_PERMITTED = "operation not permitted when stream is capturing"
# ops that wait for the device (a value read on the host) or whose output shape depends on tensor values
# (the names differ in and out of inference mode: `int(t)` is item there, _local_scalar_dense here)
SYNCS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
         aten.masked_select.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
         aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor, aten.bincount.default, aten.allclose.default}
FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Capture(TorchDispatchMode):
    """Records every op run inside a capture; refuses what a capture cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []  # (op, args, kwargs, outputs, those in new memory: refreshed on replay)
        self.made: set[int] = set()  # storages allocated inside the capture
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # older storages written: (tensor, its contents)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._refuse(func, args)
        schema = func._schema
        for arg, value in zip(schema.arguments, [*args, *[kwargs.get(a.name) for a in schema.arguments[len(args):]]]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in _tensors(value):
                    key = _storage(t)
                    if key not in self.made and key not in self.saved:
                        base = t._base if t._base is not None else t
                        self.saved[key] = (base, base.clone())
        out = func(*args, **kwargs)
        # outputs in new memory are refreshed on replay; a view's or an in-place op's share an input's memory. By
        # the memory, not the schema: `to.dtype` and `reshape` are views in theirs, and copy when they must
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        fresh = [t for t in _tensors(out) if _storage(t) not in inputs and t.numel()]
        self.made.update(_storage(t) for t in fresh)
        self.ops.append((func, args, kwargs, out, fresh))
        return out

    def _refuse(self, func, args) -> None:
        if func in SYNCS:
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} ({func} reads a device value on the host)")
        if func in FROM_HOST and args[0].dim() > 0:  # a Python scalar operand (`x[i] = 0`) is a kernel argument
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} (host data copied to the device by {func})")
        if func in BOOL_INDEXED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} ({func} with a boolean mask: its shape is data-dependent)")

    def end(self) -> None:
        """As after a real capture: older tensors unchanged, tensors made inside hold garbage."""
        with torch.inference_mode():
            for base, contents in self.saved.values():
                base.copy_(contents)
            for *_, fresh in self.ops:
                for t in fresh:
                    t.fill_(True if t.dtype == torch.bool else float("nan") if t.is_floating_point() else -777)
        self.saved.clear()


class SimulatedGraph:
    """Stands in for torch.cuda.CUDAGraph."""

    def __init__(self, *args, **kwargs) -> None:
        self.capture: _Capture | None = None
        self.replays = 0

    def replay(self) -> None:
        if self.capture is None:
            raise RuntimeError("replay of a graph that was never captured")
        with torch.inference_mode():
            for func, args, kwargs, out, fresh in self.capture.ops:
                new = func(*args, **kwargs)
                for old, t in zip(_tensors(out), _tensors(new)):
                    if any(old is f for f in fresh):
                        old.copy_(t)
        self.replays += 1


@contextlib.contextmanager
def _graph(g: SimulatedGraph, pool=None, stream=None, capture_error_mode: str = "global"):
    """Stands in for torch.cuda.graph(g): records the block's ops into g."""
    cap = _Capture()

    def refused(self, *args, **kwargs):  # these read a CPU tensor's memory without any op: refused by name
        raise RuntimeError(f"CUDA error: {NOT_PERMITTED} (a tensor's values read on the host)")

    with mock.patch.object(torch.Tensor, "tolist", refused), mock.patch.object(torch.Tensor, "numpy", refused), cap:
        yield g
    cap.end()
    g.capture = cap


class _Stream:
    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def simulated_cuda_graphs():
    """Within: torch.cuda.CUDAGraph, torch.cuda.graph and streams are the simulation's, and the graph decode path
    accepts CPU tensors."""
    from harness.pd import static_decode

    with contextlib.ExitStack() as stack:
        for name, value in (("CUDAGraph", SimulatedGraph), ("graph", _graph), ("Stream", _Stream),
                            ("stream", lambda s: contextlib.nullcontext()), ("current_stream", _Stream)):
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(static_decode, "can_capture", lambda device: True))
        yield
