"""Shared fixtures: a tiny random Llama (byte tokenizer), the real SmolLM2, the shared data dir."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"evaluation data not found at {DATA_DIR}; set HARNESS_DATA_DIR to a copy of ../shared/data")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny():
    from harness.models import load_model

    return load_model("random:tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


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
