"""kill -9 at random moments of every writer (quality run, latency run, report, export, check --update):
afterwards each file in its folder is the old version or the new complete one, never half of one,
and the same command run again completes (what "What is never lost" in docs/running.md promises).

Each writer: the old state is made first, then the new write is started and killed three times, at
random moments of its expected duration and just after its first file appears (seeded, so a failure
can be replayed), and finally run to completion; the files seen after each kill are compared with the
old and the final ones. A kill that finds the write already finished is tried again from the old state,
sooner (`RETRIES`), so that a fast or a loaded machine still has its writes killed midway."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

from harness.cli import main as cli_main
from harness.store import lock
from harness.store.files import TEMP_SUFFIX, recover_swap

REFERENCE = ROOT / "results" / "reference"
TINY = ["--model", "random:tiny", "--device", "cpu", "-q"]
SEED = int(os.environ.get("FAULT_SEED", "14"))


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Seconds a harness process takes before it does anything (imports), measured once."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness", "run", "--help"], cwd=ROOT, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def old_state(argv: list[str], startup_s: float) -> float:
    """Write the old version in this process (no second startup); the seconds a process would take for it."""
    t0 = time.perf_counter()
    assert cli_main(argv) == 0
    return startup_s + time.perf_counter() - t0


def complete(argv: list[str]) -> None:
    """Run the write `argv` to completion in this process (the kills are what needs a process of its own: the
    completing run only has to find and finish what they left, which it does the same here, one start-up fewer)."""
    assert cli_main(argv) == 0


def files(folder: Path) -> dict[str, bytes]:
    """The folder's files, without the lock and the temp files of killed writes (removed by the next writer)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != lock.LOCK_NAME and not p.name.endswith(TEMP_SUFFIX)} if folder.exists() else {}


def killed(argv: list[str], delay_s: float, watch: Path | None) -> bool:
    """Start the write, kill -9 it after `delay_s` (counted from its first new file in `watch` when given);
    True when it was still running at the kill."""
    def written() -> set[str]:  # a lock file is taken at the start, long before anything is written
        # os.walk, not rglob: a folder the write renames or removes while it is listed is skipped, not an error
        return {os.path.join(top, n) for top, dirs, names in os.walk(watch) for n in dirs + names if not n.endswith(".lock")}

    before = written() if watch is not None else set()
    proc = subprocess.Popen([sys.executable, "-m", "harness", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if watch is not None:
        while proc.poll() is None and not written() - before:
            time.sleep(0.001)
    time.sleep(delay_s)
    alive = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL) if alive else None
    proc.wait()
    return alive


def fault_check(folder: Path, argv: list[str], expected_s: float, watch: Path | None = None, transient: str = r"$^",
                whole: bool = False, same: Callable[[str, bytes, bytes], bool] = lambda name, a, b: a == b,
                spread: tuple[float, float] = (0.3, 1.0)) -> None:
    """Kill the write `argv` three times, then complete it; every file seen after a kill must be old or final.

    `transient`: names of files a write keeps only while it runs (resume state), which must still be whole
    JSON; `whole`: the folder is replaced as one (all old or all new); `same`: equality of two complete
    versions (for files holding a creation time)."""
    rng = random.Random(f"{SEED}-{argv[0]}")
    old, seen, ran = files(folder), [], 0
    delays = [(rng.uniform(*spread) * expected_s, None) for _ in range(2)] + [(rng.uniform(0, 0.05), watch or folder.parent)]
    with tempfile.TemporaryDirectory() as keep:
        backup = Path(keep) / "old"
        shutil.copytree(folder, backup) if folder.exists() else None
        for delay, where in delays:
            for _ in range(RETRIES + 1):
                alive = killed(argv, delay, where)
                recover_swap(folder)  # what every writer does first, for a kill between the two renames of a folder swap
                seen.append((round(delay, 3), files(folder)))
                if alive:
                    break
                # the write had finished (a machine faster or slower than expected): from the old state again,
                # killed sooner, so that the kill still lands in the write it is meant to test
                _restore(folder, backup)
                delay /= 2
            ran += alive
    assert ran >= 2, f"only {ran} of 3 kills found the write still running, {RETRIES} retries each (seed {SEED})"
    complete(argv)
    final = files(folder)
    assert not [p for p in folder.parent.rglob(f"*{TEMP_SUFFIX}")], "temp files left after the completed write"
    assert_versions(old, seen, final, transient, whole, same)


RETRIES = 2  # per kill that came after the write had finished


def _restore(folder: Path, backup: Path) -> None:
    """Put the folder back as it was before the kills (nothing when there was none)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(backup, folder) if backup.exists() else None


def assert_versions(old: dict, seen: list, final: dict, transient: str = r"$^", whole: bool = False,
                    same: Callable[[str, bytes, bytes], bool] = lambda name, a, b: a == b) -> None:
    def is_(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(same(k, a[k], b[k]) for k in a)

    for delay, mid in seen:
        where = f"after a kill at {delay}s (seed {SEED})"
        if whole:
            assert is_(mid, old) or is_(mid, final), f"{where}: the folder is neither the old nor the new version"
            continue
        assert old.keys() - mid.keys() <= old.keys() - final.keys(), f"{where}: removed {old.keys() - mid.keys()}"
        for name, data in mid.items():
            if re.search(transient, name) and name not in final:
                json.loads(data)  # resume state: whole
            else:
                assert (name in old and same(name, data, old[name])) or (name in final and same(name, data, final[name])), \
                    f"{where}: {name} is neither its old nor its new version"


PD_PPL = ["--tasks", "pd_ppl", "--set", "pd_ppl.docs=1", "--set", "pd_ppl.prompt_tokens=32", "--set", "pd_ppl.cont_tokens=8",
          "--mode", "disaggregated"]


def test_quality_run_killed_anywhere(tmp_path, startup_s):
    out = tmp_path / "run"
    expected = old_state(["run", *TINY, "--methods", "unpruned", *PD_PPL, "--out", str(out)], startup_s)
    fault_check(out, ["run", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", *PD_PPL, "--out", str(out)],
                expected, transient=r"\.partial\.json$")


def test_latency_run_killed_anywhere(tmp_path, startup_s):
    out = tmp_path / "latency"
    shape = ["--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--warmup", "0"]
    expected = old_state(["latency", *TINY, "--methods", "unpruned", *shape, "--out", str(out)], startup_s)
    fault_check(out, ["latency", *TINY, "--methods", "unpruned,tail", "--set", "tail.k=1", *shape, "--out", str(out)], expected)


def _no_timestamps(name: str, a: bytes, b: bytes) -> bool:
    """Equal but for when they were made (report.html's generation time, an export's `created`)."""
    if name.endswith(".json"):
        strip = lambda d: {k: strip(v) for k, v in d.items() if k != "created"} if isinstance(d, dict) else d  # noqa: E731
        return strip(json.loads(a)) == strip(json.loads(b))
    stamp = rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC"
    return re.sub(stamp, b"", a) == re.sub(stamp, b"", b)


def test_report_killed_anywhere(tmp_path, startup_s):
    out = tmp_path / "report"
    expected = old_state(["report", str(REFERENCE / "quality"), "--out", str(out)], startup_s)
    fault_check(out, ["report", str(REFERENCE / "quality"), str(REFERENCE / "latency"), "--out", str(out)], 1.5 * expected,
                same=_no_timestamps)


def test_export_killed_anywhere(tmp_path, startup_s):
    out = tmp_path / "pd"
    export = ["export", *TINY[:-1], "--method", "manual", "--mode", "disaggregated", "--set", "manual.prefill_layers=0,1,3"]
    expected = old_state([*export, "--set", "manual.decode_layers=0,3", "--out", str(out)], startup_s)
    fault_check(out, [*export, "--set", "manual.decode_layers=0,1", "--out", str(out), "--force"], 1.2 * expected,
                whole=True, same=_no_timestamps)


def test_check_update_killed_anywhere(tmp_path):
    ref, cur = tmp_path / "ref", tmp_path / "cur"
    shutil.copytree(REFERENCE, ref)
    shutil.copytree(REFERENCE, cur)
    for p in cur.rglob("*__*.json"):  # every reference changes, so old and new differ in every file
        d = json.loads(p.read_text())
        d["created"] = "2099-01-01T00:00:00+00:00"
        p.write_text(json.dumps(d))
    argv = ["check", "--against", str(ref), "--current", str(cur), "--update"]
    # how long the whole update takes now, measured on a scratch pair (start-up included): `--help` alone
    # understated it under load and the kills landed after the write had finished
    scratch = tmp_path / "scratch"
    shutil.copytree(REFERENCE, scratch)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness", "check", "--against", str(scratch), "--current", str(cur), "--update"],
                   cwd=ROOT, capture_output=True, timeout=120)
    # the write itself takes milliseconds at the end of the run: the random kills fall in the first 60 %, so
    # both land while it runs whatever the load; the third lands just after its first new file appears
    fault_check(ref, argv, time.perf_counter() - t0, whole=True, spread=(0.1, 0.6))


def test_the_comparison_catches_a_lost_or_half_written_file():
    """The comparison itself can fail: a removed file, a truncated one, a mixed folder."""
    old, final = {"a": b"old a", "b": b"old b"}, {"a": b"new a", "b": b"new b"}
    assert_versions(old, [(0.1, {"a": b"old a", "b": b"new b"}), (0.2, final)], final)  # per file: fine
    for mid, whole, why in (({"a": b"old a"}, False, "removed"), ({"a": b"new", "b": b"old b"}, False, "neither its old"),
                            ({"a": b"old a", "b": b"new b"}, True, "neither the old nor the new version")):
        with pytest.raises(AssertionError, match=why):
            assert_versions(old, [(0.1, mid)], final, whole=whole)
