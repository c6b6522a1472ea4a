"""Ctrl-C during a PDTrim search on SmolLM2, then the same command again: how much the rerun reuses.

    python benchmarks/ctrl_c_resume.py SECONDS   # SIGINT after SECONDS (e.g. 150), fresh cache in /tmp/ctrlc-cache

Prints the first run's exit and timing line, the objective values kept on disk, the rerun's reuse lines,
timing line, plan and the evaluations it still did. The child gets SIGINT's default disposition, so
it works from shells that start background jobs with SIGINT ignored.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
env = {**os.environ, "HARNESS_CALIBRATION_CACHE": "/tmp/ctrlc-cache", "HARNESS_DATA_DIR": DATA}
cmd = [sys.executable, "-m", "harness", "--methods", "pdtrim", "--tasks", "arc_easy", "--limit", "5",
       "--mode", "disaggregated", "-q", "--out", "/tmp/ctrlc"]


def dfl():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


t0 = time.time()
p = subprocess.Popen(cmd, env=env, preexec_fn=dfl, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
time.sleep(float(sys.argv[1]))
p.send_signal(signal.SIGINT)
err = p.communicate()[1]
print("first run: exit", p.returncode, "after", round(time.time() - t0, 1), "s;", err.strip().splitlines()[-2:])
memo = glob.glob("/tmp/ctrlc-cache/pdtrim-search/*.json")
vals = json.load(open(memo[0]))["value"] if memo else {}
print("values kept on disk:", len(vals) if isinstance(vals, dict) else vals)
t0 = time.time()
r = subprocess.run(cmd, env=env, preexec_fn=dfl, capture_output=True, text=True, cwd=str(ROOT))
print("rerun: exit", r.returncode, round(time.time() - t0, 1), "s")
print("\n".join(l for l in r.stderr.splitlines() if "reused" in l or l.startswith("time:")))
rec = json.load(open("/tmp/ctrlc/pdtrim__disaggregated.json"))
w = rec["plan"]["info"]["work"]
info = rec["plan"]["info"]
print("rerun plan: removed", info["removed_prefill"], info["removed_decode"],
      "evaluations this run", w["evaluations"], "ffe", round(w["full_forward_equivalents"], 1))
