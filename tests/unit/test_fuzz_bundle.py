"""Fuzzing bundle parsing: PEM blocks, chains and keys assembled, shuffled, split and damaged.

Properties, for every input:

* only the product's own refusals escape (``BundleError``, ``InputTooLarge``), and a refusal
  never quotes the private key; each call stays within the profile's deadline;
* an accepted bundle round-trips: its ``tls.crt`` holds the leaf then the intermediates,
  its ``tls.key`` matches the leaf, and building again from ``tls.crt`` / ``tls.key`` /
  ``ca.crt`` gives the same bundle.

Settings come from ``tests.fuzz`` (``CAP_FUZZ_PROFILE``; ``python -m tests.fuzz`` runs a
campaign).
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from tests.certfactory import (
    cert_to_pem,
    key_to_pem,
    make_chain,
    make_csr_pem,
    make_self_signed,
    public_key_pem,
)
from tests.fuzz import fuzz_settings, within_budget
from worker.core.bundle import (
    BundleError,
    TlsBundle,
    build_bundle,
    describe_certificates,
    public_key_fingerprint_of_private_key,
)
from worker.core.limits import InputTooLarge

NOW = dt.datetime(2031, 3, 1, 12, 0, tzinfo=dt.UTC)
PASSPHRASE = b"fuzz passphrase"

MAIN = make_chain(cn="fuzz.example.com", intermediates=2, now=NOW)
RSA = make_chain(cn="rsa.example.com", key_type="rsa2048", intermediates=1, now=NOW)
OTHER = make_chain(cn="other.example.com", intermediates=1, now=NOW, fresh_leaf_key=True)
SELF_SIGNED, SELF_KEY = make_self_signed("self.example.com", now=NOW)

CERT_BLOCKS = [
    MAIN.leaf_pem,
    *(cert_to_pem(c) for c in MAIN.intermediates),
    MAIN.root_pem,
    RSA.leaf_pem,
    RSA.chain_pem,
    RSA.root_pem,
    OTHER.leaf_pem,
    OTHER.chain_pem,
    cert_to_pem(SELF_SIGNED),
]
KEY_BLOCKS = [
    MAIN.key_pem,
    MAIN.key_as("sec1"),
    MAIN.key_as("pkcs8", passphrase=PASSPHRASE),
    RSA.key_pem,
    RSA.key_as("pkcs1"),
    OTHER.key_pem,
    key_to_pem(SELF_KEY, "pkcs8"),
]
SECRETS = [k for k in KEY_BLOCKS if b"ENCRYPTED" not in k]
ODD_BLOCKS = [
    make_csr_pem(),
    public_key_pem(MAIN.leaf_key),
    b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n",
    b"-----BEGIN PKCS7-----\nMIIB\n-----END PKCS7-----\n",
    b"-----BEGIN CERTIFICATE-----\n",
    b"-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"Bag Attributes\n    friendlyName: x\nsubject=/CN=x\n",
    b"\r\n",
    b"\x00\xff",
]


def _random_block(label: str, body: bytes) -> bytes:
    encoded = base64.encodebytes(body)
    return f"-----BEGIN {label}-----\n".encode() + encoded + f"-----END {label}-----\n".encode()


RANDOM_BLOCKS = st.builds(
    _random_block,
    st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "X"]),
    st.binary(max_size=200),
)


@st.composite
def damaged(draw: st.DrawFn, block: bytes) -> bytes:
    """A block, perhaps truncated, with a byte flipped, or with CRLF line ends."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return block[: draw(st.integers(0, len(block)))]
    if choice == 1:
        data = bytearray(block)
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if choice == 2:
        return block.replace(b"\n", b"\r\n")
    return block


BLOCKS = st.one_of(
    st.sampled_from(CERT_BLOCKS).flatmap(damaged),
    st.sampled_from(ODD_BLOCKS),
    RANDOM_BLOCKS,
    st.sampled_from(KEY_BLOCKS).flatmap(damaged),
)


def _key_variants(chain: Any) -> list[tuple[bytes, bytes | None]]:
    fmt = "pkcs1" if chain is RSA else "sec1"
    return [
        (chain.key_pem, None),
        (chain.key_as(fmt), None),
        (chain.key_as("pkcs8", passphrase=PASSPHRASE), PASSPHRASE),
    ]


@st.composite
def bundle_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """A real chain split between cert/chain/ca in any order, then zero to two damages."""
    source = draw(st.sampled_from([MAIN, RSA, OTHER]))
    certs = [source.leaf_pem, *(cert_to_pem(c) for c in source.intermediates)]
    if draw(st.booleans()):
        certs.append(source.root_pem)
    certs = draw(st.permutations(certs))
    split = draw(st.integers(1, len(certs)))
    key, passphrase = draw(st.sampled_from(_key_variants(source)))
    inputs: dict[str, Any] = {
        "cert_pem": b"".join(certs[:split]),
        "chain_pem": b"".join(certs[split:]),
        "key_pem": key,
        "ca_pem": source.root_pem if draw(st.booleans()) else None,
        "passphrase": passphrase,
    }
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(["cert_pem", "chain_pem", "key_pem", "ca_pem", "passphrase"]))
        change = draw(st.integers(0, 3))
        if field == "passphrase":
            inputs[field] = draw(st.sampled_from([None, PASSPHRASE, b"wrong", b""]))
        elif change == 0:  # an extra block, anywhere
            current = inputs[field] or b""
            at = draw(st.integers(0, len(current)))
            inputs[field] = current[:at] + draw(BLOCKS) + current[at:]
        elif change == 1 and inputs[field]:
            inputs[field] = draw(damaged(inputs[field]))
        elif change == 2:
            inputs[field] = draw(st.sampled_from([*CERT_BLOCKS, *KEY_BLOCKS, *ODD_BLOCKS]))
        else:
            inputs[field] = b"" if field != "ca_pem" else None
    return inputs


def _build(**inputs: Any) -> TlsBundle | None:
    try:
        with within_budget():
            return build_bundle(**inputs, now=NOW)
    except (BundleError, InputTooLarge) as refusal:
        text = str(refusal).encode()
        for secret in SECRETS:
            body = secret.split(b"\n")[1]  # the first line of base64 key data
            assert body not in text
        return None


def _assert_round_trip(bundle: TlsBundle) -> None:
    described = describe_certificates(bundle.tls_crt())
    assert described[0] == bundle.leaf
    assert len(described) == 1 + len(bundle.chain_pems)
    assert public_key_fingerprint_of_private_key(bundle.tls_key()) == bundle.leaf.public_key_sha256
    again = build_bundle(bundle.tls_crt(), bundle.tls_key(), ca_pem=bundle.ca_crt(), now=NOW)
    assert (again.leaf, again.leaf_pem, again.chain_pems, again.key_pem, again.ca_pem) == (
        bundle.leaf,
        bundle.leaf_pem,
        bundle.chain_pems,
        bundle.key_pem,
        bundle.ca_pem,
    )


@fuzz_settings(max_examples=150)
@given(inputs=bundle_inputs())
def test_assembled_bundles_are_refused_cleanly_or_round_trip(inputs: dict[str, Any]) -> None:
    bundle = _build(**inputs)
    event("accepted" if bundle is not None else "refused")
    if bundle is not None:
        _assert_round_trip(bundle)


@fuzz_settings(max_examples=60)
@given(
    blocks=st.lists(BLOCKS, max_size=4),
    noise=st.binary(max_size=64),
    field=st.sampled_from(["cert_pem", "chain_pem", "key_pem", "ca_pem"]),
)
def test_block_soup_in_any_input_is_refused_cleanly(
    blocks: list[bytes], noise: bytes, field: str
) -> None:
    inputs: dict[str, Any] = {"cert_pem": MAIN.leaf_pem, "key_pem": MAIN.key_pem}
    inputs[field] = noise.join(blocks) if blocks else noise
    bundle = _build(**inputs)
    event("accepted" if bundle is not None else "refused")
    if bundle is not None:
        _assert_round_trip(bundle)
