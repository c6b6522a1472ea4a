"""The layer contracts in pyproject.toml hold, and they would catch an upward import or a cycle.

`lint-imports` (import-linter) reads `[tool.importlinter]`; these tests run it on the real tree and
on a copy with one planted violation, so a contract that silently stopped checking fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tree")
    for pkg in ("harness", "methods", "reports"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_every_contract():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("module, line, contract", [
    ("harness/pd/plan.py", "from harness.run import pipeline", "Layers point down"),
    ("harness/quality/scoring.py", "import methods", "Only harness.run imports methods"),
    ("harness/store/records.py", "import torch", "The store is torch-free"),
    ("reports/collect.py", "from harness.pd import engine", "Reports read records only"),
    ("harness/run/pipeline.py", "from harness.cli import main", "Nothing imports the CLI"),
])
def test_a_planted_violation_breaks_its_contract(tree_copy, module, line, contract):
    path = tree_copy / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # planted by the test\n")
        r = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert r.returncode != 0, r.stdout[-3000:]
    broken = [ln for ln in r.stdout.splitlines() if " BROKEN" in ln]  # "... BROKEN (1 ignored import)" too
    assert any(ln.startswith(contract) for ln in broken), r.stdout[-3000:]
