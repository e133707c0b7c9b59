"""The audit's classification of one live Secret and its urgency order (pure, no cluster)."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certfactory import make_chain, utcnow
from worker.core.audit import (
    AUDIT_STATES,
    CURRENT,
    DRIFTED,
    FAILED,
    FORBIDDEN,
    MISSING,
    OUTDATED,
    UNMANAGED,
    UNREACHABLE,
    AuditFinding,
    classify_secret,
    days_left,
    failure_state,
    urgency,
)
from worker.core.bundle import TlsBundle, build_bundle
from worker.core.secret import (
    ANN_CERTIFICATE_SHA256,
    ANN_CONTENT_SHA256,
    ANN_DISTRIBUTION_ID,
    ANN_SERIAL,
    MANAGED_BY_LABEL,
    content_sha256,
    decoded_data,
    desired_secret,
)

DISTRIBUTION = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
OTHER_DISTRIBUTION = "0a0b0c0d-1111-4222-8333-444455556666"


def _bundle(cn: str = "app.example.com") -> TlsBundle:
    chain = make_chain(cn, fresh_leaf_key=True)
    return build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=utcnow()
    )


# Three revisions of one certificate, and a certificate that is none of them.
REV1, REV2, REV3 = _bundle(), _bundle(), _bundle()
FOREIGN = _bundle("other.example.com")
REVISIONS = {
    REV1.leaf.sha256_fingerprint: 1,
    REV2.leaf.sha256_fingerprint: 2,
    REV3.leaf.sha256_fingerprint: 3,
}


def written(
    bundle: TlsBundle, *, distribution: str = DISTRIBUTION, include_ca: bool = False
) -> dict[str, Any]:
    """The Secret as our execute writes it (what the API server returns, plus server fields)."""
    secret = desired_secret(
        name="app-example-com-tls",
        namespace="ingress",
        tls_crt=bundle.tls_crt(),
        tls_key=bundle.tls_key(),
        ca_crt=bundle.ca_crt() if include_ca else None,
        leaf=bundle.leaf,
        distribution_id=distribution,
    )
    secret["metadata"]["resourceVersion"] = "42"
    secret["metadata"]["uid"] = "d9e0c8a4-0000-4000-8000-000000000001"
    return secret


def classify(live: dict[str, Any] | None, pinned: int = 2) -> AuditFinding:
    return classify_secret(live, revisions=REVISIONS, pinned_revision=pinned)


def _set_data(secret: dict[str, Any], key: str, value: bytes) -> None:
    secret["data"][key] = base64.b64encode(value).decode("ascii")


# ----------------------------------------------------------------------------- the table


def _unmanaged(secret: dict[str, Any]) -> dict[str, Any]:
    del secret["metadata"]["labels"][MANAGED_BY_LABEL]
    return secret


def _kubectl_replaced(secret: dict[str, Any]) -> dict[str, Any]:
    # `kubectl replace` with a new certificate keeps the metadata it was given: our labels and
    # annotations stay, the data changes.
    _set_data(secret, "tls.crt", REV3.tls_crt())
    return secret


def _hash_removed(secret: dict[str, Any]) -> dict[str, Any]:
    del secret["metadata"]["annotations"][ANN_CONTENT_SHA256]
    return secret


def _opaque(secret: dict[str, Any]) -> dict[str, Any]:
    secret["type"] = "Opaque"
    return secret


CASES = [
    ("absent", lambda: None, MISSING, None),
    ("our write of the pinned revision", lambda: written(REV2), CURRENT, 2),
    ("our write of an older revision", lambda: written(REV1), OUTDATED, 1),
    ("our write of a newer revision (renewed meanwhile)", lambda: written(REV3), CURRENT, 3),
    (
        "another distribution's write of this certificate",
        lambda: written(REV2, distribution=OTHER_DISTRIBUTION),
        CURRENT,
        2,
    ),
    ("our write with ca.crt", lambda: written(REV2, include_ca=True), CURRENT, 2),
    ("no managed-by label", lambda: _unmanaged(written(REV2)), UNMANAGED, None),
    ("data replaced, our metadata kept", lambda: _kubectl_replaced(written(REV2)), DRIFTED, None),
    ("content hash removed", lambda: _hash_removed(written(REV2)), DRIFTED, None),
    ("type changed", lambda: _opaque(written(REV2)), DRIFTED, None),
    (
        "another certificate's unedited write",
        lambda: written(FOREIGN, distribution=OTHER_DISTRIBUTION),
        DRIFTED,
        None,
    ),
]


@pytest.mark.parametrize(
    ("build", "state", "revision"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_kind_of_secret_gets_its_state(build: Any, state: str, revision: int | None) -> None:
    finding = classify(build())
    assert finding.state == state, finding.detail
    assert finding.revision == revision
    assert finding.state in AUDIT_STATES


def test_the_deployed_leaf_is_read_from_the_data_whatever_the_state() -> None:
    for live, bundle in (
        (written(REV1), REV1),
        (_unmanaged(written(REV2)), REV2),
        (_kubectl_replaced(written(REV2)), REV3),
    ):
        leaf = classify(live).leaf
        assert leaf is not None
        assert leaf.serial_hex == bundle.leaf.serial_hex
        assert leaf.not_after == bundle.leaf.not_after
        assert leaf.sha256_fingerprint == bundle.leaf.sha256_fingerprint


def test_annotations_naming_the_pinned_certificate_do_not_make_an_old_write_current() -> None:
    live = written(REV1)
    live["metadata"]["annotations"][ANN_CERTIFICATE_SHA256] = REV2.leaf.sha256_fingerprint
    live["metadata"]["annotations"][ANN_SERIAL] = REV2.leaf.serial_hex
    assert classify(live).state == OUTDATED


def test_a_secret_without_data_is_missing_nothing_but_has_no_leaf() -> None:
    live = _unmanaged(written(REV2))
    live["data"] = {}
    finding = classify(live)
    assert (finding.state, finding.leaf) == (UNMANAGED, None)


def test_a_forged_hash_over_unreadable_data_is_drift_not_a_crash() -> None:
    live = written(REV2)
    _set_data(live, "tls.crt", b"not a certificate")
    live["metadata"]["annotations"][ANN_CONTENT_SHA256] = content_sha256(decoded_data(live))
    finding = classify(live)
    assert finding.state == DRIFTED
    assert "not a PEM certificate" in finding.detail
    assert finding.leaf is None


def test_the_finding_names_the_writer_and_never_carries_key_material() -> None:
    finding = classify(written(FOREIGN, distribution=OTHER_DISTRIBUTION))
    assert OTHER_DISTRIBUTION in finding.detail
    as_dict = finding.to_dict()
    assert as_dict["written_by"] == OTHER_DISTRIBUTION
    text = repr(as_dict)
    assert "PRIVATE KEY" not in text
    assert base64.b64encode(FOREIGN.tls_key()).decode()[:40] not in text


# --------------------------------------------------------------------- properties (hypothesis)

_foreign_keys = st.from_regex(r"[a-z]{1,10}\.example/[a-z]{1,10}", fullmatch=True)
_foreign_values = st.text(max_size=20)
_foreign_meta = st.dictionaries(_foreign_keys, _foreign_values, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    bundle_index=st.integers(0, 2),
    pinned=st.integers(1, 3),
    labels=_foreign_meta,
    annotations=_foreign_meta,
    include_ca=st.booleans(),
)
def test_others_labels_and_annotations_never_change_the_state(
    bundle_index: int,
    pinned: int,
    labels: dict[str, str],
    annotations: dict[str, str],
    include_ca: bool,
) -> None:
    bundle = (REV1, REV2, REV3)[bundle_index]
    plain = written(bundle, include_ca=include_ca)
    decorated = copy.deepcopy(plain)
    decorated["metadata"]["labels"].update(labels)
    decorated["metadata"]["annotations"].update(annotations)
    expected = CURRENT if bundle_index + 1 >= pinned else OUTDATED
    assert classify(plain, pinned).state == expected
    assert classify(decorated, pinned).state == expected
    assert classify(decorated, pinned).revision == bundle_index + 1


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(["tls.crt", "tls.key", "ca.crt", "extra"]),
    value=st.binary(max_size=64),
    pinned=st.integers(1, 3),
)
def test_any_change_to_the_data_of_our_write_is_drift(key: str, value: bytes, pinned: int) -> None:
    live = written(REV2, include_ca=True)
    before = decoded_data(live)
    _set_data(live, key, value)
    if decoded_data(live) == before:
        return  # the same bytes written back: not a change
    assert classify(live, pinned).state == DRIFTED


@settings(max_examples=40, deadline=None)
@given(
    label_value=st.one_of(st.none(), st.text(max_size=20).filter(lambda v: v != "certautopilot")),
    edited=st.booleans(),
)
def test_without_our_label_a_secret_is_unmanaged_however_it_looks(
    label_value: str | None, edited: bool
) -> None:
    live = written(REV2)
    if label_value is None:
        del live["metadata"]["labels"][MANAGED_BY_LABEL]
    else:
        live["metadata"]["labels"][MANAGED_BY_LABEL] = label_value
    if edited:
        _set_data(live, "tls.crt", REV1.tls_crt())
    assert classify(live).state == UNMANAGED


def test_distribution_id_annotation_is_reported_not_trusted() -> None:
    live = written(REV2)
    live["metadata"]["annotations"][ANN_DISTRIBUTION_ID] = OTHER_DISTRIBUTION
    finding = classify(live)
    assert (finding.state, finding.written_by) == (CURRENT, OTHER_DISTRIBUTION)


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        ("unreachable", UNREACHABLE),
        ("timeout", UNREACHABLE),
        ("transport_error", UNREACHABLE),
        ("tls_verification_failed", UNREACHABLE),
        ("throttled", UNREACHABLE),
        ("server_error", UNREACHABLE),
        ("forbidden", FORBIDDEN),
        ("unauthorized", FORBIDDEN),
        ("namespace_not_found", FAILED),
        ("template_invalid", FAILED),
        (None, FAILED),
    ],
)
def test_a_failed_read_maps_to_its_audit_state(reason: str | None, state: str) -> None:
    assert failure_state(reason) == state


# ------------------------------------------------------------------------- days and urgency

AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delta", "days"),
    [
        (timedelta(days=10), 10),
        (timedelta(days=10, hours=23), 10),
        (timedelta(seconds=1), 0),
        (timedelta(0), 0),
        (timedelta(seconds=-1), -1),
        (timedelta(days=-3, hours=-1), -4),
    ],
)
def test_days_left_round_down(delta: timedelta, days: int) -> None:
    assert days_left(AT + delta, AT) == days


def test_days_left_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        days_left(datetime(2027, 1, 1), AT)


_STATES = (CURRENT, OUTDATED, DRIFTED, UNMANAGED, MISSING, UNREACHABLE, FORBIDDEN, FAILED)


def test_urgency_order_without_expiry_pressure() -> None:
    far = AT + timedelta(days=300)
    ordered = sorted(_STATES, key=lambda s: urgency(s, None if s == MISSING else far, AT))
    assert ordered[:2] == [DRIFTED, MISSING]
    assert set(ordered[2:5]) == {UNREACHABLE, FORBIDDEN, FAILED}
    assert ordered[5:] == [OUTDATED, UNMANAGED, CURRENT]


@settings(max_examples=200, deadline=None)
@given(
    a_state=st.sampled_from(_STATES),
    b_state=st.sampled_from(_STATES),
    # Minutes, so the datetime arithmetic is exact.
    a_minutes=st.one_of(st.none(), st.integers(-400 * 1440, 400 * 1440)),
    b_minutes=st.one_of(st.none(), st.integers(-400 * 1440, 400 * 1440)),
    warn_days=st.integers(0, 90),
)
def test_expired_before_expiring_before_everything_else(
    a_state: str, b_state: str, a_minutes: int | None, b_minutes: int | None, warn_days: int
) -> None:
    def key(state: str, minutes: int | None) -> tuple[int, float]:
        not_after = None if minutes is None else AT + timedelta(minutes=minutes)
        return urgency(state, not_after, AT, warn_days=warn_days)

    def band(minutes: int | None) -> int:  # 0 expired, 1 expiring, 2 neither
        if minutes is None:
            return 2
        return 0 if minutes <= 0 else 1 if minutes < warn_days * 1440 else 2

    a, b = key(a_state, a_minutes), key(b_state, b_minutes)
    if band(a_minutes) < band(b_minutes):
        assert a < b
    if band(a_minutes) == band(b_minutes) < 2 and a_minutes is not None and b_minutes is not None:
        # Among expired or among expiring: the one closest to (or furthest past) expiry first.
        assert (a < b) == (a_minutes < b_minutes)


def test_urgency_refuses_unknown_states_and_negative_windows() -> None:
    with pytest.raises(ValueError, match="unknown audit state 'fine'"):
        urgency("fine", None, AT)
    with pytest.raises(ValueError, match="warn_days must be 0 or more"):
        urgency(CURRENT, None, AT, warn_days=-1)
