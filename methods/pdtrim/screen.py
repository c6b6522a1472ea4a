"""Screening estimates of PDTrim's stage objectives: the same forwards in a bfloat16 copy of the model.

A greedy step of the search compares 16-23 candidate blocks, most of them far from the best. On a
CPU with bfloat16 dot products (AVX512-BF16, AMX) a bfloat16 forward costs about a third of a
float32 one (on a CPU without them, about 4x one: torch converts, so `screen="auto"` screens only
where the device has them; `bfloat16_is_fast`), and its objective values rank the candidates as the float32 ones do: on SmolLM2's
default search (32 sequences) every candidate of every greedy step was within 1.4 % of its float32
value, and the float32 best ranked first by the screen at all 8 steps
(`results/issue16/screening_bf16.json`). So the search screens every candidate it would have
evaluated, then evaluates in float32 only those whose screened value is within `screen_margin`
(relative) of the lowest, and takes the lowest float32 value (`methods/pdtrim/search.py`).

Each estimate resumes from the float32 objective's cached layer inputs (its base) at the first
layer where the candidate differs, cast to bfloat16, and is scored against the same float32
teacher; nothing it computes is kept as a base. The decode estimate reads the float32 prompt
caches, converted once per `R_P`.

Where bfloat16 is slow, `screen="auto"` screens with the objective on the sensitivity sequences
alone instead ("subset": float32, a fifth of the tokens; `methods/pdtrim/search.py` moves that
objective's base along the greedy path), with a wider margin (`subset_margin`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from harness.errors import UsageError
from harness.pd.cache import PDCache

SCREEN_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "subset": None, "none": None}  # auto: bfloat16 where fast


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bfloat16, or a CPU
    with AVX512-BF16 or AMX tiles. Elsewhere torch converts to float32 and back: a bfloat16 forward of
    SmolLM2 took 3.8x a float32 one on an AVX2-only EPYC, so a screen there would cost more than it saves."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's probes of the CPU's features (private, hence looked up)
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def screen_dtype(model, screen: str) -> torch.dtype | None:
    """The dtype option `screen` screens `model`'s search in, or None when there is nothing to gain ("none";
    "auto" on a device without fast bfloat16; a model that already computes in a narrower type than float32:
    the screen would cost what the objective does)."""
    param = next(model.parameters())
    dtype = torch.bfloat16 if screen == "auto" and bfloat16_is_fast(param.device) else SCREEN_DTYPES[screen]
    return dtype if dtype is not None and param.dtype == torch.float32 else None


def screen_kind(model, screen: str, subset: bool) -> str | None:
    """What screens the search: "bfloat16" (a narrow copy of the model, `screen_dtype`), "subset" (the float32
    objective on the sensitivity sequences alone; `subset`: they are fewer than the search's) or None.
    "auto" takes bfloat16 where the device computes it in hardware and the subset elsewhere. A model placed by
    accelerate (`--device-map`) is never copied: it was spread because it does not fit one device, and a copy
    of a model with offloaded modules cannot even be moved to the narrow type."""
    if getattr(model, "hf_device_map", None):
        if screen == "bfloat16":
            raise UsageError("pdtrim.screen=bfloat16 screens on a bfloat16 copy of the model; a model placed with "
                             "--device-map is not copied: use pdtrim.screen=auto (the subset screen) or none")
        screen = "subset" if screen == "auto" else screen
    if screen == "auto":
        screen = "bfloat16" if screen_dtype(model, "auto") is not None else "subset"
    if screen == "bfloat16":
        return "bfloat16" if screen_dtype(model, "bfloat16") is not None else None
    return "subset" if screen == "subset" and subset else None


def screen_copy(model, dtype: torch.dtype):
    """A copy of `model` in `dtype` for screening (the float32 model stays as it is). The rotary frequencies
    (`inv_freq` buffers) stay float32, as `from_pretrained(dtype=...)` keeps them: rounded to bfloat16 (8 bits
    of mantissa) a frequency f is off by up to f·2^-9, so position p's angle by up to p·f·2^-9 rad (~0.9 rad
    at p = 512 for f near 1), and every screened objective was computed with scrambled positions."""
    narrow = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            owner, _, attr = name.rpartition(".")
            if attr.endswith("inv_freq"):
                setattr(narrow.get_submodule(owner), attr, buf.detach().clone())
    return narrow


class Screen:
    """Estimates of `obj.prefill(R)` and `obj.decode(R_D, R_P)` computed by `model` (a narrow copy of
    `obj.model`), resumed from `obj`'s base. Counts its own work apart from the objective's."""

    def __init__(self, obj, model) -> None:
        self.obj, self.model = obj, model
        self.dtype = next(model.parameters()).dtype
        self.evaluations = 0
        self.layer_token_passes = 0
        self._caches: tuple[frozenset, list[PDCache | None]] | None = None

    @torch.inference_mode()
    def prefill(self, removed: Iterable[int]) -> float:
        total, _ = self.obj._prefill_forward(frozenset(removed), screen=self)
        self.evaluations += 1
        return float(total) / self.obj.n_scored

    @torch.inference_mode()
    def decode(self, removed_decode: Iterable[int], removed_prefill: Iterable[int]) -> float:
        # the first tokens' KL comes from the float32 prefill of the prompts, as in the objective
        total, _ = self.obj._decode_forward(*self.obj.decode_sets(removed_decode, removed_prefill), screen=self)
        self.evaluations += 1
        return float(total) / self.obj.n_scored

    def prompt_caches(self, rp: frozenset, states) -> list[PDCache | None]:
        """The prompt caches under `rp` in the screen's dtype (None for a batch without continuation)."""
        if self._caches is None or self._caches[0] != rp:
            self._caches = (rp, [c.frozen_as(self.dtype) if b.dec.ids.shape[1] else None
                                 for b, (c, _) in zip(self.obj.batches, states)])
        return self._caches[1]
