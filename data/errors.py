"""Exceptions raised for problems with the user's data; the command line shows their message."""

from __future__ import annotations


class DataError(ValueError):
    """The data the user pointed at cannot be used; the message says what to do."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset could not be found on disk nor fetched."""


class DecodeBusyError(RuntimeError):
    """Every image-decoding slot stayed busy too long (a server answers 503: retry later)."""
