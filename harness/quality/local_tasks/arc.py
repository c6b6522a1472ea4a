"""`arc_easy`, `arc_challenge`: AI2 ARC's test split (data folders `arc_easy/`, `arc_challenge/`), rows as lm-eval's
`allenai/ai2_arc` dataset has them."""

from __future__ import annotations

from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, answers, jsonl

FIELDS = ("question", "choices", "answerKey")


def _labels(row: dict) -> list:
    return row["choices"].get("label", []) if isinstance(row["choices"], dict) else []


@register_task
class ArcEasy(LocalTask):
    name = "arc_easy"
    files = ("arc_easy/ARC-Easy-test.jsonl",)
    splits = ("test",)
    upstream = "arc/arc_easy.yaml"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        path = cls.path(data_dir)
        return {"test": answers(path, jsonl(path, FIELDS), lambda r: r["answerKey"] in _labels(r),
                                lambda r: f"answerKey {r['answerKey']!r} is not one of its choice labels {_labels(r)}")}


@register_task
class ArcChallenge(ArcEasy):
    name = "arc_challenge"
    files = ("arc_challenge/ARC-Challenge-test.jsonl",)
    upstream = "arc/arc_challenge.yaml"
    table_metric = "acc_norm"
