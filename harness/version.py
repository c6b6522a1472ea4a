"""The harness's version (recorded in every record's environment; `python -m harness --version`)."""

__version__ = "0.1.0"
