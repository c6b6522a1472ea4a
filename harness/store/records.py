"""`RunRecord`: one (method, mode) result with its config, plan and environment; JSON on disk.

Torch-free on purpose: `reports/` reads records through this module. Files are written atomically
(temp file + rename, harness/store/files.py), so an interrupted run never leaves a half-written record.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.store.files import atomic_write  # noqa: F401 - writers import it from here
from harness.store.task_names import LEGACY_PRESENTATION, TaskPresentation

SCHEMA_VERSION = 1

# Metric shown for a task when a table needs one number (lm-eval's usual reporting convention).
PRIMARY_METRIC = {
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "wikitext": "word_perplexity",
    "lambada_openai": "acc",
}  # long-context tasks name theirs in their presentation (harness/quality/long_tasks/, task_names.LEGACY_PRESENTATION)
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ppl"}


def primary_metric(task: str, record: RunRecord | None = None) -> str:
    """The task's one number: a long-context task's from its presentation (in `record` when given), else
    lm-eval's usual convention."""
    pres = task_presentation(record, task) if record is not None else LEGACY_PRESENTATION.get(task)
    return pres.primary_metric if pres else PRIMARY_METRIC.get(task, "acc")


def task_presentation(record: RunRecord, task: str) -> TaskPresentation | None:
    """How reports show long-context `task` of `record`: the presentation the pipeline stored with it,
    the legacy fallback for records older than that, or None (not a long-context task)."""
    return stored_presentation(record, task) or LEGACY_PRESENTATION.get(task)


def stored_presentation(record: RunRecord, task: str) -> TaskPresentation | None:
    """The presentation the pipeline stored with `record` for long-context `task` (None in older records)."""
    stored = (record.lm_eval.get("tasks", {}).get(task) or {}).get("harness_task", {}).get("presentation")
    return TaskPresentation.from_dict(stored) if stored else None


def is_long_task(record: RunRecord, task: str) -> bool:
    """A harness long-context task (not an lm-eval task) in `record`."""
    return task_presentation(record, task) is not None


@dataclass
class RunRecord:
    """Result of one method in one mode.

    `scores[task][metric] = {"value": float, "stderr": float | None}`;
    `kv[task]` = {"kv_bytes", "kv_bytes_paged", "handoffs", "prompt_tokens"} for that task's
    evaluation (empty in unified mode, where nothing is handed over).
    """

    method: str
    mode: str
    run_key: str
    config: dict[str, Any]
    plan: dict[str, Any]
    environment: dict[str, Any]
    model: dict[str, Any]
    calibration: dict[str, Any] | None
    scores: dict[str, dict[str, dict[str, float | None]]]
    kv: dict[str, dict[str, int]]
    n_samples: dict[str, int]
    lm_eval: dict[str, Any]
    timing_s: dict[str, float]
    created: str
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return record_filename(self.method, self.mode)

    def kv_bytes_total(self) -> int | None:
        if not self.kv:
            return None
        return sum(v["kv_bytes"] for v in self.kv.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> RunRecord:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{source}: record schema {d.get('schema_version')!r}, this harness reads {SCHEMA_VERSION}")
        fields = cls.__dataclass_fields__
        missing = [n for n, f in fields.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"{source}: not a run record (missing {', '.join(sorted(missing))})")
        return cls(**{k: v for k, v in d.items() if k in fields})


def record_filename(method: str, mode: str) -> str:
    return f"{method}__{mode}.json"


def failure_filename(method: str, mode: str) -> str:
    return f"{method}__{mode}.failed.json"


def is_record_file(path: Path) -> bool:
    """A finished record's file (not a `.partial.json` resume file, a `.failed.json` note or a temp file)."""
    name = Path(path).name
    return "__" in name and name.endswith(".json") and not name.startswith(".") \
        and not name.endswith((".partial.json", ".failed.json"))


def save(record: RunRecord, out_dir: Path) -> Path:
    path = out_dir / record.filename
    atomic_write(path, record.to_json())
    return path


def load(path: Path) -> RunRecord:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable record ({e})") from e
    return RunRecord.from_dict(d, str(path))


def load_dir(out_dir: Path) -> list[RunRecord]:
    return [load(p) for p in sorted(Path(out_dir).glob("*__*.json")) if is_record_file(p)]


def save_failure(out_dir: Path, method: str, mode: str, run_key: str, error: BaseException, tb: str,
                 created: str) -> Path:
    """Note that a (method, mode) cell failed: its error and traceback, for the summary and a rerun."""
    path = Path(out_dir) / failure_filename(method, mode)
    atomic_write(path, json.dumps({
        "schema_version": SCHEMA_VERSION, "kind": "failed_cell", "method": method, "mode": mode, "run_key": run_key,
        "error_type": type(error).__name__, "error": str(error)[:2000], "traceback": tb[-8000:], "created": created,
    }, indent=2))
    return path


def load_failures(out_dir: Path) -> list[dict[str, Any]]:
    """The failed-cell notes in `out_dir` (cells that failed and have not succeeded since)."""
    out = []
    for p in sorted(Path(out_dir).glob("*__*.failed.json")):
        try:
            out.append({**json.loads(p.read_text(encoding="utf-8")), "file": str(p)})
        except (OSError, json.JSONDecodeError):
            continue
    return out


SUMMARY_COLUMNS = ["method", "mode", "task", "metric", "value", "stderr", "kv_bytes_sent", "kv_bytes_sent_paged",
                   "n_samples", "primary", "model", "removed_prefill", "removed_decode", "run_key"]


def summary_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """Tidy rows: one per (method, mode, task, metric)."""
    rows = []
    for r in records:
        for task, metrics in r.scores.items():
            kv = r.kv.get(task, {})
            for metric, v in metrics.items():
                rows.append({
                    "method": r.method, "mode": r.mode, "task": task, "metric": metric,
                    "value": v["value"], "stderr": v.get("stderr"),
                    "kv_bytes_sent": kv.get("kv_bytes", ""), "kv_bytes_sent_paged": kv.get("kv_bytes_paged", ""),
                    "n_samples": r.n_samples.get(task, ""), "primary": metric == primary_metric(task, r),
                    "model": r.config.get("model", ""),
                    "removed_prefill": " ".join(map(str, r.plan.get("removed_prefill", []))),
                    "removed_decode": " ".join(map(str, r.plan.get("removed_decode", []))),
                    "run_key": r.run_key,
                })
    return rows


def write_summary(records: list[RunRecord], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in summary_rows(records):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())
    return path
