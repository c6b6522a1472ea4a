"""PD-aware evaluation harness: pruning plans, a prefill/decode engine, lm-eval scoring."""

__version__ = "0.1.0"
