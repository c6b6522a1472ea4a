"""An interrupted (method, mode) resumes from its finished tasks; records round-trip."""

import pytest

from harness import pipeline, records
from harness.config import RunConfig


def test_interrupted_run_resumes_from_finished_tasks(tiny, data_dir, tmp_path, monkeypatch):
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "boolq"), limit=4,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir), batch_size=4)
    real = pipeline.evaluate_task
    calls = []

    def flaky(lm, task, tasks, cfg):
        calls.append(task)
        if task == "boolq" and calls.count("boolq") == 1:
            raise KeyboardInterrupt
        return real(lm, task, tasks, cfg)

    monkeypatch.setattr(pipeline, "evaluate_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    assert not (tmp_path / "unpruned__disaggregated.json").exists()
    assert (tmp_path / "unpruned__disaggregated.partial.json").exists()
    (rec,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    assert calls == ["arc_easy", "boolq", "boolq"]  # arc_easy was not evaluated again
    assert set(rec.scores) == {"arc_easy", "boolq"} and not (tmp_path / "unpruned__disaggregated.partial.json").exists()
    loaded = records.load(tmp_path / "unpruned__disaggregated.json")
    assert loaded == rec


def test_record_loader_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x__y.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(ValueError, match="schema 99"):
        records.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable record"):
        records.load(bad)
