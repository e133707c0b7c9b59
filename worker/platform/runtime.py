"""Per-process resources: settings, database engine, keyring and Kubernetes API clients.

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
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.core.crypto import Keyring
from worker.core.lru import LruCache
from worker.kube.connect import ClientCache
from worker.platform.db import dispose_after_fork, make_engine, make_session_factory, session_scope
from worker.platform.settings import Settings, load_settings

if TYPE_CHECKING:
    from worker.core.bundle import TlsBundle


@dataclass
class Runtime:
    """What one process needs to do distribution work."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    keyring: Keyring
    clients: ClientCache
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    """The process environment, read once (in-cluster detection needs KUBERNETES_SERVICE_*)."""
    pid: int = field(default_factory=os.getpid)
    bundles: LruCache[tuple[str, str], TlsBundle] = field(default_factory=lambda: LruCache(256))
    """Parsed certificate bundles by (certificate id, fingerprint): parse once per process."""
    _client_versions: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on error."""
        with session_scope(self.sessions) as session:
            yield session

    def cached_client(self, credential_id: str, envelope: bytes, allow_insecure: bool) -> Any:
        """The client built for exactly this sealed credential, or None (saves a decrypt)."""
        known = self._client_versions.get(credential_id)
        if known is not None and known[0] == _version(envelope, allow_insecure):
            return known[1]
        return None

    def remember_client(
        self, credential_id: str, envelope: bytes, allow_insecure: bool, client: Any
    ) -> None:
        """Remember which sealed credential ``client`` was built from."""
        self._client_versions[credential_id] = (_version(envelope, allow_insecure), client)

    def close(self) -> None:
        """Release clients and pooled connections (worker shutdown)."""
        self.clients.close_all()
        self.engine.dispose()


def _version(envelope: bytes, allow_insecure: bool) -> str:
    return sha256(envelope + (b"\1" if allow_insecure else b"\0")).hexdigest()


def build_runtime(settings: Settings) -> Runtime:
    """Create the resources for ``settings`` in this process."""
    engine = make_engine(settings.database.url)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        keyring=Keyring.from_settings(settings),
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
                keyring=current.keyring,
                clients=current.clients,
                environ=current.environ,
            )
            _runtime = current
        if current is None:
            current = build_runtime(load_settings())
            _runtime = current
        return current


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) the process runtime; the CLI and tests use explicit settings."""
    global _runtime
    with _lock:
        _runtime = runtime
