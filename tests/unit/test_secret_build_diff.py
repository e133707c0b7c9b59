"""The desired Secret, the update body and the operator's diff (pure functions, no cluster)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certfactory import make_chain, utcnow
from worker.core.bundle import TlsBundle, build_bundle
from worker.core.secret import (
    ANN_CERTIFICATE_SHA256,
    ANN_CONTENT_SHA256,
    ANN_DISTRIBUTION_ID,
    ANN_NOT_AFTER,
    ANN_SERIAL,
    MANAGED_BY_LABEL,
    MAX_SECRET_DATA_BYTES,
    content_sha256,
    data_size,
    decoded_data,
    desired_secret,
    diff_secrets,
    is_managed,
    prepare_update,
    render_diff,
    secret_content_equal,
)
from worker.kube.deploy import refuse_oversized
from worker.kube.errors import SecretTooLarge

DISTRIBUTION = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"


def bundle_for(cn: str, *, sans: list[str] | None = None, key_type: Any = "ec256") -> TlsBundle:
    chain = make_chain(cn, sans=sans, key_type=key_type, fresh_leaf_key=True)
    return build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=utcnow()
    )


OLD = bundle_for("app.example.com", sans=["app.example.com"])
NEW = bundle_for("app.example.com", sans=["app.example.com", "www.example.com"])


def desired(
    bundle: TlsBundle = NEW, *, include_ca: bool = False, **overrides: Any
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "app-example-com-tls",
        "namespace": "ingress",
        "tls_crt": bundle.tls_crt(),
        "tls_key": bundle.tls_key(),
        "ca_crt": bundle.ca_crt() if include_ca else None,
        "leaf": bundle.leaf,
        "distribution_id": DISTRIBUTION,
    }
    args.update(overrides)
    return desired_secret(**args)


def as_live(manifest: dict[str, Any], *, rv: str = "100", **meta: Any) -> dict[str, Any]:
    """What the API server would return for ``manifest`` (plus server-side metadata)."""
    live = copy.deepcopy(manifest)
    live["metadata"].update(
        {
            "resourceVersion": rv,
            "uid": "0d9a-uid",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "certautopilot", "operation": "Update"}],
        }
    )
    for key, value in meta.items():
        live["metadata"][key] = value
    return live


# --- desired_secret -----------------------------------------------------------------------


def test_desired_secret_is_a_tls_secret_marked_as_ours() -> None:
    manifest = desired()
    assert (manifest["apiVersion"], manifest["kind"], manifest["type"]) == (
        "v1",
        "Secret",
        "kubernetes.io/tls",
    )
    assert manifest["metadata"]["labels"] == {MANAGED_BY_LABEL: "certautopilot"}
    annotations = manifest["metadata"]["annotations"]
    assert annotations[ANN_CERTIFICATE_SHA256] == NEW.leaf.sha256_fingerprint
    assert annotations[ANN_SERIAL] == NEW.leaf.serial_hex
    assert annotations[ANN_NOT_AFTER] == NEW.leaf.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert annotations[ANN_DISTRIBUTION_ID] == DISTRIBUTION
    assert annotations[ANN_CONTENT_SHA256] == content_sha256(decoded_data(manifest))
    json.dumps(manifest)  # JSON-able


def test_tls_crt_is_leaf_plus_chain_and_tls_key_the_key() -> None:
    data = decoded_data(desired())
    assert data["tls.crt"] == NEW.leaf_pem + b"".join(NEW.chain_pems)
    assert data["tls.key"] == NEW.tls_key()
    assert set(data) == {"tls.crt", "tls.key"}


def test_ca_crt_is_included_only_when_asked() -> None:
    assert "ca.crt" not in desired()["data"]
    assert decoded_data(desired(include_ca=True))["ca.crt"] == NEW.ca_crt()


def test_content_hash_changes_with_the_data_only() -> None:
    with_ca, without_ca = desired(include_ca=True), desired()
    ann = ANN_CONTENT_SHA256
    assert with_ca["metadata"]["annotations"][ann] != without_ca["metadata"]["annotations"][ann]
    renamed = desired(name="other-name")
    assert renamed["metadata"]["annotations"][ann] == without_ca["metadata"]["annotations"][ann]


def test_content_hash_cannot_be_fooled_by_moving_bytes_between_keys() -> None:
    assert content_sha256({"a": b"bc", "d": b""}) != content_sha256({"a": b"b", "d": b"c"})


@pytest.mark.parametrize(
    ("extra", "refused"), [(0, False), (1, True)], ids=["exactly 1 MiB", "one byte over"]
)
def test_a_secret_over_one_mebibyte_is_refused(extra: int, refused: bool) -> None:
    # The API server counts key names plus value bytes; so do we.
    key = b"k" * 100
    crt_size = MAX_SECRET_DATA_BYTES - len("tls.crt") - len("tls.key") - len(key) + extra
    args: dict[str, Any] = {"tls_crt": b"c" * crt_size, "tls_key": key}
    manifest = desired(**args)
    assert data_size(manifest) == MAX_SECRET_DATA_BYTES + extra
    if refused:
        with pytest.raises(SecretTooLarge, match="1 MiB"):
            refuse_oversized(manifest)
    else:
        refuse_oversized(manifest)
        assert len(decoded_data(manifest)["tls.crt"]) == crt_size


# --- prepare_update -----------------------------------------------------------------------


def test_update_keeps_labels_owned_by_others() -> None:
    live = as_live(desired(OLD), labels={"team": "edge", MANAGED_BY_LABEL: "certautopilot"})
    body = prepare_update(live, desired())
    assert body["metadata"]["labels"] == {"team": "edge", MANAGED_BY_LABEL: "certautopilot"}


def test_update_keeps_annotations_owned_by_others_and_overwrites_ours() -> None:
    old = desired(OLD)
    live = as_live(old)
    live["metadata"]["annotations"]["reloader.stakater.com/match"] = "true"
    live["metadata"]["annotations"]["certautopilot.io/retired-annotation"] = "x"
    body = prepare_update(live, desired())
    annotations = body["metadata"]["annotations"]
    assert annotations["reloader.stakater.com/match"] == "true"
    assert annotations[ANN_CERTIFICATE_SHA256] == NEW.leaf.sha256_fingerprint
    assert "certautopilot.io/retired-annotation" not in annotations  # ours, no longer wanted


def test_update_carries_the_live_resource_version_and_ownership_metadata() -> None:
    owner = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u"}]
    live = as_live(desired(OLD), rv="4242", ownerReferences=owner, finalizers=["keep/me"])
    body = prepare_update(live, desired())
    meta = body["metadata"]
    assert meta["resourceVersion"] == "4242"
    assert (meta["ownerReferences"], meta["finalizers"]) == (owner, ["keep/me"])
    assert "managedFields" not in meta  # the server keeps them when omitted


def test_update_replaces_data_and_type_entirely() -> None:
    live = as_live(desired(OLD, include_ca=True))
    live["data"]["someone-elses-key"] = base64.b64encode(b"x").decode()
    live["type"] = "Opaque"
    body = prepare_update(live, desired())
    assert body["data"] == desired()["data"]
    assert body["type"] == "kubernetes.io/tls"


def test_adopting_an_unmanaged_secret_adds_our_label() -> None:
    live = as_live(desired(OLD))
    live["metadata"]["labels"] = {"app": "web"}
    live["metadata"]["annotations"] = {}
    body = prepare_update(live, desired())
    assert body["metadata"]["labels"] == {"app": "web", MANAGED_BY_LABEL: "certautopilot"}


FOREIGN_KEYS = st.from_regex(r"[a-z]{1,8}\.example/[a-z]{1,10}", fullmatch=True)
FOREIGN_VALUES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=12)


@settings(max_examples=60)
@given(
    labels=st.dictionaries(FOREIGN_KEYS, FOREIGN_VALUES, max_size=5),
    annotations=st.dictionaries(FOREIGN_KEYS, FOREIGN_VALUES, max_size=5),
)
def test_update_keeps_any_foreign_metadata_and_then_equals_desired(
    labels: dict[str, str], annotations: dict[str, str]
) -> None:
    live = as_live(desired(OLD))
    live["metadata"]["labels"].update(labels)
    live["metadata"]["annotations"].update(annotations)
    body = prepare_update(live, desired())
    for key, value in {**labels}.items():
        assert body["metadata"]["labels"][key] == value
    for key, value in annotations.items():
        assert body["metadata"]["annotations"][key] == value
    assert secret_content_equal(body, desired())
    assert diff_secrets(body, desired()).action == "unchanged"


# --- equality and ownership ---------------------------------------------------------------


def test_is_managed_reads_our_label() -> None:
    assert is_managed(as_live(desired()))
    unmanaged = as_live(desired())
    unmanaged["metadata"]["labels"] = {MANAGED_BY_LABEL: "helm"}
    assert not is_managed(unmanaged)
    assert not is_managed({"metadata": {}})


def _mutate_foreign_label(live: dict[str, Any]) -> None:
    live["metadata"]["labels"]["team"] = "x"


def _mutate_data(live: dict[str, Any]) -> None:
    live["data"]["tls.key"] = base64.b64encode(b"other").decode()


def _mutate_type(live: dict[str, Any]) -> None:
    live["type"] = "Opaque"


def _mutate_our_annotation(live: dict[str, Any]) -> None:
    live["metadata"]["annotations"][ANN_DISTRIBUTION_ID] = "another-distribution"


def _drop_our_label(live: dict[str, Any]) -> None:
    del live["metadata"]["labels"][MANAGED_BY_LABEL]


def _add_data_key(live: dict[str, Any]) -> None:
    live["data"]["ca.crt"] = base64.b64encode(b"x").decode()


@pytest.mark.parametrize(
    ("mutate", "equal"),
    [
        (_mutate_foreign_label, True),
        (_mutate_data, False),
        (_mutate_type, False),
        (_mutate_our_annotation, False),
        (_drop_our_label, False),
        (_add_data_key, False),
    ],
)
def test_content_equality_considers_only_what_we_own(mutate: Any, equal: bool) -> None:
    live = as_live(desired())
    mutate(live)
    assert secret_content_equal(live, desired()) is equal


# --- the diff -----------------------------------------------------------------------------


def test_diff_of_an_absent_secret_is_create_with_everything_added() -> None:
    diff = diff_secrets(None, desired())
    assert diff.action == "create" and not diff.unmanaged
    assert [(e.key, e.change) for e in diff.data] == [("tls.crt", "added"), ("tls.key", "added")]
    assert {c.key for c in diff.labels} == {MANAGED_BY_LABEL}
    assert "would create (it does not exist yet)" in render_diff(diff)


def test_diff_of_an_equal_secret_is_unchanged() -> None:
    diff = diff_secrets(as_live(desired()), desired())
    assert diff.action == "unchanged"
    assert all(e.change == "unchanged" for e in diff.data)
    assert diff.labels == () and diff.annotations == ()
    assert render_diff(diff).startswith('Secret "ingress/app-example-com-tls": unchanged')


def test_diff_shows_certificate_fields_old_to_new() -> None:
    diff = diff_secrets(as_live(desired(OLD)), desired(NEW))
    assert diff.action == "update" and diff.live_resource_version == "100"
    crt = diff.data[0]
    assert crt.key == "tls.crt" and crt.change == "changed"
    text = render_diff(diff)
    assert f"serial       {OLD.leaf.serial_hex} -> {NEW.leaf.serial_hex}" in text
    assert f"sha256       {OLD.leaf.sha256_fingerprint} -> {NEW.leaf.sha256_fingerprint}" in text
    assert "SANs         app.example.com -> app.example.com, www.example.com" in text
    assert f"issuer       {NEW.leaf.issuer}\n" in text  # same issuer name: shown once
    assert "not-after" in text and "chain length 2" in text
    assert "subject      CN=app.example.com" in text
    assert "would update (live resourceVersion 100)" in text


def test_diff_shows_the_private_key_only_as_its_public_key_fingerprint() -> None:
    diff = diff_secrets(as_live(desired(OLD)), desired(NEW))
    key_entry = next(e for e in diff.data if e.key == "tls.key")
    assert key_entry.change == "changed"
    text = render_diff(diff)
    assert (
        f"tls.key: changed (public key sha256 {OLD.leaf.public_key_sha256} -> "
        f"{NEW.leaf.public_key_sha256})"
    ) in text


def test_no_key_material_reaches_the_diff_record_or_text() -> None:
    diff = diff_secrets(as_live(desired(OLD)), desired(NEW))
    rendered = json.dumps(diff.to_dict()) + render_diff(diff) + repr(diff)
    for bundle in (OLD, NEW):
        body = b"".join(bundle.tls_key().splitlines()[1:-1]).decode()
        assert body[:24] not in rendered
        assert base64.b64encode(bundle.tls_key()).decode()[:40] not in rendered
    assert "PRIVATE KEY" not in rendered


def test_diff_flags_an_unmanaged_secret() -> None:
    live = as_live(desired(OLD))
    live["metadata"]["labels"] = {}
    diff = diff_secrets(live, desired())
    assert diff.unmanaged
    assert "not managed by CertAutoPilot" in render_diff(diff)
    assert diff.to_dict()["unmanaged"] is True


def test_diff_flags_a_type_change_and_an_immutable_secret() -> None:
    live = as_live(desired(OLD))
    live["type"] = "Opaque"
    live["immutable"] = True
    diff = diff_secrets(live, desired())
    assert diff.type_changes and diff.immutable
    text = render_diff(diff)
    assert "type Opaque -> kubernetes.io/tls is impossible" in text
    assert "immutable: true" in text


def test_diff_lists_metadata_changes_and_foreign_data_by_size_only() -> None:
    live = as_live(desired(OLD))
    live["data"]["password"] = base64.b64encode(b"hunter2").decode()
    diff = diff_secrets(live, desired())
    text = render_diff(diff)
    assert "password: removed (7 bytes)" in text
    assert "hunter2" not in text
    changed = {c.key: (c.old, c.new) for c in diff.annotations}
    assert changed[ANN_SERIAL] == (OLD.leaf.serial_hex, NEW.leaf.serial_hex)
    assert f"~ {ANN_SERIAL}: {OLD.leaf.serial_hex} -> {NEW.leaf.serial_hex}" in text


def test_diff_of_garbage_in_the_live_secret_says_it_cannot_be_read() -> None:
    live = as_live(desired(OLD))
    live["data"]["tls.crt"] = base64.b64encode(b"not a certificate").decode()
    live["data"]["tls.key"] = base64.b64encode(b"not a key").decode()
    text = render_diff(diff_secrets(live, desired()))
    assert "not a PEM certificate (17 bytes)" in text
    assert "not a usable private key (9 bytes)" in text


def test_diff_wording_for_execute_is_not_conditional() -> None:
    diff = diff_secrets(as_live(desired(OLD)), desired(NEW))
    assert ": update (live" in render_diff(diff, dry_run=False)


def test_ca_crt_addition_shows_the_ca_certificate() -> None:
    diff = diff_secrets(as_live(desired(OLD)), desired(OLD, include_ca=True))
    entry = next(e for e in diff.data if e.key == "ca.crt")
    assert entry.change == "added"
    assert f"subject      {OLD.leaf.issuer}" not in render_diff(diff)  # the root, not the leaf
    assert "CertAutoPilot Test Root" in render_diff(diff)
