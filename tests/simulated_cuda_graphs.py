"""CUDA graphs simulated on a CPU: the `graph` decode path (`harness.pd.static_decode.GraphDecoder`) run where
there is no GPU, with a graph's semantics enforced rather than assumed.

What a real capture does, and this one too:
- **Nothing runs at capture.** Kernels are recorded, not executed: tensors that existed before the capture hold
  their old contents after it, and tensors made inside it hold garbage until the first replay. Here every op
  runs (to get its outputs' shapes); when the capture ends, each older tensor it wrote is restored, and every
  tensor it made is filled with garbage (NaN, or -777 for integers, True for booleans). The whole storage is
  restored, not the tensor written: under inference mode a view has no `_base`, so two views of one buffer
  written in one capture (`buf[:, :2]`, `buf[:, 2:]`) are one storage to restore. A capture that fails ran
  nothing either: what it wrote is restored all the same.
- **A replay re-runs the recorded kernels on the recorded memory, with the recorded arguments.** Python is not
  re-run: a Python number read at capture (a step counter, a length) is frozen, and a tensor bound to a name
  after the capture is not what the graph reads. Here a replay calls each recorded op again on the very tensors
  (and Python values) it was recorded with, and copies its results into the recorded outputs. A graph reads
  addresses, not Python objects: a tensor the capture read that was later given other memory (`t.data = ...`,
  `set_`, `resize_`) is refused at replay, where a GPU would read the old (perhaps freed) memory.
- **Nothing may wait for the device while it captures.** A capture that reads a value on the host (`.item()`,
  `bool(t)`, `torch.equal`, `.tolist()`, `.cpu()`), makes a data-dependent shape (`nonzero`, a boolean mask index,
  `unique`) or copies host data to the device (`torch.tensor(...)`, `torch.tensor(v, device=...)`) fails with the
  RuntimeError a GPU gives ("operation not permitted when stream is capturing"). A Python scalar made a 0-dim
  host tensor (`x[:2] = 0`, `x + torch.tensor(2.0)`) is a kernel argument, read on the host at capture and baked
  in; but where PyTorch copies it to the device first (one element, `x[0] = 0`: `copy_`; `x[idx] = 0`:
  `index_put_`) the copy is a blocking copy from pageable memory, refused in a capture (aten/src/ATen/native/
  cuda/Copy.cu), and so is `masked_fill`/`index_fill` with a 0-dim *device* value, which CUDA reads with
  `value.item()`.

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
# ops that copy a 0-dim host tensor (a lifted Python scalar) to the device: that argument's name
COPIES_HOST = {aten.copy_.default: "src", aten.index_put_.default: "values", aten.index_put.default: "values",
               aten._index_put_impl_.default: "values"}
# ops whose CUDA kernel reads a 0-dim tensor operand with .item(): free for a host scalar, a sync for a device one
READS_VALUE = {aten.masked_fill.Tensor: "value", aten.masked_fill_.Tensor: "value", aten.index_fill.int_Tensor: "value",
               aten.index_fill_.int_Tensor: "value"}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _arg(func, args, kwargs, name: str):
    """An op's argument by its schema name, given by position or keyword."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name)
    return None


class _Capture(TorchDispatchMode):
    """Records every op run inside a capture; refuses what a capture cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []  # (op, args, kwargs, outputs, those in new memory: refreshed on replay)
        self.made: set[int] = set()  # storages allocated inside the capture
        self.host: set[int] = set()  # storages of 0-dim host tensors lifted from Python scalars inside the capture
        self.saved: dict[int, tuple] = {}  # older storages written: (storage, its contents)
        self.bound: list[tuple[torch.Tensor, int]] = []  # every tensor the ops read or wrote, and its address

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._refuse(func, args, kwargs)
        schema = func._schema
        for arg, value in zip(schema.arguments, [*args, *[kwargs.get(a.name) for a in schema.arguments[len(args):]]]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in _tensors(value):
                    key = _storage(t)
                    if key not in self.made and key not in self.saved:
                        self.saved[key] = (t.untyped_storage(), t.untyped_storage().clone())
        out = func(*args, **kwargs)
        if func in FROM_HOST:
            self.host.update(_storage(t) for t in _tensors(out))
        # outputs in new memory are refreshed on replay; a view's or an in-place op's share an input's memory. By
        # the memory, not the schema: `to.dtype` and `reshape` are views in theirs, and copy when they must
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        fresh = [t for t in _tensors(out) if _storage(t) not in inputs and t.numel()]
        self.made.update(_storage(t) for t in fresh)
        self.ops.append((func, args, kwargs, out, fresh))
        return out

    def _refuse(self, func, args, kwargs) -> None:
        if func in SYNCS:
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} ({func} reads a device value on the host)")
        if func in FROM_HOST and args[0].dim() > 0:  # a Python scalar operand (`x[:2] = 0`) is a kernel argument
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} (host data copied to the device by {func})")
        if func in BOOL_INDEXED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} ({func} with a boolean mask: its shape is data-dependent)")
        if func in COPIES_HOST and any(_storage(t) in self.host for t in _tensors(_arg(func, args, kwargs, COPIES_HOST[func]))):
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} (a Python scalar copied to the device by {func}, "
                               "from pageable host memory)")
        if func in READS_VALUE and any(_storage(t) not in self.host for t in _tensors(_arg(func, args, kwargs, READS_VALUE[func]))):
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} ({func} reads its 0-dim device value on the host)")

    def end(self) -> None:
        """As after a real capture: older tensors unchanged, tensors made inside hold garbage."""
        with torch.inference_mode():
            for storage, contents in self.saved.values():
                storage.copy_(contents)
            for *_, fresh in self.ops:
                for t in fresh:
                    t.fill_(True if t.dtype == torch.bool else float("nan") if t.is_floating_point() else -777)
        self.saved.clear()
        seen: set[int] = set()
        for _, args, kwargs, *_ in self.ops:
            for t in _tensors((args, kwargs)):
                if id(t) not in seen:
                    seen.add(id(t))
                    self.bound.append((t, t.data_ptr()))


class SimulatedGraph:
    """Stands in for torch.cuda.CUDAGraph."""

    def __init__(self, *args, **kwargs) -> None:
        self.capture: _Capture | None = None
        self.replays = 0

    def replay(self) -> None:
        if self.capture is None:
            raise RuntimeError("replay of a graph that was never captured")
        for t, address in self.capture.bound:
            if t.data_ptr() != address:
                raise RuntimeError(f"replay: a {tuple(t.shape)} tensor the graph reads was given other memory after the "
                                   "capture (.data =, set_, resize_); a CUDA graph reads the old address")
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

    tensor = torch.tensor

    def to_device(data, *args, device=None, **kwargs):  # here the device is the CPU: a device= is the GPU's
        if device is not None:
            raise RuntimeError(f"CUDA error: {NOT_PERMITTED} (torch.tensor(..., device=...) copies host data to the device)")
        return tensor(data, *args, **kwargs)

    try:
        with mock.patch.object(torch.Tensor, "tolist", refused), mock.patch.object(torch.Tensor, "numpy", refused), \
                mock.patch.object(torch.Tensor, "cpu", refused), mock.patch.object(torch, "tensor", to_device), cap:
            yield g
    finally:
        cap.end()  # a failed capture ran nothing either
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
