"""`hellaswag`: HellaSwag's validation split (data folder `hellaswag/`), rows as lm-eval's `Rowan/hellaswag` has them."""

from __future__ import annotations

from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, answers, jsonl


@register_task
class HellaSwag(LocalTask):
    name = "hellaswag"
    files = ("hellaswag/hellaswag_validation.jsonl",)
    splits = ("validation",)
    upstream = "hellaswag/hellaswag.yaml"
    table_metric = "acc_norm"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        path = cls.path(data_dir)
        rows = jsonl(path, ("activity_label", "ctx_a", "ctx_b", "endings", "label"))
        ok = lambda r: str(r["label"]) in {str(i) for i in range(len(r["endings"] or []))}  # lm-eval: int(label)  # noqa: E731
        return {"validation": answers(path, rows, ok, "label must index its endings")}
