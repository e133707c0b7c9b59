"""Extra output formats and a Secret's consumers, end to end against the real environment.

Through the Python API (the scheduler's) and the CLI, with real Celery workers, PostgreSQL or
the embedded default, and real kube-apiservers; every write goes through a ServiceAccount
bound to the spec's minimum Role (plus, where a test says so, the opt-in consumers Role).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from kubernetes import client as k8s

from models import queries
from models.errors import InvalidRecordError
from tests.certfactory import Chain, make_chain
from tests.integration.test_cli_end_to_end import operator  # noqa: F401 - the CLI fixture
from tests.support.pipeline import Pipeline, read_secret
from tests.testenv import SPEC_MINIMUM_RULES, Cluster, ServiceAccountAccess
from worker.app import service
from worker.cli.output import render_diff_dict
from worker.core.formats import COMBINED_PEM_KEY, KEYSTORE_ALIAS, KEYSTORE_KEY

pytestmark = pytest.mark.integration

PASSWORD = b"keystore-pass-1"
CONSUMER_RULES = [
    *SPEC_MINIMUM_RULES,
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["list"]},
]
STANDARD_KEYS = {"tls.crt", "tls.key"}
ALL_KEYS = STANDARD_KEYS | {COMBINED_PEM_KEY, KEYSTORE_KEY}


def _data(secret: k8s.V1Secret | None) -> dict[str, bytes]:
    assert secret is not None and secret.data is not None
    return {key: base64.b64decode(value) for key, value in secret.data.items()}


def _der(pem: bytes) -> list[bytes]:
    from cryptography import x509

    return [
        c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)
    ]


def _key_der(pem: bytes) -> bytes:
    return serialization.load_pem_private_key(pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def assert_keystore_holds(value: bytes, password: bytes, chain: Chain) -> None:
    """The keystore opens with ``password`` (cryptography) and holds the key, leaf and chain."""
    loaded = pkcs12.load_pkcs12(value, password)
    assert loaded.key is not None and loaded.cert is not None
    assert loaded.cert.friendly_name == KEYSTORE_ALIAS
    key_der = loaded.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert key_der == _key_der(chain.key_pem)
    certs = [loaded.cert.certificate, *(c.certificate for c in loaded.additional_certs)]
    assert [c.public_bytes(serialization.Encoding.DER) for c in certs] == _der(chain.fullchain_pem)


def _statuses(report: service.RunReport) -> list[str]:
    return [result.status for result in report.results]


def _import(rt: Any, chain: Chain) -> str:
    return service.import_certificate(rt, chain.leaf_pem, chain.key_pem, chain.chain_pem)


# ------------------------------------------------------------------------- formats (API)


def test_formats_are_written_kept_when_unchanged_renewed_and_rolled_back(
    pipe: Pipeline,
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    rt = pipe.runtime
    pipe.start_worker()
    namespace = f"fmt-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    kubeconfig = service.add_kubeconfig_credential(rt, "kc", access.kubeconfig.encode())
    spec = service.TargetSpec(
        name="java-app",
        namespace=namespace,
        credential=kubeconfig,
        secret_name="app-tls",
        combined_pem=True,
        pkcs12_password_credential="ks-password",
    )

    # Bad input first: a password credential that does not exist is refused by name, and a
    # credential of another kind too; nothing is stored either time.
    with pytest.raises(service.ServiceError) as missing:
        service.create_target(rt, spec, check=False)
    assert "PKCS#12 password credential 'ks-password' does not exist" in str(missing.value)
    assert "credentials add-pkcs12-password ks-password" in str(missing.value)
    with pytest.raises(InvalidRecordError, match="not a PKCS#12 password"):
        service.create_target(
            rt,
            dataclasses.replace(spec, pkcs12_password_credential="kc"),
            check=False,
        )
    with pytest.raises(service.ServiceError, match="at least 6"):
        service.add_pkcs12_password(rt, "ks-password", b"short")
    assert service.list_targets(rt) == []
    assert [c.name for c in service.list_credentials(rt)] == ["kc"]

    password_id = service.add_pkcs12_password(rt, "ks-password", PASSWORD)
    target_id, _ = service.create_target(rt, spec, check=False)
    view = service.get_target(rt, target_id)
    assert (view.combined_pem, view.pkcs12_password_credential) == (True, "ks-password")
    first = make_chain("app.example.com", intermediates=2, fresh_leaf_key=True)
    certificate_id = _import(rt, first)
    distribution = service.attach(rt, certificate_id, target="java-app", store_content=True)

    created = pipe.wait(pipe.enqueue(distribution, "execute"))
    assert _statuses(created) == ["created"], created
    live = read_secret(testenv_admin_api, cluster, namespace, "app-tls")
    data = _data(live)
    assert live is not None and live.type == "kubernetes.io/tls"
    assert set(data) == ALL_KEYS
    assert data[COMBINED_PEM_KEY] == first.key_pem + first.fullchain_pem
    assert_keystore_holds(data[KEYSTORE_KEY], PASSWORD, first)
    written_rv = live.metadata.resource_version

    # A new worker process builds its own keystore (other bytes, same content): no write.
    pipe.workers.pop().stop()
    pipe.start_worker()
    again = pipe.wait(pipe.enqueue(distribution, "execute"))
    assert _statuses(again) == ["unchanged"], again
    same = read_secret(testenv_admin_api, cluster, namespace, "app-tls")
    assert same is not None and same.metadata.resource_version == written_rv
    assert _data(same) == data
    dry = pipe.wait(pipe.enqueue(distribution, "dry_run"))
    assert _statuses(dry) == ["unchanged"]
    (dry_result,) = dry.results
    assert dry_result.diff is not None
    # The minimum Role cannot list pods or ingresses: said, not failed.
    assert "consumers unknown (no list permission)" in render_diff_dict(dry_result.diff)

    # A renewal updates every key; the keystore holds the new key and chain.
    renewed = make_chain("app.example.com", intermediates=1, fresh_leaf_key=True)
    service.renew_certificate(
        rt,
        certificate_id,
        {"cert": renewed.leaf_pem, "key": renewed.key_pem, "chain": renewed.chain_pem},
    )
    update = pipe.wait(pipe.enqueue(distribution, "dry_run"))
    (would,) = update.results
    assert would.status == "would_update" and would.diff is not None
    text = render_diff_dict(would.diff)
    assert f"{KEYSTORE_KEY}: changed (PKCS#12, key + leaf + chain" in text
    assert f"{COMBINED_PEM_KEY}: changed (key + leaf + chain" in text
    assert "chain length 3 -> 2" in " ".join(text.split())
    assert "PRIVATE KEY" not in text and PASSWORD.decode() not in text
    updated = pipe.wait(pipe.enqueue(distribution, "execute"))
    assert _statuses(updated) == ["updated"], updated
    after_renewal = _data(read_secret(testenv_admin_api, cluster, namespace, "app-tls"))
    assert after_renewal[COMBINED_PEM_KEY] == renewed.key_pem + renewed.fullchain_pem
    assert_keystore_holds(after_renewal[KEYSTORE_KEY], PASSWORD, renewed)

    # A changed password is a change: the live keystore no longer opens with it.
    new_password = b"rotated-pass-2"
    with rt.session() as session:
        queries.replace_credential_secret(session, rt.sealer, password_id, new_password)
    rotated = pipe.wait(pipe.enqueue(distribution, "execute"))
    assert _statuses(rotated) == ["updated"], rotated
    (rotated_result,) = rotated.results
    assert rotated_result.diff is not None
    changed = {e["key"] for e in rotated_result.diff["data"] if e["change"] != "unchanged"}
    assert changed == {KEYSTORE_KEY}
    after_rotation = _data(read_secret(testenv_admin_api, cluster, namespace, "app-tls"))
    assert_keystore_holds(after_rotation[KEYSTORE_KEY], new_password, renewed)

    # Another distribution (another certificate) snapshots that Secret, keystore included,
    # before its write; its rollback puts every key back byte for byte.
    other = make_chain("app.example.com", intermediates=0, fresh_leaf_key=True)
    second = service.attach(rt, _import(rt, other), target="java-app", store_content=True)
    replaced = pipe.wait(pipe.enqueue(second, "execute"))
    assert _statuses(replaced) == ["updated"], replaced
    assert_keystore_holds(
        _data(read_secret(testenv_admin_api, cluster, namespace, "app-tls"))[KEYSTORE_KEY],
        new_password,
        other,
    )
    rolled = pipe.wait(pipe.enqueue(second, "rollback"))
    assert _statuses(rolled) == ["rolled_back"], rolled
    restored = _data(read_secret(testenv_admin_api, cluster, namespace, "app-tls"))
    assert restored == after_rotation
    assert_keystore_holds(restored[KEYSTORE_KEY], new_password, renewed)
    for result in (*created.results, *updated.results, *rolled.results):
        assert "PRIVATE KEY" not in json.dumps(result.diff)


# ------------------------------------------------------------------------ consumers (API)


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    container = {"name": "app", "image": "registry.example/app:1", **spec.pop("container", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container], **spec},
    }


def _consumer_objects(secret: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volume = {"name": "tls", "secret": {"secretName": secret}}
    pods = [
        _pod(
            "mounts-volume",
            {
                "volumes": [volume],
                "container": {"volumeMounts": [{"name": "tls", "mountPath": "/tls"}]},
            },
        ),
        _pod(
            "mounts-projected",
            {
                "volumes": [
                    {"name": "all", "projected": {"sources": [{"secret": {"name": secret}}]}}
                ],
                "container": {"volumeMounts": [{"name": "all", "mountPath": "/etc/all"}]},
            },
        ),
        _pod(
            "reads-env",
            {
                "container": {
                    "env": [
                        {
                            "name": "TLS_CERT",
                            "valueFrom": {"secretKeyRef": {"name": secret, "key": "tls.crt"}},
                        }
                    ]
                }
            },
        ),
        _pod("reads-envfrom", {"container": {"envFrom": [{"secretRef": {"name": secret}}]}}),
        _pod(
            "mounts-subpath",
            {
                "volumes": [volume],
                "container": {
                    "volumeMounts": [
                        {"name": "tls", "mountPath": "/etc/ssl/cert.pem", "subPath": "tls.crt"}
                    ]
                },
            },
        ),
        _pod(
            "unrelated",
            {"volumes": [{"name": "tls", "secret": {"secretName": "someone-elses"}}]},
        ),
    ]
    ingresses = [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": name},
            "spec": {
                "tls": [{"hosts": ["shop.example.com"], "secretName": tls_secret}],
                "defaultBackend": {"service": {"name": "shop", "port": {"number": 80}}},
            },
        }
        for name, tls_secret in (("shop", secret), ("other", "other-tls"))
    ]
    return pods, ingresses


def test_a_dry_run_lists_who_consumes_the_secret_or_says_it_may_not(
    pipe: Pipeline,
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    rt = pipe.runtime
    pipe.start_worker()
    namespace = f"use-{uuid.uuid4().hex[:8]}"
    admin = testenv_admin_api(cluster)
    reader = make_service_account(cluster, namespace, CONSUMER_RULES, name="reader")
    minimum = make_service_account(cluster, namespace, SPEC_MINIMUM_RULES, name="minimum")
    pods, ingresses = _consumer_objects("shop-tls")
    core, networking = k8s.CoreV1Api(admin), k8s.NetworkingV1Api(admin)
    for pod in pods:
        core.create_namespaced_pod(namespace, pod)  # no node: they stay Pending, still listed
    for ingress in ingresses:
        networking.create_namespaced_ingress(namespace, ingress)
    for name, access in (("with-list", reader), ("minimum-only", minimum)):
        credential = service.add_kubeconfig_credential(rt, name, access.kubeconfig.encode())
        service.create_target(
            rt,
            service.TargetSpec(
                name=name, namespace=namespace, credential=credential, secret_name="shop-tls"
            ),
            check=False,
        )
    chain = make_chain("shop.example.com", fresh_leaf_key=True)
    group = service.create_group(rt, "both", ["with-list", "minimum-only"])
    assert group
    distribution = service.attach(rt, _import(rt, chain), group="both")

    report = pipe.wait(pipe.enqueue(distribution, "dry_run"))
    results = {result.target_name: result for result in report.results}
    assert {r.status for r in results.values()} == {"would_create"}, report
    listed = results["with-list"].diff
    assert listed is not None
    consumers = listed["consumers"]
    by_pod = {item["pod"]: item for item in consumers["pods"]}
    assert set(by_pod) == {
        "mounts-volume",
        "mounts-projected",
        "reads-env",
        "reads-envfrom",
        "mounts-subpath",
    }
    assert {name for name, item in by_pod.items() if item["restart_needed"]} == {
        "reads-env",
        "reads-envfrom",
        "mounts-subpath",
    }
    assert by_pod["reads-env"]["uses"] == ["container app: env TLS_CERT (key tls.crt)"]
    assert by_pod["mounts-subpath"]["uses"] == [
        "container app: subPath mount /etc/ssl/cert.pem (tls.crt)"
    ]
    assert consumers["ingresses"] == ["shop"]
    assert (consumers["pods_unknown"], consumers["ingresses_unknown"]) == (None, None)
    text = render_diff_dict(listed)
    assert "2 pod(s) mount it as a volume" in text
    assert "3 pod(s) read it through env or subPath: they will NOT see" in text
    assert "stack a webhook distribution" in text
    assert "1 ingress(es) name it in tls.secretName" in text

    denied = results["minimum-only"].diff
    assert denied is not None
    assert denied["consumers"]["pods_unknown"] == "no list permission"
    assert "consumers unknown (no list permission)" in render_diff_dict(denied)
    # Execute never lists: the consumers are a dry-run's advice.
    executed = pipe.wait(pipe.enqueue(distribution, "execute"))
    assert all("consumers" not in (r.diff or {}) for r in executed.results)


# ------------------------------------------------------------------------------------ CLI


def test_the_cli_stores_a_password_adds_a_target_with_formats_and_shows_them(
    operator: Callable[..., subprocess.CompletedProcess[str]],  # noqa: F811
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
    tmp_path: Path,
) -> None:
    namespace = f"cli-fmt-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace, CONSUMER_RULES)
    chain = make_chain("shop.example.com", intermediates=1, fresh_leaf_key=True)
    files = {}
    for name, data in (
        ("cert", chain.leaf_pem),
        ("chain", chain.chain_pem),
        ("key", chain.key_pem),
    ):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(data)

    def ok(*args: str, stdin: str | None = None) -> str:
        result = operator(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    ok("credentials", "add-kubeconfig", "c1", "--stdin", stdin=access.kubeconfig)
    add = ("targets", "add", "java", "--namespace", namespace, "--kubeconfig-credential", "c1",
           "--secret-name", "shop-tls", "--combined-pem",
           "--pkcs12-password-credential", "ks")  # fmt: skip
    refused = operator(*add)
    assert refused.returncode == 2
    assert "PKCS#12 password credential 'ks' does not exist" in refused.stderr
    assert json.loads(ok("targets", "list", "-o", "json")) == []
    short = operator("credentials", "add-pkcs12-password", "ks", "--stdin", stdin="abc\n")
    assert short.returncode == 2 and "at least 6" in short.stderr
    stored = ok(
        "credentials", "add-pkcs12-password", "ks", "--stdin", stdin=PASSWORD.decode() + "\n"
    )
    assert PASSWORD.decode() not in stored
    assert "health: healthy" in ok(*add)
    shown = ok("targets", "show", "java")
    assert "tls-combined.pem" in shown and "password from credential 'ks'" in shown
    cert = json.loads(
        ok("certs", "import", "--cert", str(files["cert"]), "--key", str(files["key"]),
           "--chain", str(files["chain"]), "-o", "json")
    )  # fmt: skip
    distribution = json.loads(
        ok("distributions", "attach", cert["id"], "--target", "java", "-o", "json")
    )
    dry = ok("run", distribution["id"], "--dry-run")
    assert f"{KEYSTORE_KEY}: added (PKCS#12, key + leaf + chain" in dry
    assert f"{COMBINED_PEM_KEY}: added (key + leaf + chain" in dry
    assert "no pod uses it" in dry and "no ingress names it" in dry
    assert "PRIVATE KEY" not in dry and PASSWORD.decode() not in dry
    assert "succeeded: 1 created" in ok("run", distribution["id"], "--execute")
    live = _data(read_secret(testenv_admin_api, cluster, namespace, "shop-tls"))
    assert set(live) == ALL_KEYS
    assert_keystore_holds(live[KEYSTORE_KEY], PASSWORD, chain)
    assert "succeeded: 1 unchanged" in ok("run", distribution["id"], "--execute")
