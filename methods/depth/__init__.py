"""Depth-pruning baselines (one file per method) and the `stage:` wrapper."""
