"""Fuzzing kubeconfig vetting: targeted documents, mutated YAML text and raw bytes.

Properties, for every input:

* only the product's own refusals escape (``KubeconfigRejected``, ``InputTooLarge``), never
  key material in their text, and each call stays within the profile's deadline;
* an accepted file's stored form (``minimal_kubeconfig``) passes vetting again with the same
  connection, is a fixed point, and holds one context, one cluster and one user;
* storing refuses any refused field anywhere in the file (whole-file vetting).

Settings come from ``tests.fuzz`` (``CAP_FUZZ_PROFILE``; ``python -m tests.fuzz`` runs a
campaign).
"""

from __future__ import annotations

import base64
from typing import Any

import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st

from tests.certfactory import make_chain
from tests.fuzz import fuzz_settings, within_budget
from worker.core.limits import InputTooLarge
from worker.kube.connect import minimal_kubeconfig, vet_kubeconfig
from worker.kube.errors import KubeconfigRejected

CHAIN = make_chain("fuzz-admin", sans=[])
TOKEN = "fuzz-token-0123456789abcdef"
SECRETS = (TOKEN, base64.b64encode(CHAIN.key_pem).decode()[:40])

USER_REFUSED = ["exec", "auth-provider", "client-certificate", "client-key", "tokenFile"]
USER_REFUSED += ["username", "password", "as", "as-uid", "as-groups", "as-user-extra"]
CLUSTER_REFUSED = ["certificate-authority", "proxy-url"]

b64 = base64.b64encode


def _b64(data: bytes) -> str:
    return b64(data).decode()


NAMES = st.one_of(
    st.sampled_from(["main", "c1", "u1", "other", "", "a b", "[x]", "ü", "0", "true", "~"]),
    st.text(min_size=0, max_size=12),
    st.integers(),
    st.none(),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
SERVERS = st.one_of(
    st.sampled_from(
        [
            "https://127.0.0.1:6443",
            "https://k8s.example.com/",
            "https://[::1]:6443",
            "https://[::1",
            "https://h:99999",
            "https://h:-1",
            "http://127.0.0.1:8080",
            "https://",
            "https://a b",
            "https://h\n",
            "file:///etc/passwd",
            "https://user:pw@h",
        ]
    ),
    st.text(max_size=40).map(lambda s: "https://" + s),
    ANY_VALUE,
)
INLINE_DATA = st.one_of(
    st.sampled_from(
        [
            _b64(CHAIN.root_pem),
            _b64(CHAIN.leaf_pem),
            _b64(CHAIN.key_pem),
            _b64(b"-----BEGIN CERTIFICATE-----"),
            _b64(b"hello"),
            "%%%",
            "",
            "aGVsbG8",
        ]
    ),
    st.binary(max_size=40).map(_b64),
    ANY_VALUE,
)
TOKENS = st.one_of(
    st.sampled_from([TOKEN, f"  {TOKEN}\n", "", "  ", "a\nb", "a\x00b", "tok en"]),
    st.text(max_size=30),
    ANY_VALUE,
)


CLUSTER_FIELDS = ["server", "certificate-authority-data", "tls-server-name"]
CLUSTER_FIELDS += ["insecure-skip-tls-verify", "disable-compression", "extensions", "unknown-x"]
USER_FIELDS = ["token", "client-certificate-data", "client-key-data", "extensions", "unknown-y"]
CONTEXT_FIELDS = ["cluster", "user", "namespace", "extensions", "x"]
VALUES_FOR = {
    "server": SERVERS,
    "certificate-authority-data": INLINE_DATA,
    "client-certificate-data": INLINE_DATA,
    "client-key-data": INLINE_DATA,
    "token": TOKENS,
}


def _valid_cluster(index: int) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": f"https://10.0.0.{index}:6443"}
    if index % 2 == 0:
        cluster["certificate-authority-data"] = _b64(CHAIN.root_pem)
    return cluster


def _valid_user(index: int) -> dict[str, Any]:
    if index % 2 == 0:
        return {"token": TOKEN}
    return {
        "client-certificate-data": _b64(CHAIN.leaf_pem),
        "client-key-data": _b64(CHAIN.key_pem),
    }


@st.composite
def kubeconfig_documents(draw: st.DrawFn) -> Any:
    """A valid kubeconfig of one to three contexts, then zero to three targeted changes."""
    count = draw(st.integers(1, 3))
    names = [f"e{i}" for i in range(count)]
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": draw(st.sampled_from(names)),
        "contexts": [
            {"name": n, "context": {"cluster": draw(st.sampled_from(names)), "user": n}}
            for n in names
        ],
        "clusters": [{"name": n, "cluster": _valid_cluster(i)} for i, n in enumerate(names)],
        "users": [{"name": n, "user": _valid_user(i)} for i, n in enumerate(names)],
    }
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["contexts", "clusters", "users"]))
        index = draw(st.integers(0, count - 1))
        entries = doc.get(section)
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
        body = entry.get(section[:-1]) if isinstance(entry, dict) else None
        change = draw(st.integers(0, 9))
        if change <= 4 and isinstance(body, dict):  # one field set to a targeted value
            fields = {"clusters": CLUSTER_FIELDS, "users": USER_FIELDS}.get(section, CONTEXT_FIELDS)
            refused = {"clusters": CLUSTER_REFUSED, "users": USER_REFUSED}.get(section, [])
            key = draw(st.sampled_from(fields + refused))
            body[key] = draw(VALUES_FOR.get(key, ANY_VALUE))
        elif change == 5 and isinstance(body, dict) and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif change == 6 and isinstance(entry, dict):
            entry["name"] = draw(NAMES)
        elif change == 7:
            doc["current-context"] = draw(NAMES)
        elif change == 8:
            doc[draw(st.sampled_from(["preferences", "extensions", "exec", section]))] = draw(
                ANY_VALUE
            )
        elif isinstance(doc.get(section), list):
            doc[section].append(draw(ANY_VALUE))
    return doc


YAML_MUTATIONS = [
    "&a ",
    "*a",
    "!!binary ",
    "!!python/object/apply:os.system ",
    "!x ",
    "<<: ",
    "? ",
    "- ",
    ": ",
    "[",
    "]",
    "{",
    "}",
    "\n",
    "  ",
    "'",
    '"',
    "#",
    "---\n",
    "%YAML 1.1\n",
    "2024-13-45",
    "1" * 5000,
    "\t",
    "\ufeff",
]


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    """A dumped document with YAML punctuation, anchors, tags or garbage spliced in."""
    text = yaml.safe_dump(draw(kubeconfig_documents()), allow_unicode=True)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        piece = draw(st.one_of(st.sampled_from(YAML_MUTATIONS), st.text(max_size=6)))
        text = text[:at] + piece + text[at + cut :]
    return text.encode("utf-8", "surrogatepass")


_GOOD = {
    "apiVersion": "v1",
    "current-context": "e0",
    "contexts": [{"name": "e0", "context": {"cluster": "e0", "user": "e0"}}],
    "clusters": [{"name": "e0", "cluster": _valid_cluster(0)}],
    "users": [{"name": "e0", "user": _valid_user(0)}],
}


def _checked(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call and return the result, or None for a product refusal; anything else fails."""
    try:
        with within_budget():
            return call(*args, **kwargs)
    except (KubeconfigRejected, InputTooLarge) as refusal:
        text = str(refusal)
        assert not any(secret in text for secret in SECRETS), text
        return None


def _assert_properties(raw: bytes | str) -> None:
    spec = _checked(vet_kubeconfig, raw, allow_insecure=True)
    stored = _checked(minimal_kubeconfig, raw)
    event(f"connects: {spec is not None}, stored: {stored is not None}")
    if stored is None:
        return
    # Storing vets more than connecting: whatever it accepts connects, the same way.
    assert spec is not None
    assert vet_kubeconfig(stored, allow_insecure=True) == spec
    assert minimal_kubeconfig(stored) == stored
    doc = yaml.safe_load(stored)
    assert [len(doc[s]) for s in ("contexts", "clusters", "users")] == [1, 1, 1]
    # Whole-file vetting: nothing refused survived anywhere in the input.
    # BaseLoader keeps every scalar text, as the product's loader keeps dates: a plain
    # safe_load would fail on `apiVersion: 2024-13-45`, which the product rightly accepts.
    original = yaml.load(raw, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds no objects
    for entry in original.get("users") or []:
        assert not set(entry["user"]) & set(USER_REFUSED)
    for entry in original.get("clusters") or []:
        assert not set(entry["cluster"]) & set(CLUSTER_REFUSED)


@fuzz_settings(max_examples=150)
@given(doc=kubeconfig_documents())
@example(
    doc={
        "current-context": "e0",
        "contexts": [{"name": "e0", "context": {"cluster": "e0", "user": "e0"}}],
        "clusters": [{"name": "e0", "cluster": {"server": "https://[::1"}}],
        "users": [{"name": "e0", "user": {"token": TOKEN}}],
    }
)
def test_targeted_kubeconfigs_are_refused_cleanly_or_stored_minimal(doc: Any) -> None:
    _assert_properties(yaml.safe_dump(doc, allow_unicode=True))


@fuzz_settings(max_examples=150)
@given(raw=mutated_texts())
@example(raw=b"current-context: 2024-13-45\n")
@example(raw=yaml.safe_dump({**_GOOD, "apiVersion": "_v_"}).replace("_v_", "2024-13-45").encode())
@example(raw=b"a: " + b"1" * 5000 + b"\n")
def test_mutated_yaml_is_refused_cleanly_or_stored_minimal(raw: bytes) -> None:
    _assert_properties(raw)


@fuzz_settings(max_examples=100)
@given(raw=st.one_of(st.binary(max_size=400), st.text(max_size=400)))
def test_arbitrary_bytes_and_text_are_refused_cleanly(raw: bytes | str) -> None:
    _assert_properties(raw)
