"""The one exception type that reaches the user as a clear message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a data set. The CLI prints it in one line, exit 2."""
