"""`RunRecord`: one (method, mode) result with its config, plan and environment; JSON on disk.

Torch-free on purpose: `reports/` reads records through this module. Files are written atomically
(temp file + rename, harness/store/files.py), so an interrupted run never leaves a half-written record.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.store.files import atomic_write  # noqa: F401 - writers import atomic_write from here
from harness.store.folders import check_writable, refuse_dangling_link  # noqa: F401 - callers import them from here
from harness.store.latency import WorkloadLatency, upgrade_v1
from harness.store.record_shape import check_nested, is_counts
from harness.store.task_names import LEGACY_PRESENTATION, TaskPresentation

SCHEMA_VERSION = 2  # 2: latency figures are a typed field (`latency`), no longer fake scores
READABLE_SCHEMAS = {1: upgrade_v1, 2: lambda d: d}  # version -> converter to the current form

# Metric shown for a task when a table needs one number (lm-eval's usual reporting convention), for records
# without `lm_eval.metric_convention` and for lm-eval tasks the harness defines nothing for (read from the hub). An
# lm-eval task on local data names its own (`table_metric`, harness/quality/local_tasks/), which each record stores.
PRIMARY_METRIC = {
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "wikitext": "word_perplexity",
    "lambada_openai": "acc",
}  # long-context tasks name theirs in their presentation (harness/quality/long_tasks/, task_names.LEGACY_PRESENTATION)
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ppl"}


def primary_metric(task: str, record: RunRecord | None = None) -> str:
    """The task's one number: a long-context task's from its presentation (in `record` when given), else the one
    `record` stored for it (`lm_eval.metric_convention`: a plug-in lm-eval task's `table_metric`), else lm-eval's
    usual convention."""
    pres = task_presentation(record, task) if record is not None else LEGACY_PRESENTATION.get(task)
    if pres:
        return pres.primary_metric
    stored = (record.lm_eval.get("metric_convention") or {}).get(task) if record is not None else None
    return stored if isinstance(stored, str) and stored else PRIMARY_METRIC.get(task, "acc")


def task_presentation(record: RunRecord, task: str) -> TaskPresentation | None:
    """How reports show long-context `task` of `record`: the presentation the pipeline stored with it,
    the legacy fallback for records older than that, or None (not a long-context task)."""
    return stored_presentation(record, task) or LEGACY_PRESENTATION.get(task)


def stored_presentation(record: RunRecord, task: str) -> TaskPresentation | None:
    """The presentation the pipeline stored with `record` for long-context `task` (None in older records)."""
    stored = (record.lm_eval.get("tasks", {}).get(task) or {}).get("harness_task", {}).get("presentation")
    return TaskPresentation.from_dict(stored) if stored else None


def lower_is_better(record: RunRecord, task: str, metric: str) -> bool:
    """A perplexity-like metric: a named one (LOWER_IS_BETTER), or a lower-is-better long-context task's primary
    metric and its per-setting scores (pd_ppl's `ppl_T2048`: the presentation's setting_prefix)."""
    if metric in LOWER_IS_BETTER:
        return True
    p = task_presentation(record, task)
    return bool(p and p.lower_is_better and (metric == p.primary_metric or metric.startswith(p.setting_prefix)))


def is_long_task(record: RunRecord, task: str) -> bool:
    """A harness long-context task (not an lm-eval task) in `record`."""
    return task_presentation(record, task) is not None


@dataclass
class RunRecord:
    """Result of one method in one mode.

    `scores[task][metric] = {"value": float, "stderr": float | None}`;
    `kv[task]` = {"kv_bytes", "kv_bytes_paged", "handoffs", "prompt_tokens"} for that task's
    evaluation (empty in unified mode, where nothing is handed over). A latency record (`config.kind
    == "latency"`) has no scores: `latency[workload]` holds its figures and raw samples, `kv[workload]`
    its bytes.
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
    latency: dict[str, WorkloadLatency] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return record_filename(self.method, self.mode)

    def kv_bytes_total(self) -> int | None:
        if not self.kv:
            return None
        return sum(v["kv_bytes"] for v in self.kv.values())

    def inputs(self) -> dict:
        """The digests of the inputs this record was made from (`extra.inputs`: weights, data, calibration data,
        plug-in code; harness/run/inputs.py); {} for records made before them."""
        return (self.extra or {}).get("inputs") or {}

    def model_location(self) -> str | None:
        """The resolved path of the model folder or GGUF file this record was made with (`config.model` keeps it
        as typed); None for a packaged model (the default: its file lies in whichever environment loads it), a hub
        id or a random preset."""
        desc = self.model or {}
        if desc.get("package"):
            return None
        return {"directory": desc.get("path"), "gguf": desc.get("gguf")}.get(desc.get("kind"))

    def figure(self, workload: str, name: str) -> float | None:
        """A latency figure (e.g. `ttft_ms_p50`) of `workload`, None when the record has none."""
        wl = self.latency.get(workload)
        return wl.get(name) if wl is not None else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> RunRecord:
        """The record in `d`, its structure checked (a `RecordError` naming `source` and the field otherwise);
        older schemas are converted to the current form (`READABLE_SCHEMAS`)."""
        if not isinstance(d, dict):
            raise RecordError(f"{source}: not a run record (a JSON {type(d).__name__}, expected an object)")
        version = d.get("schema_version")
        upgrade = READABLE_SCHEMAS.get(version) if type(version) is int else None  # a list or a bool is no version
        if upgrade is None:
            raise RecordError(f"{source}: record schema {d.get('schema_version')!r}, this harness reads "
                              f"{', '.join(map(str, READABLE_SCHEMAS))}")
        fields = cls.__dataclass_fields__
        missing = [n for n, f in fields.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise RecordError(f"{source}: not a run record (missing {', '.join(sorted(missing))})")
        _check_types(d, source)
        try:
            check_nested(d)
        except ValueError as e:
            raise RecordError(f"{source}: {e}") from None
        d = upgrade(d)
        kept = {k: v for k, v in d.items() if k in fields}
        try:
            kept["latency"] = {k: WorkloadLatency.from_dict(v) for k, v in kept.get("latency", {}).items()}
        except (AttributeError, KeyError, TypeError) as e:
            raise RecordError(f"{source}: field 'latency' is not an object of workloads ({e})") from None
        return cls(**kept)


class RecordError(UsageError):
    """A file that is not a readable run record of this schema; the message names the file and what is wrong
    (bad input: a command that meets one it cannot skip exits 2 with this message)."""


# JSON type of each top-level field (readers index into these without further checks)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "mode": (str,), "run_key": (str,), "created": (str,), "config": (dict,), "plan": (dict,),
    "environment": (dict,), "model": (dict,), "calibration": (dict, type(None)), "scores": (dict,), "kv": (dict,),
    "n_samples": (dict,), "lm_eval": (dict,), "timing_s": (dict,), "extra": (dict,),
}


def _check_types(d: dict[str, Any], source: str) -> None:
    """Field types of a record, down to each score (`scores[task][metric]["value"]` a number or null)."""
    for name, types in _FIELD_TYPES.items():
        if name in d and not isinstance(d[name], types):
            want = " or ".join("null" if t is type(None) else {dict: "an object", str: "a string"}[t] for t in types)
            raise RecordError(f"{source}: field {name!r} is a JSON {type(d[name]).__name__}, expected {want}")
    for task, metrics in d["scores"].items():
        if not isinstance(metrics, dict):
            raise RecordError(f"{source}: scores[{task!r}] is not an object of metrics")
        for metric, v in metrics.items():
            ok = isinstance(v, dict) and "value" in v and all(isinstance(v.get(k), (int, float, type(None))) and not isinstance(v.get(k), bool)
                                             for k in ("value", "stderr"))
            if not ok:
                raise RecordError(f"{source}: scores[{task!r}][{metric!r}] must be {{\"value\": number, \"stderr\": number "
                                  f"or null}}, got {json.dumps(v, default=str)[:80]}")
    for task, v in d["kv"].items():
        if not is_counts(v):
            raise RecordError(f"{source}: kv[{task!r}] must be an object of integer counts with kv_bytes")


def non_finite_scores(r: RunRecord) -> list[str]:
    """'task metric value nan' for each score or stderr of `r` that is a number but not a finite one."""
    return [f"{task} {m} {k} {v[k]}" for task, metrics in r.scores.items() for m, v in metrics.items() for k in ("value", "stderr")
            if isinstance(v.get(k), float) and not math.isfinite(v[k])]


def one_of_a_cell(first: Path, first_record: RunRecord, second: Path, second_record: RunRecord) -> tuple[Path, Path, str]:
    """(kept, dropped, why) for two records of one cell read from one folder (a renamed copy beside a record, whose rows
    could not be told apart from its): the one in the cell's own file name is kept, else the first read. `report`
    and `load_results` keep the same one and say the same of the other."""
    keep_second = second.name == second_record.filename and first.name != first_record.filename
    kept, dropped = (second, first) if keep_second else (first, second)
    return kept, dropped, (f"{dropped}: a second record of {second_record.method}/{second_record.mode} in its folder, "
                           f"beside {kept.name} (one record per method and PD setting in a folder); skipped")


def cell_key(r: RunRecord) -> str:
    """'kind/method/mode' (`quality/pdtrim/disaggregated`): the cell a record is of, whatever folder holds it."""
    return f"{r.config.get('kind', 'quality')}/{r.method}/{r.mode}"


def record_filename(method: str, mode: str) -> str:
    return f"{method}__{mode}.json"


def failure_filename(method: str, mode: str) -> str:
    return f"{method}__{mode}.failed.json"


def partial_filename(method: str, mode: str) -> str:
    """A cell's resume state while its tasks run (`harness.run.pipeline`); removed once its record is written."""
    return f"{method}__{mode}.partial.json"


def is_record_file(path: Path) -> bool:
    """A finished record's file (not a `.partial.json` resume file, a `.failed.json` note or a temp file)."""
    name = Path(path).name
    return "__" in name and name.endswith(".json") and not name.startswith(".") \
        and not name.endswith((".partial.json", ".failed.json"))


def record_files_under(folder: Path) -> list[Path]:
    """Every finished record's file under `folder`, searched recursively, in path order."""
    return sorted(p for p in run_files_under(folder) if is_record_file(p))


def unfinished_cells(folder: Path) -> list[str]:
    """'method/mode' of each cell under `folder` that has a resume state (`.partial.json`) and no record yet: a run
    interrupted or still running, which its command resumes."""
    return sorted({p.name[:-len(".partial.json")].replace("__", "/", 1) for p in run_files_under(folder)
                   if p.name.endswith(".partial.json") and not p.name.startswith(".")
                   and not p.with_name(p.name[:-len(".partial.json")] + ".json").exists()})


def unfinished_hint(folder: Path) -> str:
    """'; cells not finished there: a/b, c/d (rerun the command that made them to finish them)', or ''."""
    cells = unfinished_cells(folder)
    return (f"; cells not finished there: {', '.join(cells)} (rerun the command that made them to finish them)"
            if cells else "")


def run_files_under(folder: Path) -> Iterator[Path]:
    """The files runs leave under `folder`, searched recursively (a sweep's cells too): records, resume states
    (`.partial.json`) and failed-cell notes (`.failed.json`), all named `<method>__<mode>...json`.

    os.walk, not rglob: a folder removed while it is listed (a `check --update` or an export swapping theirs
    beside it) is skipped, where rglob raises FileNotFoundError on Python 3.11."""
    for top, _dirs, names in os.walk(folder):  # regular files only: reading a FIFO named like a record waited forever
        yield from (p for n in names if "__" in n and n.endswith(".json") and (p := Path(top) / n).is_file())


def save(record: RunRecord, out_dir: Path) -> Path:
    path = out_dir / record.filename
    atomic_write(path, record.to_json())
    return path


def load(path: Path) -> RunRecord:
    """The record in `path`; a `RecordError` naming the file when it is not a readable record of this schema."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable record ({e})") from e
    return RunRecord.from_dict(d, str(path))


def load_cell(path: Path) -> RunRecord:
    """The record a run found at its own cell's `path`; unreadable, it is refused rather than overwritten."""
    try:
        return load(path)
    except RecordError as e:
        raise UsageError(f"{e}: this run would replace it; move it away (or use another --out) and rerun") from None


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_dir(out_dir: Path, warn: Callable[[str], None] | None = None) -> list[RunRecord]:
    """The finished records in `out_dir`. Without `warn` an unreadable one raises its `RecordError`; with it,
    that file is skipped and `warn` gets one line naming it (one bad file must not hide the others)."""
    out = []
    for p in sorted(Path(out_dir).glob("*__*.json")):
        if not is_record_file(p):
            continue
        try:
            out.append(load(p))
        except RecordError as e:
            if warn is None:
                raise
            warn(f"{e}; skipped")
    return out


def refresh_summary(out_dir: Path, warn: Callable[[str], None] = warn_stderr) -> Path:
    """Rewrite `out_dir/summary.csv` from every readable record there (unreadable ones skipped with a warning)."""
    return write_summary(load_dir(out_dir, warn), Path(out_dir) / "summary.csv")


def save_failure(out_dir: Path, method: str, mode: str, run_key: str, error: BaseException, tb: str,
                 created: str, **about: str) -> Path:
    """Note that a (method, mode) cell failed: its error and traceback, for the summary, a rerun and the report's notes;
    `about`: what else the report says of it (a latency run's `run="latency"` and the `plugin` code blamed)."""
    path = Path(out_dir) / failure_filename(method, mode)
    atomic_write(path, json.dumps({
        "schema_version": SCHEMA_VERSION, "kind": "failed_cell", "method": method, "mode": mode, "run_key": run_key,
        "error_type": type(error).__name__, "error": str(error)[:2000], "traceback": tb[-8000:], "created": created,
        **about,
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
    """Tidy rows: one per (method, mode, task, metric); a latency figure is a row of its workload."""
    rows = []
    for r in records:
        for task, metrics in r.scores.items():
            rows += [_summary_row(r, task, metric, v["value"], v.get("stderr")) for metric, v in metrics.items()]
        for label, wl in r.latency.items():
            rows += [_summary_row(r, label, name, value, None) for name, value in wl.figures.items()]
    return rows


def _summary_row(r: RunRecord, task: str, metric: str, value: float | None, stderr: float | None) -> dict[str, Any]:
    kv = r.kv.get(task, {})
    return {
        "method": r.method, "mode": r.mode, "task": task, "metric": metric, "value": value, "stderr": stderr,
        "kv_bytes_sent": kv.get("kv_bytes", ""), "kv_bytes_sent_paged": kv.get("kv_bytes_paged", ""),
        "n_samples": r.n_samples.get(task, ""), "primary": metric == primary_metric(task, r),
        "model": r.config.get("model", ""),
        "removed_prefill": " ".join(map(str, r.plan.get("removed_prefill", []))),
        "removed_decode": " ".join(map(str, r.plan.get("removed_decode", []))),
        "run_key": r.run_key,
    }


def write_summary(records: list[RunRecord], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in summary_rows(records):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())
    return path
