"""Errors the CLI turns into exit code 2 with a one-paragraph message."""


class UsageError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be right."""
