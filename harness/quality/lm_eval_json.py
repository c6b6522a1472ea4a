"""Each (method, mode) cell's scores also in lm-eval's own results file schema.

lm-eval's `EvaluationTracker.save_results_aggregated` writes `results_<timestamp>.json` holding
`simple_evaluate`'s output ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
"higher_is_better", "n-samples", "config", "git_hash", "date", ...) plus its `GeneralConfigTracker`
fields. The harness evaluates one task per `simple_evaluate` call, so this merges the per-task parts
of one cell into one such file, at `<out>/lm_eval/<method>__<mode>/results_<timestamp>.json`, where
lm-eval's tooling (`lm_eval.utils.make_table`, leaderboards' loaders) reads it. The harness's
long-context tasks, which lm-eval does not run, appear under "results" with their metrics under the
filter "none". Numbers are lm-eval's own, unchanged: the record's scores are flattened from them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.quality.evaluate import LM_EVAL_PARTS
from harness.store.files import atomic_write

if TYPE_CHECKING:
    from harness.config import RunConfig


def results_dir(out_dir: Path, method: str, mode: str) -> Path:
    """`<out>/lm_eval/<method>__<mode>/` (method names such as `stage:sleb` made file-safe)."""
    return Path(out_dir) / "lm_eval" / f"{method}__{mode}".replace(":", "-").replace("/", "-")


def _merge_tasks(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's per-task parts merged over the cell's tasks; long-context tasks from their scores."""
    doc: dict[str, Any] = {part: {} for part in LM_EVAL_PARTS}
    for task, done in tasks.items():
        parts = done.get("lm_eval_results")
        if parts:
            for part in LM_EVAL_PARTS:
                doc[part].update(parts.get(part, {}))
            continue
        scores = {"alias": task}
        for metric, v in done.get("scores", {}).items():
            scores[f"{metric},none"] = v["value"]
            scores[f"{metric}_stderr,none"] = v["stderr"] if v.get("stderr") is not None else "N/A"
        doc["results"][task] = scores
        doc["versions"][task] = (done.get("harness_task") or {}).get("version")
        doc["n-shot"][task] = 0
        doc["higher_is_better"][task] = {}
        doc["n-samples"][task] = {"original": done.get("n_samples", 0), "effective": done.get("n_samples", 0)}
    return doc


def cell_results(cfg: RunConfig, method: str, mode: str, tasks: dict[str, dict[str, Any]], env: dict[str, Any],
                 extra: dict[str, Any]) -> dict[str, Any]:
    """One cell's results in lm-eval's results-file schema. `tasks` is the cell's per-task results (as
    kept in its `.partial.json`); `extra` holds run_key, max_length, batch_sizes, chat_template."""
    seconds = sum(float(t.get("seconds", 0.0)) for t in tasks.values())
    now = dt.datetime.now(dt.timezone.utc)
    template = extra.get("chat_template")
    packages = env.get("packages", {})
    doc = _merge_tasks(tasks)
    doc["config"] = {
        "model": cfg.model, "model_args": cfg.model_args, "batch_size": cfg.batch_size,
        "batch_sizes": extra.get("batch_sizes", []), "device": env.get("device", cfg.device), "use_cache": None,
        "limit": cfg.limit, "bootstrap_iters": cfg.bootstrap_iters, "gen_kwargs": None, "random_seed": cfg.seed,
        "numpy_seed": cfg.seed, "torch_seed": cfg.seed, "fewshot_seed": cfg.seed,
        # what lm-eval has no field for: which pruning cell produced these numbers
        "harness": {"method": method, "mode": mode, "run_key": extra.get("run_key"), "dtype": cfg.dtype,
                    "apply_chat_template": cfg.apply_chat_template},
    }
    doc.update({
        "git_hash": (env.get("git") or {}).get("commit"), "date": now.timestamp(), "task_hashes": {},
        "lm_eval_version": packages.get("lm_eval"), "transformers_version": packages.get("transformers"),
        "max_length": extra.get("max_length"),
        # EvaluationTracker's GeneralConfigTracker fields ("CUSTOM": an LM object, not a registered model name)
        "model_source": "CUSTOM", "model_name": cfg.model,
        "model_name_sanitized": cfg.model.replace("/", "__").replace(":", "__"),
        "system_instruction": None, "system_instruction_sha": None,
        "fewshot_as_multiturn": bool(cfg.apply_chat_template), "chat_template": template,
        "chat_template_sha": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "start_time": now.timestamp() - seconds, "end_time": now.timestamp(), "total_evaluation_time_seconds": str(seconds),
    })
    return doc


def write_cell_results(out_dir: Path, method: str, mode: str, doc: dict[str, Any]) -> Path:
    """Write `doc` as `results_<timestamp>.json` (lm-eval's file name: ISO time with ':' as '-'), the cell's
    only one: an earlier file (a run killed between it and the record, then rerun) is removed after it."""
    stamp = dt.datetime.now().isoformat().replace(":", "-")
    path = results_dir(out_dir, method, mode) / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    for old in path.parent.glob("results_*.json"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
