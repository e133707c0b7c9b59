"""Certificate bundles: every accepted shape of input, and a clear refusal for every bad one."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.certfactory import (
    Chain,
    KeyFormat,
    KeyType,
    cached_key,
    cert_to_der,
    cert_to_pem,
    generate_key,
    issue_certificate,
    key_to_der,
    key_to_pem,
    make_chain,
    make_csr_pem,
    make_self_signed,
    public_key_pem,
)
from worker.core.bundle import (
    BundleError,
    NameChange,
    TlsBundle,
    build_bundle,
    certificate_names,
    describe_certificate,
    describe_certificates,
    name_change,
    public_key_fingerprint_of_private_key,
)
from worker.core.limits import BUNDLE, PEM_FILE, InputTooLarge

NOW = dt.datetime(2031, 3, 1, 12, 0, tzinfo=dt.UTC)
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(scope="module")
def chain() -> Chain:
    """root -> intermediate 1 -> intermediate 2 -> leaf (EC P-256)."""
    return make_chain(cn="app.example.com", intermediates=2, now=NOW)


@pytest.fixture(scope="module")
def other_chain() -> Chain:
    """An unrelated chain from another root, with its own leaf key."""
    return make_chain(
        cn="other.example.com",
        intermediates=2,
        now=NOW,
        fresh_leaf_key=True,
        root_cn="Another Root",
    )


def pems(*certs: x509.Certificate) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def key_body_lines(key_pem: bytes) -> list[bytes]:
    """The base64 lines of a key PEM: none of them may ever appear in a message."""
    return [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]


def assert_no_key_material(text: str, key_pem: bytes) -> None:
    for line in key_body_lines(key_pem):
        assert line.decode() not in text


def refusal(**kwargs: object) -> BundleError:
    """Call build_bundle and return the BundleError it must raise."""
    kwargs.setdefault("now", NOW)
    with pytest.raises(BundleError) as caught:
        build_bundle(**kwargs)  # type: ignore[arg-type]
    return caught.value


# --- accepted keys ------------------------------------------------------------------------------

KEY_CASES: list[tuple[KeyType, KeyFormat, str]] = [
    ("ec256", "pkcs8", "EC-P256"),
    ("ec256", "sec1", "EC-P256"),
    ("ec384", "pkcs8", "EC-P384"),
    ("ec384", "sec1", "EC-P384"),
    ("rsa2048", "pkcs8", "RSA-2048"),
    ("rsa2048", "pkcs1", "RSA-2048"),
    ("ed25519", "pkcs8", "Ed25519"),
]


@pytest.mark.parametrize(("key_type", "key_format", "described"), KEY_CASES)
def test_every_supported_key_type_and_format_builds_a_bundle(
    key_type: KeyType, key_format: KeyFormat, described: str
) -> None:
    c = make_chain(key_type=key_type, now=NOW)
    key_pem = c.key_as(key_format)
    bundle = build_bundle(c.leaf_pem, key_pem, c.chain_pem, now=NOW)
    assert bundle.leaf.key_type == described
    assert bundle.key_pem == key_pem  # kept as given: consumers may expect PKCS#1 or SEC1
    assert bundle.tls_crt() == c.fullchain_pem


@pytest.mark.parametrize(
    ("key_type", "key_format"),
    [("ec256", "pkcs8"), ("ec384", "sec1"), ("rsa2048", "pkcs1"), ("ed25519", "pkcs8")],
)
def test_an_encrypted_key_with_its_passphrase_is_stored_decrypted(
    key_type: KeyType, key_format: KeyFormat
) -> None:
    c = make_chain(key_type=key_type, now=NOW)
    encrypted = c.key_as(key_format, passphrase=PASSPHRASE)
    bundle = build_bundle(c.leaf_pem, encrypted, c.chain_pem, now=NOW, passphrase=PASSPHRASE)
    assert bundle.tls_key().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    reloaded = serialization.load_pem_private_key(bundle.tls_key(), password=None)
    assert public_key_pem(reloaded) == public_key_pem(c.leaf_key)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_format", ["pkcs8", "sec1"])
def test_an_encrypted_key_without_passphrase_is_refused_with_the_way_out(
    key_format: KeyFormat,
) -> None:
    c = make_chain(now=NOW)
    encrypted = c.key_as(key_format, passphrase=PASSPHRASE)
    error = refusal(cert_pem=c.leaf_pem, key_pem=encrypted)
    assert (error.input_name, error.rule) == ("key", "encrypted-key")
    assert "passphrase" in str(error)
    assert "openssl pkey" in str(error)


def test_a_wrong_passphrase_is_refused_without_echoing_the_key() -> None:
    c = make_chain(now=NOW)
    encrypted = c.key_as("pkcs8", passphrase=PASSPHRASE)
    error = refusal(cert_pem=c.leaf_pem, key_pem=encrypted, passphrase=b"wrong")
    assert (error.input_name, error.rule) == ("key", "bad-passphrase")
    assert error.__cause__ is None
    assert_no_key_material(str(error), encrypted)


def test_a_passphrase_given_for_a_plain_key_is_ignored() -> None:
    c = make_chain(now=NOW)
    bundle = build_bundle(c.leaf_pem, c.key_pem, now=NOW, passphrase=PASSPHRASE)
    assert bundle.key_pem == c.key_pem


def test_ec_parameters_before_an_ec_key_are_dropped_from_tls_key() -> None:
    c = make_chain(key_type="ec256", now=NOW)
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    bundle = build_bundle(c.leaf_pem, params + c.key_as("sec1"), now=NOW)
    assert bundle.tls_key() == c.key_as("sec1")


# --- refused keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "rule", "named"),
    [
        ("ec521", "unsupported-key", "EC-P521"),
        ("ed448", "unsupported-key", "Ed448"),
        ("dsa2048", "unsupported-key", "DSA-2048"),
        ("rsa1024", "weak-key", "RSA-1024"),
    ],
)
def test_unsupported_key_types_are_refused_by_name(
    key_type: KeyType, rule: str, named: str
) -> None:
    c = make_chain(now=NOW)
    key_pem = key_to_pem(cached_key(key_type), "pkcs8")
    error = refusal(cert_pem=c.leaf_pem, key_pem=key_pem)
    assert (error.input_name, error.rule) == ("key", rule)
    assert named in str(error)
    assert "Ed25519" in error.fix  # says what is supported


def test_a_key_that_does_not_match_the_leaf_is_refused(other_chain: Chain) -> None:
    c = make_chain(now=NOW, fresh_leaf_key=True)
    error = refusal(cert_pem=c.leaf_pem, key_pem=other_chain.key_pem)
    assert (error.input_name, error.rule) == ("key", "key-mismatch")
    assert "app.example.com" in str(error)
    assert_no_key_material(str(error), other_chain.key_pem)


# --- chains -------------------------------------------------------------------------------------


def test_intermediates_given_in_order_are_kept_in_order(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, now=NOW)
    assert bundle.chain_pems == tuple(cert_to_pem(c) for c in chain.intermediates)
    assert bundle.ca_pem is None
    assert bundle.ca_crt() is None


def test_intermediates_given_in_reverse_are_put_in_leaf_to_root_order(chain: Chain) -> None:
    reversed_chain = pems(*reversed(chain.intermediates))
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, reversed_chain, now=NOW)
    assert bundle.tls_crt() == chain.fullchain_pem


def test_a_self_signed_root_in_the_chain_moves_to_ca_crt(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem + chain.root_pem, now=NOW)
    assert bundle.ca_crt() == chain.root_pem
    assert chain.root_pem not in bundle.tls_crt()
    assert bundle.tls_crt() == chain.fullchain_pem


@pytest.mark.parametrize("seed", range(6))
def test_a_full_chain_in_cert_pem_in_any_order_finds_the_leaf(chain: Chain, seed: int) -> None:
    certs = [chain.leaf, *chain.intermediates, chain.root]
    random.Random(seed).shuffle(certs)
    bundle = build_bundle(pems(*certs), chain.key_pem, now=NOW)
    assert bundle.leaf.common_name == "app.example.com"
    assert bundle.tls_crt() == chain.fullchain_pem
    assert bundle.ca_crt() == chain.root_pem


def test_a_leaf_issued_directly_by_the_root_has_no_intermediates() -> None:
    c = make_chain(intermediates=0, now=NOW)
    bundle = build_bundle(c.leaf_pem, c.key_pem, c.root_pem, now=NOW)
    assert bundle.chain_pems == ()
    assert bundle.tls_crt() == c.leaf_pem
    assert bundle.ca_crt() == c.root_pem


def test_a_self_signed_leaf_alone_is_a_bundle_without_ca() -> None:
    cert, key = make_self_signed(now=NOW)
    bundle = build_bundle(cert_to_pem(cert), key_to_pem(key), now=NOW)
    assert bundle.tls_crt() == cert_to_pem(cert)
    assert bundle.ca_crt() is None


def test_a_given_ca_that_issued_the_last_intermediate_becomes_ca_crt(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=NOW)
    assert bundle.ca_crt() == chain.root_pem


def test_a_given_ca_that_issued_the_leaf_directly_is_accepted() -> None:
    c = make_chain(intermediates=0, now=NOW)
    bundle = build_bundle(c.leaf_pem, c.key_pem, ca_pem=c.root_pem, now=NOW)
    assert bundle.ca_crt() == c.root_pem


def test_a_given_ca_that_did_not_issue_the_chain_is_refused(
    chain: Chain, other_chain: Chain
) -> None:
    error = refusal(
        cert_pem=chain.leaf_pem,
        key_pem=chain.key_pem,
        chain_pem=chain.chain_pem,
        ca_pem=other_chain.root_pem,
    )
    assert (error.input_name, error.rule) == ("ca", "ca-mismatch")
    assert "Another Root" in str(error)


def test_a_ca_input_holding_two_certificates_is_refused(chain: Chain) -> None:
    error = refusal(
        cert_pem=chain.leaf_pem,
        key_pem=chain.key_pem,
        ca_pem=chain.root_pem + cert_to_pem(chain.intermediates[-1]),
    )
    assert (error.input_name, error.rule) == ("ca", "ca-count")


def test_an_empty_ca_input_means_no_ca(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, b"", now=NOW)
    assert bundle.ca_crt() is None


def test_a_certificate_from_another_chain_is_refused_as_unrelated(
    chain: Chain, other_chain: Chain
) -> None:
    error = refusal(
        cert_pem=chain.leaf_pem,
        key_pem=chain.key_pem,
        chain_pem=chain.chain_pem + other_chain.leaf_pem,
    )
    assert (error.input_name, error.rule) == ("chain", "unrelated")
    assert "other.example.com" in str(error)


def test_an_intermediate_from_another_chain_is_refused(chain: Chain, other_chain: Chain) -> None:
    error = refusal(
        cert_pem=chain.leaf_pem,
        key_pem=chain.key_pem,
        chain_pem=chain.chain_pem + cert_to_pem(other_chain.intermediates[0]),
    )
    assert error.input_name == "chain"
    assert error.rule == "chain-gap"
    assert "remove certificates that belong to another chain" in str(error)


def test_a_missing_intermediate_is_refused_naming_the_missing_issuer(chain: Chain) -> None:
    # The leaf was issued by intermediates[0]; give only the one above it.
    error = refusal(
        cert_pem=chain.leaf_pem,
        key_pem=chain.key_pem,
        chain_pem=cert_to_pem(chain.intermediates[1]),
    )
    assert (error.input_name, error.rule) == ("chain", "chain-gap")
    assert "does not connect" in str(error)
    assert chain.intermediates[0].subject.rfc4514_string() in str(error)


def test_a_missing_intermediate_between_leaf_and_root_is_refused(chain: Chain) -> None:
    error = refusal(cert_pem=chain.leaf_pem, key_pem=chain.key_pem, chain_pem=chain.root_pem)
    assert error.rule == "chain-gap"


@pytest.mark.parametrize(
    "where", ["intermediate twice in chain", "leaf again in chain", "intermediate in both"]
)
def test_duplicate_certificates_are_refused(chain: Chain, where: str) -> None:
    first = cert_to_pem(chain.intermediates[0])
    cert_pem, chain_pem = {
        "intermediate twice in chain": (chain.leaf_pem, chain.chain_pem + first),
        "leaf again in chain": (chain.leaf_pem, chain.leaf_pem + chain.chain_pem),
        "intermediate in both": (chain.leaf_pem + first, chain.chain_pem),
    }[where]
    error = refusal(cert_pem=cert_pem, key_pem=chain.key_pem, chain_pem=chain_pem)
    assert error.rule == "duplicate"
    assert "duplicate" in str(error)


def test_two_leaves_in_cert_pem_keep_the_one_matching_the_key(
    chain: Chain, other_chain: Chain
) -> None:
    error = refusal(
        cert_pem=chain.leaf_pem + other_chain.leaf_pem,
        key_pem=chain.key_pem,
        chain_pem=chain.chain_pem,
    )
    assert error.rule == "unrelated"
    assert "other.example.com" in str(error)


def test_two_leaves_matching_neither_key_are_ambiguous(chain: Chain, other_chain: Chain) -> None:
    unrelated_key = key_to_pem(generate_key("ec256"))
    error = refusal(
        cert_pem=chain.leaf_pem + other_chain.leaf_pem,
        key_pem=unrelated_key,
    )
    assert (error.input_name, error.rule) == ("leaf", "ambiguous-leaf")


def test_swapped_cert_and_chain_inputs_are_explained(chain: Chain) -> None:
    error = refusal(
        cert_pem=cert_to_pem(chain.intermediates[0]),
        key_pem=chain.key_pem,
        chain_pem=chain.leaf_pem,
    )
    assert (error.input_name, error.rule) == ("leaf", "leaf-is-ca")
    assert "swapped" in str(error)


def test_an_intermediate_with_the_right_name_but_another_key_is_refused(chain: Chain) -> None:
    impostor_key = generate_key("ec256")
    impostor = issue_certificate(
        subject=chain.intermediates[0].subject,
        public_key=impostor_key,
        issuer=chain.root.subject,
        issuer_key=chain.root_key,
        is_ca=True,
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW + dt.timedelta(days=30),
    )
    error = refusal(cert_pem=chain.leaf_pem, key_pem=chain.key_pem, chain_pem=cert_to_pem(impostor))
    assert (error.input_name, error.rule) == ("chain", "signature-mismatch")


def test_an_issuer_that_is_not_a_ca_is_refused() -> None:
    # A leaf "issued" by another end-entity certificate (a classic misconfiguration).
    c = make_chain(now=NOW)
    sub_key = generate_key("ec256")
    sub = issue_certificate(
        subject=x509.Name.from_rfc4514_string("CN=sub.example.com"),
        public_key=sub_key,
        issuer=c.leaf.subject,
        issuer_key=c.leaf_key,
        is_ca=False,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=1),
    )
    error = refusal(
        cert_pem=cert_to_pem(sub),
        key_pem=key_to_pem(sub_key),
        chain_pem=c.leaf_pem,
    )
    assert (error.input_name, error.rule) == ("chain", "not-a-ca")


# --- validity -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_lived() -> Chain:
    return make_chain(
        not_before=NOW - dt.timedelta(days=10), not_after=NOW + dt.timedelta(days=10), now=NOW
    )


@pytest.mark.parametrize(("offset_days", "rule"), [(11, "expired"), (-11, "not-yet-valid")])
def test_a_leaf_outside_its_validity_is_refused_unless_allowed(
    short_lived: Chain, offset_days: int, rule: str
) -> None:
    when = NOW + dt.timedelta(days=offset_days)
    error = refusal(cert_pem=short_lived.leaf_pem, key_pem=short_lived.key_pem, now=when)
    assert (error.input_name, error.rule) == ("leaf", rule)
    assert "allow" in error.fix
    allowed = build_bundle(
        short_lived.leaf_pem,
        short_lived.key_pem,
        now=when,
        allow_expired=rule == "expired",
        allow_not_yet_valid=rule == "not-yet-valid",
    )
    assert allowed.leaf.common_name == "app.example.com"


def test_the_validity_bounds_themselves_are_valid(short_lived: Chain) -> None:
    for when in (short_lived.leaf.not_valid_before_utc, short_lived.leaf.not_valid_after_utc):
        build_bundle(short_lived.leaf_pem, short_lived.key_pem, now=when)


def test_a_naive_now_is_a_programming_error(chain: Chain) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_bundle(chain.leaf_pem, chain.key_pem, now=dt.datetime(2031, 1, 1))


# --- malformed input table ----------------------------------------------------------------------


def _malformed_cases(c: Chain) -> list[tuple[str, dict[str, bytes], str, str]]:
    """(case id, inputs overriding a valid bundle, input named, rule)."""
    leaf, key = c.leaf_pem, c.key_pem
    leaf_lines = leaf.splitlines(keepends=True)
    key_lines = key.splitlines(keepends=True)
    corrupted = (
        leaf_lines[0] + leaf_lines[1][:10] + b"!!!!" + leaf_lines[1][14:] + b"".join(leaf_lines[2:])
    )
    return [
        ("empty certificate", {"cert_pem": b""}, "leaf", "empty"),
        ("whitespace certificate", {"cert_pem": b"  \n\t\n"}, "leaf", "empty"),
        ("empty key", {"key_pem": b""}, "key", "empty"),
        ("garbage certificate", {"cert_pem": b"hello, I am not a certificate"}, "leaf", "not-pem"),
        ("garbage chain", {"chain_pem": b"not a chain at all"}, "chain", "not-pem"),
        ("garbage key", {"key_pem": b"definitely not a key"}, "key", "not-pem"),
        ("garbage ca", {"ca_pem": b"\x00\x01\x02"}, "ca", "not-pem"),
        ("DER certificate", {"cert_pem": cert_to_der(c.leaf)}, "leaf", "der"),
        ("DER chain", {"chain_pem": cert_to_der(c.intermediates[0])}, "chain", "der"),
        ("DER key", {"key_pem": key_to_der(c.leaf_key)}, "key", "der"),
        ("DER ca", {"ca_pem": cert_to_der(c.root)}, "ca", "der"),
        (
            "certificate cut before END",
            {"cert_pem": b"".join(leaf_lines[:-1])},
            "leaf",
            "truncated",
        ),
        (
            "certificate cut after BEGIN",
            {"cert_pem": b"".join(leaf_lines[1:])},
            "leaf",
            "truncated",
        ),
        ("key cut before END", {"key_pem": b"".join(key_lines[:-1])}, "key", "truncated"),
        (
            "base64 cut inside the body",
            {"cert_pem": b"".join(leaf_lines[:2] + leaf_lines[-1:])},
            "leaf",
            "undecodable",
        ),
        ("corrupted base64", {"cert_pem": corrupted}, "leaf", "undecodable"),
        (
            "key body cut",
            {"key_pem": b"".join(key_lines[:2] + key_lines[-1:])},
            "key",
            "undecodable",
        ),
        (
            "BEGIN and END disagree",
            {"cert_pem": leaf.replace(b"END CERTIFICATE", b"END X509 CRL")},
            "leaf",
            "truncated",
        ),
        (
            "second certificate cut",
            {"cert_pem": leaf + b"".join(leaf_lines[:3])},
            "leaf",
            "truncated",
        ),
        ("CSR as certificate", {"cert_pem": make_csr_pem()}, "leaf", "wrong-block"),
        (
            "public key as certificate",
            {"cert_pem": public_key_pem(c.leaf_key)},
            "leaf",
            "wrong-block",
        ),
        ("private key as certificate", {"cert_pem": key}, "leaf", "wrong-block"),
        ("certificate and key in one input", {"cert_pem": leaf + key}, "leaf", "wrong-block"),
        (
            "trusted certificate",
            {"cert_pem": leaf.replace(b"CERTIFICATE", b"TRUSTED CERTIFICATE")},
            "leaf",
            "wrong-block",
        ),
        ("public key as key", {"key_pem": public_key_pem(c.leaf_key)}, "key", "wrong-block"),
        ("certificate as key", {"key_pem": leaf}, "key", "wrong-block"),
        ("CSR in chain", {"chain_pem": make_csr_pem()}, "chain", "wrong-block"),
        ("key in chain", {"chain_pem": key}, "chain", "wrong-block"),
        (
            "OpenSSH key",
            {"key_pem": key_to_pem(cached_key("ed25519"), "openssh")},
            "key",
            "wrong-block",
        ),
        ("two keys", {"key_pem": key + key}, "key", "multiple-keys"),
    ]


_TABLE_CHAIN = make_chain(cn="table.example.com", now=NOW)
MALFORMED = _malformed_cases(_TABLE_CHAIN)


@pytest.mark.parametrize(
    ("overrides", "input_name", "rule"),
    [pytest.param(o, i, r, id=case) for case, o, i, r in MALFORMED],
)
def test_malformed_input_is_refused_naming_the_input_and_rule(
    overrides: dict[str, bytes], input_name: str, rule: str
) -> None:
    inputs: dict[str, object] = {
        "cert_pem": _TABLE_CHAIN.leaf_pem,
        "key_pem": _TABLE_CHAIN.key_pem,
        "chain_pem": _TABLE_CHAIN.chain_pem,
        **overrides,
    }
    error = refusal(**inputs)
    assert (error.input_name, error.rule) == (input_name, rule)
    message = str(error)
    label = {"leaf": "cert_pem", "chain": "chain_pem", "key": "key_pem", "ca": "ca_pem"}
    assert label[input_name] in message.split(": ")[0]  # the message starts with the input
    assert "Fix: " in message and error.fix
    assert_no_key_material(message, _TABLE_CHAIN.key_pem)
    assert error.__cause__ is None


def _oversized_cases(c: Chain) -> list[tuple[str, dict[str, bytes], str]]:
    leaf, key, limit = c.leaf_pem, c.key_pem, PEM_FILE.maximum
    return [
        ("oversized certificate", {"cert_pem": leaf + b" " * limit}, "cert_pem"),
        ("oversized chain", {"chain_pem": b"\n" * (limit + 1)}, "chain_pem"),
        ("oversized key", {"key_pem": key + b"\n" * limit}, "key_pem"),
        ("oversized ca", {"ca_pem": b"-" * (limit + 1)}, "ca_pem"),
    ]


@pytest.mark.parametrize(
    ("overrides", "label"),
    [pytest.param(o, label, id=case) for case, o, label in _oversized_cases(_TABLE_CHAIN)],
)
def test_an_oversized_input_is_refused_before_parsing_naming_input_limit_and_size(
    overrides: dict[str, bytes], label: str
) -> None:
    inputs: dict[str, object] = {
        "cert_pem": _TABLE_CHAIN.leaf_pem,
        "key_pem": _TABLE_CHAIN.key_pem,
        "chain_pem": _TABLE_CHAIN.chain_pem,
        "now": NOW,
        **overrides,
    }
    with pytest.raises(InputTooLarge) as caught:
        build_bundle(**inputs)  # type: ignore[arg-type]
    error = caught.value
    size = len(next(iter(overrides.values())))
    assert (error.limit, error.size) == (PEM_FILE, size)
    message = str(error)
    assert label in message.split(" is ")[0]  # the message starts with the input
    assert f"{size} bytes" in message and "256 KiB" in message and "Fix: " in message
    assert_no_key_material(message, _TABLE_CHAIN.key_pem)
    assert isinstance(error, ValueError)


def test_a_bundle_whose_inputs_together_exceed_the_bundle_limit_is_refused() -> None:
    # Each input within its own limit, together over the bundle's: the Secret must fit.
    padding = b"\n" * (PEM_FILE.maximum - len(_TABLE_CHAIN.chain_pem))
    inputs = {
        "cert_pem": _TABLE_CHAIN.leaf_pem + b"\n" * (PEM_FILE.maximum - len(_TABLE_CHAIN.leaf_pem)),
        "key_pem": _TABLE_CHAIN.key_pem,
        "chain_pem": _TABLE_CHAIN.chain_pem + padding,
    }
    total = sum(len(v) for v in inputs.values())
    assert total > BUNDLE.maximum
    with pytest.raises(InputTooLarge) as caught:
        build_bundle(**inputs, now=NOW)
    assert caught.value.limit is BUNDLE and caught.value.size == total
    assert f"{total} bytes" in str(caught.value) and "512 KiB" in str(caught.value)


def test_describe_and_key_fingerprint_refuse_oversized_pem() -> None:
    big = b" " * (PEM_FILE.maximum + 1)
    with pytest.raises(InputTooLarge, match="certificate"):
        describe_certificates(_TABLE_CHAIN.leaf_pem + big)
    with pytest.raises(InputTooLarge, match="private key"):
        public_key_fingerprint_of_private_key(_TABLE_CHAIN.key_pem + big)


def test_the_wrong_block_message_names_the_block_and_its_remedy() -> None:
    error = refusal(cert_pem=make_csr_pem(), key_pem=_TABLE_CHAIN.key_pem)
    assert "'CERTIFICATE REQUEST'" in str(error)
    assert "submit it to your CA" in str(error)


def test_the_der_message_says_how_to_convert() -> None:
    error = refusal(cert_pem=cert_to_der(_TABLE_CHAIN.leaf), key_pem=_TABLE_CHAIN.key_pem)
    assert "openssl x509 -inform DER -outform PEM" in str(error)


# --- tolerated formatting -----------------------------------------------------------------------


def test_crlf_line_endings_and_surrounding_text_are_accepted(chain: Chain) -> None:
    noisy = (
        b"subject=CN = app.example.com\r\nissuer=CN = Intermediate\r\n"
        + chain.leaf_pem.replace(b"\n", b"\r\n")
        + b"Bag Attributes: none\r\n"
    )
    bundle = build_bundle(
        noisy,
        chain.key_pem.replace(b"\n", b"\r\n"),
        chain.chain_pem.replace(b"\n", b"\r\n"),
        now=NOW,
    )
    assert bundle.tls_crt() == chain.fullchain_pem
    assert bundle.tls_key() == chain.key_pem


def test_pem_without_trailing_newline_still_ends_each_block_with_one(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem.rstrip(), chain.key_pem.rstrip(), now=NOW)
    assert bundle.tls_crt().endswith(b"-----END CERTIFICATE-----\n")
    assert bundle.tls_key().endswith(b"-----END PRIVATE KEY-----\n")


# --- the bundle's outputs -----------------------------------------------------------------------


def test_tls_crt_parses_back_to_leaf_then_intermediates(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem + chain.root_pem, now=NOW)
    parsed = x509.load_pem_x509_certificates(bundle.tls_crt())
    assert parsed == [chain.leaf, *chain.intermediates]
    assert all(pem.endswith(b"\n") for pem in (bundle.leaf_pem, *bundle.chain_pems))


def test_the_bundle_repr_and_str_never_show_the_key(chain: Chain) -> None:
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, now=NOW)
    for text in (repr(bundle), str(bundle), f"{bundle}", repr([bundle])):
        assert "PRIVATE KEY" not in text
        assert_no_key_material(text, chain.key_pem)
        assert "app.example.com" in text
        assert "redacted" in text


def test_bundles_from_the_same_inputs_are_equal(chain: Chain) -> None:
    first = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, now=NOW)
    second = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, now=NOW)
    assert first == second
    assert isinstance(first, TlsBundle)


# --- describing certificates --------------------------------------------------------------------


def test_describe_certificate_reports_every_field() -> None:
    c = make_chain(
        cn="api.example.com",
        sans=["api.example.com", "*.api.example.com", "10.0.0.7", "::1"],
        key_type="rsa2048",
        now=NOW,
    )
    info = describe_certificate(c.leaf_pem)
    assert info.common_name == "api.example.com"
    assert info.subject == c.leaf.subject.rfc4514_string()
    assert info.issuer == c.intermediates[0].subject.rfc4514_string()
    assert info.sans == ("api.example.com", "*.api.example.com", "10.0.0.7", "::1")
    assert info.serial_hex == format(c.leaf.serial_number, "x")
    assert re.fullmatch(r"[0-9a-f]+", info.serial_hex)
    assert info.sha256_fingerprint == hashlib.sha256(cert_to_der(c.leaf)).hexdigest()
    assert info.public_key_sha256 == public_key_fingerprint_of_private_key(c.key_pem)
    assert info.key_type == "RSA-2048"
    assert info.not_before == c.leaf.not_valid_before_utc
    assert info.not_after.tzinfo is not None
    assert info.not_after.utcoffset() == dt.timedelta(0)


def test_a_certificate_without_common_name_has_none() -> None:
    c = make_chain(cn=None, sans=["nocn.example.com"], now=NOW)
    info = describe_certificate(c.leaf_pem)
    assert info.common_name is None
    assert info.sans == ("nocn.example.com",)


def test_describe_certificates_lists_every_certificate_in_order(chain: Chain) -> None:
    infos = describe_certificates(chain.fullchain_pem + chain.root_pem)
    assert [i.subject for i in infos] == [
        c.subject.rfc4514_string() for c in (chain.leaf, *chain.intermediates, chain.root)
    ]


def test_describe_certificate_refuses_garbage_clearly() -> None:
    with pytest.raises(BundleError) as caught:
        describe_certificate(b"nonsense")
    assert caught.value.input_name == "certificate"
    assert str(caught.value).startswith("certificate: ")


@pytest.mark.parametrize(("key_type", "key_format"), [(k, f) for k, f, _ in KEY_CASES])
def test_the_private_key_fingerprint_matches_the_certificate_one(
    key_type: KeyType, key_format: KeyFormat
) -> None:
    c = make_chain(key_type=key_type, now=NOW)
    assert public_key_fingerprint_of_private_key(c.key_as(key_format)) == (
        describe_certificate(c.leaf_pem).public_key_sha256
    )


def test_the_private_key_fingerprint_of_an_encrypted_key_needs_the_passphrase() -> None:
    c = make_chain(now=NOW)
    encrypted = c.key_as("pkcs8", passphrase=PASSPHRASE)
    with pytest.raises(BundleError, match="encrypted"):
        public_key_fingerprint_of_private_key(encrypted)
    assert public_key_fingerprint_of_private_key(encrypted, passphrase=PASSPHRASE) == (
        describe_certificate(c.leaf_pem).public_key_sha256
    )


# --- properties ---------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=3000), field=st.sampled_from(["cert_pem", "key_pem", "chain_pem"]))
def test_arbitrary_bytes_in_any_input_give_a_bundle_error_or_a_bundle(
    data: bytes, field: str
) -> None:
    inputs: dict[str, object] = {
        "cert_pem": _TABLE_CHAIN.leaf_pem,
        "key_pem": _TABLE_CHAIN.key_pem,
        field: data,
    }
    try:
        build_bundle(**inputs, now=NOW)  # type: ignore[arg-type]
    except BundleError as error:
        assert_no_key_material(str(error), _TABLE_CHAIN.key_pem)


@FUZZ
@given(
    field=st.sampled_from(["cert_pem", "key_pem", "chain_pem"]),
    cut=st.integers(min_value=0, max_value=2000),
    flip=st.integers(min_value=0, max_value=2000),
    byte=st.integers(min_value=0, max_value=255),
)
def test_truncated_or_bit_flipped_pem_gives_a_bundle_error_or_a_bundle(
    field: str, cut: int, flip: int, byte: int
) -> None:
    valid = {
        "cert_pem": _TABLE_CHAIN.leaf_pem,
        "key_pem": _TABLE_CHAIN.key_pem,
        "chain_pem": _TABLE_CHAIN.chain_pem,
    }
    damaged = bytearray(valid[field][: max(cut, 1)])
    damaged[flip % len(damaged)] = byte
    try:
        bundle = build_bundle(**{**valid, field: bytes(damaged)}, now=NOW)  # type: ignore[arg-type]
    except BundleError as error:
        assert_no_key_material(str(error), _TABLE_CHAIN.key_pem)
    else:
        # Whatever was accepted is still the right leaf with a matching key.
        assert bundle.leaf.public_key_sha256 == public_key_fingerprint_of_private_key(
            bundle.tls_key()
        )


@settings(max_examples=25, deadline=None)
@given(
    order=st.permutations(range(4)),
    split=st.integers(min_value=1, max_value=4),
)
def test_any_split_of_a_shuffled_chain_between_cert_and_chain_inputs_builds_the_same_bundle(
    order: list[int], split: int
) -> None:
    c = _PROPERTY_CHAIN
    certs = [c.leaf, *c.intermediates, c.root]
    shuffled = [certs[i] for i in order]
    # The leaf must be in cert_pem; everything else may be anywhere.
    head = shuffled[:split]
    if c.leaf not in head:
        head.append(c.leaf)
    tail = [x for x in shuffled if x not in head]
    bundle = build_bundle(pems(*head), c.key_pem, pems(*tail), now=NOW)
    assert bundle.tls_crt() == c.fullchain_pem
    assert bundle.ca_crt() == c.root_pem


_PROPERTY_CHAIN = make_chain(cn="prop.example.com", intermediates=2, now=NOW)


def test_the_base64_of_the_key_is_long_enough_for_the_secrecy_checks_to_mean_something() -> None:
    lines = key_body_lines(_TABLE_CHAIN.key_pem)
    assert lines and all(len(line) > 20 for line in lines)
    assert base64.b64decode(b"".join(lines))


_NAMES = st.lists(st.sampled_from(["a.example", "B.example", "c.example", "10.0.0.1", "d.example"]))


@given(cn=st.none() | st.sampled_from(["a.example", "A.EXAMPLE", "e.example"]), sans=_NAMES)
def test_certificate_names_are_lower_cased_unique_and_keep_their_order(
    cn: str | None, sans: list[str]
) -> None:
    names = certificate_names(cn, sans)
    assert len(set(names)) == len(names)
    assert all(name == name.lower() for name in names)
    assert set(names) == {name.lower() for name in ([cn] if cn else []) + sans}
    if cn:
        assert names[0] == cn.lower()


@given(before=_NAMES, after=_NAMES)
def test_a_name_change_partitions_both_sides(before: list[str], after: list[str]) -> None:
    old, new = certificate_names(None, before), certificate_names(None, after)
    change = name_change(old, new)
    assert set(change.kept) | set(change.added) == set(new)
    assert set(change.kept) | set(change.removed) == set(old)
    assert not set(change.kept) & (set(change.added) | set(change.removed))
    assert change.unrelated == (not set(old) & set(new))
    assert change.changed == (set(old) != set(new))


def test_a_renewal_that_only_changes_case_keeps_every_name() -> None:
    change = name_change(
        certificate_names("Shop.Example.com", ["shop.example.com"]),
        certificate_names("shop.example.com", ["SHOP.example.COM", "www.shop.example.com"]),
    )
    assert change == NameChange(
        kept=("shop.example.com",), added=("www.shop.example.com",), removed=()
    )
