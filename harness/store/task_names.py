"""Task names and the torch-free description of how a long-context task's results are shown.

Store-level on purpose (no torch, no `harness.config`, no `harness.quality.long_tasks`): `reports/` learns
how to render a long-context task from the `TaskPresentation` that the pipeline writes into each
record (`lm_eval.tasks[TASK].harness_task.presentation`). Records written before that field
existed are rendered with `LEGACY_PRESENTATION`, the fallback for the two tasks that existed then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# lm-eval multiple-choice tasks with local data, in the order tables show them (the `standard` alias).
STANDARD_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")

METRIC_FORMATS = ("decimal", "percent")  # decimal: the value, 2 decimals; percent: ×100, 1 decimal


@dataclass(frozen=True)
class TaskPresentation:
    """How the long-context table shows one task (stored in its records, so reports need no task code).

    Per-setting scores are named `setting_prefix` + number (`ppl_T2048`); the setting is the last
    letter of the prefix and the number (`T2048`), which also keys `extra.kv_by_setting[task]`.
    """

    title: str  # column head before the setting: "PPL" -> "PPL T2048"
    setting_prefix: str  # per-setting score names start with it, e.g. "ppl_T"
    primary_metric: str  # the one number for the task (pooled over settings)
    metric_format: str = "percent"  # one of METRIC_FORMATS
    lower_is_better: bool = False  # which end of a column is bold
    # caption sentence; {OPTION} or {OPTION|TEXT} is filled with the distinct values of that option over
    # the table's records ("128/256"), or TEXT when no record of the task has one
    caption: str = ""
    column_order: int = 100  # tasks' column blocks sort by (column_order, task name)

    def __post_init__(self) -> None:
        if self.metric_format not in METRIC_FORMATS:
            raise ValueError(f"metric_format {self.metric_format!r}: expected one of {', '.join(METRIC_FORMATS)}")
        if not self.setting_prefix:
            raise ValueError("setting_prefix must not be empty (its last letter names the setting)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskPresentation:
        """Ignores keys this version does not know (records written by a newer harness still render)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fallback for records written before tasks stored their presentation (results/reference, issue3,
# issue6, ...): exactly how reports/tables.py rendered `pd_ppl` and `passkey` then. Do not edit
# to restyle new records; change the task's own `presentation` (harness/quality/long_tasks/) instead.
LEGACY_PRESENTATION: dict[str, TaskPresentation] = {
    "pd_ppl": TaskPresentation(
        title="PPL", setting_prefix="ppl_T", primary_metric="ppl", metric_format="decimal", lower_is_better=True,
        caption="PPL: token perplexity of {cont_tokens|the} continuation tokens after a T-token WikiText-2 prompt (pd_ppl)",
        column_order=0),
    "passkey": TaskPresentation(
        title="passkey %", setting_prefix="acc_L", primary_metric="acc", metric_format="percent",
        caption="passkey %: exact retrieval of a 5-digit key from an L-token prompt", column_order=1),
}
