"""Declarative base, naming convention and column types shared by every model."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "Envelope",
    "JsonValue",
    "UTCDateTime",
    "json_array_length",
    "new_id",
    "utcnow",
]

# Deterministic constraint names: Alembic can drop/alter them on every backend, and SQLite's
# batch mode can recreate tables without losing them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A new primary key: a UUID4 string (ids are generated client-side)."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on every backend, stored and returned in UTC.

    SQLite has no time zones and returns naive values; PostgreSQL returns the session's
    zone. Normalising both to aware UTC keeps comparisons in Python correct. Naive values
    are refused on write, because their meaning depends on the machine's zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given; pass a timezone-aware value "
                "(e.g. datetime.now(UTC))"
            )
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact); plain JSON text on SQLite.
JsonValue = JSON().with_variant(JSONB(), "postgresql")


class json_array_length(GenericFunction[int]):
    """The length of a :data:`JsonValue` array, computed by the database (so a large array,
    a 10,000-target batch plan, is not sent to Python to be counted)."""

    type = Integer()
    inherit_cache = True


@compiles(json_array_length, "postgresql")
def _jsonb_array_length(element: json_array_length, compiler: SQLCompiler, **kw: Any) -> str:
    return f"jsonb_array_length({compiler.process(element.clauses, **kw)})"


# Sealed envelopes (worker.core.crypto) are opaque bytes.
Envelope = LargeBinary().with_variant(BYTEA(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base: naming convention, UUID string keys, aware timestamps."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JsonValue,
        list[Any]: JsonValue,
        bytes: Envelope,
    }


def id_column() -> Mapped[str]:
    """A UUID4 string primary key generated client-side."""
    return mapped_column(String(36), primary_key=True, default=new_id)
