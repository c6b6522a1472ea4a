"""The longest silence of a command: how long a user watching its terminal sees nothing new.

    python benchmarks/silence.py [--no-echo] [--json] [--threshold S] -- CMD ARGS...

Runs CMD with its stdout and stderr on pipes, timestamps every chunk either prints (a tqdm bar's
'\\r' redraw is a chunk, so a bar that moves is not silence), passes the output through (unless
--no-echo) and at the end prints, on stderr so that CMD's stdout stays clean:

    silence: longest 12.3 s at 45.6 s, after: '…planning pdtrim/disaggregated'
    silence: 2 gaps over 10.0 s; wall 123.4 s; 517 chunks; exit 0

The start of CMD to its first output and its last output to its exit count as gaps too.
`--json` prints the same as one JSON object on stdout instead. Exit status: CMD's.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

TAIL_CHARS = 120  # how much of the output before the longest gap the summary quotes


@dataclass
class Silence:
    """Gaps between output chunks of one command, in seconds from its start."""

    wall_s: float = 0.0
    chunks: int = 0
    longest_s: float = 0.0
    longest_at_s: float = 0.0  # when the longest gap began
    before: str = ""  # the output just before the longest gap (its last TAIL_CHARS characters)
    gaps_s: list[float] = field(default_factory=list)  # every gap, in order
    exit_code: int = 0


def _gap(res: Silence, start_s: float, end_s: float, tail: str) -> None:
    res.gaps_s.append(end_s - start_s)
    if end_s - start_s > res.longest_s:
        res.longest_s, res.longest_at_s, res.before = end_s - start_s, start_s, tail


def measure(cmd: list[str], echo: bool = True) -> Silence:
    """Run `cmd` to its end and time the gaps between the chunks it writes on stdout or stderr."""
    res, tail = Silence(), ""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sinks = {proc.stdout: sys.stdout.buffer, proc.stderr: sys.stderr.buffer}
    for f in sinks:
        sel.register(f, selectors.EVENT_READ)
    last = 0.0
    while sel.get_map():
        try:
            ready = sel.select()
        except KeyboardInterrupt:  # Ctrl-C: the command stops as on its own Ctrl-C; what it printed until then is measured
            try:
                proc.wait(timeout=1.0)  # a terminal's Ctrl-C reached the command too: a second one would be its "again"
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # it reached this process alone (kill -INT)
            continue
        for key, _ in ready:
            data = os.read(key.fd, 65536)  # what is there now: one write of the child, or a few
            now = time.perf_counter() - t0
            if not data:
                sel.unregister(key.fileobj)
                continue
            _gap(res, last, now, tail)
            last, res.chunks = now, res.chunks + 1
            tail = (tail + data.decode("utf-8", "replace"))[-TAIL_CHARS:]
            if echo:
                sinks[key.fileobj].write(data)
                sinks[key.fileobj].flush()
    res.exit_code = proc.wait()
    res.wall_s = time.perf_counter() - t0
    _gap(res, last, res.wall_s, tail)
    return res


def summary(res: Silence, threshold_s: float) -> str:
    """Two human lines: the longest gap with what preceded it, and the totals."""
    before = res.before.replace("\r", "\n").strip().splitlines()[-1:] or [""]
    over = sum(1 for g in res.gaps_s if g > threshold_s)
    return (f"silence: longest {res.longest_s:.1f} s at {res.longest_at_s:.1f} s, after: {before[0][-TAIL_CHARS:]!r}\n"
            f"silence: {over} gaps over {threshold_s:.1f} s; wall {res.wall_s:.1f} s; {res.chunks} chunks; "
            f"exit {res.exit_code}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-echo", action="store_true", help="do not pass CMD's output through")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--threshold", type=float, default=10.0, help="count gaps longer than this many seconds (default: 10)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give a command to run, e.g. -- python -m harness --methods unpruned --limit 2")
    res = measure(cmd, echo=not args.no_echo)
    if args.json:
        print(json.dumps({**asdict(res), "gaps_s": [round(g, 3) for g in res.gaps_s]}))
    else:
        print(summary(res, args.threshold), file=sys.stderr)
    return res.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
