"""Per-process resources: settings, database engine, keyring and the Kubernetes API client cache.

A Celery prefork worker forks its pool processes after the parent imported the
app, so anything holding a socket (database pool, urllib3 pools) must be created
in the process that uses it. :func:`get_runtime` builds the resources lazily and
rebuilds them when it notices it now runs in a different process (a fork).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.core.crypto import Keyring, SealContext, envelope_key_id, rewrap, seal, unseal
from worker.core.lru import LruCache
from worker.kube.connect import ClientCache
from worker.platform.bootstrap import bootstrap
from worker.platform.db import dispose_after_fork, make_engine, make_session_factory, session_scope
from worker.platform.settings import Settings, SettingsError, load_settings, require_kek

if TYPE_CHECKING:
    from worker.core.bundle import TlsBundle


@dataclass(frozen=True)
class KeyringSealer:
    """The models' Sealer (models.sealing) over worker.core.crypto with this keyring."""

    keyring: Keyring

    def seal(self, plaintext: bytes, *, table: str, row_id: str, purpose: str) -> bytes:
        """Encrypt under the current KEK, bound to (table, row id, purpose)."""
        return seal(self.keyring, plaintext, SealContext(table, row_id, purpose))

    def unseal(self, envelope: bytes, *, table: str, row_id: str, purpose: str) -> bytes:
        """Decrypt an envelope bound to (table, row id, purpose)."""
        return unseal(self.keyring, envelope, SealContext(table, row_id, purpose))

    def rewrap(
        self, envelope: bytes, to_key_id: str, *, table: str, row_id: str, purpose: str
    ) -> bytes:
        """Re-wrap the data key under ``to_key_id``; the payload is untouched."""
        return rewrap(self.keyring, envelope, SealContext(table, row_id, purpose), to_key_id)

    def key_id(self, envelope: bytes) -> str:
        """The id of the KEK that wraps the envelope."""
        return envelope_key_id(envelope)


@dataclass
class Runtime:
    """What one process needs to do distribution work."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    keys: Keyring | None
    """None without a configured KEK (see :attr:`keyring`)."""
    clients: ClientCache
    """The process's API clients (one per credential, rebuilt when its sealed bytes change)."""
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    """The process environment, read once (in-cluster detection needs KUBERNETES_SERVICE_*)."""
    pid: int = field(default_factory=os.getpid)
    bundles: LruCache[str, TlsBundle] = field(default_factory=lambda: LruCache(256))
    """Parsed certificate bundles by certificate revision id: parse once per process."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on error."""
        with session_scope(self.sessions) as session:
            yield session

    @property
    def keyring(self) -> Keyring:
        """The KEKs; without one configured, the settings' error naming the fix."""
        if self.keys is None:
            require_kek(self.settings)
            raise SettingsError("no KEK loaded")  # unreachable: require_kek raised
        return self.keys

    @property
    def sealer(self) -> KeyringSealer:
        """Seals and opens the models' envelopes with this process's keyring."""
        return KeyringSealer(self.keyring)

    def close(self) -> None:
        """Release clients and pooled connections (worker shutdown)."""
        self.clients.close_all()
        self.engine.dispose()


@contextmanager
def migration_engine(url: str) -> Iterator[Engine]:
    """An engine for :mod:`models.migrate` on ``url`` (SQLite foreign keys off), then disposed."""
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        yield engine
    finally:
        engine.dispose()


def build_runtime(settings: Settings) -> Runtime:
    """Create the resources for ``settings`` in this process."""
    engine = make_engine(settings.database.url)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        keys=None if settings.crypto.missing else Keyring.from_settings(settings),
        clients=ClientCache(
            connect_timeout=settings.kube.connect_timeout,
            read_timeout=settings.kube.read_timeout,
        ),
    )


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """The process's runtime, created on first use and re-created after a fork."""
    global _runtime
    with _lock:
        current = _runtime
        if current is not None and current.pid != os.getpid():
            # Inherited from the parent: forget its sockets without closing them.
            dispose_after_fork(current.engine)
            current.clients.reset_after_fork()
            current = Runtime(
                settings=current.settings,
                engine=current.engine,
                sessions=current.sessions,
                keys=current.keys,
                clients=current.clients,
                environ=current.environ,
            )
            _runtime = current
        if current is None:
            current = build_runtime(bootstrap(load_settings()))
            _runtime = current
        return current


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) the process runtime; the CLI and tests use explicit settings."""
    global _runtime
    with _lock:
        _runtime = runtime
