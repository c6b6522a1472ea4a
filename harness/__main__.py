import sys

try:  # Ctrl-C during the imports below (seconds: torch, transformers) ends with one line, like later on
    from harness.cli import main
except KeyboardInterrupt:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
