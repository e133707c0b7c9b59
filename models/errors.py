"""Errors the models layer raises, and the database errors that mean "unreachable right now"."""

from __future__ import annotations

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = [
    "DATABASE_OUTAGE_ERRORS",
    "AlreadyExistsError",
    "InvalidRecordError",
    "NotFoundError",
    "RunStateError",
]

#: Errors that mean "the database is unreachable right now", not "this request is wrong":
#: a lost or refused connection, a server restarting, an exhausted pool. Tasks retry them.
DATABASE_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
)


class NotFoundError(LookupError):
    """No row with the given id or name."""

    def __init__(self, entity: str, key: str, *, by: str = "id") -> None:
        super().__init__(f"{entity} with {by} {key!r} not found")
        self.entity = entity
        self.key = key


class AlreadyExistsError(ValueError):
    """A row with the same unique name already exists."""


class InvalidRecordError(ValueError):
    """The values given do not form a valid row (the message says which rule and how to fix)."""


class RunStateError(ValueError):
    """A run transition that its current state does not allow."""
