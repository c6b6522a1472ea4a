"""`piqa`: PIQA's validation split (data folder `piqa/`: questions and a separate label file), rows as lm-eval's
`baber/piqa` has them (the label joined to its row)."""

from __future__ import annotations

from pathlib import Path

from harness.errors import UsageError
from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, jsonl, text


@register_task
class Piqa(LocalTask):
    name = "piqa"
    files = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    splits = ("validation",)
    upstream = "piqa/piqa.yaml"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        rows, labels_file = jsonl(cls.path(data_dir), ("goal", "sol1", "sol2")), cls.path(data_dir, 1)
        try:
            labels = [int(x) for x in text(labels_file).split()]
            bad = [y for y in labels if y not in (0, 1)]
            if bad:
                raise ValueError(f"label {bad[0]}")
        except ValueError as e:
            raise UsageError(f"data file {labels_file}: expected one 0/1 label per line ({e})") from None
        if len(rows) != len(labels):
            raise UsageError(f"{labels_file.parent}: valid.jsonl has {len(rows)} rows but valid-labels.lst has {len(labels)}")
        return {"validation": [{**r, "label": y} for r, y in zip(rows, labels)]}
