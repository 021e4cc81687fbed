"""Domain exceptions. The HTTP layer maps them to status codes in one place."""

from __future__ import annotations


class RalphError(Exception):
    """Base class for errors a client can act on."""


class NotFound(RalphError, LookupError):
    """The named thing does not exist."""


class Conflict(RalphError):
    """The request conflicts with the current state (a version, a status)."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class InvalidInput(RalphError, ValueError):
    """The request is well-formed but not acceptable."""


class AlreadyInBlock(InvalidInput):
    """A proposed change that would leave the block as it is (its text is already there)."""


class AlreadyRejected(InvalidInput):
    """An agent proposing again a change a reviewer rejected (recently) for the same block."""
