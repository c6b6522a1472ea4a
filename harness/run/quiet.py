"""Silence the logging and progress bars of the libraries a run uses (lm-eval, transformers, datasets)."""

import logging
import os
import warnings

from harness.errors import HarnessWarning


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=HarnessWarning)  # ours say what a run did (docs/cache.md)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
