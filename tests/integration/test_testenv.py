"""The test environment is real: independent clusters, real RBAC and validation, Redis, PostgreSQL.

These tests also record facts about the real API server that the worker depends on, e.g.
whether the spec's minimum Role lets a ServiceAccount read its own Namespace object.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
import sqlalchemy
import yaml
from cryptography import x509
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from tests.testenv import (
    SPEC_MINIMUM_RULES,
    Cluster,
    ServiceAccountAccess,
    StartupError,
    TestEnvironment,
)
from tests.testenv import binaries as binaries_module
from tests.testenv.binaries import ETCD_VERSION, K8S_VERSION, BinariesError, find_binaries
from tests.testenv.cluster import ApiServer
from tests.testenv.pki import CertificateAuthority
from tests.testenv.services import PostgresServer, RedisServer

AdminApi = Callable[[Cluster], client.ApiClient]
MakeServiceAccount = Callable[..., ServiceAccountAccess]

NO_UPDATE_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]


def unique_namespace() -> str:
    """A namespace name no other test uses (namespaces cannot be deleted: no controller runs)."""
    return f"tt-{uuid.uuid4().hex[:10]}"


def tls_secret(name: str, data: dict[str, bytes]) -> client.V1Secret:
    """A kubernetes.io/tls Secret with base64-encoded `data`."""
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        type="kubernetes.io/tls",
        data={key: base64.b64encode(value).decode("ascii") for key, value in data.items()},
    )


def api_from_kubeconfig(kubeconfig: str) -> client.ApiClient:
    """An ApiClient from a kubeconfig string, leaving the library's default configuration alone."""
    loaded = config.new_client_from_config_dict(  # type: ignore[no-untyped-call]
        yaml.safe_load(kubeconfig), persist_config=False
    )
    return cast(client.ApiClient, loaded)


def api_with_token(target: Cluster, token: str) -> client.ApiClient:
    """An ApiClient that presents `token` to `target`, trusting the target's CA."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": target.name,
                "cluster": {
                    "server": target.server,
                    "certificate-authority-data": base64.b64encode(target.ca_pem.encode()).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": target.name, "user": "u"}}],
        "current-context": "c",
    }
    return api_from_kubeconfig(yaml.safe_dump(kubeconfig))


def user_info(api: client.ApiClient) -> client.V1UserInfo:
    """Who the API server says the caller is (SelfSubjectReview)."""
    reviews = client.AuthenticationV1Api(api)
    review = reviews.create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status is not None and review.status.user_info is not None
    return review.status.user_info


def whoami(api: client.ApiClient) -> str:
    """The user name the API server authenticated (SelfSubjectReview)."""
    return str(user_info(api).username)


def status_of(call: Callable[[], Any]) -> int:
    """Run an API call and return the HTTP status it failed with (200 when it succeeded)."""
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


@pytest.fixture
def admin(cluster: Cluster, testenv_admin_api: AdminApi) -> client.CoreV1Api:
    """Core API of the first cluster as admin."""
    return client.CoreV1Api(testenv_admin_api(cluster))


@pytest.fixture
def second_cluster(clusters: list[Cluster]) -> Cluster:
    """The second cluster; the independence tests need at least two."""
    assert len(clusters) >= 2, "independence tests need CAP_TEST_CLUSTERS >= 2"
    return clusters[1]


pytestmark = pytest.mark.integration


# --- clusters are real and independent -------------------------------------------------------


def test_secret_created_in_one_cluster_is_absent_in_another(
    cluster: Cluster, second_cluster: Cluster, testenv_admin_api: AdminApi
) -> None:
    namespace = unique_namespace()
    first = client.CoreV1Api(testenv_admin_api(cluster))
    second = client.CoreV1Api(testenv_admin_api(second_cluster))
    for api in (first, second):
        api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    first.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="only-here"))
    )

    assert status_of(lambda: first.read_namespaced_secret("only-here", namespace)) == 200
    assert status_of(lambda: second.read_namespaced_secret("only-here", namespace)) == 404


def test_each_cluster_has_its_own_serving_ca_issuer_and_admin(clusters: list[Cluster]) -> None:
    assert len({c.ca_pem for c in clusters}) == len(clusters)
    assert len({c.issuer for c in clusters}) == len(clusters)
    assert len({c.admin_kubeconfig for c in clusters}) == len(clusters)
    assert len({c.server for c in clusters}) == len(clusters)


def test_a_cluster_rejects_the_admin_certificate_of_another(
    cluster: Cluster, second_cluster: Cluster
) -> None:
    # Trust the second cluster's serving CA, but present the first cluster's admin cert.
    configuration = client.Configuration()
    configuration.host = second_cluster.server
    configuration.ca_cert_data = second_cluster.ca_pem
    configuration.cert_file = str(cluster.admin_cert_file)
    configuration.key_file = str(cluster.admin_key_file)
    api = client.CoreV1Api(client.ApiClient(configuration))

    # A client certificate from an unknown CA is an authentication failure, not anonymity.
    assert status_of(lambda: api.list_namespace()) == 401


def test_a_cluster_rejects_service_account_tokens_of_another(
    cluster: Cluster, second_cluster: Cluster, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace())
    foreign = client.CoreV1Api(api_with_token(second_cluster, account.token))

    assert status_of(lambda: foreign.read_namespace(account.namespace)) == 401


def test_admin_kubeconfig_carries_inline_data_and_authenticates_as_system_masters(
    cluster: Cluster,
) -> None:
    kubeconfig = yaml.safe_load(cluster.admin_kubeconfig)
    entry = kubeconfig["clusters"][0]["cluster"]
    user = kubeconfig["users"][0]["user"]
    assert entry["server"] == cluster.server
    assert base64.b64decode(entry["certificate-authority-data"]).decode() == cluster.ca_pem
    assert set(user) == {"client-certificate-data", "client-key-data"}

    api = api_from_kubeconfig(cluster.admin_kubeconfig)
    assert "system:masters" in (user_info(api).groups or [])


# --- RBAC and validation behave like a real cluster ------------------------------------------


def test_service_account_kubeconfig_authenticates_as_that_account(
    cluster: Cluster, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace())

    kubeconfig = yaml.safe_load(account.kubeconfig)
    assert kubeconfig["users"][0]["user"] == {"token": account.token}
    assert "certificate-authority-data" in kubeconfig["clusters"][0]["cluster"]
    assert whoami(api_from_kubeconfig(account.kubeconfig)) == account.username


def test_service_account_token_comes_from_token_request_and_lasts_an_hour(
    cluster: Cluster, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace())
    payload = account.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    assert claims["iss"] == cluster.issuer
    assert claims["aud"] == [cluster.issuer]
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["sub"] == account.username


def test_service_account_without_update_verb_gets_403_on_put(
    cluster: Cluster, admin: client.CoreV1Api, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace(), rules=NO_UPDATE_RULES)
    admin.create_namespaced_secret(
        account.namespace, tls_secret("web-tls", {"tls.crt": b"old", "tls.key": b"old"})
    )
    limited = client.CoreV1Api(api_from_kubeconfig(account.kubeconfig))
    live = limited.read_namespaced_secret("web-tls", account.namespace)  # get is granted

    with pytest.raises(ApiException) as raised:
        limited.replace_namespaced_secret("web-tls", account.namespace, live)

    assert raised.value.status == 403
    status = json.loads(raised.value.body or "{}")
    assert status["reason"] == "Forbidden"
    assert 'cannot update resource "secrets"' in status["message"]


def test_api_server_rejects_tls_secret_without_tls_key(admin: client.CoreV1Api) -> None:
    namespace = unique_namespace()
    admin.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    with pytest.raises(ApiException) as raised:
        admin.create_namespaced_secret(namespace, tls_secret("half", {"tls.crt": b"cert"}))

    assert raised.value.status == 422
    status = json.loads(raised.value.body or "{}")
    assert status["reason"] == "Invalid"
    assert "tls.key" in status["message"]


def test_spec_minimum_role_can_get_its_own_namespace(
    cluster: Cluster, make_service_account: MakeServiceAccount
) -> None:
    # A namespaced Role granting "get" on namespaces covers GET /api/v1/namespaces/<own>,
    # because the API server treats a namespace object as living in itself. The worker's
    # health check ("reads the namespace") can rely on this.
    account = make_service_account(cluster, unique_namespace(), rules=SPEC_MINIMUM_RULES)
    limited = client.CoreV1Api(api_from_kubeconfig(account.kubeconfig))

    namespace = limited.read_namespace(account.namespace)
    assert namespace.metadata is not None and namespace.metadata.name == account.namespace


def test_spec_minimum_role_cannot_get_other_namespaces_or_list_them(
    cluster: Cluster, admin: client.CoreV1Api, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace(), rules=SPEC_MINIMUM_RULES)
    other = unique_namespace()
    admin.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    limited = client.CoreV1Api(api_from_kubeconfig(account.kubeconfig))

    assert status_of(lambda: limited.read_namespace(other)) == 403
    assert status_of(lambda: limited.list_namespace()) == 403
    # A namespace that does not exist is also 403, not 404: no permission to learn about it.
    assert status_of(lambda: limited.read_namespace(unique_namespace())) == 403


@pytest.mark.parametrize(
    ("verb", "allowed"),
    [("get", True), ("create", True), ("update", True), ("patch", True), ("list", False)],
)
def test_spec_minimum_role_grants_exactly_the_documented_secret_verbs(
    cluster: Cluster,
    admin: client.CoreV1Api,
    make_service_account: MakeServiceAccount,
    verb: str,
    allowed: bool,
) -> None:
    account = make_service_account(cluster, unique_namespace(), rules=SPEC_MINIMUM_RULES)
    admin.create_namespaced_secret(
        account.namespace, tls_secret("existing", {"tls.crt": b"c", "tls.key": b"k"})
    )
    limited = client.CoreV1Api(api_from_kubeconfig(account.kubeconfig))
    ns = account.namespace
    calls: dict[str, Callable[[], Any]] = {
        "get": lambda: limited.read_namespaced_secret("existing", ns),
        "create": lambda: limited.create_namespaced_secret(
            ns, tls_secret("new", {"tls.crt": b"c", "tls.key": b"k"})
        ),
        "update": lambda: limited.replace_namespaced_secret(
            "existing", ns, admin.read_namespaced_secret("existing", ns)
        ),
        "patch": lambda: limited.patch_namespaced_secret(
            "existing", ns, {"metadata": {"labels": {"patched": "yes"}}}
        ),
        "list": lambda: limited.list_namespaced_secret(ns),
    }

    assert status_of(calls[verb]) == (200 if allowed else 403)


def test_service_account_without_role_can_authenticate_but_not_read(
    cluster: Cluster, make_service_account: MakeServiceAccount
) -> None:
    account = make_service_account(cluster, unique_namespace(), rules=None)
    api = api_from_kubeconfig(account.kubeconfig)

    assert whoami(api) == account.username
    assert status_of(lambda: client.CoreV1Api(api).read_namespace(account.namespace)) == 403


# --- in-cluster layout ---------------------------------------------------------------------


def test_in_cluster_folder_is_laid_out_like_a_pod_mount_and_its_token_authenticates(
    cluster: Cluster,
    make_service_account: MakeServiceAccount,
    in_cluster_env: Callable[[Cluster, str, str], Any],
) -> None:
    account = make_service_account(cluster, unique_namespace())
    env = in_cluster_env(cluster, account.namespace, account.token)

    assert sorted(p.name for p in env.sa_dir.iterdir()) == ["ca.crt", "namespace", "token"]
    assert (env.sa_dir / "namespace").read_text() == account.namespace
    assert (env.sa_dir / "token").read_text() == account.token
    assert (env.sa_dir / "ca.crt").read_text() == cluster.ca_pem
    assert env.environ["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env.environ["KUBERNETES_SERVICE_PORT"] == str(cluster.port)

    configuration = client.Configuration()
    InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(env.sa_dir / "token"),
        cert_filename=str(env.sa_dir / "ca.crt"),
        environ=env.environ,
    ).load_and_set(configuration)
    assert whoami(client.ApiClient(configuration)) == account.username


# --- Redis and PostgreSQL --------------------------------------------------------------------


def test_session_redis_answers_at_its_url(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    try:
        assert redis_url.startswith("redis://127.0.0.1:")
        assert connection.ping() is True
        key = f"testenv-{uuid.uuid4().hex}"
        connection.set(key, b"value")
        assert connection.get(key) == b"value"
    finally:
        connection.close()


@pytest.mark.parametrize(("appendonly", "survives"), [(True, True), (False, False)])
def test_restarted_redis_keeps_its_url_and_only_appendonly_keeps_data(
    make_redis_server: Callable[..., RedisServer], appendonly: bool, survives: bool
) -> None:
    server = make_redis_server(appendonly=appendonly)
    before = redis.Redis.from_url(server.url)
    before.set("key", b"value")
    before.close()

    server.restart()

    after = redis.Redis.from_url(server.url)
    try:
        assert after.ping() is True
        assert (after.get("key") == b"value") is survives
    finally:
        after.close()
        server.stop()


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sqlalchemy.Engine]:
    """An engine on this test's fresh database."""
    made = sqlalchemy.create_engine(postgres_url)
    yield made
    made.dispose()


def test_postgres_url_is_a_fresh_empty_writable_database(
    postgres_url: str, engine: sqlalchemy.Engine
) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    assert "@127.0.0.1:" in postgres_url
    assert sqlalchemy.inspect(engine).get_table_names() == []
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE probe (id integer primary key)"))
        connection.execute(sqlalchemy.text("INSERT INTO probe VALUES (1)"))
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM probe")).scalar() == 1


def test_postgres_databases_are_isolated_from_each_other(testenv: TestEnvironment) -> None:
    server = testenv.postgres()
    first, second = server.create_database(), server.create_database()
    try:
        assert first != second
        with psycopg.connect(first.replace("postgresql+psycopg", "postgresql")) as connection:
            connection.execute("CREATE TABLE only_in_first (id integer)")
        engine = sqlalchemy.create_engine(second)
        try:
            assert sqlalchemy.inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
    finally:
        server.drop_database(first)
        server.drop_database(second)


# --- failures are loud ---------------------------------------------------------------------


def test_api_server_that_cannot_start_fails_with_its_own_output(tmp_path: Path) -> None:
    binaries = find_binaries(os.environ, build=False)
    server = ApiServer(
        "broken",
        binaries.kube_apiserver,
        "http://127.0.0.1:1",
        tmp_path / "broken",
        tmp_path / "logs",
        extra_args=["--no-such-flag=1"],
    )
    server.start()

    with pytest.raises(StartupError) as raised:
        server.wait_ready(timeout=60)

    message = str(raised.value)
    assert "kube-apiserver broken exited" in message
    assert "unknown flag: --no-such-flag" in message


def test_postgres_that_cannot_initialise_fails_with_initdb_output(
    testenv: TestEnvironment,
) -> None:
    # Under the environment's folder: as root, postgres tools run as the postgres user.
    bindir = testenv.workdir / f"fake-pg-{uuid.uuid4().hex[:6]}"
    bindir.mkdir(mode=0o755)
    for tool, body in (("initdb", 'echo "initdb: error: disk is full" >&2; exit 1'),
                       ("postgres", "exit 1")):
        (bindir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / tool).chmod(0o755)
    server = PostgresServer(bindir / "data", testenv.logs, bindir=bindir)

    with pytest.raises(StartupError) as raised:
        server.start()

    assert "initdb" in str(raised.value)
    assert "disk is full" in str(raised.value)


def test_missing_redis_binary_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="apt package redis-server"):
        RedisServer(tmp_path, tmp_path, binary=str(tmp_path / "no-redis-server"))


# --- certificates ----------------------------------------------------------------------------


def test_serving_certificate_names_loopback_and_localhost() -> None:
    issued = CertificateAuthority("test CA").issue_serving("kube-apiserver")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)
    assert "PRIVATE KEY" not in repr(issued)


# --- binaries ------------------------------------------------------------------------------


FAKE_BUILD = """#!/usr/bin/env bash
set -euo pipefail
echo "fake build into $1 (k8s $CAP_K8S_VERSION, etcd $CAP_ETCD_VERSION)"
echo run >> "$1.runs"
{body}
"""


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Replace build-binaries.sh with a script running `body`; return the cache root."""

    def install(body: str) -> Path:
        script = tmp_path / "fake-build.sh"
        script.write_text(FAKE_BUILD.format(body=body))
        monkeypatch.setattr(binaries_module, "BUILD_SCRIPT", script)
        return tmp_path / "cache"

    return install


def test_missing_binaries_are_built_once_into_the_versioned_cache(
    fake_build: Callable[[str], Path],
) -> None:
    cache = fake_build(
        'mkdir -p "$1"; for b in etcd kube-apiserver; do '
        'printf "#!/bin/sh\\n" > "$1/$b"; chmod +x "$1/$b"; done'
    )
    environ = {"XDG_CACHE_HOME": str(cache), "PATH": os.environ["PATH"]}
    progress = io.StringIO()

    first = find_binaries(environ, progress=progress)
    second = find_binaries(environ, progress=progress)

    assert first == second
    assert first.folder == cache / "certautopilot" / "testenv" / first.folder.name
    assert first.folder.name == f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}"
    assert Path(f"{first.folder}.runs").read_text() == "run\n"  # built once
    assert f"k8s {K8S_VERSION}, etcd {ETCD_VERSION}" in progress.getvalue()


def test_failed_build_reports_the_build_output(fake_build: Callable[[str], Path]) -> None:
    cache = fake_build('echo "go: module lookup disabled"; exit 3')
    environ = {"XDG_CACHE_HOME": str(cache), "PATH": os.environ["PATH"]}

    with pytest.raises(BinariesError) as raised:
        find_binaries(environ, progress=io.StringIO())

    assert "exit 3" in str(raised.value)
    assert "go: module lookup disabled" in str(raised.value)


def test_kubebuilder_assets_are_used_without_building(
    tmp_path: Path, fake_build: Callable[[str], Path]
) -> None:
    fake_build("exit 1")
    for name in ("etcd", "kube-apiserver"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)

    found = find_binaries({"KUBEBUILDER_ASSETS": str(tmp_path)})

    assert found.kube_apiserver == tmp_path / "kube-apiserver"
    assert found.etcd == tmp_path / "etcd"
