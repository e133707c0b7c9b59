"""Lookups shared by the aggregates' query modules."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import Base
from models.errors import AlreadyExistsError, InvalidRecordError, NotFoundError

_M = TypeVar("_M", bound=Base)


def get_row(session: Session, model: type[_M], row_id: str, entity: str) -> _M:
    """The row of ``model`` with this id, or NotFoundError naming ``entity``."""
    row = session.get(model, row_id)
    if row is None:
        raise NotFoundError(entity, row_id)
    return row


def get_row_by_name(session: Session, model: type[_M], name: str, entity: str) -> _M:
    """The row of ``model`` with this unique name, or NotFoundError."""
    row = session.scalars(select(model).where(model.name == name)).one_or_none()  # type: ignore[attr-defined]
    if row is None:
        raise NotFoundError(entity, name, by="name")
    return row


def ensure_unique_name(session: Session, model: type[Base], name: str, entity: str) -> None:
    """Refuse an empty name, or one another row of ``model`` already has."""
    if not name or not name.strip():
        raise InvalidRecordError(f"{entity} name must not be empty")
    taken = session.scalar(select(model.id).where(model.name == name))  # type: ignore[attr-defined]
    if taken is not None:
        raise AlreadyExistsError(
            f"a {entity} named {name!r} already exists (id {taken}); choose another name"
        )
