"""Database engines and sessions: the only place sessions are made.

SQLite (the embedded default) is tuned for several worker processes sharing one file:

* WAL journal, so readers never block the writer and vice versa;
* foreign keys enforced (SQLite leaves them off unless asked, per connection);
* a busy timeout, so a writer waits for the lock instead of failing at once;
* every transaction starts with ``BEGIN IMMEDIATE``. SQLite's default deferred
  transactions take the write lock at the first write, and a reader that tries to upgrade
  while another process has committed fails with "database is locked" *without* waiting
  for the busy timeout. Taking the lock at BEGIN makes writers queue up instead. The price:
  keep session scopes short and never hold one across a network call (a Kubernetes API
  request), because on SQLite an open transaction blocks every other writer.

PostgreSQL gets ``pool_pre_ping`` so connections dropped by a server restart are replaced
transparently.

Celery's prefork pool forks after the engine may have opened connections; a connection
shared across processes corrupts both sides. Call :func:`dispose_after_fork` from
``worker_process_init`` so each child opens its own connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from worker.platform.redaction import redact_url
from worker.platform.settings import normalize_database_url

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "DatabaseUrlError",
    "dispose_after_fork",
    "make_engine",
    "make_session_factory",
    "session_scope",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long (ms) a SQLite connection waits for another process's write lock before failing."""


class DatabaseUrlError(ValueError):
    """The database URL cannot be used (unsupported backend, missing folder)."""


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _install_sqlite_hooks(engine: Engine, *, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Hand transaction control to SQLAlchemy (the "begin" hook below); pysqlite's own
        # implicit BEGIN would defer locking and break SAVEPOINTs.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode; only a power loss
            # can drop the last transactions, which the broker would redeliver.
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, echo: bool = False, sqlite_foreign_keys: bool = True) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL) with the settings described above."""
    parsed = make_url(normalize_database_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        options: dict[str, Any] = {}
        if _is_memory(parsed):
            # One shared connection, or every session would see its own empty database.
            options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        else:
            folder = Path(parsed.database or "").absolute().parent
            if not folder.is_dir():
                raise DatabaseUrlError(
                    f"SQLite database folder {str(folder)!r} does not exist; create it or fix "
                    f"CAP_DATABASE_URL ({redact_url(url)!r})"
                )
        engine = create_engine(parsed, echo=echo, **options)
        _install_sqlite_hooks(engine, foreign_keys=sqlite_foreign_keys)
        return engine
    if backend == "postgresql":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
    raise DatabaseUrlError(
        f"database URL {redact_url(url)!r} uses the unsupported backend {backend!r}; "
        "use sqlite:///path or postgresql+psycopg://user:password@host/db"
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The session factory every caller uses (objects stay readable after commit)."""
    # expire_on_commit=False: tasks read attributes after the scope commits; with
    # lazy="raise" relationships nothing is ever loaded behind the caller's back anyway.
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_after_fork(engine: Engine) -> None:
    """Forget pooled connections inherited from the parent process (call in the child)."""
    # close=False: the parent still owns those sockets/files; closing them here would
    # break its connections.
    engine.dispose(close=False)
