"""PD-aware evaluation harness: pruning plans, a prefill/decode engine, lm-eval scoring.

From Python: `harness.evaluate(methods=[...], tasks=[...], limit=..., mode=...)` returns a run's
tidy rows as a pandas DataFrame and `harness.load_results(folder)` reads any run folder
(`harness/api.py`, docs/api.md). Importing `harness` itself loads neither torch nor pandas.
"""

from harness.version import __version__  # noqa: F401 - the package's version, re-exported


def evaluate(**options):
    """See `harness.api.evaluate`."""
    from harness.api import evaluate as _evaluate

    return _evaluate(**options)


def load_results(path):
    """See `harness.api.load_results`."""
    from harness.api import load_results as _load_results

    return _load_results(path)
