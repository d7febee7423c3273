"""Typed errors that cross the boundary between the core and the services.

The API maps them to status codes by type (matchbox's sentinel errors), never by
matching the text of a message. Each is a ``ValueError`` so older callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class NetbootdError(ValueError):
    """Base of every typed error the core raises to a service."""


class NotFound(NetbootdError):
    """The named thing (image, version, node, channel) does not exist. HTTP 404."""


class Conflict(NetbootdError):
    """The request clashes with the current state (e.g. delete an active version). 409."""


class Invalid(NetbootdError):
    """The request itself is malformed or breaks a rule (bad name, bad build). 400/422."""


class TooLarge(Invalid):
    """Something went past its size limit (an upload: the API answers 413)."""

    def __init__(self, limit: int, what: str = "upload") -> None:
        self.limit = limit
        super().__init__(f"{what} larger than {limit} bytes")


class DiskFull(TooLarge):
    """It would not fit on the disk (a reserve of free space is kept). HTTP 507."""
