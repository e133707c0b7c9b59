"""The whole test environment behind one object: components start on first use, close() ends all.

Shared by the pytest plugin and by ``python -m tests.testenv up``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from tests.testenv.binaries import find_binaries
from tests.testenv.cluster import Cluster, ClusterSet
from tests.testenv.process import ManagedProcess, StartupError
from tests.testenv.services import PostgresServer, RedisServer

if TYPE_CHECKING:
    from tests.testenv.node import Node

WORKDIR_PREFIX = "cap-testenv-"
_OWNER_FILE = "owner.pid"
T = TypeVar("T")


def cluster_count_from(environ: Mapping[str, str]) -> int:
    """Read CAP_TEST_CLUSTERS (default 3), refusing anything but a positive integer."""
    raw = environ.get("CAP_TEST_CLUSTERS", "3")
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"CAP_TEST_CLUSTERS must be a positive integer, got {raw!r}")
    return count


def _remove_stale_workdirs(root: Path) -> None:
    """Delete work folders left by runs whose owning process no longer exists (kill -9)."""
    for folder in root.glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


class TestEnvironment:
    """Clusters, Redis and PostgreSQL in one temporary folder, each started lazily once."""

    __test__ = False  # not a test class, despite the name

    def __init__(
        self,
        *,
        cluster_count: int,
        environ: Mapping[str, str],
        progress: Callable[[], TextIO] = lambda: sys.stderr,
        node: bool = False,
    ) -> None:
        self.cluster_count = cluster_count
        self.node_enabled = node
        self._environ = dict(environ)
        self._progress = progress
        tmp_root = Path(tempfile.gettempdir())
        _remove_stale_workdirs(tmp_root)
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=tmp_root))
        (self.workdir / _OWNER_FILE).write_text(str(os.getpid()))
        if os.geteuid() == 0:
            # postgres runs as its own user and must be able to reach its folder below this one.
            self.workdir.chmod(0o711)
        self.logs = self.workdir / "logs"
        self.logs.mkdir()
        self._cluster_set: ClusterSet | None = None
        self._redis: RedisServer | None = None
        self._postgres: PostgresServer | None = None
        self._extra_redis: list[RedisServer] = []
        self._extra_postgres: list[PostgresServer] = []
        self._node: Node | None = None
        self._failures: dict[str, BaseException] = {}
        self.timings: dict[str, float] = {}
        self._closed = False

    def _once(self, what: str, start: Callable[[], T]) -> T:
        # A component that failed to start fails every later request the same way, fast.
        if self._closed:
            raise RuntimeError("the test environment is already closed")
        if what in self._failures:
            raise StartupError(f"{what} failed to start earlier: {self._failures[what]}")
        started = time.monotonic()
        try:
            result = start()
        except BaseException as exc:
            self._failures[what] = exc
            raise
        self.timings[what] = time.monotonic() - started
        return result

    def clusters(self) -> list[Cluster]:
        """Start etcd and the API servers on first call; return the ready clusters."""
        if self._cluster_set is None:

            def start() -> ClusterSet:
                binaries = find_binaries(self._environ, progress=self._progress())
                cluster_set = ClusterSet(binaries, self.workdir / "clusters", self.cluster_count)
                cluster_set.start()
                return cluster_set

            self._cluster_set = self._once("clusters", start)
        return self._cluster_set.clusters

    @property
    def cluster_set(self) -> ClusterSet | None:
        """The running cluster set, if started."""
        return self._cluster_set

    def redis(self) -> RedisServer:
        """Start the shared Redis on first call and return it."""
        if self._redis is None:

            def start() -> RedisServer:
                server = RedisServer(self.workdir / "redis", self.logs)
                server.start()
                return server

            self._redis = self._once("redis", start)
        return self._redis

    def new_redis(self, *, appendonly: bool = True) -> RedisServer:
        """Start an additional private Redis (for fault tests that kill or restart it)."""
        index = len(self._extra_redis) + 1
        server = RedisServer(
            self.workdir / f"redis-{index}", self.logs, appendonly=appendonly, name=f"redis-{index}"
        )
        self._extra_redis.append(server)
        server.start()
        return server

    def new_postgres(self) -> PostgresServer:
        """Start an additional private PostgreSQL (for fault tests that restart it)."""
        index = len(self._extra_postgres) + 1
        name = f"postgres-{index}"
        server = PostgresServer(self.workdir / name, self.logs, name=name)
        self._extra_postgres.append(server)
        server.start()
        return server

    def postgres(self) -> PostgresServer:
        """Initialise and start PostgreSQL on first call and return it."""
        if self._postgres is None:

            def start() -> PostgresServer:
                server = PostgresServer(self.workdir / "postgres", self.logs)
                server.start()
                return server

            self._postgres = self._once("postgres", start)
        return self._postgres

    def node(self) -> Node:
        """Start the node cluster (tests/testenv/node.py) on first call and return it: one more
        API server on the clusters' etcd, with containerd, kubelet, controller-manager,
        scheduler and kube-proxy running real pods on this host. CAP_NODE_SYNC_FREQUENCY
        (seconds, default 60 as kubelet's) sets kubelet's syncFrequency."""
        # Imported here: `python -m tests.testenv.node` must not find it imported already.
        from tests.testenv.node import Node, NodeError, find_node_binaries

        if not self.node_enabled:
            raise NodeError("this test environment was made without node=True")
        raw = self._environ.get("CAP_NODE_SYNC_FREQUENCY", "60")
        if not raw.isdigit() or not 1 <= int(raw) <= 3600:
            raise NodeError(
                f"CAP_NODE_SYNC_FREQUENCY must be whole seconds from 1 to 3600, got {raw!r}"
            )
        sync_frequency = int(raw)
        if self._node is None:

            def start() -> Node:
                binaries = find_binaries(self._environ, progress=self._progress())
                node_binaries = find_node_binaries(self._environ, progress=self._progress())
                self.clusters()
                assert self._cluster_set is not None
                node = Node(
                    node_binaries, binaries.kube_apiserver, self._cluster_set.etcd_url,
                    self.workdir / "node", self.logs, sync_frequency=sync_frequency,
                    progress=self._progress(),
                )  # fmt: skip
                node.start()
                return node

            self._node = self._once("node", start)
        return self._node

    def processes(self) -> list[ManagedProcess]:
        """Every server process started so far."""
        found: list[ManagedProcess] = []
        if self._cluster_set is not None:
            found += self._cluster_set.processes()
        for redis_server in (self._redis, *self._extra_redis):
            if redis_server is not None:
                found.append(redis_server.process)
        for postgres_server in (self._postgres, *self._extra_postgres):
            if postgres_server is not None and postgres_server.process is not None:
                found.append(postgres_server.process)
        if self._node is not None:
            found += [*self._node.processes.values(), self._node.apiserver.process]
        return found

    def dead_components(self) -> list[str]:
        """Names of started components whose process has exited."""
        return [p.name for p in self.processes() if p.pid is not None and not p.running()]

    def close(self) -> None:
        """Stop every component and delete the temporary folder."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        stops: list[Callable[[], None]] = [server.stop for server in self._extra_redis]
        stops += [server.stop for server in self._extra_postgres]
        if self._node is not None:
            stops.append(self._node.stop)  # before etcd: its API server keeps data there
        for component in (self._redis, self._postgres, self._cluster_set):
            if component is not None:
                stops.append(component.stop)
        for stop in stops:
            try:
                stop()
            except Exception as exc:
                errors.append(repr(exc))
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)
        if errors:
            raise RuntimeError("stopping the test environment failed: " + "; ".join(errors))
