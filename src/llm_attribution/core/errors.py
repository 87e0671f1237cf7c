"""Typed exceptions for problems the user can fix.

The CLI turns every :class:`UserError` into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback. Library code raises these instead of ``assert`` so that a wrong field name
or a missing file never surfaces as a stack trace.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, settings or files; the message says what and how to fix it."""


class ConfigError(UserError):
    """An option value is malformed or out of range."""


class DataError(UserError):
    """A dataset cannot be found, read, or has the wrong shape (fields, emptiness, labels)."""


class ModelError(UserError):
    """A model or adapter cannot be resolved or loaded."""


class RunError(UserError):
    """A run folder is missing, incomplete, or was written with other settings."""
