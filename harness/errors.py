"""Errors the CLI turns into exit code 2 with a one-paragraph message (and `PluginFailed`: exit 1, one line)."""


class UsageError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""


class PluginContractError(UsageError, RuntimeError):
    """A plug-in's code broke its contract while running (a KV policy's `keep()`, a long-context task's results):
    the message names the plug-in and the rule. Bad input (exit 2, fix the plug-in), not a crash to retry; a
    RuntimeError too, as these checks raised before."""


class PluginFailed(RuntimeError):
    """A plug-in's own code raised before any cell ran (a local task's loader, while the run built its tasks): the run
    stops there, exit 1 with one line naming the plug-in code, rather than failing every cell the same way after the
    model loaded. Its failure, as a plug-in's `evaluate()` that raises (exit 1), not the harness's, nor bad input."""


class HarnessWarning(UserWarning):
    """A warning of the harness's own (or a plug-in's), shown even where the libraries' warnings are silenced."""


class RoundsInterrupted(KeyboardInterrupt):
    """Ctrl-C while a latency run measured its rounds, whose figures no record keeps yet (the CLI says so)."""
