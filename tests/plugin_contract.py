"""The long-context task, local-data lm-eval task and latency figure contracts, as functions (as `method_contract.py` holds the method's):
`test_contracts.py` runs them for every registered task and figure of the package, and a plug-in's own test file,
inside or outside this repository, runs them on its task or figure (the suite drops `HARNESS_PLUGINS`, so the
registry-wide tests never see an outside plug-in)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from harness.latency import figures
from harness.latency.measure import Measurement, Workload
from harness.quality import local_tasks, long_tasks
from harness.registration import option_types
from harness.store.task_names import TaskPresentation


def check_long_task_contract(name: str) -> None:
    """The registered task `name` declares what the pipeline, `--set`, `--help` and the reports read of it."""
    task = long_tasks.get(name)
    assert task.name == name and "." not in name and "," not in name
    assert isinstance(task.version, int) and task.version >= 1
    assert task.evaluate is not long_tasks.LongTask.evaluate  # what each cell calls
    options = task.Config()  # the defaults are the standard setting
    assert dataclasses.is_dataclass(options) and option_types(task.Config, name)  # --set and --help can read its types
    pres = task.presentation
    assert isinstance(pres, TaskPresentation) and TaskPresentation.from_dict(pres.to_dict()) == pres
    assert pres.primary_metric and pres.setting_prefix and pres.title
    stored = task.describe(options)  # what each record keeps: plain JSON, read back by reports without task code
    assert json.loads(json.dumps(stored))["version"] == task.version  # tuples come back as lists: the stored form
    assert all(isinstance(f, str) and not f.startswith("/") for f in task.data_files)  # relative to the data dir


def check_local_task_contract(name: str, data_dir: Path | None = None) -> None:
    """The registered lm-eval task on local data `name` names an upstream YAML of the pinned lm-eval that scores one of
    the splits it provides and reports its `table_metric`; with `data_dir`, its loader gives exactly those splits, each
    with rows (a group's first subtask), and lm-eval builds the task from them (it renders a row through the upstream
    YAML's templates: rows lacking a field it reads raise a PluginContractError naming the loader)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml  # the pinned lm-eval's reader, `include:` resolved

    from harness.quality.evaluate import TaskCache
    from harness.quality.tasks import local_rows

    task = local_tasks.get(name)
    assert task.name == name and local_tasks.is_local_task(name) and not long_tasks.is_long_task(name)
    assert isinstance(task.files, tuple) and task.files and all(isinstance(f, str) and f for f in task.files)
    subtasks = task.subtasks(Path(data_dir)) if data_dir is not None else None
    subtask = subtasks[0] if subtasks else ("anatomy" if "{subtask}" in task.upstream else None)
    upstream = Path(lm_eval.tasks.__file__).parent / task.upstream_yaml(subtask)
    config = load_yaml(upstream, resolve_func=False)
    assert task.table_metric in [m["metric"] for m in config.get("metric_list", [])], (task.table_metric, upstream)
    assert config.get("test_split") in task.splits or config.get("validation_split") in task.splits, (config, task.splits)
    if data_dir is not None:
        rows = local_rows(name, data_dir, subtask)
        assert set(rows) == set(task.splits) and all(rows.values()), {k: len(v) for k, v in rows.items()}
        assert all(isinstance(r, dict) for split in rows.values() for r in split[:5])
        built = TaskCache([name], Path(data_dir))
        try:
            built.get(name)
        finally:
            built.close()


def _measurement(decode_tokens: int) -> Measurement:
    steps = decode_tokens - 1
    return Measurement("contract", Workload(16, decode_tokens, 2), "perf_counter_ns", ttft_ms=[3.0, 3.5, 4.0],
                       handoff_ms=[0.2, 0.3, 0.25], itl_ms=[1.0 + 0.01 * i for i in range(3 * steps)],
                       tpot_ms=[1.0, 1.1, 1.2][: 3 if steps else 0], kv_bytes=8192, kv_bytes_paged=16384)


def check_latency_figure_contract(name: str) -> None:
    """The registered figure `name` returns {name-prefixed value: finite number}, purely from its inputs, for a
    workload with decode steps and for a one-token one (none)."""
    for decode_tokens in (1, 4):
        x = figures.FigureInputs(_measurement(decode_tokens), (25.0, 100.0), decode_bound_ms=0.5)
        values = figures.FIGURES[name](x)
        assert isinstance(values, dict)
        for key, value in values.items():
            assert key.startswith(name) and isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert values == figures.FIGURES[name](x)  # a pure function of its inputs
