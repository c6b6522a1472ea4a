"""A stop (Ctrl-C, or SIGTERM under `harness.cli.interrupt.sigterm_as_ctrl_c`) that a library swallowed.

The stop's handler raises KeyboardInterrupt wherever the main thread is. While lm-eval built a task, `datasets`
hashed its `process_docs` for a fingerprint inside a bare `except:`, which caught that KeyboardInterrupt and printed
"couldn't be hashed properly, a random hash was used instead": the run went on as if never stopped, and under
`torchrun` both ranks ran on until the launcher's SIGKILL 30 s later, with no 'interrupted' line. So the handler
also notes the stop here, and `check()`, called where the harness takes control back (a task built, requests
handed to the model, a collective broken), raises it again.
"""

from __future__ import annotations

_stopped = False  # a stop came since `clear()`


def note() -> None:
    """Called by a stop's signal handler, before it raises KeyboardInterrupt."""
    global _stopped
    _stopped = True


def clear() -> None:
    """Forget earlier stops: a command starts (or ends) with none."""
    global _stopped
    _stopped = False


def noted() -> bool:
    return _stopped


def check() -> None:
    """Raise KeyboardInterrupt if a stop came (since `clear()`), even one a library caught."""
    if _stopped:
        raise KeyboardInterrupt
