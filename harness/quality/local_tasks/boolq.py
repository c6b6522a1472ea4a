"""`boolq`: BoolQ's dev split (data folder `boolq/`), rows as SuperGLUE's boolq (what lm-eval reads) has them."""

from __future__ import annotations

from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, jsonl


@register_task
class BoolQ(LocalTask):
    name = "boolq"
    files = ("boolq/dev.jsonl",)
    splits = ("validation",)
    upstream = "super_glue/boolq/default.yaml"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        # SuperGLUE's boolq prefixes the passage with its title
        rows = jsonl(cls.path(data_dir), ("question", "passage", "title", "answer"))
        return {"validation": [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}",
                                "idx": i, "label": int(bool(r["answer"]))} for i, r in enumerate(rows)]}
