"""Contract tests that iterate the long-context task, local-data lm-eval task and latency figure registries, as the method contract
(tests/method_contract.py) iterates the methods: a task or figure file is checked the moment it exists. The
checks themselves are in tests/plugin_contract.py, for a plug-in's own tests to call."""

from __future__ import annotations

import pytest
from plugin_contract import check_latency_figure_contract, check_local_task_contract, check_long_task_contract

from harness.latency import figures
from harness.quality import local_tasks, long_tasks


@pytest.mark.parametrize("name", long_tasks.names())
def test_every_long_task_honours_the_contract(name):
    check_long_task_contract(name)


@pytest.mark.parametrize("name", local_tasks.names())
def test_every_local_task_honours_the_contract(name, data_dir):
    check_local_task_contract(name, data_dir)


@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_every_latency_figure_honours_the_contract(name):
    check_latency_figure_contract(name)
