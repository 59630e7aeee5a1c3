"""Errors a user can fix: the CLI prints the message (no traceback) and exits with status 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, paths, data) with a message that says how to fix it."""


EXIT_OK = 0
EXIT_USER_ERROR = 2
