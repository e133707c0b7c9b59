"""Deploy, dry-run, roll back and health-check one Kubernetes target.

The write rules (DESIGN.md decisions 2 and 3):

* absent -> create; equal -> no write ("unchanged"); otherwise PUT with the resourceVersion
  that was read, so a concurrent change answers 409 and we re-read and decide again
  (bounded by ``max_conflict_retries``).
* an existing Secret of another type (type is immutable) or an ``immutable: true`` Secret is
  refused before writing, with the fix.
* a Secret that exists but lacks our managed-by label is refused (:class:`UnmanagedSecret`)
  unless the target says adopt; either way the diff flags it. Refusing by default means a
  typo in a Secret name can never silently replace somebody else's certificate.
* with a snapshot store, the previous Secret is saved *before* each write until the store
  says its snapshot is final (our write landed after it); a final snapshot is never
  replaced. A live Secret that already carries this distribution's id and this certificate's
  fingerprint is our own earlier write (a redelivered task), which is never snapshotted; one
  of this distribution with another certificate and unedited data is snapshotted only when no
  snapshot exists (it may be our write whose landing was never recorded, which must not
  replace what was there before it).

An audit (:func:`audit_secret`) is one GET and nothing else: no write, no snapshot, no
server-side dry run; :mod:`worker.core.audit` classifies what it read.

Persistence is not imported here: the caller hands in a :class:`SnapshotStore`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker.core.audit import AuditFinding, classify_secret
from worker.core.budget import MAX_CONFLICT_RETRIES
from worker.core.secret import (
    ANN_CERTIFICATE_SHA256,
    ANN_CONTENT_SHA256,
    ANN_DISTRIBUTION_ID,
    MAX_SECRET_DATA_BYTES,
    SecretDiff,
    content_sha256,
    data_size,
    decoded_data,
    diff_secrets,
    prepare_update,
    reuse_equal_keystore,
)
from worker.core.snapshot import PreviousSecret
from worker.kube.client import KubeClient
from worker.kube.errors import (
    Conflict,
    Forbidden,
    ImmutableSecret,
    KubeError,
    NamespaceNotFound,
    NothingToRestore,
    SecretTooLarge,
    SecretTypeConflict,
    SnapshotDrifted,
    UnmanagedSecret,
    forbidden_fix,
    forbidden_message,
)

__all__ = [
    "REQUIRED_SECRET_VERBS",
    "AuditOutcome",
    "DeployOutcome",
    "HealthReport",
    "PreviousSecret",
    "SnapshotStore",
    "audit_secret",
    "deploy_secret",
    "health_check",
    "refuse_oversized",
    "rollback_secret",
]

#: What the module needs on secrets in a target namespace (spec, section 02).
REQUIRED_SECRET_VERBS = ("get", "create", "update", "patch")

Action = Literal[
    "created", "updated", "unchanged", "would_create", "would_update", "would_be_unchanged"
]


class SnapshotStore(Protocol):
    """Where the previous Secret is kept for rollback (the caller's database, encrypted)."""

    def snapshot_is_final(self) -> bool:
        """Return whether a snapshot is stored and our write already landed after it."""
        ...

    def save_snapshot(self, previous: PreviousSecret, *, replace_provisional: bool = True) -> None:
        """Store ``previous`` when no snapshot exists; replace a provisional one only with
        ``replace_provisional``; never replace a final one."""
        ...


@dataclass(frozen=True)
class DeployOutcome:
    """What one deploy or rollback did."""

    action: Action
    diff: SecretDiff
    resource_version: str | None
    requests: int
    attempts: int
    #: certificate-sha256 annotation of the Secret now in place (what rollback drift-checks).
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form (no key material)."""
        return {
            "action": self.action,
            "diff": self.diff.to_dict(),
            "resource_version": self.resource_version,
            "requests": self.requests,
            "attempts": self.attempts,
            "fingerprint": self.fingerprint,
        }


def _meta(secret: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (secret or {}).get("metadata") or {}


def _annotation(secret: Mapping[str, Any] | None, key: str) -> str | None:
    value = (_meta(secret).get("annotations") or {}).get(key)
    return None if value is None else str(value)


def _resource_version(secret: Mapping[str, Any] | None) -> str | None:
    value = _meta(secret).get("resourceVersion")
    return None if value is None else str(value)


@dataclass(frozen=True)
class _Finisher:
    """Builds the outcome of one pass: requests counted since ``start``, this attempt number."""

    client: KubeClient
    start: int
    attempt: int
    diff: SecretDiff

    def __call__(
        self, action: Action, secret: Mapping[str, Any] | None, fingerprint: str | None
    ) -> DeployOutcome:
        used = self.client.requests_made - self.start
        rv = _resource_version(secret)
        return DeployOutcome(action, self.diff, rv, used, self.attempt, fingerprint)


@contextmanager
def _with_diff(diff: SecretDiff) -> Iterator[None]:
    # Every error leaving a write carries the diff, so a failed result still shows it.
    try:
        yield
    except KubeError as err:
        err.details.setdefault("diff", diff.to_dict())
        raise


def _refuse_unwritable(live: Mapping[str, Any], diff: SecretDiff, adopt_unmanaged: bool) -> None:
    where = f'Secret "{diff.namespace}/{diff.name}"'
    details = {"diff": diff.to_dict()}
    if diff.type_changes:
        raise SecretTypeConflict(
            f"type conflict: {where} has type {diff.old_type}, not {diff.new_type}, and a "
            "Secret's type is immutable",
            details=details,
        )
    if live.get("immutable") is True:
        raise ImmutableSecret(f"immutable: {where} is marked immutable: true", details=details)
    if diff.unmanaged and not adopt_unmanaged:
        raise UnmanagedSecret(
            f"unmanaged: {where} exists and is not managed by CertAutoPilot; refusing to "
            "overwrite it",
            details=details,
        )


def _written_by_this_distribution(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    return _annotation(live, ANN_DISTRIBUTION_ID) is not None and _annotation(
        live, ANN_DISTRIBUTION_ID
    ) == _annotation(desired, ANN_DISTRIBUTION_ID)


def _unedited_write_of_this_distribution(
    live: Mapping[str, Any], desired: Mapping[str, Any]
) -> bool:
    # Carries this distribution's id and data that still matches the content hash written
    # with it: nobody edited it since a write of ours (kubectl edit keeps our annotations).
    return _written_by_this_distribution(live, desired) and _annotation(
        live, ANN_CONTENT_SHA256
    ) == content_sha256(decoded_data(live))


def _is_our_own_write(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    # Live already holds this distribution's write of this certificate: a redelivered task
    # after our own write. Snapshotting it would make rollback restore our own content.
    return _written_by_this_distribution(live, desired) and _annotation(
        live, ANN_CERTIFICATE_SHA256
    ) == _annotation(desired, ANN_CERTIFICATE_SHA256)


def _drift(live: Mapping[str, Any] | None, written_fingerprint: str | None) -> str | None:
    """Say how the live Secret differs from what we wrote, or None when it is still ours."""
    if live is None:
        return "was deleted"
    fingerprint = _annotation(live, ANN_CERTIFICATE_SHA256)
    if written_fingerprint is None or fingerprint != written_fingerprint:
        return f"now holds certificate {fingerprint or '(not written by CertAutoPilot)'}"
    # Someone may have edited the data and left our annotations: our content hash tells.
    if _annotation(live, ANN_CONTENT_SHA256) != content_sha256(decoded_data(live)):
        return "had its data changed"
    return None


def _snapshot(
    store: SnapshotStore | None, previous: PreviousSecret, *, replace_provisional: bool = True
) -> None:
    if store is not None and not store.snapshot_is_final():
        store.save_snapshot(previous, replace_provisional=replace_provisional)


def _conflicts_exhausted(where: str, attempts: int, last: Conflict, diff: SecretDiff) -> Conflict:
    return Conflict(
        f"conflict: {where} changed between our read and our write {attempts} times in a row "
        f"(last: {last.message})",
        status=last.status,
        details={"diff": diff.to_dict()},
    )


def refuse_oversized(desired: Mapping[str, Any]) -> None:
    """Raise :class:`SecretTooLarge` for a Secret the API server would refuse (over 1 MiB)."""
    size = data_size(desired)
    if size > MAX_SECRET_DATA_BYTES:
        meta = _meta(desired)
        raise SecretTooLarge(
            f'too large: Secret "{meta.get("namespace")}/{meta.get("name")}" would hold {size} '
            f"bytes of data; the API server accepts at most {MAX_SECRET_DATA_BYTES} bytes (1 MiB)"
        )


def deploy_secret(
    client: KubeClient,
    desired: dict[str, Any],
    *,
    dry_run: bool,
    server_dry_run: bool,
    adopt_unmanaged: bool,
    snapshot_store: SnapshotStore | None,
    max_conflict_retries: int = MAX_CONFLICT_RETRIES,
    keystore_password: bytes | None = None,
) -> DeployOutcome:
    """Make the live Secret equal ``desired`` (or, in a dry run, say what that would do).

    ``keystore_password``: the target's PKCS#12 password when ``desired`` holds a
    ``keystore.p12``; a live keystore that opens with it and holds the same content counts
    as unchanged (its bytes are kept), and the diff describes keystores with it.
    """
    meta = _meta(desired)
    namespace, name = str(meta["namespace"]), str(meta["name"])
    refuse_oversized(desired)
    fingerprint = _annotation(desired, ANN_CERTIFICATE_SHA256)
    start = client.requests_made
    last: Conflict | None = None
    diff: SecretDiff | None = None
    built = desired
    for attempt in range(1, max_conflict_retries + 2):
        live = client.read_secret(namespace, name)
        # Re-settled against each read: a conflict's re-read may hold another keystore.
        desired = reuse_equal_keystore(live, built, keystore_password)
        diff = diff_secrets(live, desired, keystore_password=keystore_password)
        done = _Finisher(client, start, attempt, diff)
        if diff.action == "unchanged":
            action: Action = "would_be_unchanged" if dry_run else "unchanged"
            return done(action, live, fingerprint)
        if live is not None:
            _refuse_unwritable(live, diff, adopt_unmanaged)
        try:
            with _with_diff(diff):
                if dry_run:
                    # Server-side dry run: RBAC, admission and validation answer as for a
                    # real write, and nothing is persisted.
                    if server_dry_run and live is None:
                        client.create_secret(namespace, desired, dry_run=True)
                    elif server_dry_run and live is not None:
                        body = prepare_update(live, desired)
                        client.replace_secret(namespace, name, body, dry_run=True)
                    action = "would_create" if live is None else "would_update"
                    return done(action, live, _annotation(live, ANN_CERTIFICATE_SHA256))
                if live is None:
                    _snapshot(snapshot_store, PreviousSecret.absent())
                    created = client.create_secret(namespace, desired)
                    return done("created", created, fingerprint)
                if not _is_our_own_write(live, desired):
                    # An unedited write of this distribution (another certificate): the first
                    # snapshot when there is none yet (store content turned on after it), but
                    # never in place of a provisional one — that one holds what was there
                    # before a write of ours that landed without being recorded (its answer
                    # lost), and a later write (after a renewal) must not make a rollback
                    # restore our own content. An owner's edit is snapshotted as usual.
                    _snapshot(
                        snapshot_store,
                        PreviousSecret.from_live(live),
                        replace_provisional=not _unedited_write_of_this_distribution(live, desired),
                    )
                updated = client.replace_secret(namespace, name, prepare_update(live, desired))
                return done("updated", updated, fingerprint)
        except Conflict as exc:  # also AlreadyExists: someone created it meanwhile
            last = exc
    assert last is not None and diff is not None
    raise _conflicts_exhausted(
        f'Secret "{namespace}/{name}"', max_conflict_retries + 1, last, diff
    ) from last


def rollback_secret(
    client: KubeClient,
    *,
    namespace: str,
    name: str,
    previous: PreviousSecret,
    written_fingerprint: str | None,
    force: bool,
    max_conflict_retries: int = MAX_CONFLICT_RETRIES,
    keystore_password: bytes | None = None,
) -> DeployOutcome:
    """Put the snapshot back with Update + resourceVersion; refuse on drift unless forced.

    The snapshot is restored byte for byte (a keystore in it included); ``keystore_password``
    only lets the diff describe keystores.
    """
    where = f'Secret "{namespace}/{name}"'
    if not previous.existed:
        raise NothingToRestore(
            f"nothing to restore: {where} did not exist before CertAutoPilot's first write"
        )
    target = previous.manifest(namespace, name)
    start = client.requests_made
    last: Conflict | None = None
    diff: SecretDiff | None = None
    restored_fingerprint = _annotation(target, ANN_CERTIFICATE_SHA256)
    for attempt in range(1, max_conflict_retries + 2):
        live = client.read_secret(namespace, name)
        diff = diff_secrets(live, target, keystore_password=keystore_password)
        done = _Finisher(client, start, attempt, diff)
        if diff.action == "unchanged":
            # Already restored (e.g. a redelivered rollback): nothing to do, no drift.
            return done("unchanged", live, restored_fingerprint)
        drift = _drift(live, written_fingerprint)
        if drift is not None and not force:
            raise SnapshotDrifted(
                f"drifted: {where} {drift} since CertAutoPilot wrote certificate "
                f"{written_fingerprint or '(none)'}; refusing to overwrite that change",
                details={"diff": diff.to_dict()},
            )
        try:
            with _with_diff(diff):
                if live is None:
                    created = client.create_secret(namespace, target)
                    return done("created", created, restored_fingerprint)
                updated = client.replace_secret(namespace, name, prepare_update(live, target))
                return done("updated", updated, restored_fingerprint)
        except Conflict as exc:
            last = exc
    assert last is not None and diff is not None
    raise _conflicts_exhausted(where, max_conflict_retries + 1, last, diff) from last


@dataclass(frozen=True)
class AuditOutcome:
    """What one audit read found."""

    finding: AuditFinding
    resource_version: str | None
    requests: int


def audit_secret(
    client: KubeClient,
    *,
    namespace: str,
    name: str,
    revisions: Mapping[str, int],
    pinned_revision: int,
) -> AuditOutcome:
    """Read the Secret once (one GET) and classify it; never writes (errors: KubeError)."""
    start = client.requests_made
    live = client.read_secret(namespace, name)
    finding = classify_secret(live, revisions=revisions, pinned_revision=pinned_revision)
    return AuditOutcome(finding, _resource_version(live), client.requests_made - start)


@dataclass(frozen=True)
class HealthReport:
    """Whether a target can be deployed to: namespace readable, every needed verb allowed."""

    healthy: bool
    namespace_ok: bool
    missing_verbs: tuple[str, ...]
    message: str
    #: Reason code of the problem (e.g. "namespace_not_found", "forbidden", "unreachable").
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "healthy": self.healthy,
            "namespace_ok": self.namespace_ok,
            "missing_verbs": list(self.missing_verbs),
            "message": self.message,
            "reason": self.reason,
        }


def _verb_phrase(verbs: tuple[str, ...]) -> str:
    if len(verbs) == 1:
        return verbs[0]
    return ", ".join(verbs[:-1]) + " and " + verbs[-1]


def health_check(client: KubeClient, namespace: str) -> HealthReport:
    """Read the namespace, review get/create/update/patch on its secrets; name what is missing."""
    problems: list[str] = []
    reason: str | None = None
    try:
        client.read_namespace(namespace)
        namespace_ok = True
    except NamespaceNotFound as err:
        # Without the namespace every verb review is moot; the fix is to create it.
        return HealthReport(False, False, (), str(err), err.reason)
    except Forbidden as err:
        # RBAC is judged before existence, so a namespace that does not exist (and so holds
        # no Role) answers 403 too: say both.
        namespace_ok, reason = False, err.reason
        problems.append(
            f"{err} (If the namespace does not exist, create it first: the module does not "
            "create namespaces.)"
        )
    except KubeError as err:  # unreachable, unauthorized, TLS...: nothing else can be judged
        return HealthReport(False, False, (), str(err), err.reason)
    try:
        missing = tuple(
            verb for verb in REQUIRED_SECRET_VERBS if not client.can_i(namespace, verb).allowed
        )
    except KubeError as err:
        return HealthReport(False, namespace_ok, (), str(err), err.reason)
    if missing:
        reason = reason or Forbidden.reason
        denied = "; ".join(forbidden_message(verb, "secrets", namespace) for verb in missing)
        fix = forbidden_fix(_verb_phrase(missing), "secrets")
        if len(missing) > 1:
            fix = fix.replace(" verb ", " verbs ", 1)
        problems.append(f"{denied} — fix: {fix}")
    if problems:
        return HealthReport(False, namespace_ok, missing, " | ".join(problems), reason)
    verbs = ", ".join(REQUIRED_SECRET_VERBS)
    return HealthReport(
        True, True, (), f'namespace "{namespace}" exists; {verbs} on secrets allowed', None
    )
