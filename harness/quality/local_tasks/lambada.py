"""`lambada_openai`: LAMBADA's test split in OpenAI's detokenised form (data folder `lambada/`)."""

from __future__ import annotations

from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, jsonl


@register_task
class LambadaOpenAI(LocalTask):
    name = "lambada_openai"
    files = ("lambada/lambada_test.jsonl",)
    splits = ("test",)
    upstream = "lambada/lambada_openai.yaml"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        return {"test": jsonl(cls.path(data_dir), ("text",))}
