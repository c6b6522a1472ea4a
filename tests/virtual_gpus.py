"""Two virtual GPUs on a CPU: a model spread over GPUs (`--device-map`) run where there are none.

Tensors here say they live on `vgpu:0` or `vgpu:1` (torch's PrivateUse1 device, registered from Python) while
their data is an ordinary CPU tensor inside. Every op is computed on that data, after torch's rule for devices is
checked: one op's tensors share a device (CPU scalars in elementwise ops and CPU indices aside, copies and moves
excepted), else the RuntimeError a GPU would raise. So the harness's device bookkeeping (which tensor is made where, which
is moved) is exercised as on two GPUs, and every number is the CPU's own: results equal the unsplit model's.

Not covered: autograd (the engine has no device queue for a Python-registered device). shortened_taylor does not
run here; PDTrim's healing and streamline's replacement run with 0 training steps (their copies and data, no step).

Registering the device is for the life of the process: `python tests/virtual_gpus.py OUT DATA [cases|run]` does the
two-GPU runs in a process of its own and writes what tests/test_two_gpus.py (cases) and tests/test_two_gpus_run.py
(run) compare with the unsplit model:
OUT/facts.json, OUT/scorer.json (and scorer_gpu_batching.json, batched as on a GPU), OUT/trained.json (the copies
training methods make, with 0 steps), OUT/latency.json (latency runs on one virtual GPU), OUT/latency_split.json
(latency runs of the model over both), the records of a run of
every method under OUT/run, and OUT/gpu_check.json (benchmarks/gpu_check.py on a virtual GPU).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
NAME = "vgpu"
# embedding, layers alternating, final norm and LM head on different devices: every hand-over between devices
# the engine and the methods meet (prefill's and decode's last layers apart, the head away from the inputs)
DEVICE_MAP = {"model.embed_tokens": "vgpu:0", "model.rotary_emb": "vgpu:0", "model.layers.0": "vgpu:0",
              "model.layers.1": "vgpu:1", "model.layers.2": "vgpu:1", "model.layers.3": "vgpu:0",
              "model.norm": "vgpu:0", "lm_head": "vgpu:1"}
MOVES = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten._copy_from_and_resize.default}
RESHAPED_IN_PLACE = {aten.unsqueeze_.default, aten.squeeze_.default, aten.squeeze_.dim, aten.transpose_.default,
                     aten.t_.default, aten.resize_.default, aten.as_strided_.default, aten.set_.source_Tensor}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class _Backend:
    """torch.vgpu: two devices, always available."""

    def is_initialized(self):
        return True

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def _is_in_bad_fork(self):
        return False

    def manual_seed_all(self, seed):
        pass

    def device_count(self):
        return 2


def register() -> None:
    """Make `vgpu` a device type of this process (once; it cannot be undone), with the patches it needs:
    `torch.tensor(..., device=)` copies with the dispatcher's Python keys off (this mode would not see it), and
    accelerate empties the current accelerator's cache, which a Python device has none of."""
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(NAME, backend_module=_Backend())
    make = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        if device is None or torch.device(device).type != NAME:
            return make(data, *args, device=device, **kwargs)
        return make(data, *args, **kwargs).to(device)

    torch.tensor = tensor
    torch.accelerator.empty_cache = lambda: None


class VTensor(torch.Tensor):
    """A tensor on a virtual device; `elem` holds its data on the CPU."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, layout=elem.layout, device=device,
                                                requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a {NAME} tensor used outside VirtualDevices()")

    def tolist(self):  # torch refuses tolist for subclasses; a device tensor's data is readable
        return self.elem.tolist()

    def __repr__(self):
        return f"VTensor({self.elem!r}, device={self.device})"


class VirtualDevices(TorchDispatchMode):
    """While active, every op on `vgpu` tensors runs on their CPU data under torch's device rule."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in RESHAPED_IN_PLACE:  # the wrapper's sizes would go stale under the changed data
            raise NotImplementedError(f"{func}: an in-place change of shape is not supported on the virtual devices")
        kwargs = kwargs or {}
        devices: set[torch.device] = set()
        targets: list[torch.device] = []

        # a CPU scalar (0-dim) may join a device tensor in an elementwise op, or be index_put_'s value; elsewhere
        # (index_select, embedding, stack, matmuls) CUDA refuses it as it refuses any CPU tensor
        scalar_ok, in_place = _kind(func)

        def unwrap(t, index=False):  # a leaf of the op's arguments: a wrapper's data, a device retargeted
            if isinstance(t, VTensor):
                devices.add(t.device)
                return t.elem
            if isinstance(t, torch.Tensor):
                if not index and (t.dim() > 0 or not scalar_ok):  # CPU indices: any device
                    devices.add(t.device)
            elif isinstance(t, torch.device):  # a factory's or a move's device names the result's; the data is made on the CPU
                targets.append(t)
                return _CPU
            return t

        if func in INDEXING:
            uargs = (unwrap(args[0]), _map(lambda t: unwrap(t, True), args[1]), *_map(unwrap, args[2:]))
        else:
            uargs = _map(unwrap, args)
        ukwargs = _map(unwrap, kwargs)
        if targets:
            out_dev = targets[0]
        elif func in MOVES or not devices:  # a copy_ between devices: the result is where its destination is
            out_dev = _device(args[0]) if args else torch.device("cpu")
        elif len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{', '.join(sorted(map(str, devices)))}! ({func})")
        else:
            out_dev = next(iter(devices))
        gen = kwargs.get("generator")
        if gen is not None and targets and gen.device.type != targets[0].type:
            raise RuntimeError(f"Expected a '{targets[0].type}' device type for generator but found '{gen.device.type}'")
        out = func(*uargs, **ukwargs)
        if in_place and args and isinstance(args[0], torch.Tensor):
            return args[0]  # an in-place op returns the tensor it changed (its data changed underneath)
        return _map(lambda t: _wrap(t, out_dev), out) if out_dev.type == NAME else out


_CPU = torch.device("cpu")


@functools.cache
def _kind(func) -> tuple[bool, bool]:
    """(may a CPU scalar join its device tensors, does it change its first argument in place) of an op."""
    scalar_ok = torch.Tag.pointwise in func.tags or func in INDEXING
    return scalar_ok, func._schema.is_mutable and func.__name__.split(".")[0].endswith("_")


def _map(fn, x):
    """`fn` over the leaves of an op's arguments or results (tuples, lists and dicts of them), as pytree's tree_map
    does for these, in one cheap pass: the dispatch runs for every op (~220,000 in tests/test_two_gpus.py's process),
    and five tree_maps an op were most of that process's time. Unlike tree_map it does not open torch.Size or a
    namedtuple (tuple subclasses are leaves here): neither holds a tensor or a device in an aten op's arguments, and
    ops return plain tuples at this level."""
    kind = type(x)
    if kind is tuple or kind is list:
        return kind(_map(fn, y) for y in x)
    if kind is dict:
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _device(t) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def _wrap(t, device: torch.device):
    if not isinstance(t, torch.Tensor) or isinstance(t, VTensor):
        return t
    # a view of a tensor made outside inference mode is no inference tensor (autograd shares its base's version
    # counter): the wrapper must be what its data is
    if t.is_inference() == torch.is_inference_mode_enabled():  # the mode it would set (entering one costs ~5 us)
        return VTensor(t, device)
    with torch.inference_mode(t.is_inference()):
        return VTensor(t, device)


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (on the CPU) dispatched over vgpu:0 and vgpu:1 by accelerate, as `--device-map` would."""
    from accelerate import dispatch_model

    model = dispatch_model(model, DEVICE_MAP)
    model.hf_device_map = dict(DEVICE_MAP)
    return model


def _facts() -> dict:
    """What the virtual devices refuse and report, to check that they behave like GPUs at all."""
    a, rows = torch.zeros(3, 2, device="vgpu:1"), torch.tensor([0, 2], device="vgpu:0")
    try:
        a.index_select(0, rows)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    moved = a.index_select(0, rows.to(a.device))
    try:  # a CPU generator drawing on a GPU: CUDA refuses
        torch.randint(0, 9, (2,), generator=torch.Generator().manual_seed(0), device="vgpu:0")
        generator_refused = ""
    except RuntimeError as e:
        generator_refused = str(e)
    scalar = torch.tensor(2.0)  # a CPU scalar: fine in elementwise ops, refused as an embedding's index
    try:
        torch.nn.functional.embedding(torch.tensor(1), a)
        scalar_refused = ""
    except RuntimeError as e:
        scalar_refused = str(e)
    return {"refused": refused, "moved_device": str(moved.device), "moved_values": moved.tolist(),
            "scalar_added": (a + scalar).tolist(), "scalar_refused": scalar_refused, "generator_refused": generator_refused}


PARTS = ("cases", "run")  # one process each, so the two test files' setups run side by side (pytest -n)


def main(out: Path, data_dir: str, part: str = "cases") -> None:
    """`part` "cases": facts, scorer, trained copies, latency and gpu_check.py (tests/test_two_gpus.py); "run": the
    records of a run of every method under OUT/run (tests/test_two_gpus_run.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import two_gpu_cases as cases  # noqa: E402  (tests/two_gpu_cases.py: the cases both sides run)

    register()
    import harness.quality.scoring as scoring

    scoring.FORWARD_TOKENS[NAME] = scoring.FORWARD_TOKENS["cpu"]  # the CPU's batching: the same forwards
    out.mkdir(parents=True, exist_ok=True)
    with VirtualDevices():
        if part == "run":
            try:
                cases.run_all(out / "run", data_dir, placed=spread)
            except Exception:  # noqa: BLE001  (failed cells: their .failed.json files say why; the test reads them)
                traceback.print_exc()
            return
        model = spread(cases.eager_tiny().model)
        facts = {**_facts(), "handoff": _caught(lambda: _handoff_devices(model, cases))}
        (out / "facts.json").write_text(json.dumps(facts))
        scored = {case: _caught(lambda case=case: cases.score_all(model, only=case)[case]) for case in cases.PLANS}
        (out / "scorer.json").write_text(json.dumps(scored))
        del scoring.FORWARD_TOKENS[NAME]  # a GPU's batching: one padded decode forward per batch, no row copies
        scored = {case: _caught(lambda case=case: cases.score_all(model, only=case)[case]) for case in cases.PLANS}
        (out / "scorer_gpu_batching.json").write_text(json.dumps(scored))
        scoring.FORWARD_TOKENS[NAME] = scoring.FORWARD_TOKENS["cpu"]
        (out / "trained.json").write_text(json.dumps(_caught(lambda: cases.trained_copies(model))))
        timed = {case: _caught(lambda case=case: cases.latency_all(model, case)) for case in cases.PLANS}
        (out / "latency_split.json").write_text(json.dumps(timed))  # `latency --device-map`: the model over both
        one = cases.eager_tiny().model.to("vgpu:1")  # latency runs on one GPU (not the first: nothing may assume 0)
        timed = {case: _caught(lambda case=case: cases.latency_all(one, case)) for case in cases.PLANS}
        (out / "latency.json").write_text(json.dumps(timed))
        (out / "gpu_check_rc.json").write_text(json.dumps(_caught(lambda: _gpu_check(out))))


def in_own_process(part: str, out: Path, data_dir) -> Path:
    """Runs `main(out, data_dir, part)` in a process of its own (a registered device lasts for the process); `out`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")]),
           "HARNESS_CALIBRATION_CACHE": str(out / "calibration")}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), str(data_dir), part], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(r.stderr[-4000:])
    return out


def _gpu_check(out: Path) -> int:
    """benchmarks/gpu_check.py's sections (a)-(c) on vgpu:0 (tiny shapes; (b)-(c) in bfloat16, as the device command
    runs them): the GPU branches its CPU smoke does not take ((a) compares the device's float32 with the CPU's, not
    float64 with float32). (d) is left out: its receiving process has no virtual device."""
    import harness.pd.models as models

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    resolve = models.resolve_device
    models.resolve_device = lambda d: torch.device(d) if str(d).startswith(NAME) else resolve(d)
    try:
        return gpu_check.main(["--shapes", "tiny", "--device", f"{NAME}:0", "--dtype", "bfloat16", "--sections", "a,b,c",
                               "--prompt-tokens", "96", "--decode-tokens", "6", "--batch-sizes", "1,3", "--repeats", "1",
                               "--json", str(out / "gpu_check.json"), "--md", str(out / "gpu_check.md")])
    finally:
        models.resolve_device = resolve


def _caught(fn):
    """fn(), or {"error": its traceback}: each case fails on its own, naming the place."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc(limit=-6)}


def _handoff_devices(model, cases) -> dict[str, list[str]]:
    """Per decode layer of the first/last plan: the devices of the K, V, positions and counts handed over."""
    from harness.pd.batching import pad_tokens
    from harness.pd.stages import StagedModel

    staged = StagedModel(model, cases.PLANS["first_last"][1])
    sent = staged.handoff(staged.prefill(pad_tokens([[1, 2, 3, 4, 5, 6, 7]], torch.device("vgpu:0"))))
    return {str(l): [str(d[l].device) for d in (sent.keys, sent.values, sent.positions, sent.counts)] for l in sent.keys}


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:4])
