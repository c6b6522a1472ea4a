"""`mmlu`: MMLU's 57 subjects (data folder `mmlu/`: one CSV per subject and split), a group of lm-eval tasks
`mmlu_<subject>` whose rows are as lm-eval's `cais/mmlu` has them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harness.errors import UsageError
from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, text


def mmlu_subjects(data: Path) -> list[str]:
    """The subjects with a test file in `data`/mmlu/test, sorted."""
    test = data / "mmlu/test"
    if not test.is_dir():
        raise UsageError(f"data dir {data} has no mmlu/test folder (needed by task mmlu)")
    return sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))


def mmlu_rows(data: Path, subject: str, split_dir: str) -> list[dict]:
    path = data / "mmlu" / split_dir / f"{subject}_{split_dir}.csv"
    if not path.is_file():
        raise UsageError(f"missing data file {path} (needed by task mmlu_{subject})")
    rows = []
    reader = csv.reader(io.StringIO(text(path), newline=""))
    for row in reader:
        n = reader.line_num
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise UsageError(f"data file {path}, line {n}: expected 6 columns (question, 4 choices, answer A-D), "
                             f"got {len(row)} column(s){' ending in ' + repr(row[-1][:20]) if row else ''}")
        q, a, b, c, d, ans = row
        rows.append({"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())})
    return rows


@register_task
class Mmlu(LocalTask):
    name = "mmlu"
    files = ("mmlu/test", "mmlu/dev", "mmlu/val")
    splits = ("test", "dev", "validation")
    upstream = "mmlu/default/mmlu_{subtask}.yaml"  # its folder holds the group's own YAMLs too
    hub_subtasks = 57

    @classmethod
    def subtasks(cls, data_dir: Path) -> list[str]:
        return mmlu_subjects(data_dir)

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        data = Path(data_dir)
        return {split: mmlu_rows(data, subtask or "", d) for split, d in (("test", "test"), ("dev", "dev"),
                                                                           ("validation", "val"))}
