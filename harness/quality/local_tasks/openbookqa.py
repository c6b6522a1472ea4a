"""`openbookqa`: OpenBookQA's test and dev splits (data folder `openbookqa/`), rows as lm-eval's `allenai/openbookqa`
(main) has them."""

from __future__ import annotations

from pathlib import Path

from harness.errors import UsageError
from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, answers, jsonl


def _rows(path: Path) -> list[dict]:
    out = []
    for n, r in enumerate(jsonl(path, ("id", "question", "answerKey")), 1):
        try:
            out.append({"id": r["id"], "question_stem": r["question"]["stem"],
                        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                    "label": [c["label"] for c in r["question"]["choices"]]},
                        "answerKey": r["answerKey"]})
        except (KeyError, TypeError) as e:
            raise UsageError(f"data file {path}, row {n}: missing field {e} (needs question.stem and question.choices "
                             "with text and label)") from None
    return out


@register_task
class OpenBookQA(LocalTask):
    name = "openbookqa"
    files = ("openbookqa/test.jsonl", "openbookqa/dev.jsonl")
    splits = ("test", "validation")
    upstream = "openbookqa/openbookqa.yaml"
    table_metric = "acc_norm"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        ok = lambda r: r["answerKey"] in r["choices"]["label"]  # noqa: E731
        return {split: answers(cls.path(data_dir, i), _rows(cls.path(data_dir, i)), ok,
                               "answerKey must be one of its choice labels") for i, split in enumerate(cls.splits)}
