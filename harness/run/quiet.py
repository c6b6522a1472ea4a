"""Silence the logging and progress bars of the libraries a run uses (lm-eval, transformers, datasets).

`quiet_libraries` changes them for the whole process, which suits a command; `kept` puts them back after a run
called from a longer-lived process (`harness.evaluate` in a notebook), whose own warnings and logs must not stay
silenced."""

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from harness.errors import HarnessWarning

LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "httpx", "huggingface_hub")
ENV = ("TQDM_DISABLE", "TOKENIZERS_PARALLELISM")  # what a run sets (cmd_run, quiet_libraries) for the process


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=HarnessWarning)  # ours say what a run did (docs/cache.md)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _bars() -> dict[str, bool]:
    """Whether transformers' and datasets' progress bars are on, for those imported (their default, on, for the others)."""
    state = {"transformers": True, "datasets": True}
    if "transformers" in sys.modules:
        state["transformers"] = sys.modules["transformers"].utils.logging.is_progress_bar_enabled()
    if "datasets" in sys.modules:
        state["datasets"] = sys.modules["datasets"].is_progress_bar_enabled()
    return state


def _set_bars(state: dict[str, bool]) -> None:
    if "transformers" in sys.modules:
        tl = sys.modules["transformers"].utils.logging
        tl.enable_progress_bar() if state["transformers"] else tl.disable_progress_bar()
    if "datasets" in sys.modules:
        ds = sys.modules["datasets"]
        ds.enable_progress_bars() if state["datasets"] else ds.disable_progress_bars()


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Run the block, then put back what a run changes for the process: the warning filters, the libraries' log
    levels (transformers' verbosity is its logger's level) and progress bars, and the environment variables `ENV`."""
    env = {k: os.environ.get(k) for k in ENV}
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    imported = {name for name in LOGGERS if name in sys.modules}  # their levels now are the notebook's
    bars = _bars()
    with warnings.catch_warnings():
        try:
            yield
        finally:
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level if name in imported else _first_level(name, level))
            _set_bars(bars)


def _first_level(name: str, before: int) -> int:
    """The level of logger `name` a library imported by the run sets itself at import (transformers' and datasets':
    WARNING, or their *_VERBOSITY variable's), so that a notebook logging at INFO does not get their INFO lines."""
    lib = sys.modules.get(name)
    default = getattr(getattr(getattr(lib, "utils", None), "logging", None), "_get_default_logging_level", None)
    return default() if default is not None else before


@contextlib.contextmanager
def bars_off(off: bool) -> Iterator[None]:
    """With `off` (`quiet`), tqdm bars that do not pass `disable` themselves (lm-eval's, the methods') are off in the
    block: TQDM_DISABLE, which `-q` sets, is read by tqdm once, at import, and a notebook imported it (with torch)
    before its first run, so the variable alone left those bars on."""
    if not off:
        yield
        return
    import tqdm.std

    init = tqdm.std.tqdm.__dict__["__init__"]
    tqdm.std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = init
