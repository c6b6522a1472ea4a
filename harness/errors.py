"""Errors the CLI turns into exit code 2 with a one-paragraph message."""


class UsageError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""


class HarnessWarning(UserWarning):
    """A warning of the harness's own (or a plug-in's), shown even where the libraries' warnings are silenced."""
