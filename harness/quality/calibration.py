"""The shared calibration set: seeded PIQA + MMLU samples from the data dir.

Default (PDTrim's): 256 samples, half PIQA goals with their correct solution, half MMLU
questions with their four choices and answer letter, each at most 512 tokens. PIQA's only
labelled split here is validation, which is also the `piqa` evaluation split: the overlap is
recorded in the description. MMLU samples come from the `val` split, never from `test`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.errors import UsageError
from harness.pd.batching import pad_tokens
from harness.quality.tasks import local_rows, mmlu_subjects

SOURCES = ("piqa", "mmlu")
SOURCE_FILES = {"piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "mmlu": ("mmlu/val",)}  # what each source reads


@dataclass(frozen=True)
class CalibConfig:
    n_samples: int = 256
    max_tokens: int = 512
    seed: int = 0
    sources: tuple[str, ...] = SOURCES

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.max_tokens < 2:
            raise UsageError(f"calibration needs n_samples >= 1 and max_tokens >= 2, got {self.n_samples}, {self.max_tokens}")
        bad = set(self.sources) - set(SOURCES)
        if bad:
            raise UsageError(f"calibration sources {sorted(bad)} unknown; choose from {', '.join(SOURCES)}")
        if not self.sources or len(set(self.sources)) < len(self.sources):  # a repeat drew twice, recorded once
            raise UsageError(f"calib.sources={','.join(self.sources)}: give one or more of {', '.join(SOURCES)}, each once")


@dataclass
class CalibrationSet:
    """Tokenised calibration samples; `input_ids[i]` is a list of at most `max_tokens` ids."""

    texts: list[str]
    input_ids: list[list[int]]
    description: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded (input_ids, attention_mask) batches, longest first, (B, T) each."""
        order = sorted(range(len(self.input_ids)), key=lambda i: -len(self.input_ids[i]))
        for s in range(0, len(order), batch_size):
            padded = pad_tokens([self.input_ids[i] for i in order[s : s + batch_size]], device)
            yield padded.ids, padded.valid.long()


def _piqa_texts(data: Path) -> list[str]:
    rows = local_rows("piqa", data)["validation"]
    return [f"{r['goal']} {r['sol1'] if r['label'] == 0 else r['sol2']}" for r in rows]


def _mmlu_texts(data: Path) -> list[str]:
    out = []
    for subject in mmlu_subjects(data):
        for r in local_rows("mmlu", data, subject)["validation"]:
            opts = "\n".join(f"{l}. {c}" for l, c in zip("ABCD", r["choices"]))
            out.append(f"{r['question'].strip()}\n{opts}\nAnswer: {'ABCD'[r['answer']]}")
    return out


def build_calibration(tokenizer, data_dir: Path | None, config: CalibConfig = CalibConfig()) -> CalibrationSet:
    """Sample `config.n_samples` texts evenly over `config.sources` (seeded) and tokenise them."""
    if data_dir is None:
        raise UsageError("calibration needs local data: pass --data-dir (or set HARNESS_DATA_DIR) "
                         "pointing at a folder laid out like ../shared/data")
    pools = {"piqa": _piqa_texts, "mmlu": _mmlu_texts}
    rng = random.Random(config.seed)
    per = [config.n_samples // len(config.sources)] * len(config.sources)
    for i in range(config.n_samples - sum(per)):
        per[i] += 1
    texts, origin = [], []
    for src, n in zip(config.sources, per):
        pool = pools[src](data_dir)
        if n > len(pool):
            raise UsageError(f"calibration asks {n} {src} samples but the data has {len(pool)}")
        texts += rng.sample(pool, n)
        origin += [src] * n
    ids = [tokenizer.encode(t)[: config.max_tokens] for t in texts]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    desc = {
        **asdict(config),
        "per_source": dict(zip(config.sources, per)),
        "splits": {"piqa": "validation (also the piqa eval split)", "mmlu": "val"},
        "n_tokens": sum(len(x) for x in ids),
        "truncated": sum(len(tokenizer.encode(t)) > config.max_tokens for t in texts),
        "token_sha256_16": digest,
        "format": {"piqa": "{goal} {correct solution}", "mmlu": "{question}\\nA. ..\\nD. ..\\nAnswer: {letter}"},
    }
    return CalibrationSet(texts, ids, desc)
