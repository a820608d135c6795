"""User-facing errors.

Anything raised as :class:`UserError` is reported by the CLI as one line
(``error: ...``) with exit status 2 and no traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a file, a column, a combination."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or contradicts another key."""


class DataError(UserError):
    """A dataset is missing, unreadable, empty, or lacks a required column."""
