"""Shared fixtures: a tiny random Llama (byte tokenizer), the real SmolLM2, the shared data dir."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite checks the package's own registries (the generated docs tables and --help list, the contract tests'
# parametrisation): a plug-in named in the environment would join them. Plug-in tests load their own modules.
os.environ.pop("HARNESS_PLUGINS", None)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist the workers share the cores: one thread each (inherited by the CLI
    # subprocesses the tests start), or torch's spinning threads oversubscribe them and the tiny
    # model's runs take about twice the CPU time.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the thread count is set)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()


def pytest_collection_modifyitems(config, items):
    """Every test that uses the real SmolLM2 (the `smollm2` fixture) is `slow`, so `-m "not slow"` skips them all."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """A fresh on-disk cache (harness/store/cache.py) per test: no test sees another's cached statistics,
    and a test that counts work sees it done (CLI subprocesses inherit the variable). Converted models
    (HARNESS_CACHE_DIR) stay shared."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"evaluation data not found at {DATA_DIR}; set HARNESS_DATA_DIR to a copy of ../shared/data")
    return DATA_DIR


@pytest.fixture
def cli(monkeypatch, capsys):
    """`python -m harness ARGS` run in this process (no interpreter and import start-up, ~3 s a call):
    a CompletedProcess with the exit code (argparse's SystemExit included) and what it printed."""
    import subprocess

    from harness.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what `-q` sets; monkeypatch restores the caller's value after

    def call(*args, data_dir=None):
        if data_dir is not None:
            monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return call


@pytest.fixture(scope="session")
def tiny():
    from harness.pd.models import load_model

    return load_model("random:tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from harness.pd.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@contextlib.contextmanager
def lock_holder(folder: Path, beside: bool = False) -> Iterator[subprocess.Popen]:
    """Another harness process holding `folder`'s lock (`lock.hold`, or `lock.hold_beside` for a folder replaced
    whole) from the body's start to its end; yields that process (its pid is what a refusal names)."""
    hold = "hold_beside" if beside else "hold"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; from harness.store import lock\n"
                               f"with lock.{hold}(sys.argv[1]):\n    print('held', flush=True); sys.stdin.readline()",
                               str(folder)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def random_requests(n: int, vocab: int, seed: int = 0, max_ctx: int = 40, max_cont: int = 6, shared: int = 3):
    """(context, continuation) token requests; some share a context, as multiple-choice items do."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(1, max_ctx))]
        for _ in range(rng.randint(1, shared)):
            reqs.append((ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, max_cont))]))
    return reqs


def reference_loglikelihood(model, reqs, mask_fn=None):
    """Sum of continuation log-probs by one plain HF forward per request (optionally a custom 4D mask)."""
    out = []
    with torch.inference_mode():
        for ctx, cont in reqs:
            ids = torch.tensor([ctx + cont[:-1]])
            kwargs = {} if mask_fn is None else {"attention_mask": mask_fn(len(ctx), len(cont))}
            logp = torch.log_softmax(model(ids, **kwargs).logits[0].float(), -1)
            out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def pd_kl_from_scratch(model, prompts, conts, rd, rp):
    """Mean KL(dense || PD) over continuation tokens, one request at a time: prompt through the
    model without `rp` (prefill), handoff, continuation through the model without `rd` (decode)."""
    import torch.nn.functional as F

    from harness.pd import arch
    from harness.pd.engine import final_logits, run_layers
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    n = arch.n_layers(model)
    keep = lambda r: tuple(i for i in range(n) if i not in r)  # noqa: E731
    plan = PruningPlan("x", n, keep(rp), keep(rd))
    total, count = 0.0, 0
    for p, c in zip(prompts, conts):
        s = Scorer(model, plan, "disaggregated", max_length=4096)
        out = s._prefill([p])
        dcache = s._handoff(out, torch.tensor([0]))
        hs = [out.last_hidden]
        if len(c) > 1:
            pos = (len(p) + torch.arange(len(c) - 1))[None]
            hs.append(run_layers(model, plan.decode_layers, torch.tensor([c[:-1]]), pos,
                                 torch.ones(1, len(c) - 1, dtype=torch.bool), dcache)[0])
        with torch.inference_mode():
            student = F.log_softmax(final_logits(model, torch.cat(hs)), -1)
            teacher = F.log_softmax(model(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:].float(), -1)
        total += float(F.kl_div(student, teacher, log_target=True, reduction="sum"))
        count += len(c)
    return total / count


@pytest.fixture(autouse=True)
def _fresh_pdtrim_search_states():
    """PDTrim shares one search state per (model, calibration, search options) within a process
    (swept k read one greedy path); tests start without one, so their work counts are their own."""
    import sys

    mod = sys.modules.get("methods.pdtrim.method")
    if mod is not None:
        mod._SHARED_STATES.clear()
    yield


@pytest.fixture
def swallow_a_stop(monkeypatch):
    """`swallow_a_stop(sig)`: every lm-eval task built from then on sends this process `sig` and swallows the
    KeyboardInterrupt of its handler in a bare `except:`, as `datasets`' fingerprinting does while a task is built."""
    import time

    import lm_eval.tasks

    load = lm_eval.tasks.TaskManager.load

    def arm(sig):
        def load_then_swallow(self, *args, **kwargs):
            built = load(self, *args, **kwargs)
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler's KeyboardInterrupt comes out of the sleep, into the bare except
            except:  # noqa: E722 - what datasets does
                pass
            return built

        monkeypatch.setattr(lm_eval.tasks.TaskManager, "load", load_then_swallow)

    return arm
