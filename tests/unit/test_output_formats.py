"""Extra output formats (pure): tls-combined.pem and keystore.p12, built, compared and diffed."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certfactory import make_chain, utcnow
from worker.cli.output import diff_from_dict, render_diff_dict
from worker.core.bundle import TlsBundle, build_bundle
from worker.core.formats import (
    COMBINED_PEM_KEY,
    KEYSTORE_ALIAS,
    KEYSTORE_KEY,
    MIN_PASSWORD_LENGTH,
    KeystorePasswordError,
    build_keystore,
    check_keystore_password,
    combined_pem,
    keystore_content_of_bundle,
    open_keystore,
    output_formats,
    split_combined_pem,
)
from worker.core.secret import (
    ANN_CONTENT_SHA256,
    BundleSummary,
    content_sha256,
    decoded_data,
    desired_secret,
    diff_secrets,
    render_diff,
    reuse_equal_keystore,
)

DISTRIBUTION = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
PASSWORD = b"changeit-0123"


def _bundle(key_type: Any = "ec256", intermediates: int = 1) -> TlsBundle:
    chain = make_chain(
        "app.example.com", key_type=key_type, intermediates=intermediates, fresh_leaf_key=True
    )
    return build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=utcnow()
    )


# Built once: generating keys per hypothesis example would make these tests minutes long.
BUNDLES = {
    (key_type, intermediates): _bundle(key_type, intermediates)
    for key_type in ("ec256", "ec384", "rsa2048", "ed25519")
    for intermediates in (0, 1, 3)
}
OLD, NEW = _bundle(), _bundle()
bundles = st.sampled_from(sorted(BUNDLES)).map(BUNDLES.__getitem__)
passwords = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    min_size=MIN_PASSWORD_LENGTH,
    max_size=64,
).map(str.encode)


def _pem_certs(pem: bytes) -> list[bytes]:
    from cryptography import x509

    return [
        cert.public_bytes(serialization.Encoding.DER)
        for cert in x509.load_pem_x509_certificates(pem)
    ]


def _der(pem: bytes) -> bytes:
    return _pem_certs(pem)[0]


# ------------------------------------------------------------------------- combined PEM


@settings(max_examples=40, deadline=None)
@given(bundles)
def test_the_combined_pem_is_the_key_then_the_leaf_then_the_intermediates(
    bundle: TlsBundle,
) -> None:
    value = combined_pem(bundle)
    assert value.startswith(bundle.tls_key())
    key_pem, certs_pem = split_combined_pem(value)
    assert key_pem == bundle.tls_key()
    assert certs_pem == bundle.tls_crt()
    # The root never goes in (as in tls.crt): HAProxy sends what the file holds.
    expected = [_der(bundle.leaf_pem), *(_der(pem) for pem in bundle.chain_pems)]
    assert _pem_certs(certs_pem) == expected
    assert bundle.ca_pem is not None and _der(bundle.ca_pem) not in _pem_certs(certs_pem)
    # Deterministic: the same bundle gives the same bytes, so no-write-when-unchanged holds.
    assert combined_pem(bundle) == value


def test_split_combined_pem_accepts_crlf_and_ignores_other_blocks() -> None:
    value = (
        combined_pem(OLD).replace(b"\n", b"\r\n")
        + b"-----BEGIN FOO-----\nAA==\n-----END FOO-----\n"
    )
    key_pem, certs_pem = split_combined_pem(value)
    assert key_pem == OLD.tls_key()
    assert certs_pem == OLD.tls_crt()


# ------------------------------------------------------------------------------ PKCS#12


@settings(max_examples=30, deadline=None)
@given(bundles, passwords)
def test_the_keystore_opens_with_its_password_and_holds_the_key_leaf_and_chain(
    bundle: TlsBundle, password: bytes
) -> None:
    value = build_keystore(bundle, password)
    loaded = pkcs12.load_pkcs12(value, password)
    assert loaded.key is not None and loaded.cert is not None
    assert loaded.cert.friendly_name == KEYSTORE_ALIAS
    key_der = loaded.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    wanted = serialization.load_pem_private_key(bundle.tls_key(), None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert key_der == wanted
    assert loaded.cert.certificate.public_bytes(serialization.Encoding.DER) == _der(bundle.leaf_pem)
    assert [
        c.certificate.public_bytes(serialization.Encoding.DER) for c in loaded.additional_certs
    ] == [_der(pem) for pem in bundle.chain_pems]
    opened = open_keystore(value, password)
    assert opened is not None
    assert opened.content == keystore_content_of_bundle(bundle)
    assert opened.certificates_pem == bundle.tls_crt()


@settings(max_examples=20, deadline=None)
@given(bundles, passwords, passwords)
def test_a_keystore_does_not_open_with_another_password(
    bundle: TlsBundle, password: bytes, other: bytes
) -> None:
    value = build_keystore(bundle, password)
    assert (open_keystore(value, other) is None) == (other != password)


@pytest.mark.parametrize(
    "value", [b"", b"not a keystore", b"\x30\x03\x02\x01\x03", combined_pem(OLD)]
)
def test_bytes_that_are_no_keystore_do_not_open(value: bytes) -> None:
    assert open_keystore(value, PASSWORD) is None


def test_two_builds_differ_in_bytes_but_not_in_content() -> None:
    first, second = build_keystore(OLD, PASSWORD), build_keystore(OLD, PASSWORD)
    assert first != second  # salts and IVs are random: bytes can never be compared
    opened_first, opened_second = open_keystore(first, PASSWORD), open_keystore(second, PASSWORD)
    assert opened_first is not None and opened_second is not None
    assert opened_first.content == opened_second.content
    other = open_keystore(build_keystore(NEW, PASSWORD), PASSWORD)
    assert other is not None and other.content != opened_first.content


@pytest.mark.parametrize(
    ("password", "says"),
    [
        (b"q7Zx!", "at least 6"),
        (b"", "at least 6"),
        (b"has a space", "printable ASCII"),
        ("pässwörd".encode(), "printable ASCII"),
        (b"tab\there-ok", "printable ASCII"),
    ],
)
def test_a_password_java_would_not_take_is_refused_without_quoting_it(
    password: bytes, says: str
) -> None:
    with pytest.raises(KeystorePasswordError) as caught:
        check_keystore_password(password, what="PKCS#12 password 'java'")
    message = str(caught.value)
    assert says in message and "Fix:" in message and "'java'" in message
    if password:
        assert password.decode("utf-8", "replace") not in message


@given(passwords)
def test_every_printable_password_of_six_or_more_is_accepted(password: bytes) -> None:
    check_keystore_password(password, what="password")


def test_one_process_builds_a_keystore_once_per_content_and_password() -> None:
    # Every target of a run gets the same bytes (no build or open per target); another
    # password or certificate is another keystore.
    first = output_formats(OLD, combined=False, keystore_password=PASSWORD)[KEYSTORE_KEY]
    again = output_formats(OLD, combined=False, keystore_password=PASSWORD)[KEYSTORE_KEY]
    other_password = output_formats(OLD, combined=False, keystore_password=b"another-1")
    other_bundle = output_formats(NEW, combined=False, keystore_password=PASSWORD)
    assert first == again
    assert other_password[KEYSTORE_KEY] != first and other_bundle[KEYSTORE_KEY] != first
    assert open_keystore(other_password[KEYSTORE_KEY], b"another-1") is not None


def test_output_formats_writes_only_what_the_target_asked_for() -> None:
    assert output_formats(OLD, combined=False, keystore_password=None) == {}
    assert set(output_formats(OLD, combined=True, keystore_password=None)) == {COMBINED_PEM_KEY}
    assert set(output_formats(OLD, combined=False, keystore_password=PASSWORD)) == {KEYSTORE_KEY}
    both = output_formats(OLD, combined=True, keystore_password=PASSWORD)
    assert set(both) == {COMBINED_PEM_KEY, KEYSTORE_KEY}


# ------------------------------------------------------------ the Secret, its diff, no write


def _desired(bundle: TlsBundle, *, password: bytes | None = PASSWORD) -> dict[str, Any]:
    return desired_secret(
        name="app-tls",
        namespace="apps",
        tls_crt=bundle.tls_crt(),
        tls_key=bundle.tls_key(),
        ca_crt=None,
        leaf=bundle.leaf,
        distribution_id=DISTRIBUTION,
        extra_data=output_formats(bundle, combined=True, keystore_password=password),
    )


def _live(desired: dict[str, Any]) -> dict[str, Any]:
    live = copy.deepcopy(desired)
    live["metadata"]["resourceVersion"] = "42"
    return live


def test_the_extra_formats_are_data_keys_of_the_tls_secret_under_our_content_hash() -> None:
    wanted = _desired(OLD)
    assert wanted["type"] == "kubernetes.io/tls"
    data = decoded_data(wanted)
    assert set(data) == {"tls.crt", "tls.key", COMBINED_PEM_KEY, KEYSTORE_KEY}
    assert wanted["metadata"]["annotations"][ANN_CONTENT_SHA256] == content_sha256(data)


def _written_elsewhere(desired: dict[str, Any], bundle: TlsBundle) -> dict[str, Any]:
    """The live Secret as another worker process wrote it: its own build of the keystore."""
    live = _live(desired)
    live["data"][KEYSTORE_KEY] = base64.b64encode(build_keystore(bundle, PASSWORD)).decode()
    data = decoded_data(live)
    live["metadata"]["annotations"][ANN_CONTENT_SHA256] = content_sha256(data)
    return live


def test_a_live_keystore_with_the_same_content_is_unchanged_and_its_bytes_kept() -> None:
    rebuilt = _desired(OLD)
    live = _written_elsewhere(rebuilt, OLD)  # same certificate, other keystore bytes
    assert decoded_data(rebuilt)[KEYSTORE_KEY] != decoded_data(live)[KEYSTORE_KEY]
    assert diff_secrets(live, rebuilt, keystore_password=PASSWORD).action == "update"

    settled = reuse_equal_keystore(live, rebuilt, PASSWORD)

    assert decoded_data(settled) == decoded_data(live)
    assert settled["metadata"]["annotations"][ANN_CONTENT_SHA256] == content_sha256(
        decoded_data(live)
    )
    assert diff_secrets(live, settled, keystore_password=PASSWORD).action == "unchanged"
    assert rebuilt["data"][KEYSTORE_KEY] != settled["data"][KEYSTORE_KEY]  # input untouched


def test_a_changed_password_is_a_change_and_the_diff_says_why() -> None:
    live = _live(_desired(OLD, password=b"old-password-1"))
    wanted = reuse_equal_keystore(live, _desired(OLD), PASSWORD)
    diff = diff_secrets(live, wanted, keystore_password=PASSWORD)
    assert diff.action == "update"
    entry = next(e for e in diff.data if e.key == KEYSTORE_KEY)
    assert entry.change == "changed"
    assert isinstance(entry.old, BundleSummary) and isinstance(entry.new, BundleSummary)
    assert entry.old.error is not None and "current password" in entry.old.error
    assert entry.new.error is None
    # Everything else is the same certificate: only the keystore changes.
    assert {e.key for e in diff.data if e.change != "unchanged"} == {KEYSTORE_KEY}


def test_a_renewal_changes_every_format_and_the_diff_shows_them_readably() -> None:
    live = _live(_desired(OLD))
    wanted = reuse_equal_keystore(live, _desired(NEW), PASSWORD)
    diff = diff_secrets(live, wanted, keystore_password=PASSWORD)
    assert diff.action == "update"
    changed = {e.key: e for e in diff.data if e.change == "changed"}
    assert set(changed) == {"tls.crt", "tls.key", COMBINED_PEM_KEY, KEYSTORE_KEY}
    for key in (COMBINED_PEM_KEY, KEYSTORE_KEY):
        old, new = changed[key].old, changed[key].new
        assert isinstance(old, BundleSummary) and isinstance(new, BundleSummary)
        assert old.certificate is not None and new.certificate is not None
        assert old.certificate.serial == OLD.leaf.serial_hex
        assert new.certificate.serial == NEW.leaf.serial_hex
        assert new.certificate.chain_length == 1 + len(NEW.chain_pems)
        assert new.public_key_sha256 == NEW.leaf.public_key_sha256
    text = render_diff(diff)
    assert f"{COMBINED_PEM_KEY}: changed (key + leaf + chain" in text
    assert f"{KEYSTORE_KEY}: changed (PKCS#12, key + leaf + chain" in text
    assert NEW.leaf.public_key_sha256 in text and NEW.leaf.sha256_fingerprint in text
    _assert_no_secret(text)
    # The stored form renders the same text (runs show reads it back).
    assert render_diff_dict(diff.to_dict()) == text
    assert diff_from_dict(diff.to_dict()) == diff


def test_a_new_secret_with_formats_renders_without_key_or_password() -> None:
    diff = diff_secrets(None, _desired(NEW), keystore_password=PASSWORD)
    text = render_diff(diff)
    assert diff.action == "create"
    assert f"{KEYSTORE_KEY}: added" in text and f"{COMBINED_PEM_KEY}: added" in text
    _assert_no_secret(text)
    _assert_no_secret(str(diff.to_dict()))


def test_turning_a_format_off_removes_its_key() -> None:
    live = _live(_desired(OLD))
    wanted = desired_secret(
        name="app-tls",
        namespace="apps",
        tls_crt=OLD.tls_crt(),
        tls_key=OLD.tls_key(),
        ca_crt=None,
        leaf=OLD.leaf,
        distribution_id=DISTRIBUTION,
    )
    diff = diff_secrets(live, wanted, keystore_password=None)
    removed = {e.key for e in diff.data if e.change == "removed"}
    assert removed == {COMBINED_PEM_KEY, KEYSTORE_KEY}
    keystore = next(e for e in diff.data if e.key == KEYSTORE_KEY)
    assert isinstance(keystore.old, BundleSummary) and keystore.old.error is not None


def test_a_keystore_is_only_reused_when_it_opens_and_matches() -> None:
    wanted = _desired(OLD)
    # No live Secret, no live keystore, no password: nothing to reuse.
    assert reuse_equal_keystore(None, wanted, PASSWORD) is wanted
    assert reuse_equal_keystore(_live(_desired(OLD, password=None)), wanted, PASSWORD) is wanted
    assert reuse_equal_keystore(_live(_desired(OLD)), wanted, None) is wanted
    garbage = _live(wanted)
    garbage["data"][KEYSTORE_KEY] = base64.b64encode(b"garbage").decode()
    assert reuse_equal_keystore(garbage, wanted, PASSWORD) is wanted


def _assert_no_secret(text: str) -> None:
    for bundle in (OLD, NEW):
        body = b"".join(bundle.tls_key().splitlines()[1:-1]).decode()
        assert body[:40] not in text
    assert PASSWORD.decode() not in text
    assert "PRIVATE KEY" not in text
