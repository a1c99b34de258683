"""User-facing errors.

Anything a user can fix (a bad path, a wrong column, an unknown key) raises :class:`FastlesionError` with one
line naming the culprit. The CLI prints that line and exits non-zero, without a traceback.
"""


class FastlesionError(Exception):
    """An error caused by user input: printed as one line by the CLI, exit status 2."""


class ConfigError(FastlesionError):
    """A bad config file, key, value or type."""


class DatasetError(FastlesionError):
    """A dataset that cannot be read as asked: missing files, missing columns, a single class, ..."""
