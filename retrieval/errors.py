"""Errors caused by the user's input; the command line prints their message and exits with 2."""

from __future__ import annotations

from data.errors import DataError


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what to do instead."""


#: Exceptions the command line reports as one line (no traceback), exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, DataError)
