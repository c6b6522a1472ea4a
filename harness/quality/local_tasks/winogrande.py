"""`winogrande`: WinoGrande's dev split (data folder `winogrande/`), lm-eval's validation split."""

from __future__ import annotations

from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, answers, jsonl


@register_task
class WinoGrande(LocalTask):
    name = "winogrande"
    files = ("winogrande/dev.jsonl",)
    splits = ("validation",)
    upstream = "winogrande/default.yaml"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        path = cls.path(data_dir)
        rows = jsonl(path, ("sentence", "option1", "option2", "answer"))
        return {"validation": answers(path, rows, lambda r: r["answer"] in ("1", "2"), "answer must be the string '1' or '2'")}
