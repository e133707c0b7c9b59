"""Connecting: kubeconfig vetting, in-cluster detection, token rotation, building, caching.

Pure unit tests (no API server): the refusals of dangerous kubeconfig fields, that key
material never lands in a file or a repr, and that the library's process-wide default
configuration is never touched.
"""

from __future__ import annotations

import base64
import copy
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration

from tests.certfactory import make_chain
from worker.core.limits import KUBECONFIG, YAML_MAX_DEPTH, YAML_MAX_NODES, InputTooLarge
from worker.kube.connect import (
    ClientCache,
    ConnectionSpec,
    RotatingTokenFile,
    build_api_client,
    in_cluster_available,
    in_cluster_spec,
    minimal_kubeconfig,
    vet_kubeconfig,
)
from worker.kube.errors import InClusterUnavailable, KubeconfigRejected

CHAIN = make_chain("admin", sans=[])
CA_PEM = CHAIN.root_pem
CERT_PEM = CHAIN.leaf_pem
KEY_PEM = CHAIN.key_pem
TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(**user: Any) -> dict[str, Any]:
    """A valid kubeconfig as a dict (token user unless overridden)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "main",
        "contexts": [
            {"name": "main", "context": {"cluster": "c1", "user": "u1", "namespace": "ingress"}},
            {"name": "other", "context": {"cluster": "c2", "user": "u2"}},
        ],
        "clusters": [
            {
                "name": "c1",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": b64(CA_PEM),
                },
            },
            {
                "name": "c2",
                "cluster": {
                    "server": "https://k8s.example.com",
                    "certificate-authority-data": b64(CA_PEM),
                    "tls-server-name": "kubernetes.default",
                },
            },
        ],
        "users": [
            {"name": "u1", "user": user or {"token": TOKEN}},
            {
                "name": "u2",
                "user": {
                    "client-certificate-data": b64(CERT_PEM),
                    "client-key-data": b64(KEY_PEM),
                },
            },
        ],
    }


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc)


def with_change(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """The valid kubeconfig with one field set (value None deletes it)."""
    doc = copy.deepcopy(kubeconfig())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


USER = ("users", 0, "user")
CLUSTER = ("clusters", 0, "cluster")

# (case id, document, text that the refusal must name)
REFUSALS: list[tuple[str, Any, str]] = [
    (
        "exec plugin",
        with_change((*USER, "exec"), {"command": "/bin/sh", "args": ["-c", "id"]}),
        "users[u1].user.exec",
    ),
    (
        "auth-provider",
        with_change((*USER, "auth-provider"), {"name": "gcp"}),
        "users[u1].user.auth-provider",
    ),
    (
        "client-certificate path",
        with_change((*USER, "client-certificate"), "/etc/passwd"),
        "users[u1].user.client-certificate",
    ),
    (
        "client-key path",
        with_change((*USER, "client-key"), "/root/.ssh/id_rsa"),
        "users[u1].user.client-key",
    ),
    ("tokenFile path", with_change((*USER, "tokenFile"), "/var/token"), "users[u1].user.tokenFile"),
    (
        "certificate-authority path",
        with_change((*CLUSTER, "certificate-authority"), "/etc/ssl/ca.pem"),
        "clusters[c1].cluster.certificate-authority",
    ),
    (
        "insecure-skip-tls-verify",
        with_change((*CLUSTER, "insecure-skip-tls-verify"), True),
        "clusters[c1].cluster.insecure-skip-tls-verify",
    ),
    (
        "plain http server",
        with_change((*CLUSTER, "server"), "http://127.0.0.1:8080"),
        "must be an https:// URL",
    ),
    ("missing server", with_change((*CLUSTER, "server"), None), "clusters[c1].cluster.server"),
    ("no current-context", with_change(("current-context",), None), "current-context"),
    ("unknown current-context", with_change(("current-context",), "nope"), 'named "nope"'),
    ("no clusters", with_change(("clusters",), None), "clusters"),
    ("no users", with_change(("users",), None), "users"),
    ("context without user", with_change(("contexts", 0, "context", "user"), None), ".user"),
    (
        "username and password",
        with_change(USER, {"username": "admin", "password": "hunter2"}),
        "basic authentication, which is unsupported",
    ),
    ("impersonation", with_change((*USER, "as"), "system:admin"), "impersonates"),
    ("proxy", with_change((*CLUSTER, "proxy-url"), "http://proxy:3128"), "proxy"),
    ("unknown user field", with_change((*USER, "future-thing"), "x"), "not supported"),
    (
        "CA data not base64",
        with_change((*CLUSTER, "certificate-authority-data"), "%%%not-base64%%%"),
        "not valid base64",
    ),
    (
        "CA data not PEM",
        with_change((*CLUSTER, "certificate-authority-data"), b64(b"hello")),
        "does not hold PEM data",
    ),
    (
        "certificate without key",
        with_change(USER, {"client-certificate-data": b64(CERT_PEM)}),
        "client-key-data is missing",
    ),
    ("no credentials at all", with_change(USER, {}), "has no credentials"),
    ("empty token", with_change(USER, {"token": "  "}), "users[u1].user.token"),
    ("not yaml", "clusters: [\n  - {name: c1", "not valid YAML"),
    ("not a mapping", "- just\n- a list\n", "not a kubeconfig"),
]


@pytest.mark.parametrize(
    ("document", "named"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_vetting_refuses_each_dangerous_or_broken_field(document: Any, named: str) -> None:
    text = document if isinstance(document, str) else dump(document)
    with pytest.raises(KubeconfigRejected) as caught:
        vet_kubeconfig(text)
    err = caught.value
    assert named in err.message
    assert err.reason == "kubeconfig_rejected"
    # Neither the token nor key data may be echoed in the refusal.
    assert TOKEN not in str(err) and b64(KEY_PEM)[:40] not in str(err)
    assert "hunter2" not in str(err)


def test_insecure_is_accepted_only_when_the_target_allows_it() -> None:
    text = dump(with_change((*CLUSTER, "insecure-skip-tls-verify"), True))
    spec = vet_kubeconfig(text, allow_insecure=True)
    assert spec.insecure is True


def test_a_token_kubeconfig_gives_its_server_ca_and_token() -> None:
    spec = vet_kubeconfig(dump(kubeconfig()))
    assert spec.server == "https://127.0.0.1:6443"
    assert spec.ca_pem == CA_PEM
    assert spec.token == TOKEN
    assert spec.client_cert_pem is None and spec.insecure is False


def test_the_context_argument_selects_a_client_certificate_user() -> None:
    spec = vet_kubeconfig(dump(kubeconfig()).encode(), context="other")
    assert (spec.server, spec.tls_server_name) == ("https://k8s.example.com", "kubernetes.default")
    assert (spec.client_cert_pem, spec.client_key_pem, spec.token) == (CERT_PEM, KEY_PEM, None)


def test_dangerous_fields_of_unused_users_do_not_matter_when_connecting() -> None:
    # Connecting vets what it uses; storing (minimal_kubeconfig, below) vets the whole file.
    doc = kubeconfig()
    doc["users"][1]["user"] = {"exec": {"command": "gcloud"}}
    assert vet_kubeconfig(dump(doc)).token == TOKEN


def test_the_spec_repr_hides_token_and_key() -> None:
    spec = vet_kubeconfig(dump(kubeconfig()), context="other")
    text = repr(spec) + repr(vet_kubeconfig(dump(kubeconfig())))
    assert TOKEN not in text
    assert "PRIVATE KEY" not in text
    assert "https://k8s.example.com" in text


def test_the_insecure_refusal_names_the_target_flag_not_a_re_export() -> None:
    text = dump(with_change((*CLUSTER, "insecure-skip-tls-verify"), True))
    with pytest.raises(KubeconfigRejected) as caught:
        vet_kubeconfig(text)
    assert "clusters[c1].cluster.insecure-skip-tls-verify" in caught.value.message
    assert "--allow-insecure" in caught.value.fix
    assert "kubectl config view" not in caught.value.fix


MORE_REFUSALS: list[tuple[str, Any, str]] = [
    ("token with a line break", with_change((*USER, "token"), "abc\nX-Evil: 1"), "control"),
    ("server port not a number", with_change((*CLUSTER, "server"), "https://h:99999"), "valid"),
    ("server bracket unclosed", with_change((*CLUSTER, "server"), "https://[::1"), "valid"),
    ("server not text", with_change((*CLUSTER, "server"), ["https://h"]), "server"),
    ("CA data not text", with_change((*CLUSTER, "certificate-authority-data"), 5), "base64"),
    ("tls-server-name not text", with_change((*CLUSTER, "tls-server-name"), {"a": 1}), "host"),
    ("current-context not text", with_change(("current-context",), ["main"]), "current-context"),
    ("context user not text", with_change(("contexts", 0, "context", "user"), 7), ".user"),
    ("unknown context field", with_change(("contexts", 0, "context", "x"), 1), ".context.x"),
]


@pytest.mark.parametrize(
    ("document", "named"), [c[1:] for c in MORE_REFUSALS], ids=[c[0] for c in MORE_REFUSALS]
)
def test_malformed_values_are_refused_as_kubeconfig_errors(document: Any, named: str) -> None:
    with pytest.raises(KubeconfigRejected) as caught:
        vet_kubeconfig(dump(document))
    assert named in caught.value.message
    assert TOKEN not in str(caught.value)


# --- size and YAML hardening --------------------------------------------------------------


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_an_oversized_kubeconfig_is_refused_before_parsing(as_text: bool) -> None:
    raw = dump(kubeconfig()).encode() + b"# padding\n" * 2_000_000  # 20 MB
    started = time.perf_counter()
    for call in (vet_kubeconfig, minimal_kubeconfig):
        with pytest.raises(InputTooLarge) as caught:
            call(raw.decode() if as_text else raw)
        assert caught.value.limit is KUBECONFIG
        assert caught.value.size == len(raw)
        assert str(caught.value).startswith(f"the kubeconfig is {len(raw)} bytes")
        assert "256 KiB" in str(caught.value) and "--minify" in str(caught.value)
    assert time.perf_counter() - started < 1.0


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
current-context: main
"""
GOOD = dump(kubeconfig())
YAML_REFUSALS: list[tuple[str, str, str]] = [
    ("billion laughs", BILLION_LAUGHS, "line 1 defines an anchor (&a)"),
    ("alias to a user", GOOD.replace("- name: u1", "- &u name: u1") + "x: *u\n", "anchor"),
    ("alias only", GOOD + "preferences: *nothing\n", "alias"),
    ("python tag", GOOD + "preferences: !!python/object/apply:os.system [id]\n", "tag"),
    ("binary tag", GOOD + "preferences: !!binary aGVsbG8=\n", "tag"),
    ("local tag", GOOD + "preferences: !thing {}\n", "tag"),
    ("merge key", GOOD + "preferences: {<<: {a: 1}}\n", "merge key"),
    ("duplicate top-level key", GOOD + "current-context: other\n", "repeats the key"),
    (
        "duplicate token",
        dump(kubeconfig()).replace(f"token: {TOKEN}", f"token: {TOKEN}\n    token: x"),
        "repeats the key 'token'",
    ),
    ("too deep", GOOD + "preferences: " + "[" * (YAML_MAX_DEPTH + 5) + "]" * 25 + "\n", "deeper"),
    ("too many nodes", GOOD + "preferences: [" + "a," * YAML_MAX_NODES + "]\n", "nodes"),
    ("two documents", GOOD + "---\n" + GOOD, "not valid YAML (line"),
    ("not UTF-8", "current-context: \udcff\n", "not valid YAML"),
]


@pytest.mark.parametrize(
    ("text", "named"), [c[1:] for c in YAML_REFUSALS], ids=[c[0] for c in YAML_REFUSALS]
)
def test_yaml_features_a_kubeconfig_never_needs_are_refused_naming_the_line(
    text: str, named: str
) -> None:
    raw = text.encode("utf-8", "surrogateescape")
    for call in (vet_kubeconfig, minimal_kubeconfig):
        with pytest.raises(KubeconfigRejected) as caught:
            call(raw)
        assert named in caught.value.message
        assert TOKEN not in str(caught.value)


def test_the_duplicate_key_refusal_names_its_line() -> None:
    text = dump(kubeconfig()) + "current-context: other\n"
    line = text.count("\n")
    with pytest.raises(KubeconfigRejected, match=f"line {line} repeats the key 'current-context'"):
        vet_kubeconfig(text)


@pytest.mark.parametrize("value", ["2024-13-45", "1" * 5000, "0x" + "f" * 5000, "1e99999"])
def test_odd_scalars_stay_kubeconfig_errors(value: str) -> None:
    # An impossible date or an integer too long to convert must not escape as ValueError.
    doc = dump(kubeconfig()).replace("name: main", f"name: {value}", 1)
    with pytest.raises(KubeconfigRejected):
        vet_kubeconfig(doc)


# --- the stored form: the whole file is vetted, only the selected context is kept ---------


def test_the_stored_form_is_one_context_one_cluster_one_user_inline_only() -> None:
    doc = kubeconfig()
    doc["clusters"][0]["cluster"]["extensions"] = [{"name": "x", "extension": {"a": 1}}]
    doc["preferences"] = {"colors": True}
    stored = minimal_kubeconfig(dump(doc))
    assert yaml.safe_load(stored) == {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "main",
        "contexts": [{"name": "main", "context": {"cluster": "c1", "user": "u1"}}],
        "clusters": [
            {
                "name": "c1",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": b64(CA_PEM),
                },
            }
        ],
        "users": [{"name": "u1", "user": {"token": TOKEN}}],
    }


@pytest.mark.parametrize("context", [None, "other"])
@pytest.mark.parametrize("insecure", [False, True])
def test_the_stored_form_connects_the_same_and_is_a_fixed_point(
    context: str | None, insecure: bool
) -> None:
    doc = kubeconfig()
    index = 0 if context is None else 1
    doc["clusters"][index]["cluster"]["server"] += "/"
    if insecure:
        doc["clusters"][index]["cluster"]["insecure-skip-tls-verify"] = True
    doc["users"][0]["user"]["token"] = f"  {TOKEN}\n"
    text = dump(doc)
    stored = minimal_kubeconfig(text, context=context)
    assert minimal_kubeconfig(stored) == stored
    assert vet_kubeconfig(stored, allow_insecure=True) == vet_kubeconfig(
        text, allow_insecure=True, context=context
    )
    assert yaml.safe_load(stored)["current-context"] == (context or "main")
    if insecure:  # the target still decides: storing kept the flag, connecting refuses it
        with pytest.raises(KubeconfigRejected, match="insecure-skip-tls-verify"):
            vet_kubeconfig(stored)


def test_the_stored_form_of_a_certificate_user_keeps_cert_key_and_server_name() -> None:
    stored = yaml.safe_load(minimal_kubeconfig(dump(kubeconfig()), context="other"))
    assert stored["users"] == [
        {
            "name": "u2",
            "user": {"client-certificate-data": b64(CERT_PEM), "client-key-data": b64(KEY_PEM)},
        }
    ]
    assert stored["clusters"][0]["cluster"]["tls-server-name"] == "kubernetes.default"


UNUSED = ("users", 1, "user")
UNUSED_CLUSTER = ("clusters", 1, "cluster")
WHOLE_FILE_REFUSALS: list[tuple[str, Any, str]] = [
    (
        "unused user with exec",
        with_change((*UNUSED, "exec"), {"command": "sh"}),
        "users[u2].user.exec",
    ),
    (
        "unused user with auth-provider",
        with_change((*UNUSED, "auth-provider"), {"name": "oidc"}),
        "users[u2].user.auth-provider",
    ),
    ("unused tokenFile", with_change((*UNUSED, "tokenFile"), "/t"), "users[u2].user.tokenFile"),
    ("unused key path", with_change((*UNUSED, "client-key"), "/k"), "users[u2].user.client-key"),
    ("unused impersonation", with_change((*UNUSED, "as"), "root"), "users[u2].user.as"),
    ("unused basic auth", with_change((*UNUSED, "password"), "pw"), "users[u2].user.password"),
    (
        "unused CA path",
        with_change((*UNUSED_CLUSTER, "certificate-authority"), "/ca"),
        "clusters[c2].cluster.certificate-authority",
    ),
    (
        "unused proxy",
        with_change((*UNUSED_CLUSTER, "proxy-url"), "http://p"),
        "clusters[c2].cluster.proxy-url",
    ),
    ("unknown top-level field", with_change(("exec",), {"command": "sh"}), "exec is not"),
    ("unknown entry field", with_change(("users", 1, "exec"), "sh"), "users[u2].exec"),
    ("entry without a name", with_change(("users", 1, "name"), None), "users[#1].name"),
    ("entry not a mapping", with_change(("clusters", 1), "c2"), "clusters[#1]"),
    ("section not a list", with_change(("users",), {"u1": {}}), "users must be a list"),
    ("unused entry body missing", with_change(("users", 1, "user"), None), "users[u2].user"),
    (
        "two users of one name",
        with_change(("users", 1, "name"), "u1"),
        "users[u1] appears twice",
    ),
]


@pytest.mark.parametrize(
    ("document", "named"),
    [c[1:] for c in WHOLE_FILE_REFUSALS],
    ids=[c[0] for c in WHOLE_FILE_REFUSALS],
)
def test_storing_refuses_a_dangerous_field_anywhere_in_the_file(document: Any, named: str) -> None:
    with pytest.raises(KubeconfigRejected) as caught:
        minimal_kubeconfig(dump(document))
    assert named in caught.value.message
    if "user." in named or "cluster." in named:
        assert "--minify" in caught.value.fix  # how to store only the context that is needed
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("document", "named"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_storing_refuses_whatever_connecting_refuses(document: Any, named: str) -> None:
    text = document if isinstance(document, str) else dump(document)
    if "insecure" in named:
        minimal_kubeconfig(text)  # the target decides about insecure connections
        return
    with pytest.raises(KubeconfigRejected) as caught:
        minimal_kubeconfig(text)
    assert named in caught.value.message


# --- in-cluster ---------------------------------------------------------------------------


def sa_folder(tmp_path: Path, token: str = TOKEN) -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_bytes(CA_PEM)
    (folder / "namespace").write_text("certautopilot")
    return folder


POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster_spec_uses_the_service_address_and_mounted_files(tmp_path: Path) -> None:
    spec = in_cluster_spec(sa_folder(tmp_path), POD_ENV)
    assert spec.server == "https://10.96.0.1:443"
    assert spec.ca_pem == CA_PEM
    assert spec.token_provider is not None and spec.token_provider() == TOKEN


def test_in_cluster_spec_brackets_an_ipv6_service_host(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_spec(sa_folder(tmp_path), env).server == "https://[fd00::1]:443"


@pytest.mark.parametrize(
    ("environ", "remove", "named"),
    [
        ({}, None, "KUBERNETES_SERVICE_HOST"),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None, "KUBERNETES_SERVICE_PORT"),
        (POD_ENV, "token", "token"),
        (POD_ENV, "ca.crt", "ca.crt"),
    ],
    ids=["no service host", "no service port", "no token", "no CA"],
)
def test_in_cluster_mode_outside_kubernetes_is_a_clear_error(
    tmp_path: Path, environ: dict[str, str], remove: str | None, named: str
) -> None:
    folder = sa_folder(tmp_path)
    if remove:
        (folder / remove).unlink()
    with pytest.raises(InClusterUnavailable) as caught:
        in_cluster_spec(folder, environ)
    assert named in caught.value.message
    assert "kubeconfig mode" in caught.value.fix
    assert in_cluster_available(folder, environ) is False


def test_in_cluster_is_available_inside_a_pod(tmp_path: Path) -> None:
    assert in_cluster_available(sa_folder(tmp_path), POD_ENV) is True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_is_re_read_when_the_file_changes(tmp_path: Path) -> None:
    path = sa_folder(tmp_path) / "token"
    provider = RotatingTokenFile(path, clock=Clock())
    assert provider() == TOKEN
    path.write_text("rotated-token")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert provider() == "rotated-token"


def test_the_token_is_re_read_after_a_minute_even_with_the_same_mtime(tmp_path: Path) -> None:
    path = sa_folder(tmp_path) / "token"
    clock = Clock()
    provider = RotatingTokenFile(path, clock=clock)
    provider()
    mtime = path.stat().st_mtime_ns
    path.write_text("rotated-token")
    os.utime(path, ns=(mtime, mtime))  # same mtime: only the age can trigger a re-read
    clock.now += 59
    assert provider() == TOKEN
    clock.now += 1
    assert provider() == "rotated-token"


def test_the_last_token_is_kept_while_the_file_is_briefly_missing(tmp_path: Path) -> None:
    path = sa_folder(tmp_path) / "token"
    provider = RotatingTokenFile(path, clock=Clock())
    provider()
    path.unlink()
    assert provider() == TOKEN


def test_a_token_file_that_never_existed_is_in_cluster_unavailable(tmp_path: Path) -> None:
    with pytest.raises(InClusterUnavailable, match="cannot be read"):
        RotatingTokenFile(tmp_path / "missing")()


def test_the_rotating_token_reaches_the_authorization_header(tmp_path: Path) -> None:
    folder = sa_folder(tmp_path)
    api = build_api_client(in_cluster_spec(folder, POD_ENV), connect_timeout=1, read_timeout=1)
    first = api.param_serialize("GET", "/api", auth_settings=["BearerToken"])[2]
    (folder / "token").write_text("rotated-token")
    os.utime(folder / "token", ns=(0, 10**18))
    second = api.param_serialize("GET", "/api", auth_settings=["BearerToken"])[2]
    assert (first["authorization"], second["authorization"]) == (
        f"Bearer {TOKEN}",
        "Bearer rotated-token",
    )


# --- building clients ---------------------------------------------------------------------


@pytest.fixture
def watched_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty folder so any temp file written would show up there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_building_a_client_writes_no_file_and_leaves_the_default_configuration_alone(
    watched_tempdir: Path,
) -> None:
    default_before = Configuration._default
    api_default_before = ApiClient._default
    spec = vet_kubeconfig(dump(kubeconfig()), context="other")
    api = build_api_client(spec, connect_timeout=2, read_timeout=7)
    assert list(watched_tempdir.iterdir()) == []
    assert Configuration._default is default_before
    assert ApiClient._default is api_default_before
    assert api.configuration.cert_file is None and api.configuration.key_file is None
    assert api.request_timeout == (2, 7)
    pool = api.rest_client.pool_manager
    context = pool.connection_pool_kw["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert pool.connection_pool_kw["server_hostname"] == "kubernetes.default"
    assert pool.connection_pool_kw["retries"].total is False  # tenacity owns retries
    assert [c["subject"] for c in context.get_ca_certs()] != []


def test_the_client_certificate_goes_through_memory_only(
    watched_tempdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, *args: Any, **kwargs: Any) -> None:
        loaded.append(certfile)
        original(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    build_api_client(
        vet_kubeconfig(dump(kubeconfig()), context="other"), connect_timeout=1, read_timeout=1
    )
    assert len(loaded) == 1 and loaded[0].startswith("/proc/self/fd/")
    fd = int(loaded[0].rsplit("/", 1)[1])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed right after loading
    assert list(watched_tempdir.iterdir()) == []


def test_a_key_that_does_not_match_the_certificate_is_rejected() -> None:
    other_key = make_chain("other", fresh_leaf_key=True).key_pem
    spec = ConnectionSpec(
        server="https://127.0.0.1:1",
        ca_pem=CA_PEM,
        client_cert_pem=CERT_PEM,
        client_key_pem=other_key,
    )
    with pytest.raises(KubeconfigRejected, match="cannot be loaded"):
        build_api_client(spec, connect_timeout=1, read_timeout=1)


def test_an_insecure_spec_builds_a_client_that_skips_verification() -> None:
    spec = ConnectionSpec(server="https://127.0.0.1:1", token="t", insecure=True)
    api = build_api_client(spec, connect_timeout=1, read_timeout=1)
    context = api.rest_client.pool_manager.connection_pool_kw["ssl_context"]
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


# --- the client cache ---------------------------------------------------------------------


class Built(list[Any]):
    """A builder that records each spec and returns a distinct closable stand-in."""

    def __call__(self, spec: ConnectionSpec, **timeouts: float) -> Any:
        made = _StandIn(spec, timeouts)
        self.append(made)
        return made


class _StandIn:
    def __init__(self, spec: ConnectionSpec, timeouts: dict[str, float]) -> None:
        self.spec, self.timeouts, self.closed = spec, timeouts, False

    def close(self) -> None:
        self.closed = True


def cache_with(builder: Callable[..., Any]) -> ClientCache:
    return ClientCache(connect_timeout=3, read_timeout=9, builder=builder)


def test_the_cache_reuses_one_client_per_credential_and_content() -> None:
    built = Built()
    cache = cache_with(built)
    text = dump(kubeconfig())
    first = cache.for_kubeconfig("cred-1", text)
    assert cache.for_kubeconfig("cred-1", text) is first
    assert cache.for_kubeconfig("cred-2", text) is not first
    assert len(built) == 2 and built[0].timeouts == {"connect_timeout": 3, "read_timeout": 9}


def test_a_changed_credential_gets_a_new_client_and_the_old_one_is_closed() -> None:
    built = Built()
    cache = cache_with(built)
    old: Any = cache.for_kubeconfig("cred-1", dump(kubeconfig()))
    new: Any = cache.for_kubeconfig("cred-1", dump(kubeconfig(token="new-token")))
    assert new is not old and old.closed and not new.closed
    assert len(cache) == 1


def test_close_all_closes_every_client_and_empties_the_cache() -> None:
    built = Built()
    cache = cache_with(built)
    for credential in ("a", "b", "c"):
        cache.for_kubeconfig(credential, dump(kubeconfig()))
    cache.close_all()
    assert all(made.closed for made in built) and len(cache) == 0


def test_after_fork_the_cache_forgets_clients_without_closing_them() -> None:
    built = Built()
    cache = cache_with(built)
    parent: Any = cache.for_kubeconfig("a", dump(kubeconfig()))
    cache.reset_after_fork()
    child = cache.for_kubeconfig("a", dump(kubeconfig()))
    assert child is not parent and not parent.closed


def test_a_rejected_kubeconfig_is_not_cached() -> None:
    cache = cache_with(Built())
    with pytest.raises(KubeconfigRejected):
        cache.for_kubeconfig("a", dump(with_change((*USER, "exec"), {"command": "x"})))
    assert len(cache) == 0


def test_concurrent_first_use_builds_exactly_one_client() -> None:
    built = Built()
    cache = cache_with(built)
    text = dump(kubeconfig())
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(cache.for_kubeconfig("cred", text))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and all(result is built[0] for result in results)


def test_in_cluster_clients_are_cached_across_token_rotation(tmp_path: Path) -> None:
    built = Built()
    cache = cache_with(built)
    folder = sa_folder(tmp_path)
    first = cache.for_in_cluster(folder, POD_ENV)
    (folder / "token").write_text("rotated")
    assert cache.for_in_cluster(folder, POD_ENV) is first
