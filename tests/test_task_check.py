"""The run's check of its local tasks' rows before the model loads (`harness.run.task_check`): it renders the first
few-shot row as lm-eval renders a few-shot example, with the YAML's `fewshot_config` templates where it gives some."""

from __future__ import annotations

import json
import textwrap

import pytest

ROWS = [{"question": f"What is {i} plus one?", "prompt": f"{i} + 1 =", "choices": [str(i + 1), str(i + 7), str(i)],
         "answer": i % 3} for i in range(6)]


def _folder(tmp_path, shot_text: str):
    """An --include-path folder whose few-shot rows lack `question` (fewshot_config's process_docs drops it) and whose
    few-shot examples are rendered with `shot_text`."""
    folder = tmp_path / "shots"
    folder.mkdir()
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "utils.py").write_text("def shots(dataset):\n    return dataset.remove_columns(['question'])\n")
    (folder / "fs_mc.yaml").write_text(textwrap.dedent(f"""\
        task: fs_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
            train: {data}
        test_split: test
        fewshot_split: train
        fewshot_config:
          sampler: first_n
          process_docs: !function utils.shots
          doc_to_text: "{shot_text}"
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))
    return folder


def _run(cli, folder, out):
    return cli("--methods", "unpruned", "--model", "random:tiny", "--tasks", "fs_mc", "--limit", 3, "--num-fewshot", 1,
               "--include-path", folder, "--out", out, "-q")


def test_few_shot_rows_rendered_by_the_fewshot_config_templates_are_not_refused(cli, tmp_path, monkeypatch):
    """The few-shot rows lack the field the scored rows' template reads, and the YAML's fewshot_config renders them
    with its own template (as lm-eval does): the run worked before the up-front check, which refused it (exit 2)."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    out = tmp_path / "run"
    r = _run(cli, _folder(tmp_path, "Q: {{prompt}}"), out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is undefined" not in r.stderr and len(list(out.glob("*__*.json"))) == 1


def test_a_fewshot_config_template_reading_a_missing_field_is_refused_before_the_model_loads(cli, tmp_path,
                                                                                            monkeypatch):
    import harness.pd.models

    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    monkeypatch.setattr(harness.pd.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folder, out = _folder(tmp_path, "Q: {{hint}}"), tmp_path / "run"
    r = _run(cli, folder, out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"task fs_mc ({folder / 'fs_mc.yaml'}): its template reads a field that its data's rows lack ('hint' is " \
           "undefined)" in r.stderr, r.stderr[-3000:]
    assert not list(out.glob("*.json"))


@pytest.fixture
def built(monkeypatch):
    """(task, TaskCache id) of every task a TaskCache builds, and every TaskCache made, in this process."""
    from harness.quality.evaluate import TaskCache

    log, caches, get, init = [], [], TaskCache.get, TaskCache.__init__

    def counted(self, task):
        if task not in self._built:
            log.append((task, id(self)))
        return get(self, task)

    def made(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(TaskCache, "get", counted)
    monkeypatch.setattr(TaskCache, "__init__", made)
    return log, caches


def test_a_run_builds_each_task_once_and_a_finished_one_builds_none(cli, tmp_path, monkeypatch, built):
    """The check's TaskCache is the one the cells use (two cells, one build); a rerun of a finished run evaluates
    nothing, so it builds nothing either."""
    log, caches = built
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    folder, out = _folder(tmp_path, "Q: {{prompt}}"), tmp_path / "run"
    args = ("--methods", "unpruned", "--model", "random:tiny", "--tasks", "fs_mc", "--limit", 3, "--mode", "both",
            "--include-path", folder, "--out", out, "-q")
    assert cli(*args).returncode == 0
    assert len(caches) == 1 and log == [("fs_mc", id(caches[0]))] and len(list(out.glob("*__*.json"))) == 2
    assert cli(*args).returncode == 0
    assert len(log) == 1  # the rerun built nothing
    assert all(c._workdir is None for c in caches)  # closed: the temporary YAMLs removed


def test_a_refused_task_leaves_no_temporary_yamls(cli, tmp_path, monkeypatch, built):
    _, caches = built
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    assert _run(cli, _folder(tmp_path, "Q: {{hint}}"), tmp_path / "run").returncode == 2
    assert caches and all(c._workdir is None for c in caches)


def test_pipeline_run_called_alone_builds_the_tasks_once_and_closes_them(tmp_path, monkeypatch, built):
    """Without a TaskCache from the caller (`tasks`), pipeline.run makes the check's own, for its cells, and closes it."""
    from harness.cli.run import run_config, run_parser
    from harness.run import pipeline

    log, caches = built
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    cfg = run_config(run_parser().parse_args(["--methods", "unpruned", "--model", "random:tiny", "--tasks", "fs_mc",
                                              "--limit", "3", "--mode", "both", "--include-path",
                                              str(_folder(tmp_path, "Q: {{prompt}}"))]))
    assert len(pipeline.run(cfg, tmp_path / "run")) == 2
    assert len(caches) == 1 and log == [("fs_mc", id(caches[0]))] and caches[0]._workdir is None


class _WeightsLoad(Exception):
    """Raised by a patched `load_model`: the checks before the weights are done."""


@pytest.mark.parametrize("entry", ["run", "pipeline"])
def test_the_model_config_is_read_once_before_the_weights_load(entry, tmp_path, monkeypatch):
    """The options checked against the tokenizer (a long-context task's length) and the methods checked against the
    config (their counts, the family) each read the model's config: twice before the weights load, and for a hub id
    twice the probe of the hub. One read now, with the tokenizer, by `run` and by `pipeline.run` called alone."""
    from harness.cli.run import cmd_run, run_config, run_parser
    from harness.pd import models
    from harness.run import pipeline

    reads, real = [], models._without_weights
    monkeypatch.setattr(models, "_without_weights", lambda spec, *a, **k: reads.append(spec) or real(spec, *a, **k))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(_WeightsLoad()))
    argv = ["--methods", "tail", "--set", "tail.k=1", "--model", "random:tiny", "--device", "cpu", "--tasks", "passkey",
            "--limit", "1", "--set", "passkey.lengths=384", "--out", str(tmp_path / "o"), "-q"]
    with pytest.raises(_WeightsLoad):
        cmd_run(argv) if entry == "run" else pipeline.run(run_config(run_parser().parse_args(argv)), tmp_path / "o")
    assert reads == ["random:tiny"]


def test_latency_reads_the_model_config_once_before_the_weights_load(tmp_path, monkeypatch):
    """`latency` checks the config for the architecture and the methods (`model_before_load`) and for the workloads'
    memory floor (`harness.latency.memory`): each read it, and for a hub id each probed the hub. One read now."""
    from harness.cli.latency import cmd_latency
    from harness.pd import models

    reads, real = [], models._without_weights
    monkeypatch.setattr(models, "_without_weights", lambda spec, *a, **k: reads.append(spec) or real(spec, *a, **k))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(_WeightsLoad()))
    with pytest.raises(_WeightsLoad):
        cmd_latency(["--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--prompt-tokens", "16",
                     "--decode-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "o"), "-q"])
    assert reads == ["random:tiny"]
