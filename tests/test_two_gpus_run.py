"""`--device-map` over two GPUs, on a CPU: a run of every method that does not need gradients (streamline's
replacement and PDTrim's healing with 0 training steps), both modes, with the tiny model spread over two virtual GPUs
(tests/virtual_gpus.py), gives the unsplit run's plans, scores and KV bytes. Its own file (and process), so that
pytest -n runs it beside tests/test_two_gpus.py's process rather than after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import two_gpu_cases as cases
from virtual_gpus import in_own_process

from harness.store import records as rec


@pytest.fixture(scope="module")
def two_gpu_run(data_dir, tmp_path_factory) -> Path:
    import torch.utils.backend_registration as backends

    if not hasattr(backends, "_setup_privateuseone_for_python_backend"):  # torch 2.13 (CI's) has it
        pytest.skip(f"torch {torch.__version__} cannot register a device from Python (virtual GPUs)")
    return in_own_process("run", tmp_path_factory.mktemp("two-gpu-run"), data_dir)


def test_every_method_plans_and_scores_as_on_one_device(two_gpu_run, data_dir, tmp_path):
    """Every method but those that train, both modes, arc_easy + pd_ppl + passkey: same plan, scores and KV."""
    one = cases.run_all(tmp_path / "one", str(data_dir))
    failed = [f"{f['method']}/{f['mode']}: {_where(f['traceback'])}{f['error']}" for f in rec.load_failures(two_gpu_run / "run")]
    assert not failed, "\n".join(failed)
    split = {(r.method, r.mode): r for r in rec.load_dir(two_gpu_run / "run")}
    assert len(one) == len(split) == 2 * len(cases.method_names())
    for r in one:
        s = split[(r.method, r.mode)]
        assert s.model["device_map"] == {"vgpu:0": 5, "vgpu:1": 3}
        plan = {k: v for k, v in r.plan.items() if k != "info"}
        assert {k: v for k, v in s.plan.items() if k != "info"} == plan, r.method
        assert s.scores == r.scores, (r.method, r.mode)
        assert s.kv == r.kv, (r.method, r.mode)



def _where(tb: str) -> str:
    """The last line of the harness's own code in a traceback ('methods/depth/blocks.py, line 43: '), or ''."""
    own = [line.strip() for line in tb.splitlines() if line.strip().startswith('File "') and "site-packages" not in line
           and "virtual_gpus.py" not in line]
    return f"{own[-1]}: " if own else ""
