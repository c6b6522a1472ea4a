"""Errors the CLI turns into exit code 2 with a one-paragraph message."""


class UsageError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""


class PluginContractError(UsageError, RuntimeError):
    """A plug-in's code broke its contract while running (a KV policy's `keep()`, a long-context task's results):
    the message names the plug-in and the rule. Bad input (exit 2, fix the plug-in), not a crash to retry; a
    RuntimeError too, as these checks raised before."""


class HarnessWarning(UserWarning):
    """A warning of the harness's own (or a plug-in's), shown even where the libraries' warnings are silenced."""


class RoundsInterrupted(KeyboardInterrupt):
    """Ctrl-C while a latency run measured its rounds, whose figures no record keeps yet (the CLI says so)."""
