"""The harness's scores against stock lm-eval: `HFLM` wrapping the same model object, in float32, scores every item
as `PDLM` does in both modes (the claim docs/lm_eval.md makes; the other equivalence tests compare the two modes
with each other, not with HFLM)."""

import pytest

from harness.pd.plan import PruningPlan
from harness.quality.lm import PDLM
from harness.quality.tasks import task_manager, without_env_report

TASKS = ["arc_easy", "hellaswag", "boolq"]
LIMIT = 6


@pytest.fixture
def head_data(data_dir, tmp_path):
    """The data dir with HellaSwag's validation file cut to its first 100 rows (each task scores its first LIMIT items,
    the same rows in either file): lm-eval's HellaSwag preprocessing of all 10,042 rows, on each of the three
    `simple_evaluate` calls, was most of this test's time. The other tasks' folders are the data dir's own."""
    small = tmp_path / "data"
    small.mkdir()
    for entry in data_dir.iterdir():
        if entry.name != "hellaswag":
            (small / entry.name).symlink_to(entry)
    (small / "hellaswag").mkdir()
    for f in (data_dir / "hellaswag").iterdir():
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as rows:
                (small / "hellaswag" / f.name).write_text("".join(next(rows) for _ in range(100)), encoding="utf-8")
        else:
            (small / "hellaswag" / f.name).symlink_to(f)
    return small


def _loglikelihoods(out: dict, task: str) -> list[float]:
    """Every (item, choice) log-likelihood lm-eval logged for `task`, in its order."""
    return [r[0] if isinstance(r, (list, tuple)) else r for s in out["samples"][task] for r in s["filtered_resps"]]


def test_scores_equal_stock_hflm_item_for_item_in_float32(tiny, head_data):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    plan = PruningPlan.dense("unpruned", tiny.model.config.num_hidden_layers)
    lms = {mode: PDLM(tiny.model, tiny.tokenizer, plan, mode, batch_size=4, progress=False) for mode in ("unified", "disaggregated")}
    lms["stock"] = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, max_length=lms["unified"].max_length)
    tm = task_manager(TASKS, head_data)
    with without_env_report():  # lm-eval's environment report (pip list ...), which no assertion reads, as the harness runs it
        outs = {name: simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, task_manager=tm, log_samples=True, bootstrap_iters=0)
                for name, lm in lms.items()}
    for task in TASKS:
        stock = _loglikelihoods(outs["stock"], task)
        metrics = {k: v for k, v in outs["stock"]["results"][task].items() if isinstance(v, float) and "stderr" not in k}
        for mode in ("unified", "disaggregated"):
            ours = _loglikelihoods(outs[mode], task)
            assert len(ours) == len(stock) > LIMIT and max(abs(x - y) for x, y in zip(ours, stock)) <= 1e-4, (task, mode)
            assert metrics and metrics == {k: outs[mode]["results"][task][k] for k in metrics}, (task, mode)
