"""Run Alembic migrations programmatically (``certautopilot migrate``), on SQLite and PostgreSQL.

The migration environment lives in ``models/migrations``; there is no alembic.ini. Each call
runs in one transaction on its own engine:

* PostgreSQL: DDL is transactional, and a transaction-scoped advisory lock makes concurrent
  ``migrate`` runs (several pods starting at once) queue instead of racing.
* SQLite: ``BEGIN IMMEDIATE`` (worker.platform.db) already serialises writers. Foreign keys are
  switched off for the duration, because batch mode recreates tables and dropping a
  referenced table with foreign keys on would cascade or fail; integrity is checked with
  ``PRAGMA foreign_key_check`` before committing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from worker.platform.db import make_engine

__all__ = ["MigrationError", "current", "downgrade", "head", "upgrade"]

_SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
# Arbitrary constant: "CAPMIGR" as an integer; identifies our advisory lock.
_PG_LOCK_KEY = 0x4341504D49475200 & 0x7FFFFFFFFFFFFFFF


class MigrationError(RuntimeError):
    """A migration left the database inconsistent (nothing was committed)."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_connection(url: str) -> Iterator[Connection]:
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                connection.execute(lock, {"key": _PG_LOCK_KEY})
            yield connection
            if connection.dialect.name == "sqlite":
                problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if problems:
                    raise MigrationError(
                        f"migration left {len(problems)} rows violating foreign keys "
                        f"(first: table {problems[0][0]!r}); nothing was committed"
                    )
    finally:
        engine.dispose()


def upgrade(url: str, rev: str = "head") -> None:
    """Migrate the database at ``url`` up to ``rev`` (default: the newest revision)."""
    with _migration_connection(url) as connection:
        command.upgrade(_config(connection), rev)


def downgrade(url: str, rev: str) -> None:
    """Migrate the database at ``url`` down to ``rev`` ("base" removes every table)."""
    with _migration_connection(url) as connection:
        command.downgrade(_config(connection), rev)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at (None when never migrated)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision shipped with this code (compare with current() for readiness)."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    if revision is None:
        raise MigrationError("no migration scripts found in models/migrations/versions")
    return revision
