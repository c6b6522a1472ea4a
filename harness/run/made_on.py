"""Where a quality record was computed, against where this run computes: `--device auto` and `--dtype auto` name a
CPU in float32 on one machine and a GPU in bfloat16 on another, under one run key; `--device cpu` and `auto` name the
same computation on a machine without a GPU, under two. A latency record counts by the kind of device it was
measured on (`latency_measured_on`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from harness.config import RunConfig
from harness.errors import UsageError
from harness.store import records as rec

_ELSEWHERE = contextvars.ContextVar("harness_computed_elsewhere", default=False)


@contextlib.contextmanager
def computed_elsewhere() -> Iterator[None]:
    """Within: the work checked is computed on other machines than this one (a sweep's cells on the Ray cluster at
    RAY_ADDRESS, whose driver may have no GPU). What `--device auto` names there is not known here, so no record or
    resume state is refused for where it was scored, and a record of another spelling (`--device cpu` for `auto`)
    is taken as this run's: each cell checks both on its own machine, before its work."""
    token = _ELSEWHERE.set(True)
    try:
        yield
    finally:
        _ELSEWHERE.reset(token)


def made_on(old: rec.RunRecord) -> tuple[str, str] | None:
    """(device type, dtype) `old` was scored with: its environment's device ('cpu', 'cuda') and its --dtype as it
    resolved there ('float32'); None when unknown (a record without a device) or placed by --device-map."""
    from harness.pd.models import resolve_dtype

    device, dtype = (getattr(old, "environment", None) or {}).get("device"), old.config.get("dtype")
    if not isinstance(device, str) or not isinstance(dtype, str) or old.config.get("device_map"):
        return None
    kind = device.split(":")[0]
    try:
        return kind, _name(resolve_dtype(dtype, _device(kind)))
    except Exception:  # noqa: BLE001 - a dtype this version does not know: nothing to compare
        return None


def runs_on(cfg: RunConfig) -> tuple[str, str] | None:
    """(device type, dtype) this run scores with; None when --device-map places the model (its own check), or where
    the run computes elsewhere (`computed_elsewhere`)."""
    from harness.pd.models import resolve_device, resolve_dtype

    if cfg.device_map or _ELSEWHERE.get():
        return None
    device = resolve_device(cfg.device)
    return device.type, _name(resolve_dtype(cfg.dtype, device))


def spelled_otherwise(cfg: RunConfig, old: rec.RunRecord) -> list[RunConfig]:
    """`cfg` with `old`'s --device and --dtype as typed, when those named what this run computes with (`--device cpu`
    there, `auto` here on a machine without a GPU): the run key of the same work."""
    device, dtype = old.config.get("device"), old.config.get("dtype")
    if not isinstance(device, str) or not isinstance(dtype, str) or (device, dtype) == (cfg.device, cfg.dtype):
        return []
    then = made_on(old)
    same = then is not None and (_ELSEWHERE.get() or then == runs_on(cfg))  # elsewhere: the cell decides
    return [dataclasses.replace(cfg, device=device, dtype=dtype)] if same else []


def other_device(cfg: RunConfig, old: rec.RunRecord) -> str | None:
    """'cpu in float32 there, cuda in bfloat16 here' when `old` was scored on another kind of device or in another
    dtype than this run would score (the same run key: `auto`), else None. Reused, its scores would sit beside this
    device's in one table, and a resumed folder would mix the two."""
    then = made_on(old)
    return differs(then, runs_on(cfg) if then is not None else None)


def differs(then, now) -> str | None:
    """'cpu in float32 there, cuda in bfloat16 here' when both (device type, dtype) are known and differ, else None;
    `then` as a record's environment or a resume state's `made_on` gives it."""
    if not then or not now or list(then) == list(now):
        return None
    return f"{then[0]} in {then[1]} there, {now[0]} in {now[1]} here"


def latency_measured_on(path: Path, old: rec.RunRecord, kind: str) -> None:
    """A finished record measured on another kind of device (`--device auto` is one configuration on a CPU and on a
    GPU) is not this run's measurement: reused, its milliseconds would sit beside this device's in one table."""
    then = str(old.environment.get("device") or "?").split(":")[0]
    if then != kind:
        raise UsageError(f"{path} holds a {old.method} latency record measured on {then}, and this run measures on "
                         f"{kind}; use another --out (or --device {then} on a machine that has it), or remove it")


def _device(kind: str):
    import torch

    return torch.device(kind)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
