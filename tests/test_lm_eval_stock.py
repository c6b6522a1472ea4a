"""The harness's scores against stock lm-eval: `HFLM` wrapping the same model object, in float32, scores every item
as `PDLM` does in both modes (the claim docs/lm_eval.md makes; the other equivalence tests compare the two modes
with each other, not with HFLM)."""

from harness.pd.plan import PruningPlan
from harness.quality.lm import PDLM
from harness.quality.tasks import task_manager

TASKS = ["arc_easy", "hellaswag", "boolq"]


def _loglikelihoods(out: dict, task: str) -> list[float]:
    """Every (item, choice) log-likelihood lm-eval logged for `task`, in its order."""
    return [r[0] if isinstance(r, (list, tuple)) else r for s in out["samples"][task] for r in s["filtered_resps"]]


def test_scores_equal_stock_hflm_item_for_item_in_float32(tiny, data_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    plan = PruningPlan.dense("unpruned", tiny.model.config.num_hidden_layers)
    lms = {mode: PDLM(tiny.model, tiny.tokenizer, plan, mode, batch_size=4, progress=False) for mode in ("unified", "disaggregated")}
    lms["stock"] = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, max_length=lms["unified"].max_length)
    tm = task_manager(TASKS, data_dir)
    outs = {name: simple_evaluate(model=lm, tasks=TASKS, limit=6, task_manager=tm, log_samples=True, bootstrap_iters=0)
            for name, lm in lms.items()}
    for task in TASKS:
        stock = _loglikelihoods(outs["stock"], task)
        metrics = {k: v for k, v in outs["stock"]["results"][task].items() if isinstance(v, float) and "stderr" not in k}
        for mode in ("unified", "disaggregated"):
            ours = _loglikelihoods(outs[mode], task)
            assert len(ours) == len(stock) > 6 and max(abs(x - y) for x, y in zip(ours, stock)) <= 1e-4, (task, mode)
            assert metrics and metrics == {k: outs[mode]["results"][task][k] for k in metrics}, (task, mode)
