"""The command line's one error type: bad input from the user."""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""
