"""Through lm-eval on real items: disaggregated `unpruned` scores as unified does (<= 1e-4)."""

import pytest
import torch

from harness.pd.engine import expected_kv_bytes
from harness.pd.plan import PruningPlan
from harness.quality.lm import PDLM
from harness.quality.tasks import task_manager, without_env_report

TASKS = ["boolq", "arc_easy"]


def run_both(loaded, data_dir, limit=50, tasks=TASKS, items=None):
    """Both modes through lm-eval: the first `limit` items of each task, or `items` (task -> item indices)."""
    from lm_eval import simple_evaluate

    tm = task_manager(tasks, data_dir)
    plan = PruningPlan.dense("unpruned", loaded.model.config.num_hidden_layers)
    outs, lms = {}, {}
    for mode in ("unified", "disaggregated"):
        lm = PDLM(loaded.model, loaded.tokenizer, plan, mode, batch_size=16, progress=False)
        with without_env_report():  # lm-eval's environment report (pip list ...): no assertion reads it
            outs[mode] = simple_evaluate(model=lm, tasks=list(tasks), limit=None if items else limit, samples=items,
                                         task_manager=tm, log_samples=True, bootstrap_iters=0)
        lms[mode] = lm
    return outs, lms


def check(outs, limit=50, tasks=TASKS):
    for task in tasks:
        uni, dis = outs["unified"]["samples"][task], outs["disaggregated"]["samples"][task]
        assert len(uni) == len(dis) == limit
        diffs = [abs(a[0][0] - b[0][0]) for su, sd in zip(uni, dis) for a, b in zip(su["resps"], sd["resps"])]
        assert len(diffs) >= 2 * limit and max(diffs) <= 1e-4
        assert [s["acc"] for s in uni] == [s["acc"] for s in dis]
        assert outs["unified"]["results"][task]["acc,none"] == outs["disaggregated"]["results"][task]["acc,none"]


def test_tiny_random_model(tiny, data_dir):
    outs, lms = run_both(tiny, data_dir)
    check(outs)
    # bytes: every request hands over its whole context, all 4 layers, float32
    lm = lms["disaggregated"]
    pairs = [arg for task in TASKS for s in outs["disaggregated"]["samples"][task] for arg in s["arguments"]]
    expect = sum(expected_kv_bytes(tiny.model.config, 4, len(lm._encode_pair(ctx, cont)[0]), torch.float32)
                 for ctx, cont in pairs)
    assert lm.tally.kv_bytes == expect and lm.tally.handoffs == len(pairs)
    assert lms["unified"].tally.kv_bytes == 0


@pytest.mark.slow
@pytest.mark.parametrize(("task", "first", "n"), [("boolq", 0, 13), ("boolq", 13, 12), ("boolq", 25, 13), ("boolq", 38, 12),
                                                  ("arc_easy", 0, 25), ("arc_easy", 25, 25)])
def test_smollm2(smollm2, data_dir, task, first, n):
    # the first 50 items of each task, in parts that stay under a minute on a slow 2-core host (a BoolQ
    # passage is ~7x an ARC-e question: 25 BoolQ items took 67-72 s there)
    outs, _ = run_both(smollm2, data_dir, tasks=[task], items={task: list(range(first, first + n))})
    check(outs, limit=n, tasks=[task])
