"""Identities in a test cluster: admin API clients, ServiceAccounts with Roles, in-cluster folders.

Clients are built from their own ``kubernetes.client.Configuration``; the library's
process-wide default configuration is never read or changed.
"""

from __future__ import annotations

import base64
import copy
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.testenv.cluster import Cluster

# Spec section 07, "Minimum RBAC for an in-cluster install": the Role the Helm chart ships.
SPEC_MINIMUM_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]

TOKEN_SECONDS = 3600
M = TypeVar("M")


@dataclass(frozen=True)
class ServiceAccountAccess:
    """A ServiceAccount bound to a Role, with a TokenRequest token and a kubeconfig for it."""

    cluster: Cluster
    namespace: str
    name: str
    token: str = field(repr=False)
    kubeconfig: str = field(repr=False)

    @property
    def username(self) -> str:
        """The user name the API server sees for this ServiceAccount."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@dataclass(frozen=True)
class InClusterEnv:
    """A service-account folder (token, ca.crt, namespace) and the pod's environment variables."""

    sa_dir: Path
    environ: dict[str, str] = field(repr=False)
    namespace: str


def admin_api_client(cluster: Cluster) -> client.ApiClient:
    """Return an ApiClient authenticated as the cluster admin, from a dedicated Configuration."""
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ca_cert_data = cluster.ca_pem
    configuration.cert_file = str(cluster.admin_cert_file)
    configuration.key_file = str(cluster.admin_key_file)
    configuration.verify_ssl = True
    return client.ApiClient(configuration)


def token_kubeconfig(cluster: Cluster, user: str, token: str, namespace: str) -> str:
    """Return a kubeconfig YAML with the cluster CA inline and a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster.name,
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority-data": base64.b64encode(
                        cluster.ca_pem.encode("ascii")
                    ).decode("ascii"),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": f"{user}@{cluster.name}",
                "context": {"cluster": cluster.name, "user": user, "namespace": namespace},
            }
        ],
        "current-context": f"{user}@{cluster.name}",
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)


def ensure_namespace(api: client.ApiClient, namespace: str) -> None:
    """Create `namespace` unless it exists."""
    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except ApiException as exc:
        if exc.status != 409:
            raise


def create_service_account(
    api: client.ApiClient,
    cluster: Cluster,
    namespace: str,
    rules: Sequence[Mapping[str, Any]] | None = SPEC_MINIMUM_RULES,
    name: str | None = None,
) -> ServiceAccountAccess:
    """Create the namespace if missing, a ServiceAccount, a Role with `rules` and a RoleBinding.

    `rules=None` creates no Role and no RoleBinding: the account can authenticate and do nothing.
    Role and RoleBinding are named after the account and replaced when they already exist.
    """
    name = name or f"sa-{uuid.uuid4().hex[:10]}"
    ensure_namespace(api, namespace)
    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    _create_or_keep(
        lambda: core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    )
    if rules is not None:
        role = _model(
            client.V1Role,
            {"metadata": {"name": name}, "rules": [copy.deepcopy(dict(r)) for r in rules]}
        )
        _create_or_replace(
            lambda: rbac.create_namespaced_role(namespace, role),
            lambda: rbac.replace_namespaced_role(name, namespace, role),
        )
        binding = _model(
            client.V1RoleBinding,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }
        )
        _create_or_replace(
            lambda: rbac.create_namespaced_role_binding(namespace, binding),
            lambda: rbac.replace_namespaced_role_binding(name, namespace, binding),
        )
    token = request_token(api, cluster, namespace, name)
    return ServiceAccountAccess(
        cluster=cluster,
        namespace=namespace,
        name=name,
        token=token,
        kubeconfig=token_kubeconfig(cluster, name, token, namespace),
    )


def request_token(
    api: client.ApiClient, cluster: Cluster, namespace: str, name: str, seconds: int = TOKEN_SECONDS
) -> str:
    """Issue a bound token for a ServiceAccount through the TokenRequest API."""
    request = _model(
        client.AuthenticationV1TokenRequest,
        {"spec": {"audiences": [cluster.issuer], "expirationSeconds": seconds}},
    )
    issued = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, request
    )
    assert issued is not None and issued.status is not None
    return str(issued.status.token)


def write_in_cluster_env(
    folder: Path, cluster: Cluster, namespace: str, token: str
) -> InClusterEnv:
    """Lay out `folder` like a pod's service-account mount and return it with the pod's env."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_text(cluster.ca_pem)
    (folder / "namespace").write_text(namespace)
    environ = {
        "KUBERNETES_SERVICE_HOST": cluster.host,
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        # The worker's setting for where the folder is (a pod has the default path).
        "CAP_SERVICEACCOUNT_DIR": str(folder),
    }
    return InClusterEnv(sa_dir=folder, environ=environ, namespace=namespace)


def _model(model: type[M], data: dict[str, Any]) -> M:
    made = model.from_dict(data)  # type: ignore[attr-defined]
    if made is None:
        raise ValueError(f"{model.__name__} could not be built from {sorted(data)}")
    return cast(M, made)


def _create_or_keep(create: Callable[[], object]) -> None:
    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise


def _create_or_replace(create: Callable[[], object], replace: Callable[[], object]) -> None:
    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise
        replace()
