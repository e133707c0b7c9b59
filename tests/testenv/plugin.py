"""Pytest plugin: real Kubernetes API servers, Redis and PostgreSQL as fixtures.

Loaded with ``-p tests.testenv.plugin`` (pyproject addopts). Nothing starts until a test asks
for it; everything stops at the end of the session. A component that cannot start makes the
requesting tests error with that component's own output, never skip.

Fixtures:
  clusters              session   list[Cluster] (CAP_TEST_CLUSTERS, default 3)
  cluster               session   clusters[0]
  make_service_account  function  (cluster, namespace, rules=SPEC_MINIMUM_RULES, name=None)
                                  -> ServiceAccountAccess
  in_cluster_env        function  (cluster, namespace, token) -> InClusterEnv
  testenv_admin_api     session   (cluster) -> kubernetes.client.ApiClient (admin)
  redis_server          session   RedisServer (.url, .restart())
  redis_url             session   redis://127.0.0.1:PORT/0
  make_redis_server     session   (appendonly=True) -> a private RedisServer for fault tests
  postgres_url          function  URL of a fresh, empty database (dropped afterwards)
  testenv               session   the TestEnvironment itself
  node                  session   Node: a real single-node cluster (pods run on this host)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.testenv.access import (
    SPEC_MINIMUM_RULES,
    InClusterEnv,
    ServiceAccountAccess,
    admin_api_client,
    create_service_account,
    write_in_cluster_env,
)
from tests.testenv.binaries import BinariesError, find_binaries
from tests.testenv.cluster import Cluster
from tests.testenv.environment import TestEnvironment, cluster_count_from
from tests.testenv.node import Node, NodeError, find_node_binaries
from tests.testenv.services import RedisServer

_binaries_failure = pytest.StashKey[BinariesError]()
_node_binaries_failure = pytest.StashKey[NodeError]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build missing Kubernetes binaries before any test runs, outside per-test timeouts.

    Only when a collected test will start clusters; the build takes ~10 minutes once, longer
    than pytest-timeout allows a single test. A failure is kept and reported by `clusters`.
    """
    if session.config.option.collectonly:
        return
    wanted = [set(getattr(item, "fixturenames", ())) for item in session.items]
    if not any({"clusters", "node"} & names for names in wanted):
        return
    with _uncaptured(session.config):
        try:
            find_binaries(os.environ)
        except BinariesError as exc:
            session.config.stash[_binaries_failure] = exc
        if any("node" in names for names in wanted):
            try:
                find_node_binaries(os.environ)
            except NodeError as exc:
                session.config.stash[_node_binaries_failure] = exc


@pytest.fixture(scope="session")
def testenv(pytestconfig: pytest.Config) -> Iterator[TestEnvironment]:
    """The session's test environment; components start when first requested."""
    environment = TestEnvironment(
        cluster_count=cluster_count_from(os.environ),
        environ=os.environ,
        progress=lambda: sys.stderr,
        node=True,  # started only when a test asks for the `node` fixture
    )
    try:
        yield environment
    finally:
        environment.close()


def _uncaptured(config: pytest.Config) -> contextlib.AbstractContextManager[object]:
    """Let a one-time binaries build print its progress through pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        return contextlib.nullcontext()
    return capture.global_and_fixture_disabled()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def clusters(testenv: TestEnvironment, pytestconfig: pytest.Config) -> list[Cluster]:
    """All test clusters, started on first use (3 unless CAP_TEST_CLUSTERS says otherwise)."""
    failure = pytestconfig.stash.get(_binaries_failure, None)
    if failure is not None:
        raise failure
    with _uncaptured(pytestconfig):
        return testenv.clusters()


@pytest.fixture(scope="session")
def cluster(clusters: list[Cluster]) -> Cluster:
    """The first test cluster."""
    return clusters[0]


@pytest.fixture(scope="session")
def testenv_admin_api(
    clusters: list[Cluster],
) -> Iterator[Callable[[Cluster], client.ApiClient]]:
    """Factory of admin ApiClients (for test setup and assertions only)."""
    made: list[client.ApiClient] = []

    def make(target: Cluster) -> client.ApiClient:
        api = admin_api_client(target)
        made.append(api)
        return api

    yield make
    for api in made:
        with contextlib.suppress(Exception):
            api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def make_service_account(
    testenv_admin_api: Callable[[Cluster], client.ApiClient],
) -> Callable[..., ServiceAccountAccess]:
    """Factory: namespace (if missing) + ServiceAccount + Role(rules) + RoleBinding + token."""
    apis: dict[str, client.ApiClient] = {}

    def make(
        target: Cluster,
        namespace: str,
        rules: Sequence[Mapping[str, Any]] | None = SPEC_MINIMUM_RULES,
        name: str | None = None,
    ) -> ServiceAccountAccess:
        if target.name not in apis:
            apis[target.name] = testenv_admin_api(target)
        return create_service_account(apis[target.name], target, namespace, rules, name)

    return make


@pytest.fixture
def in_cluster_env(tmp_path: Path) -> Callable[[Cluster, str, str], InClusterEnv]:
    """Factory: a pod-like service-account folder (token, ca.crt, namespace) plus its env vars."""
    count = 0

    def make(target: Cluster, namespace: str, token: str) -> InClusterEnv:
        nonlocal count
        count += 1
        return write_in_cluster_env(
            tmp_path / f"serviceaccount-{count}", target, namespace, token
        )

    return make


@pytest.fixture(scope="session")
def redis_server(testenv: TestEnvironment) -> RedisServer:
    """The session's Redis server (`.url`, `.restart()`)."""
    return testenv.redis()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis: redis://127.0.0.1:PORT/0."""
    return redis_server.url


@pytest.fixture(scope="session")
def make_redis_server(testenv: TestEnvironment) -> Callable[..., RedisServer]:
    """Factory of private Redis servers (appendonly by default) for tests that kill them."""
    return testenv.new_redis


@pytest.fixture
def postgres_url(testenv: TestEnvironment) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (SQLAlchemy URL, psycopg 3 driver)."""
    server = testenv.postgres()
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture(scope="session")
def node(testenv: TestEnvironment, pytestconfig: pytest.Config) -> Node:
    """The node cluster with containerd, kubelet, controller-manager, scheduler, kube-proxy.

    A host that cannot run it makes the requesting tests error with the reason (NodeError
    names what to install or set), never skip.
    """
    failure = pytestconfig.stash.get(_node_binaries_failure, None)
    if failure is not None:
        raise failure
    with _uncaptured(pytestconfig):
        return testenv.node()
