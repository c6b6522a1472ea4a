"""Digests of a run's inputs that its configuration names only by path: the model's weights and the data
files of its tasks. A record keeps them (`extra.inputs`), so a rerun after the files behind a path
changed does not reuse records made from the old files, and `--plans-from` does not replay a plan
made on other weights (run keys name the path, not the content)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from harness.errors import UsageError


def _files_sha256(paths: list[Path]) -> str:
    """sha256 (16 hex) of the files under `paths` (files, or folders read recursively), names and bytes."""
    h = hashlib.sha256()
    for root in paths:
        for f in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            h.update(f"{f.relative_to(root.parent)}\0".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def task_data_files(task: str, data_dir: Path) -> list[Path]:
    """The files (or folders) `task` reads from `data_dir`: an lm-eval task's local data, or a long-context
    task's `data_files` (none for a synthetic task such as passkey)."""
    from harness.quality import long_tasks
    from harness.quality.tasks import TASK_FILES

    rel = TASK_FILES[task][0] if task in TASK_FILES else long_tasks.get(task).data_files if long_tasks.is_long_task(task) else ()
    return [data_dir / r for r in rel if (data_dir / r).exists()]


def weights_fingerprint(model) -> str:
    """sha256 (16 hex) of the parameters' names, shapes and a few values of each, rounded to bfloat16: the same
    weights give the same digest wherever the files lie (a moved cache) and in whichever dtype they were loaded."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"|{name}:{tuple(p.shape)}".encode())
            if p.numel():
                flat = p.detach().reshape(-1)
                h.update(torch.cat([flat[:8], flat[-8:]]).to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def digests(cfg, model) -> dict[str, Any]:
    """{"model": the weights' fingerprint (None with a --device-map: offloaded weights are not all in memory),
    "data": {task: sha256 of its files}} for the run's tasks."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    data = {t: _files_sha256(files) for t in cfg.tasks if data_dir and (files := task_data_files(t, data_dir))}
    return {"model": None if cfg.device_map else weights_fingerprint(model), "data": data}


def differences(then: dict | None, now: dict) -> list[str]:
    """What differs between the inputs a record or resume state was made from and this run's (nothing when it
    predates digests, or for a digest either side lacks)."""
    if not then:
        return []
    out = []
    if then.get("model") and now.get("model") and then["model"] != now["model"]:
        out.append(f"the model's weights (fingerprint {then['model']} then, {now['model']} now)")
    changed = sorted(t for t, d in (then.get("data") or {}).items() if now["data"].get(t) not in (None, d))
    if changed:
        out.append(f"the data files of {', '.join(changed)}")
    return out


def refuse_stale_work(out_dir: Path, cells: list[tuple[str, str]], now: dict) -> None:
    """A UsageError naming every record or resume state of `cells` ((name, mode)) in `out_dir` made from other
    files behind the same paths: reusing them would mix old and new inputs under one configuration."""
    import json

    from harness.store import records as rec

    found = []
    for name, mode in cells:
        for path in (out_dir / rec.record_filename(name, mode), out_dir / rec.partial_filename(name, mode)):
            try:
                doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            except (OSError, ValueError):
                continue  # unreadable: the run's own checks name it
            then = (doc.get("extra") or {}).get("inputs") if path.name.endswith("__" + mode + ".json") else doc.get("inputs")
            why = differences(then, now) if isinstance(then, dict) else []
            if why:
                found.append(f"{path.name} ({'; '.join(why)} changed)")
    if found:
        raise UsageError(f"{out_dir} holds work made from other files behind the same paths: {', '.join(found)}; "
                         "use another --out, or remove those files to redo them")
