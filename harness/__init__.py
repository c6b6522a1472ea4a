"""PD-aware evaluation harness: pruning plans, a prefill/decode engine, lm-eval scoring.

From Python: `harness.evaluate(methods=[...], tasks=[...], limit=..., mode=...)` returns a run's
tidy rows as a pandas DataFrame and `harness.load_results(folder)` reads any run folder
(`harness/api.py`, docs/api.md). Importing `harness` itself loads neither torch nor pandas.
"""

from harness.version import __version__  # noqa: F401 - the package's version, re-exported

_API = ("evaluate", "load_results")


def __getattr__(name: str):
    """`harness.evaluate` / `load_results` are `harness.api`'s own functions (their docs and signatures
    in `help`), imported on first use: even that light module (typing, pathlib) would add several
    milliseconds to every `import harness`, the CLI's included."""
    if name in _API:
        import harness.api

        return getattr(harness.api, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
