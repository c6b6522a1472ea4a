"""Reusing finished work: plans stored by another run (`--plans-from`) and records made before a
method gained options that are now at their defaults (an added option must not invalidate them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.errors import UsageError
from harness.pd.plan import PruningPlan
from harness.store import records as rec


def stored_plan(cfg: RunConfig, prepared, name: str, mode: str, options: dict) -> tuple[PruningPlan, Path, Any] | None:
    """The plan of `name`/`mode` in `--plans-from` records, if made on the same model, seed, method
    options and calibration (plans are deterministic given those); None otherwise."""
    if not cfg.plans_from or prepared.methods[name].needs_replan_on_resume():
        return None
    path = Path(cfg.plans_from) / rec.record_filename(name, mode)
    if not path.exists():
        return None
    try:
        old = rec.load(path)
    except rec.RecordError as e:
        raise UsageError(f"--plans-from: {e}; remove that file or pick another run folder") from None
    calib_now = dataclasses.asdict(prepared.calib_config) if prepared.methods[name].needs_calibration else None
    calib_then = {k: (old.calibration or {}).get(k) for k in calib_now} if calib_now else None
    if (old.config.get("model"), old.config.get("seed")) != (cfg.model, cfg.seed):
        return None
    # options added to a method since the record was made count as matching at their defaults
    defaults = json.loads(json.dumps(dataclasses.asdict(type(prepared.methods[name].config)())))
    then = {**{k: v for k, v in defaults.items() if k not in old.config.get("method_options", {})},
            **old.config.get("method_options", {})}
    if then != json.loads(json.dumps(options)):
        return None
    if calib_now and json.loads(json.dumps(calib_now)) != calib_then:
        return None
    return plan_of(old, path), path, old.calibration


def plan_of(record: rec.RunRecord, path: Path) -> PruningPlan:
    """The plan stored in a --plans-from record, or a UsageError naming the file."""
    try:
        return PruningPlan.from_dict(record.plan)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--plans-from {path}: its plan is not valid ({type(e).__name__}: {e}); "
                         "remove that record or pick another run folder") from None


def same_but_newer_options(cfg: RunConfig, method, old: rec.RunRecord, cell: tuple) -> bool:
    """True when `old` was made by this configuration before some method options existed and
    those options are now at their defaults (an added option must not invalidate finished work)."""
    name, mode, calib_desc, task_opts = cell
    then = old.config.get("method_options", {})
    now = json.loads(json.dumps(method.options()))
    defaults = json.loads(json.dumps(dataclasses.asdict(type(method.config)())))
    added = set(now) - set(then)
    if not added or any(now[k] != defaults.get(k) for k in added) or any(now.get(k) != v for k, v in then.items()):
        return False
    return cfg.identity(name, mode, then, calib_desc, task_opts) == old.run_key
