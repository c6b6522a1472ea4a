"""Long-context task plug-ins: a task defined here registers itself, is accepted by --tasks and --set,
runs through the pipeline, and the report renders it from its record alone."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from harness.errors import UsageError
from harness.quality import long_tasks
from harness.quality.long_tasks.base import LongTask, kv_delta, mean_se
from harness.store.task_names import LEGACY_PRESENTATION, TaskPresentation

TOY = "toy_echo"


@dataclass(frozen=True)
class ToyConfig:
    lengths: tuple[int, ...] = (24, 40)  # prompt tokens per setting
    docs: int = 2


def _define_toy() -> type[LongTask]:
    """Defining the class registers it (inside a fixture, so other test modules never see it)."""

    @long_tasks.register_task
    class ToyEcho(LongTask):
        name = TOY
        Config = ToyConfig
        presentation = TaskPresentation(
            title="Echo %", setting_prefix="hit_N", primary_metric="hit", metric_format="percent",
            caption="Echo %: chance of the next token after an N-token prompt over {docs} docs (toy)")

        def evaluate(self, scorer, tokenizer, data_dir, options, limit, progress=False):
            scores, kv_by, every = {}, {}, []
            for n in options.lengths:
                reqs = [([(7 * d + i) % 200 + 1 for i in range(n)], [5]) for d in range(options.docs)]
                res, kv_by[f"N{n}"] = kv_delta(scorer, lambda reqs=reqs: scorer.loglikelihood(reqs))
                p = [2.718281828 ** lp for lp, _ in res]
                every += p
                scores[f"hit_N{n}"] = {"value": mean_se(p)[0], "stderr": mean_se(p)[1]}
            return {"scores": {"hit": {"value": mean_se(every)[0], "stderr": None}, **scores},
                    "n_samples": len(every), "kv_by": kv_by, "details": {}}

    return ToyEcho


@pytest.fixture
def toy():
    cls = _define_toy()
    try:
        yield cls
    finally:
        long_tasks.unregister_task(TOY)


def test_a_task_file_registers_itself_and_is_accepted_by_tasks_and_set(toy, data_dir):
    from harness.cli.run import check_tasks
    from harness.config import RunConfig, expand_tasks
    from harness.run import pipeline

    assert long_tasks.names()[:2] == ("pd_ppl", "passkey") and TOY in long_tasks.names()
    check_tasks(("arc_easy", TOY), str(data_dir))
    # registered after harness.config was imported (as a HARNESS_PLUGINS task is), and still in `long`
    assert expand_tasks(["arc_easy", "long"]) == ("arc_easy", "pd_ppl", "passkey", TOY)
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=(TOY,), data_dir=str(data_dir),
                    overrides=(f"{TOY}.lengths=16,32", f"{TOY}.docs=3"))
    assert pipeline.prepare(cfg).task_options[TOY] == ToyConfig(lengths=(16, 32), docs=3)
    with pytest.raises(UsageError, match=f"{TOY} has no option 'depth'"):
        pipeline.prepare(RunConfig(**{**cfg.__dict__, "overrides": (f"{TOY}.depth=1",)}))
    with pytest.raises(ValueError, match="already registered"):
        long_tasks.register_task(type("Other", (LongTask,), {"name": TOY, "Config": ToyConfig,
                                                               "presentation": toy.presentation}))
    long_tasks.unregister_task(TOY)
    with pytest.raises(UsageError, match=f"unknown task\\(s\\) {TOY}"):
        check_tasks((TOY,), str(data_dir))


def test_report_renders_a_new_task_from_its_record_alone(toy, tiny, data_dir, tmp_path):
    from harness.config import RunConfig
    from harness.run import pipeline
    from harness.store import records
    from reports.formats import to_markdown
    from reports.tables import long_context_table, quality_table

    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", TOY), limit=4,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir), batch_size=4)
    (rec,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    stored = rec.lm_eval["tasks"][TOY]["harness_task"]
    assert stored["presentation"] == toy.presentation.to_dict() and stored["options"]["docs"] == 2
    assert rec.lm_eval["metric_convention"][TOY] == "hit"
    assert "task_titles" not in rec.lm_eval  # no task declares a title: the record's shape is as before
    long_tasks.unregister_task(TOY)  # the report must not need the task's code
    (back,) = records.load_dir(tmp_path)
    assert records.primary_metric(TOY, back) == "hit"
    assert {row["metric"] for row in records.summary_rows([back]) if row["primary"]} == {"acc", "hit"}
    md = to_markdown(long_context_table([back]))
    assert "| Echo % N24 | KV/req N24 (MiB) | Echo % N40 | KV/req N40 (MiB) |" in md
    assert "Echo %: chance of the next token after an N-token prompt over 2 docs (toy)" in md
    assert "PPL" not in md and "passkey" not in md  # the legacy captions only come with the legacy tasks
    assert f"{100 * back.scores[TOY]['hit_N24']['value']:.1f}" in md
    quality = to_markdown(quality_table([back]))
    assert "ARC-e" in quality and "Echo" not in quality and TOY not in quality


def test_legacy_fallback_matches_the_builtin_tasks():
    """Old records render with the fallback; today it equals the tasks' own presentation."""
    for name in ("pd_ppl", "passkey"):
        assert long_tasks.get(name).presentation == LEGACY_PRESENTATION[name]
        assert long_tasks.get(name)().primary_metric == LEGACY_PRESENTATION[name].primary_metric
    d = {**LEGACY_PRESENTATION["pd_ppl"].to_dict(), "from_a_newer_harness": 1}
    assert TaskPresentation.from_dict(d) == LEGACY_PRESENTATION["pd_ppl"]


def test_reports_import_no_task_code_no_config_no_torch():
    code = ("import sys, reports.render, reports.tables, reports.collect, reports.formats; "
            "print(__import__('json').dumps(sorted(m for m in sys.modules if m in "
            "('torch', 'harness.config', 'harness.quality.long_tasks') or m.startswith('harness.quality.long_tasks.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
