"""The bad-input catalog: what an operator (or the scheduler) might get wrong, tried through the
backend API and the pipeline exactly as a user would.

Refused at the API (:data:`API_CASES`): each case must raise an error whose text names the
problem *and* the fix, leak no secret, change no row of any table (hash of every table
before and after) and write nothing to any cluster (every Secret's resourceVersion, in every
namespace of every cluster, before and after).

Detected only at run time (:data:`RUNTIME_CASES`, Kubernetes state and credentials the
apiserver refuses): one run over a group holding one target per case; each target must fail
with its reason and the spec's words, its Secret untouched.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client as k8s
from sqlalchemy import select

from models.base import Base
from models.enums import ConnectionMode
from tests.certfactory import Chain, cert_to_der, make_chain, make_csr_pem
from tests.support.faults import managed_secret
from tests.support.pipeline import Pipeline, pipeline, read_secret
from tests.testenv import SPEC_MINIMUM_RULES
from tests.testenv.pki import CertificateAuthority
from worker.app import service
from worker.core.limits import PEM_FILE
from worker.kube.errors import KubeError

# --------------------------------------------------------------------------- the context


@dataclass
class Ctx:
    """What every case may use: a configured backend and one namespace on cluster 1."""

    pipe: Pipeline
    cluster: Any
    namespace: str
    kubeconfig: str
    token: str
    chain: Chain
    other: Chain
    certificate_id: str
    credential: str
    tmp: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rt(self) -> Any:
        return self.pipe.runtime

    def kubeconfig_with(self, mutate: Callable[[dict[str, Any]], None]) -> bytes:
        """The good kubeconfig, changed by ``mutate``."""
        doc = yaml.safe_load(self.kubeconfig)
        mutate(doc)
        return yaml.safe_dump(doc).encode()

    def target(self, **overrides: Any) -> service.TargetSpec:
        """A valid target spec with some fields replaced."""
        values: dict[str, Any] = {
            "name": f"t-{uuid.uuid4().hex[:8]}",
            "namespace": self.namespace,
            "credential": self.credential,
            "secret_name": "catalog-tls",
        }
        values.update(overrides)
        return service.TargetSpec(**values)


def _user(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["users"][0]["user"])


def _set_user(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["users"][0]["user"].update(fields)

    return mutate


def _set_cluster(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["clusters"][0]["cluster"].update(fields)

    return mutate


def _drop_context_field(field_name: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        del doc["contexts"][0]["context"][field_name]

    return mutate


def _rename(section: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc[section][0]["name"] = "somebody-else"

    return mutate


def _no_current_context(doc: dict[str, Any]) -> None:
    doc["current-context"] = ""


def _expired_leaf(ctx: Ctx) -> Chain:
    now = dt.datetime.now(dt.UTC)
    return make_chain(
        cn="old.example.com",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )


def _future_leaf(ctx: Ctx) -> Chain:
    now = dt.datetime.now(dt.UTC)
    return make_chain(
        cn="soon.example.com",
        not_before=now + dt.timedelta(days=2),
        not_after=now + dt.timedelta(days=90),
    )


# ------------------------------------------------------------------------ refused at the API


@dataclass(frozen=True)
class Case:
    """One bad input: ``act`` must raise ``error`` with every fragment in its text."""

    name: str
    act: Callable[[Ctx], Any]
    error: type[BaseException]
    fragments: tuple[str, ...]
    #: Runs before the "before" snapshot (state the case needs, e.g. a stored credential).
    setup: Callable[[Ctx], None] | None = None


def _cert(cert: bytes, key: bytes, chain: bytes = b"", **kw: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: service.import_certificate(ctx.rt, cert, key, chain, **kw)


def _import(make: Callable[[Ctx], tuple[bytes, bytes, bytes]], **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        cert, key, chain = make(ctx)
        return service.import_certificate(ctx.rt, cert, key, chain, **kw)

    return act


def _kubeconfig(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], Any]:
    return lambda ctx: service.add_kubeconfig_credential(
        ctx.rt, f"bad-{uuid.uuid4().hex[:6]}", ctx.kubeconfig_with(mutate)
    )


def _raw_kubeconfig(text: bytes) -> Callable[[Ctx], Any]:
    return lambda ctx: service.add_kubeconfig_credential(ctx.rt, "bad-raw", text)


def _target(**overrides: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: service.create_target(ctx.rt, ctx.target(**overrides), check=False)


def _group(batch_size: Any = None, failure_threshold: Any = None) -> Callable[[Ctx], Any]:
    return lambda ctx: service.create_group(
        ctx.rt,
        f"g-{uuid.uuid4().hex[:6]}",
        [ctx.extra["good_target"]],
        batch_size=batch_size,
        failure_threshold=failure_threshold,
    )


def _store_insecure_credential(ctx: Ctx) -> None:
    kubeconfig = ctx.kubeconfig_with(_set_cluster(**{"insecure-skip-tls-verify": True}))
    ctx.extra["insecure"] = service.add_kubeconfig_credential(ctx.rt, "insecure-kc", kubeconfig)


def _store_empty_group(ctx: Ctx) -> None:
    ctx.extra["empty_group"] = service.create_group(ctx.rt, "empty-group", [])


def _store_target_without_content(ctx: Ctx) -> None:
    target = service.create_target(ctx.rt, ctx.target(name="no-store"), check=False)[0]
    ctx.extra["no_store_distribution"] = service.attach(
        ctx.rt, ctx.certificate_id, target=target, store_content=False
    )


def _truncated(ctx: Ctx) -> tuple[bytes, bytes, bytes]:
    return ctx.chain.leaf_pem[: len(ctx.chain.leaf_pem) // 2], ctx.chain.key_pem, b""


def _oversize(ctx: Ctx) -> tuple[bytes, bytes, bytes]:
    padding = b"# padding\n" * (PEM_FILE.maximum // 10 + 1)
    return ctx.chain.leaf_pem, ctx.chain.key_pem, ctx.chain.chain_pem + padding


def _http_server(doc: dict[str, Any]) -> None:
    doc["clusters"][0]["cluster"]["server"] = doc["clusters"][0]["cluster"]["server"].replace(
        "https://", "http://"
    )


API_CASES: list[Case] = [
    # --- certificates
    Case(
        "certificate is garbage",
        _cert(b"hello, world", b"nope"),
        ValueError,
        ("certificate", "PEM"),
    ),
    Case("certificate PEM is truncated", _import(_truncated), ValueError, ("truncated",)),
    Case(
        "certificate given as DER",
        lambda ctx: service.import_certificate(
            ctx.rt, cert_to_der(ctx.chain.leaf), ctx.chain.key_pem
        ),
        ValueError,
        ("DER", "openssl"),
    ),
    Case(
        "a CSR where the certificate belongs",
        lambda ctx: service.import_certificate(ctx.rt, make_csr_pem(), ctx.chain.key_pem),
        ValueError,
        ("CERTIFICATE REQUEST",),
    ),
    Case(
        "the private key given as the certificate",
        lambda ctx: service.import_certificate(ctx.rt, ctx.chain.key_pem, ctx.chain.key_pem),
        ValueError,
        ("PRIVATE KEY",),
    ),
    Case(
        "key does not match the leaf",
        lambda ctx: service.import_certificate(
            ctx.rt, ctx.chain.leaf_pem, ctx.other.key_pem, ctx.chain.chain_pem
        ),
        ValueError,
        ("does not belong", "Fix:"),
    ),
    Case(
        "encrypted key without passphrase",
        lambda ctx: service.import_certificate(
            ctx.rt,
            ctx.chain.leaf_pem,
            ctx.chain.key_as("pkcs8", passphrase=b"s3cret-pass"),
            ctx.chain.chain_pem,
        ),
        ValueError,
        ("encrypted", "passphrase"),
    ),
    Case(
        "encrypted key with the wrong passphrase",
        lambda ctx: service.import_certificate(
            ctx.rt,
            ctx.chain.leaf_pem,
            ctx.chain.key_as("pkcs8", passphrase=b"s3cret-pass"),
            ctx.chain.chain_pem,
            passphrase=b"wrong",
        ),
        ValueError,
        ("passphrase",),
    ),
    Case(
        "expired certificate",
        _import(lambda ctx: ((c := _expired_leaf(ctx)).leaf_pem, c.key_pem, c.chain_pem)),
        ValueError,
        ("expired",),
    ),
    Case(
        "certificate not yet valid",
        _import(lambda ctx: ((c := _future_leaf(ctx)).leaf_pem, c.key_pem, c.chain_pem)),
        ValueError,
        ("not valid before",),
    ),
    Case(
        "intermediate from an unrelated chain",
        lambda ctx: service.import_certificate(
            ctx.rt, ctx.chain.leaf_pem, ctx.chain.key_pem, ctx.other.chain_pem
        ),
        ValueError,
        ("issuer",),
    ),
    Case(
        "CA that did not issue the chain",
        lambda ctx: service.import_certificate(
            ctx.rt, ctx.chain.leaf_pem, ctx.chain.key_pem, ctx.chain.chain_pem, ctx.other.root_pem
        ),
        ValueError,
        ("CA",),
    ),
    Case("chain input over the PEM-file limit", _import(_oversize), ValueError, ("256 KiB",)),
    # --- kubeconfigs
    Case(
        "kubeconfig is not YAML",
        _raw_kubeconfig(b"clusters: [unclosed\n  - {"),
        KubeError,
        ("not valid YAML",),
    ),
    Case(
        "kubeconfig is a YAML list",
        _raw_kubeconfig(b"- a\n- b\n"),
        KubeError,
        ("not a kubeconfig",),
    ),
    Case(
        "kubeconfig without current-context",
        _kubeconfig(_no_current_context),
        KubeError,
        ("current-context", "name the context"),
    ),
    Case(
        "context without a cluster",
        _kubeconfig(_drop_context_field("cluster")),
        KubeError,
        ("context.cluster", "missing"),
    ),
    Case(
        "context naming a cluster that is not there",
        _kubeconfig(_rename("clusters")),
        KubeError,
        ("clusters", "no entry named"),
    ),
    Case(
        "context naming a user that is not there",
        _kubeconfig(_rename("users")),
        KubeError,
        ("users", "no entry named"),
    ),
    Case(
        "exec credential plugin",
        _kubeconfig(
            _set_user(exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/sh"})
        ),
        KubeError,
        ("user.exec", "runs a local program"),
    ),
    Case(
        "auth-provider plugin",
        _kubeconfig(_set_user(**{"auth-provider": {"name": "gcp"}})),
        KubeError,
        ("auth-provider",),
    ),
    Case(
        "CA as a file path",
        _kubeconfig(_set_cluster(**{"certificate-authority": "/etc/kubernetes/ca.crt"})),
        KubeError,
        ("certificate-authority", "local file"),
    ),
    Case(
        "client key as a file path",
        _kubeconfig(_set_user(**{"client-certificate": "/tmp/c.crt", "client-key": "/tmp/c.key"})),
        KubeError,
        ("local file path",),
    ),
    Case(
        "tokenFile",
        _kubeconfig(_set_user(tokenFile="/var/run/token")),
        KubeError,
        ("tokenFile", "local file"),
    ),
    Case("plain http server", _kubeconfig(_http_server), KubeError, ("https://",)),
    Case(
        "username and password",
        _kubeconfig(_set_user(username="admin", password="pw")),
        KubeError,
        ("basic authentication",),
    ),
    Case(
        "client certificate data that is not base64",
        _kubeconfig(
            _set_user(**{"client-certificate-data": "!!!not-base64!!!", "client-key-data": "!!!"})
        ),
        KubeError,
        ("not valid base64",),
    ),
    Case(
        "insecure-skip-tls-verify on a target that does not allow it",
        lambda ctx: service.create_target(
            ctx.rt, ctx.target(credential="insecure-kc"), check=False
        ),
        KubeError,
        ("insecure-skip-tls-verify", "certificate-authority-data"),
        setup=_store_insecure_credential,
    ),
    # --- templates
    Case(
        "namespace template syntax error",
        _target(namespace="{{ .tenant "),
        ValueError,
        ("namespace",),
    ),
    Case(
        "unknown template variable", _target(secret_name="{{ .nope }}-tls"), ValueError, ("nope",)
    ),
    Case(
        "secret name not a DNS name", _target(secret_name="Bad_Name"), ValueError, ("secret name",)
    ),
    Case("secret name longer than 253", _target(secret_name="a" * 254), ValueError, ("253",)),
    Case("namespace longer than 63", _target(namespace="n" * 64), ValueError, ("63",)),
    Case(
        "unicode secret name", _target(secret_name="zertifikat-ü-tls"), ValueError, ("secret name",)
    ),
    Case("empty secret name", _target(secret_name=""), ValueError, ("secret name",)),
    Case("empty namespace", _target(namespace=""), ValueError, ("namespace",)),
    # --- targets
    Case(
        "in-cluster mode outside Kubernetes",
        _target(connection_mode=ConnectionMode.IN_CLUSTER, credential=None),
        KubeError,
        ("in-cluster", "KUBERNETES_SERVICE_HOST"),
    ),
    Case(
        "unknown credential",
        _target(credential="no-such-credential"),
        LookupError,
        ("no-such-credential",),
    ),
    Case(
        "kubeconfig mode without a credential",
        _target(credential=None),
        ValueError,
        ("credential",),
    ),
    # --- group settings
    Case("batch size 0", _group(batch_size=0), ValueError, ("at least 1",)),
    Case("batch size 0%", _group(batch_size="0%"), ValueError, ("at least 1",)),
    Case("batch size not a number", _group(batch_size="lots"), ValueError, ("batch size",)),
    Case("negative failure threshold", _group(failure_threshold=-1), ValueError, ("negative",)),
    Case("failure threshold over 100%", _group(failure_threshold="150%"), ValueError, ("100%",)),
    Case(
        "distribution to an empty group",
        lambda ctx: service.attach(ctx.rt, ctx.certificate_id, group="empty-group"),
        ValueError,
        ("no targets", "add targets"),
        setup=_store_empty_group,
    ),
    # --- distributions and runs
    Case(
        "webhook URL that is not http(s)",
        lambda ctx: service.attach_webhook(
            ctx.rt, ctx.certificate_id, "ftp://hooks.example.com/x", secret=None
        ),
        ValueError,
        ("https://",),
    ),
    Case(
        "webhook secret too short",
        lambda ctx: service.add_webhook_secret(ctx.rt, "short", b"tiny"),
        ValueError,
        ("16",),
    ),
    # --- output formats (issue 14 §4)
    Case(
        "PKCS#12 password credential that does not exist",
        _target(combined_pem=True, pkcs12_password_credential="no-such-password"),
        ValueError,
        ("'no-such-password' does not exist", "credentials add-pkcs12-password"),
    ),
    Case(
        "PKCS#12 password credential that holds a kubeconfig",
        lambda ctx: service.create_target(
            ctx.rt, ctx.target(pkcs12_password_credential=ctx.credential), check=False
        ),
        ValueError,
        ("not a PKCS#12 password", "add-pkcs12-password"),
    ),
    Case(
        "PKCS#12 password too short",
        lambda ctx: service.add_pkcs12_password(ctx.rt, "ks-short", b"12345"),
        ValueError,
        ("at least 6", "openssl rand"),
    ),
    Case(
        "PKCS#12 password with non-ASCII characters",
        lambda ctx: service.add_pkcs12_password(ctx.rt, "ks-utf8", "pässwörd-1".encode()),
        ValueError,
        ("printable ASCII", "Fix:"),
    ),
    Case(
        "rollback with store content off",
        lambda ctx: ctx.pipe.enqueue(ctx.extra["no_store_distribution"], "rollback"),
        ValueError,
        ("store content",),
        setup=_store_target_without_content,
    ),
]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def catalog(
    testenv: Any, clusters: list[Any], redis_url: str, tmp_path_factory: Any
) -> Iterator[Ctx]:
    from tests.testenv.access import admin_api_client, create_service_account

    server = testenv.postgres()
    url = server.create_database("catalog")
    tmp = tmp_path_factory.mktemp("catalog")
    admin = admin_api_client(clusters[0])
    namespace = f"catalog-{uuid.uuid4().hex[:6]}"
    access = create_service_account(admin, clusters[0], namespace, SPEC_MINIMUM_RULES, None)
    with pipeline(url, redis_url, tmp) as pipe:
        chain = make_chain(cn="catalog.example.com", fresh_leaf_key=True)
        ctx = Ctx(
            pipe=pipe,
            cluster=clusters[0],
            namespace=namespace,
            kubeconfig=access.kubeconfig,
            token=access.token,
            chain=chain,
            other=make_chain(cn="other.example.com", fresh_leaf_key=True),
            certificate_id=service.import_certificate(
                pipe.runtime, chain.leaf_pem, chain.key_pem, chain.chain_pem
            ),
            credential="good-kubeconfig",
            tmp=tmp,
        )
        service.add_kubeconfig_credential(
            pipe.runtime, "good-kubeconfig", access.kubeconfig.encode()
        )
        ctx.extra["good_target"] = service.create_target(
            pipe.runtime, ctx.target(name="good-target"), check=False
        )[0]
        ctx.extra["admin"] = admin
        yield ctx
    admin.close()  # type: ignore[no-untyped-call]
    server.drop_database(url)


def database_fingerprint(pipe: Pipeline) -> dict[str, str]:
    """A hash of every row of every table (what "nothing changed in the database" checks)."""
    digests: dict[str, str] = {}
    with pipe.runtime.session() as session:
        for table in Base.metadata.sorted_tables:
            rows = session.execute(select(table).order_by(*table.primary_key.columns)).all()
            digests[table.name] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return digests


def cluster_fingerprint(clusters: list[Any], admin_api: Any) -> set[tuple[str, str, str, str]]:
    """Every Secret (and namespace) in every cluster with its resourceVersion."""
    seen: set[tuple[str, str, str, str]] = set()
    for cluster in clusters:
        api = k8s.CoreV1Api(admin_api(cluster))
        for secret in api.list_secret_for_all_namespaces().items:
            meta = secret.metadata
            seen.add((cluster.name, meta.namespace, meta.name, meta.resource_version))
        for namespace in api.list_namespace().items:
            seen.add((cluster.name, "", namespace.metadata.name, ""))
    return seen


def secret_fragments(ctx: Ctx) -> list[str]:
    """Key material and tokens an error text must never quote (PEM markers, base64 lines)."""
    fragments = [ctx.token]
    for pem in (ctx.chain.key_pem, ctx.other.key_pem):
        fragments += [line for line in pem.decode().splitlines()[1:-1] if len(line) > 16]
    return fragments


@pytest.mark.parametrize("case", API_CASES, ids=[case.name for case in API_CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(
    case: Case, catalog: Ctx, clusters: list[Any], testenv_admin_api: Any
) -> None:
    if case.setup is not None:
        case.setup(catalog)
    rows_before = database_fingerprint(catalog.pipe)
    cluster_before = cluster_fingerprint(clusters, testenv_admin_api)

    with pytest.raises(case.error) as raised:
        case.act(catalog)

    text = str(raised.value)
    for fragment in case.fragments:
        assert fragment.lower() in text.lower(), f"{case.name}: {fragment!r} not in {text!r}"
    assert len(text) > 30, f"{case.name}: too terse to name problem and fix: {text!r}"
    for fragment in secret_fragments(catalog):
        assert fragment not in text, f"{case.name}: the error quotes secret material"
    assert database_fingerprint(catalog.pipe) == rows_before, "the database changed"
    assert cluster_fingerprint(clusters, testenv_admin_api) == cluster_before, "a cluster changed"


def test_the_catalog_is_at_least_forty_cases() -> None:
    assert len(API_CASES) + len(RUNTIME_CASES) >= 40


# --------------------------------------------------------------------- detected at run time


@dataclass(frozen=True)
class RuntimeCase:
    """A target that passes the API but fails at run time: ``reason`` and spec text."""

    name: str
    prepare: Callable[[Ctx, str], service.TargetSpec]
    reason: str
    fragments: tuple[str, ...]


def _new_namespace(ctx: Ctx, rules: Any = SPEC_MINIMUM_RULES) -> tuple[str, str]:
    """A namespace of its own with a ServiceAccount bound to ``rules``; its credential name."""
    from tests.testenv.access import create_service_account

    namespace = f"rt-{uuid.uuid4().hex[:8]}"
    access = create_service_account(ctx.extra["admin"], ctx.cluster, namespace, rules, None)
    credential = f"kc-{namespace}"
    service.add_kubeconfig_credential(ctx.rt, credential, access.kubeconfig.encode())
    return namespace, credential


def _rules_without(verb: str) -> list[dict[str, Any]]:
    """The spec's Role with ``verb`` taken away on secrets (namespaces/get stays)."""
    return [
        {**rule, "verbs": [v for v in rule["verbs"] if v != verb]}
        if "secrets" in rule["resources"]
        else dict(rule)
        for rule in SPEC_MINIMUM_RULES
    ]


def _secret_api(ctx: Ctx) -> Any:
    return k8s.CoreV1Api(ctx.extra["admin"])


def _put_secret(ctx: Ctx, namespace: str, body: dict[str, Any]) -> None:
    _secret_api(ctx).create_namespaced_secret(namespace, body)


def _our_older_secret(ctx: Ctx, namespace: str, name: str) -> dict[str, Any]:
    old = make_chain(cn="catalog.example.com", fresh_leaf_key=True)
    return managed_secret(name, namespace, old, "an-earlier-distribution")


def _spec(ctx: Ctx, name: str, namespace: str, credential: str, **kw: Any) -> service.TargetSpec:
    return service.TargetSpec(
        name=name, namespace=namespace, credential=credential, secret_name="runtime-tls", **kw
    )


def _missing_namespace(ctx: Ctx, name: str) -> service.TargetSpec:
    # Cluster admin (client certificate): RBAC allows everything, so the 404 is the answer.
    service.add_kubeconfig_credential(
        ctx.rt, f"admin-{name}", ctx.cluster.admin_kubeconfig.encode()
    )
    return _spec(ctx, name, f"absent-{uuid.uuid4().hex[:6]}", f"admin-{name}")


def _opaque_secret(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, credential = _new_namespace(ctx)
    _put_secret(
        ctx,
        namespace,
        {
            "metadata": {"name": "runtime-tls"},
            "type": "Opaque",
            "data": {"k": base64.b64encode(b"v").decode()},
        },
    )
    return _spec(ctx, name, namespace, credential)


def _immutable_secret(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, credential = _new_namespace(ctx)
    body = _our_older_secret(ctx, namespace, "runtime-tls")
    body["immutable"] = True
    _put_secret(ctx, namespace, body)
    return _spec(ctx, name, namespace, credential)


def _unmanaged_secret(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, credential = _new_namespace(ctx)
    body = _our_older_secret(ctx, namespace, "runtime-tls")
    body["metadata"]["labels"] = {}
    body["metadata"]["annotations"] = {}
    _put_secret(ctx, namespace, body)
    return _spec(ctx, name, namespace, credential)


def _missing_verb(verb: str, existing: bool) -> Callable[[Ctx, str], service.TargetSpec]:
    def prepare(ctx: Ctx, name: str) -> service.TargetSpec:
        namespace, credential = _new_namespace(ctx, _rules_without(verb))
        if existing:
            _put_secret(ctx, namespace, _our_older_secret(ctx, namespace, "runtime-tls"))
        return _spec(ctx, name, namespace, credential)

    return prepare


def _wrong_ca(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, _ = _new_namespace(ctx)
    stranger = CertificateAuthority("not the cluster CA").cert_pem.decode()
    kubeconfig = ctx.kubeconfig_with(
        _set_cluster(**{"certificate-authority-data": base64.b64encode(stranger.encode()).decode()})
    )
    service.add_kubeconfig_credential(ctx.rt, f"wrongca-{name}", kubeconfig)
    return _spec(ctx, name, namespace, f"wrongca-{name}")


def _invalid_token(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, _ = _new_namespace(ctx)
    kubeconfig = ctx.kubeconfig_with(_set_user(token="eyJhbGciOiJSUzI1NiJ9.forged.signature"))
    service.add_kubeconfig_credential(ctx.rt, f"badtoken-{name}", kubeconfig)
    return _spec(ctx, name, namespace, f"badtoken-{name}")


def _expired_client_certificate(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, _ = _new_namespace(ctx)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired-user")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    def mutate(doc: dict[str, Any]) -> None:
        doc["users"][0]["user"] = {
            "client-certificate-data": base64.b64encode(
                cert.public_bytes(serialization.Encoding.PEM)
            ).decode(),
            "client-key-data": base64.b64encode(key_pem).decode(),
        }

    service.add_kubeconfig_credential(ctx.rt, f"expired-{name}", ctx.kubeconfig_with(mutate))
    return _spec(ctx, name, namespace, f"expired-{name}")


def _wildcard_cn_raw(ctx: Ctx, name: str) -> service.TargetSpec:
    namespace, credential = _new_namespace(ctx)
    return service.TargetSpec(
        name=name, namespace=namespace, credential=credential, secret_name="{{ .cn_raw }}-tls"
    )


RUNTIME_CASES: list[RuntimeCase] = [
    RuntimeCase(
        "namespace missing",
        _missing_namespace,
        "namespace_not_found",
        ('namespaces "', "not found", "Create the namespace"),
    ),
    RuntimeCase(
        "secret of another type", _opaque_secret, "secret_type_conflict", ("Opaque", "immutable")
    ),
    RuntimeCase("immutable secret", _immutable_secret, "immutable_secret", ("immutable",)),
    RuntimeCase(
        "secret not managed by us",
        _unmanaged_secret,
        "unmanaged_secret",
        ("not managed by CertAutoPilot", "adopt"),
    ),
    RuntimeCase(
        "RBAC without get",
        _missing_verb("get", existing=True),
        "forbidden",
        ("secrets", "get", "RoleBinding"),
    ),
    RuntimeCase(
        "RBAC without create",
        _missing_verb("create", existing=False),
        "forbidden",
        ("forbidden: secrets cannot be created", "RoleBinding"),
    ),
    RuntimeCase(
        "RBAC without update",
        _missing_verb("update", existing=True),
        "forbidden",
        ("forbidden: secrets cannot be updated", "RoleBinding"),
    ),
    RuntimeCase(
        "kubeconfig with the wrong CA",
        _wrong_ca,
        "tls_verification_failed",
        ("certificate-authority-data",),
    ),
    RuntimeCase(
        "revoked or invalid token",
        _invalid_token,
        "unauthorized",
        ("rejected", "Store a fresh kubeconfig"),
    ),
    RuntimeCase(
        "expired client certificate",
        _expired_client_certificate,
        "unauthorized",
        ("rejected", "expired"),
    ),
    RuntimeCase(
        "wildcard CN in a raw template", _wildcard_cn_raw, "template_invalid", ("'*'", "cn")
    ),
]


@dataclass
class RuntimeOutcome:
    report: service.RunReport
    before: dict[str, Any]
    specs: dict[str, service.TargetSpec]


@pytest.fixture(scope="module")
def runtime_outcome(catalog: Ctx) -> RuntimeOutcome:
    """One execute run over a group holding one target per run-time case."""
    ctx = catalog
    wildcard = make_chain(cn="*.catalog.example.com", fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        ctx.rt, wildcard.leaf_pem, wildcard.key_pem, wildcard.chain_pem
    )
    specs: dict[str, service.TargetSpec] = {}
    before: dict[str, Any] = {}
    for index, case in enumerate(RUNTIME_CASES):
        spec = case.prepare(ctx, f"rt-{index:02d}")
        service.create_target(ctx.rt, spec, check=False)
        specs[case.name] = spec
        live = read_secret(lambda _: ctx.extra["admin"], ctx.cluster, spec.namespace, "runtime-tls")
        before[case.name] = None if live is None else live.metadata.resource_version
    service.create_group(
        ctx.rt,
        "runtime-cases",
        [spec.name for spec in specs.values()],
        failure_threshold="100%",
    )
    distribution = service.attach(ctx.rt, certificate_id, group="runtime-cases", store_content=True)
    ctx.pipe.start_worker("catalog", concurrency=4)
    report = ctx.pipe.wait(ctx.pipe.enqueue(distribution, "execute"))
    return RuntimeOutcome(report, before, specs)


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=[case.name for case in RUNTIME_CASES])
def test_bad_kubernetes_state_fails_that_target_with_the_reason_and_leaves_its_secret(
    case: RuntimeCase, catalog: Ctx, runtime_outcome: RuntimeOutcome
) -> None:
    spec = runtime_outcome.specs[case.name]
    result = next(r for r in runtime_outcome.report.results if r.target_name == spec.name)

    assert runtime_outcome.report.finished
    assert result.status == "failed", result
    assert result.error_reason == case.reason, result.error_message
    text = result.error_message or ""
    for fragment in case.fragments:
        assert fragment.lower() in text.lower(), f"{case.name}: {fragment!r} not in {text!r}"
    for fragment in secret_fragments(catalog):
        assert fragment not in text, f"{case.name}: the error quotes secret material"
    live = read_secret(
        lambda _: catalog.extra["admin"], catalog.cluster, spec.namespace, "runtime-tls"
    )
    after = None if live is None else live.metadata.resource_version
    assert after == runtime_outcome.before[case.name], f"{case.name}: the Secret was written"


def test_a_role_without_patch_is_named_by_the_health_check(catalog: Ctx) -> None:
    # The pipeline never PATCHes (writes are PUT), so a missing patch cannot fail a run;
    # the health check still reports it because the spec's Role lists it.
    namespace, credential = _new_namespace(catalog, _rules_without("patch"))
    _, health = service.create_target(catalog.rt, _spec(catalog, "no-patch", namespace, credential))
    assert health is not None and health.status == "unhealthy", health
    assert "patch" in health.message and "RoleBinding" in health.message, health.message


@pytest.mark.parametrize(
    "name", ["secret of another type", "immutable secret", "secret not managed by us"]
)
def test_a_refused_secret_keeps_the_diff_that_explains_the_refusal(
    name: str, runtime_outcome: RuntimeOutcome
) -> None:
    spec = runtime_outcome.specs[name]
    result = next(r for r in runtime_outcome.report.results if r.target_name == spec.name)

    assert result.status == "failed"
    assert result.diff is not None, f"{name}: the refusal lost its diff"
    assert result.diff["action"] == "update"
    assert "PRIVATE KEY" not in str(result.diff)
