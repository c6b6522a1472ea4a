"""The converted-model cache (harness/pd/gguf.py `convert_gguf`): two processes converting at once both
get the model, and a damaged cache entry is converted again instead of failing every later run.

A stand-in replaces the slow GGUF dequantisation (transformers' `from_pretrained(gguf_file=...)`): it
returns the tiny random Llama, and its tokenizer saves slowly, so two conversions overlap for sure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.pd.models import CONVERTED_MARKER, load_model

ROOT = Path(__file__).resolve().parent.parent

# Run in each child process (and, via `_stand_in`, in this one): patch transformers so that loading a GGUF
# gives the tiny model, slowly, counting conversions in `log`; loading a directory is untouched.
STAND_IN = """
import time, transformers
from pathlib import Path
from harness.pd.models import load_model

def stand_in(log, save_delay, patch=setattr):
    tiny = load_model("random:tiny", device="cpu", dtype="float32")
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    class SlowTokenizer:
        def save_pretrained(self, folder):
            time.sleep(save_delay)
            if Path(log).with_suffix(".fail").exists():
                Path(log).with_suffix(".fail").unlink()
                raise RuntimeError("conversion failed midway")
            tiny.tokenizer.save_pretrained(folder)

    def model(path, **kw):
        if "gguf_file" not in kw:
            return real_model(path, **kw)
        with open(log, "a") as f:
            f.write("converted\\n")
        return tiny.model

    def tokenizer(path, **kw):
        return SlowTokenizer() if "gguf_file" in kw else real_tok(path, **kw)

    patch(transformers.AutoModelForCausalLM, "from_pretrained", model)
    patch(transformers.AutoTokenizer, "from_pretrained", tokenizer)
"""

CHILD = STAND_IN + """
import json, sys
gguf, log, ready, go = sys.argv[1:5]
stand_in(log, save_delay=1.0)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
loaded = load_model(gguf, device="cpu", dtype="float32")
print(json.dumps({"layers": loaded.model.config.num_hidden_layers}))
"""


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A GGUF-named file (only its bytes key the cache entry) and a fresh HARNESS_CACHE_DIR."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "models"))
    path = tmp_path / "Stand-In.gguf"
    path.write_bytes(os.urandom(4096))
    return path


def _stand_in(tmp_path: Path, monkeypatch) -> None:
    """The stand-in in this process, undone after the test."""
    scope: dict = {}
    exec(STAND_IN, scope)
    scope["stand_in"](str(tmp_path / "conversions.log"), save_delay=0, patch=monkeypatch.setattr)


def _entry(tmp_path: Path) -> Path:
    (entry,) = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    return entry


def _conversions(tmp_path: Path) -> int:
    log = tmp_path / "conversions.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _assert_complete(entry: Path) -> None:
    marker = json.loads((entry / CONVERTED_MARKER).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    assert all((entry / name).stat().st_size == size for name, size in marker["files"].items())
    assert [p.name for p in entry.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temp folder left


def test_two_processes_converting_at_once_both_load_the_model(fake_gguf, tmp_path):
    """Found with `torchrun --nproc-per-node 2 -m harness` on a fresh cache: both ranks wrote one `<entry>.tmp`
    folder, both failed, and the entry was left with its marker but no weights, so every later run failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(fake_gguf), str(tmp_path / "conversions.log"),
                               str(tmp_path / f"ready{i}"), str(tmp_path / "go")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both start converting at the same moment
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.splitlines()[-1]) == {"layers": 4}
    _assert_complete(_entry(tmp_path))
    assert _conversions(tmp_path) == 1  # the second waited for the first, then used its conversion


@pytest.mark.parametrize("damage", ["weights deleted", "config deleted", "weights truncated"])
def test_a_damaged_cache_entry_is_converted_again(fake_gguf, tmp_path, monkeypatch, damage):
    """A marker is not enough: an entry whose files are missing or cut short is redone, not a failure for good."""
    _stand_in(tmp_path, monkeypatch)
    assert load_model(str(fake_gguf), device="cpu", dtype="float32").model.config.num_hidden_layers == 4
    entry = _entry(tmp_path)
    if damage == "weights truncated":
        with (entry / "model.safetensors").open("r+b") as f:
            f.truncate(100)
    else:
        (entry / ("model.safetensors" if damage == "weights deleted" else "config.json")).unlink()
    assert load_model(str(fake_gguf), device="cpu", dtype="float32").model.config.num_hidden_layers == 4
    assert _conversions(tmp_path) == 2
    _assert_complete(entry)
    assert load_model(str(fake_gguf), device="cpu", dtype="float32").description["n_layers"] == 4
    assert _conversions(tmp_path) == 2  # a complete entry is used as it is


def test_a_failed_conversion_leaves_nothing_half_written(fake_gguf, tmp_path, monkeypatch):
    _stand_in(tmp_path, monkeypatch)
    (tmp_path / "conversions.fail").touch()  # the first conversion fails after saving the weights
    with pytest.raises(UsageError, match="conversion failed midway"):
        load_model(str(fake_gguf), device="cpu", dtype="float32")
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    assert load_model(str(fake_gguf), device="cpu", dtype="float32").model.config.num_hidden_layers == 4
    _assert_complete(_entry(tmp_path))


def test_other_weights_in_a_gguf_of_the_same_name_and_size_are_converted_anew(fake_gguf, tmp_path, monkeypatch):
    """The cache key read the first MiB and the size only; a GGUF's first MiB is metadata (SmolLM2's tensor data
    starts at 1.7 MB), so a fine-tune written over the same file reused the old weights' conversion."""
    _stand_in(tmp_path, monkeypatch)
    head = os.urandom(1 << 20)
    fake_gguf.write_bytes(head + os.urandom(3 << 20))
    load_model(str(fake_gguf), device="cpu", dtype="float32")
    load_model(str(fake_gguf), device="cpu", dtype="float32")
    assert _conversions(tmp_path) == 1  # the same file: converted once
    fake_gguf.write_bytes(head + os.urandom(3 << 20))  # same metadata and size, other tensor data
    load_model(str(fake_gguf), device="cpu", dtype="float32")
    assert _conversions(tmp_path) == 2


def test_a_conversion_an_older_version_was_killed_in_is_removed(tmp_path):
    """Temp folders were `.<entry>.<hex>.tmp` before TEMP_SUFFIX became `.pdh.tmp`: the cleanup under the conversion
    lock looked for the new suffix only, and a dequantised checkpoint (gigabytes) left by an older harness stayed."""
    from harness.pd.gguf import TEMP_SUFFIX, _remove_partial

    out = tmp_path / "model-abc123"
    old, new = tmp_path / f".{out.name}.{'0' * 32}.tmp", tmp_path / f".{out.name}.{'1' * 32}{TEMP_SUFFIX}"
    other = tmp_path / ".another-entry.tmp"
    for folder in (old, new, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    _remove_partial(out)
    assert not old.exists() and not new.exists() and other.exists()
