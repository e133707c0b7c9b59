"""Run Alembic migrations programmatically (``certautopilot migrate``), on SQLite and PostgreSQL.

The migration environment lives in ``models/migrations``; there is no alembic.ini. The caller
hands in the engine (``worker.platform.db.make_engine(url, sqlite_foreign_keys=False)``); each
call runs in one transaction on it:

* PostgreSQL: DDL is transactional, and a transaction-scoped advisory lock makes concurrent
  ``migrate`` runs (several pods starting at once) queue instead of racing.
* SQLite: the engine's ``BEGIN IMMEDIATE`` serialises writers. Its connections must have
  foreign keys off, because batch mode recreates tables and dropping a referenced table with
  foreign keys on would cascade or fail (checked: a migration refuses such an engine);
  integrity is checked with ``PRAGMA foreign_key_check`` before committing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

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
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            lock = text("SELECT pg_advisory_xact_lock(:key)")
            connection.execute(lock, {"key": _PG_LOCK_KEY})
        if connection.dialect.name == "sqlite":
            if connection.exec_driver_sql("PRAGMA foreign_keys").scalar():
                raise MigrationError(
                    "SQLite migrations need an engine with foreign keys off "
                    "(worker.platform.db.make_engine(url, sqlite_foreign_keys=False))"
                )
        yield connection
        if connection.dialect.name == "sqlite":
            problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise MigrationError(
                    f"migration left {len(problems)} rows violating foreign keys "
                    f"(first: table {problems[0][0]!r}); nothing was committed"
                )


def upgrade(engine: Engine, rev: str = "head") -> None:
    """Migrate the database behind ``engine`` up to ``rev`` (default: the newest revision)."""
    with _migration_connection(engine) as connection:
        command.upgrade(_config(connection), rev)


def downgrade(engine: Engine, rev: str) -> None:
    """Migrate the database behind ``engine`` down to ``rev`` ("base" removes every table)."""
    with _migration_connection(engine) as connection:
        command.downgrade(_config(connection), rev)


def current(engine: Engine) -> str | None:
    """The revision the database behind ``engine`` is at (None when never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head() -> str:
    """The newest revision shipped with this code (compare with current() for readiness)."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    if revision is None:
        raise MigrationError("no migration scripts found in models/migrations/versions")
    return revision
