"""Envelope encryption: round trips, tampering, swapped rows, unknown and wrong KEKs, rotation."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.crypto import (
    KEK_BYTES,
    CryptoError,
    DecryptionError,
    Keyring,
    MalformedEnvelopeError,
    SealContext,
    UnknownKeyError,
    envelope_key_id,
    generate_kek,
    rewrap,
    seal,
    unseal,
)

KEK1 = bytes(range(32))
KEK2 = bytes(range(100, 132))
CONTEXT = SealContext("credentials", "0b7f4c0e-1f7a-4c52-9a43-1d1c6e2e9a10", "secret")
PLAINTEXT = b"apiVersion: v1\nkind: Config\nusers: [{name: u, user: {token: sup3r-s3cret}}]\n"


def keyring(*key_ids: str, current: str | None = None) -> Keyring:
    material = {"k1": KEK1, "k2": KEK2}
    return Keyring({key_id: material[key_id] for key_id in key_ids}, current)


def _all_messages(exc: BaseException) -> str:
    messages = []
    current: BaseException | None = exc
    while current is not None:
        messages.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(messages)


contexts = st.builds(
    SealContext,
    table=st.text(min_size=1, max_size=30),
    row_id=st.text(min_size=1, max_size=40),
    purpose=st.text(min_size=1, max_size=20),
)


@given(plaintext=st.binary(max_size=4096), context=contexts)
@settings(max_examples=200)
def test_unseal_returns_what_seal_was_given(plaintext: bytes, context: SealContext) -> None:
    ring = keyring("k1")
    assert unseal(ring, seal(ring, plaintext, context), context) == plaintext


@given(plaintext=st.binary(min_size=1, max_size=512), context=contexts)
@settings(max_examples=100)
def test_rewrap_keeps_plaintext_and_payload_bytes(plaintext: bytes, context: SealContext) -> None:
    ring = keyring("k1", "k2")
    sealed = seal(ring, plaintext, context)
    rotated = rewrap(ring, sealed, context, "k2")
    assert envelope_key_id(rotated) == "k2"
    # The payload (nonce + ciphertext + tag) is the tail and must be byte-identical.
    payload_length = len(plaintext) + 12 + 16
    assert rotated[-payload_length:] == sealed[-payload_length:]
    assert unseal(keyring("k2"), rotated, context) == plaintext


def test_each_seal_uses_a_fresh_data_key_and_nonces() -> None:
    ring = keyring("k1")
    first, second = seal(ring, PLAINTEXT, CONTEXT), seal(ring, PLAINTEXT, CONTEXT)
    assert first != second
    assert PLAINTEXT not in first


def test_envelope_names_the_current_key_id() -> None:
    ring = keyring("k1", "k2", current="k2")
    assert envelope_key_id(seal(ring, PLAINTEXT, CONTEXT)) == "k2"


def test_flipping_any_bit_of_any_byte_makes_unseal_fail() -> None:
    ring = keyring("k1")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    for index in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[index] ^= 1 << bit
            with pytest.raises(CryptoError):
                unseal(ring, bytes(tampered), CONTEXT)


def test_truncated_or_extended_envelopes_are_refused() -> None:
    ring = keyring("k1")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    for length in range(len(sealed)):
        with pytest.raises(DecryptionError):
            unseal(ring, sealed[:length], CONTEXT)
    with pytest.raises(DecryptionError):
        unseal(ring, sealed + b"\x00", CONTEXT)


@pytest.mark.parametrize(
    "other",
    [
        SealContext("credentials", "another-row-id", "secret"),
        SealContext("certificates", CONTEXT.row_id, "secret"),
        SealContext("credentials", CONTEXT.row_id, "private_key"),
    ],
    ids=["other row", "other table", "other purpose"],
)
def test_envelope_copied_to_another_row_fails_and_names_that_row(other: SealContext) -> None:
    ring = keyring("k1")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    with pytest.raises(DecryptionError) as caught:
        unseal(ring, sealed, other)
    assert other.row_id in str(caught.value)
    assert other.table in str(caught.value)
    assert "'k1'" in str(caught.value)


def test_payload_swapped_between_two_envelopes_of_the_same_key_fails() -> None:
    ring = keyring("k1")
    first = seal(ring, b"first secret", CONTEXT)
    second = seal(ring, b"other secret", CONTEXT)
    # Same-length plaintexts: graft the second payload onto the first wrapped key.
    header_length = len(first) - (len(b"first secret") + 12 + 16)
    franken = first[:header_length] + second[header_length:]
    with pytest.raises(DecryptionError, match="payload does not authenticate"):
        unseal(ring, franken, CONTEXT)


def test_unknown_key_id_names_the_key_and_how_to_load_it() -> None:
    sealed = seal(keyring("k1"), PLAINTEXT, CONTEXT)
    with pytest.raises(UnknownKeyError) as caught:
        unseal(keyring("k2"), sealed, CONTEXT)
    message = str(caught.value)
    assert "no KEK 'k1' loaded" in message
    assert "CAP_KEK/CAP_KEK_FILE" in message
    assert CONTEXT.row_id in message


def test_wrong_kek_under_the_same_id_is_a_decryption_error_not_garbage() -> None:
    sealed = seal(Keyring({"k1": KEK1}), PLAINTEXT, CONTEXT)
    with pytest.raises(DecryptionError) as caught:
        unseal(Keyring({"k1": KEK2}), sealed, CONTEXT)
    assert "KEK 'k1'" in str(caught.value)
    assert caught.value.__cause__ is not None  # chained from cryptography's InvalidTag


def test_error_messages_never_contain_key_or_plaintext_material() -> None:
    ring = keyring("k1")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    failures: list[BaseException] = []
    for attempt in (
        lambda: unseal(Keyring({"k1": KEK2}), sealed, CONTEXT),
        lambda: unseal(ring, sealed[:-1] + bytes([sealed[-1] ^ 1]), CONTEXT),
        lambda: unseal(keyring("k2"), sealed, CONTEXT),
        lambda: Keyring({"k1": KEK1[:16]}),
    ):
        with pytest.raises((CryptoError, ValueError)) as caught:
            attempt()
        failures.append(caught.value)
    forbidden = [
        KEK1.hex(),
        KEK2.hex(),
        base64.b64encode(KEK1).decode(),
        base64.b64encode(KEK2).decode(),
        "sup3r-s3cret",
    ]
    for failure in failures:
        text = _all_messages(failure)
        assert not any(secret in text for secret in forbidden), text


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"", "not a CertAutoPilot envelope"),
        (b"-----BEGIN PRIVATE KEY-----", "not a CertAutoPilot envelope"),
        (b"CAPE", "truncated"),
        (b"CAPE\x02\x02k1" + bytes(100), "format version 2"),
        (b"CAPE\x01\x00" + bytes(100), "truncated"),
        (b"CAPE\x01\x02\xff\xfe" + bytes(100), "invalid key id"),
    ],
    ids=["empty", "plain PEM", "header only", "future version", "empty key id", "binary key id"],
)
def test_malformed_envelopes_are_refused_with_a_reason(blob: bytes, expected: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=expected):
        unseal(keyring("k1"), blob, CONTEXT)


def test_rewrap_to_an_unloaded_key_names_it() -> None:
    ring = keyring("k1")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    with pytest.raises(UnknownKeyError, match="'k9'"):
        rewrap(ring, sealed, CONTEXT, "k9")


def test_rewrap_defaults_to_the_current_key() -> None:
    sealed = seal(keyring("k1"), PLAINTEXT, CONTEXT)
    rotated = rewrap(keyring("k1", "k2", current="k2"), sealed, CONTEXT)
    assert envelope_key_id(rotated) == "k2"


def test_rewrap_refuses_an_envelope_that_does_not_authenticate() -> None:
    ring = keyring("k1", "k2")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    with pytest.raises(DecryptionError):
        rewrap(ring, sealed, SealContext("credentials", "elsewhere", "secret"), "k2")


def test_relabelling_an_envelope_with_another_key_id_fails() -> None:
    ring = keyring("k1", "k2")
    sealed = seal(ring, PLAINTEXT, CONTEXT)
    relabelled = sealed.replace(b"\x02k1", b"\x02k2", 1)
    with pytest.raises(DecryptionError):
        unseal(ring, relabelled, CONTEXT)


@pytest.mark.parametrize(
    ("keys", "current", "expected"),
    [
        ({}, None, "at least one KEK"),
        ({"k1": KEK1[:31]}, None, "31 bytes long"),
        ({"bad id!": KEK1}, None, "KEK id 'bad id!' is invalid"),
        ({"k1": KEK1}, "k2", "current KEK id 'k2' is not among the loaded KEKs"),
    ],
    ids=["empty", "short key", "bad id", "unknown current"],
)
def test_keyring_refuses_bad_configuration(
    keys: dict[str, bytes], current: str | None, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        Keyring(keys, current)


def test_keyring_repr_shows_ids_but_not_keys() -> None:
    ring = keyring("k1", "k2", current="k2")
    text = repr(ring)
    assert "'k1'" in text and "'k2'" in text
    assert KEK1.hex() not in text and repr(KEK1) not in text


def test_generate_kek_gives_32_random_bytes_in_base64() -> None:
    first, second = generate_kek(), generate_kek()
    assert len(base64.b64decode(first, validate=True)) == KEK_BYTES
    assert first != second


def test_seal_context_fields_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="row_id"):
        SealContext("credentials", "", "secret")


def test_seal_context_encoding_is_unambiguous() -> None:
    assert SealContext("ab", "c", "d").to_aad() != SealContext("a", "bc", "d").to_aad()


def test_keyring_from_settings_reads_the_crypto_section() -> None:
    class _Crypto:
        keys = {"k1": KEK1, "k2": os.urandom(32)}
        current_key_id = "k2"

    class _Settings:
        crypto = _Crypto()

    ring = Keyring.from_settings(_Settings())
    assert ring.key_ids == ("k1", "k2")
    assert ring.current_key_id == "k2"
