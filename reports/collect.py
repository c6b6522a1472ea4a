"""Gather run records from result folders for reporting (torch-free).

A report may combine several folders (e.g. a quality run and a latency run). Records are split by
kind: latency records carry `config.kind == "latency"`, everything else is a quality record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.records import RunRecord, is_record_file, load

# Metric shown per task under each named convention. `paper` is lm-eval's usual reporting (and the
# PDTrim / ShortGPT papers'): length-normalised accuracy where answer lengths differ a lot.
CONVENTIONS: dict[str, dict[str, str]] = {
    "paper": {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
    "acc_norm": {},  # acc_norm wherever the task reports it
    "acc": {},  # acc everywhere
}
CONVENTION_TEXT = {
    "paper": "acc_norm for HellaSwag, ARC-Challenge and OpenBookQA, acc elsewhere",
    "acc_norm": "acc_norm wherever the task reports it, acc elsewhere",
    "acc": "acc everywhere",
}


class ReportError(ValueError):
    """Bad report input (missing folder, unreadable record, unknown convention); the CLI exits 2."""


def metric_for(task: str, available: dict, convention: str) -> str | None:
    """The metric to show for `task` given the metrics a record has. Tasks without acc/acc_norm
    (perplexities, long-context tasks) keep their primary metric."""
    from harness.records import primary_metric

    if convention not in CONVENTIONS:
        raise ReportError(f"unknown metric convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    if "acc" not in available and "acc_norm" not in available:
        m = primary_metric(task)
        return m if m in available else None
    if convention == "acc":
        want = "acc"
    elif convention == "acc_norm":
        want = "acc_norm" if "acc_norm" in available else "acc"
    else:
        want = CONVENTIONS["paper"].get(task, "acc")
    return want if want in available else None


@dataclass
class Collection:
    quality: list[RunRecord] = field(default_factory=list)
    latency: list[RunRecord] = field(default_factory=list)
    sources: dict[int, Path] = field(default_factory=dict)  # id(record) -> file

    def source(self, r: RunRecord) -> Path:
        return self.sources[id(r)]

    @property
    def all(self) -> list[RunRecord]:
        return [*self.quality, *self.latency]

    def label(self, r: RunRecord) -> str:
        """Method name, plus the folder name when the same (model, method, mode, kind) occurs in
        several folders (e.g. a --limit 100 and a --limit 1000 run)."""
        same = [o for o in (self.latency if is_latency(r) else self.quality)
                if (model_name(o), o.method, o.mode) == (model_name(r), r.method, r.mode)]
        return r.method if len(same) < 2 else f"{r.method} ({self.source(r).parent.name})"


def is_latency(r: RunRecord) -> bool:
    return r.config.get("kind") == "latency"


def model_name(r: RunRecord) -> str:
    return str(r.model.get("name") or r.config.get("model") or "?")


def record_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ReportError(f"{path}: no such file or folder (give folders of run records, e.g. results/issue3/default)")
    return sorted(p for p in path.rglob("*__*.json") if is_record_file(p))


def collect(paths: list[Path]) -> Collection:
    """Load every record under `paths` (folders are searched recursively)."""
    col = Collection()
    for path in paths:
        files = record_files(Path(path))
        if not files:
            raise ReportError(f"{path}: no run records (<method>__<mode>.json) found")
        for f in files:
            try:
                r = load(f)
            except ValueError as e:
                raise ReportError(str(e)) from None
            (col.latency if is_latency(r) else col.quality).append(r)
            col.sources[id(r)] = f
    return col
