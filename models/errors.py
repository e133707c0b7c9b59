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


class ActiveRunError(ValueError):
    """A distribution already has a queued or running execute or rollback."""

    def __init__(self, distribution_id: str, active_run_id: str, action: str, state: str) -> None:
        self.distribution_id = distribution_id
        self.active_run_id = active_run_id
        super().__init__(
            f"distribution {distribution_id} already has an active {action} run "
            f"{active_run_id} ({state}); only one execute or rollback of a distribution may be "
            f"queued or running at a time: wait until it finishes (`certautopilot runs show "
            f"{active_run_id}`), then enqueue again"
        )


class RunStateError(ValueError):
    """A run transition that its current state does not allow."""
