import gc
import sys

try:  # Ctrl-C during the imports below (seconds: torch, transformers) ends with one line, like later on
    from harness.cli import main
except KeyboardInterrupt:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

code = main()
# The interpreter's exit collects garbage over every object torch, transformers and lm-eval made: seconds after the
# last line, over 30 s on a loaded machine, where a sweep's cell stopped by Ctrl-C outlived the sweep's grace time and
# was killed. The process ends here; frozen objects are left to it (files are written whole and closed before).
gc.freeze()
raise SystemExit(code)
