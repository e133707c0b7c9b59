"""A real test environment: Kubernetes API servers (kube-apiserver + etcd), Redis, PostgreSQL.

See ``tests/testenv/plugin.py`` for the pytest fixtures and ``python -m tests.testenv up`` to
start the same environment by hand.
"""

from tests.testenv.access import (
    SPEC_MINIMUM_RULES,
    InClusterEnv,
    ServiceAccountAccess,
    admin_api_client,
    create_service_account,
    request_token,
    token_kubeconfig,
    write_in_cluster_env,
)
from tests.testenv.binaries import Binaries, BinariesError, find_binaries
from tests.testenv.cluster import Cluster, ClusterSet
from tests.testenv.environment import TestEnvironment
from tests.testenv.process import StartupError
from tests.testenv.services import PostgresServer, RedisServer

__all__ = [
    "SPEC_MINIMUM_RULES",
    "Binaries",
    "BinariesError",
    "Cluster",
    "ClusterSet",
    "InClusterEnv",
    "PostgresServer",
    "RedisServer",
    "ServiceAccountAccess",
    "StartupError",
    "TestEnvironment",
    "admin_api_client",
    "create_service_account",
    "find_binaries",
    "request_token",
    "token_kubeconfig",
    "write_in_cluster_env",
]
