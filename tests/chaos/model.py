"""The randomized fault scenario's pure half: the fault schedule, the expected-state model and
the invariant checkers. Nothing here touches a process, a socket or a database, so every
checker can be handed a synthetic bad state and must report it (tests/unit/test_chaos_*.py).

Contents are named by *labels*: ``"absent"`` (no Secret), ``"seed"`` (the Secret a team had
before our first write), ``"owner-N"`` (a team's later rotation of its own Secret) and
``"vN"`` (the certificate's N-th version, ours). A live Secret is identified by its
``tls.crt`` leaf and its ``tls.key`` (:func:`identify`); anything else is a violation.

The model (:func:`replay`) replays, per target, the mutating runs in the order the database
allowed them (one execute or rollback per distribution at a time) and the owner's writes
between them, keeping for each target:

* ``live``: the contents the Secret may hold now. A written result (created, updated,
  unchanged) means exactly the revision the run pinned; a failed one means "the content
  before, or the pinned revision" (a write can land and its answer be lost);
* ``snapshot``: what a rollback must restore, i.e. what was live before our first *landed*
  write of this generation (None until that write; a successful rollback starts a new
  generation). It is never ours.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

ABSENT = "absent"
SEED = "seed"

#: Result statuses that say the run's content is live in the target.
WRITTEN = frozenset({"created", "updated", "unchanged"})
RESTORED = frozenset({"rolled_back", "unchanged"})
#: Failure reasons raised before any write was attempted: nothing can have landed.
REFUSED_BEFORE_WRITE = frozenset(
    {
        "nothing_to_restore",
        "snapshot_drifted",
        "rollback_refused",
        "unmanaged_secret",
        "secret_type_conflict",
        "immutable_secret",
        "secret_too_large",
        "template_invalid",
        "system_namespace",
        "invalid_configuration",
        "not_found",
    }
)


def is_ours(label: str) -> bool:
    """True for a version of the distribution's certificate (``v0``, ``v1``, …)."""
    return label.startswith("v") and label[1:].isdigit()


# ------------------------------------------------------------------------------ schedule


FAULT_KINDS = (
    "execute",
    "rollback",
    "worker_kill",
    "worker_term",
    "redis_restart",
    "redis_wipe",
    "postgres_restart",
    "apiserver_cut",
    "rival_label",
    "owner_rotate",
    "renew",
)
"""Every kind a round may hold. ``redis_wipe`` is a restart that keeps nothing (a Redis
without persistence); ``rival_label`` is another controller stamping a label on a target
Secret; ``owner_rotate`` is a team replacing the content of its own Secret while none of
ours is live there."""


@dataclass(frozen=True)
class Fault:
    """One scheduled event: ``at`` seconds after the round started."""

    at: float
    kind: str
    arg: int = 0
    """Which worker, cluster or target (taken modulo their count by the driver)."""
    seconds: float = 0.0
    """How long the fault lasts (apiserver cut) or until the replacement starts (workers)."""

    def describe(self) -> str:
        """One line for the event log."""
        extra = f" for {self.seconds:.1f}s" if self.seconds else ""
        return f"{self.kind}[{self.arg}]{extra}"


def fault_schedule(
    seed: int, *, duration: float, skip: frozenset[str] = frozenset()
) -> list[Fault]:
    """The round's events, sorted by time: the same seed gives the same schedule.

    Every kind occurs at least once (a short CI round still covers them all); executes come
    every 5-12 s, so a run is usually active; one rollback is requested shortly after an
    execute was (aimed at "during an execute"), others at random moments. Kinds in ``skip``
    are left out afterwards (the rest of the schedule stays as the seed made it).
    """
    if duration < 30:
        raise ValueError(f"a round needs at least 30 s of faults, got {duration}")
    unknown = sorted(set(skip) - set(FAULT_KINDS))
    if unknown or "execute" in skip:
        raise ValueError(
            f"cannot skip {', '.join(unknown) or 'execute'}; kinds that may be skipped: "
            f"{', '.join(kind for kind in FAULT_KINDS if kind != 'execute')}"
        )
    rng = random.Random(seed)
    events: list[Fault] = [Fault(0.0, "execute")]
    at = 0.0
    while True:
        at += rng.uniform(5.0, 12.0)
        if at >= duration - 5:
            break
        events.append(Fault(round(at, 2), "execute"))
    executes = [event.at for event in events]
    during = rng.choice(executes[: max(1, len(executes) - 1)]) + rng.uniform(0.5, 3.0)
    events.append(Fault(round(during, 2), "rollback", arg=0))

    def one(kind: str, start: float = 3.0) -> Fault:
        return Fault(
            round(rng.uniform(start, duration - 3), 2),
            kind,
            arg=rng.randrange(1_000),
            seconds=round(rng.uniform(*_LASTS.get(kind, (0.0, 0.0))), 1),
        )

    for kind in FAULT_KINDS:
        if kind != "execute":
            events.append(one(kind))
    # Then more of everything that is not an execute, about one every 6 s.
    extra = int(duration / 6)
    weights = {kind: _WEIGHTS[kind] for kind in FAULT_KINDS if kind != "execute"}
    for kind in rng.choices(list(weights), weights=list(weights.values()), k=extra):
        events.append(one(kind))
    kept = [event for event in events if event.kind not in skip]
    return sorted(kept, key=lambda event: (event.at, event.kind))


#: (min, max) seconds a fault lasts, or until its worker's replacement starts.
_LASTS = {
    "worker_kill": (0.5, 6.0),
    "worker_term": (0.5, 6.0),
    "apiserver_cut": (2.0, 12.0),
}
_WEIGHTS = {
    "rollback": 2,
    "worker_kill": 4,
    "worker_term": 3,
    "redis_restart": 1,
    "redis_wipe": 1,
    "postgres_restart": 1,
    "apiserver_cut": 3,
    "rival_label": 3,
    "owner_rotate": 2,
    "renew": 2,
}


# ------------------------------------------------------------------------------ contents


@dataclass(frozen=True)
class Version:
    """One content the scenario knows: its leaf (DER) and its key's public key (DER)."""

    label: str
    leaf_der: bytes
    public_key_der: bytes
    fingerprint: str
    """SHA-256 of the leaf DER, lower-case hex (the product's certificate fingerprint)."""


def version_of(label: str, leaf_pem: bytes, key_pem: bytes) -> Version:
    """A :class:`Version` from a leaf certificate and its private key (PEM)."""
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    return Version(
        label=label,
        leaf_der=leaf_der,
        public_key_der=_public_der(key.public_key()),
        fingerprint=hashlib.sha256(leaf_der).hexdigest(),
    )


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Identified:
    """What a Secret holds: a known label, or a problem (mixed or unknown content)."""

    label: str | None
    problem: str | None = None


def identify(tls_crt: bytes | None, tls_key: bytes | None, known: Iterable[Version]) -> Identified:
    """Name the content of a Secret's ``tls.crt`` / ``tls.key`` (None, None: no Secret).

    The leaf must be one the scenario knows and ``tls.key`` must be that leaf's key: a leaf of
    one version with the key of another (or of nothing known) is a *mix*, reported as such.
    """
    if tls_crt is None and tls_key is None:
        return Identified(ABSENT)
    if not tls_crt or not tls_key:
        return Identified(None, "tls.crt or tls.key is missing or empty")
    try:
        leaf = x509.load_pem_x509_certificates(tls_crt)[0]
        key = serialization.load_pem_private_key(tls_key, password=None)
    except ValueError as exc:
        return Identified(None, f"tls.crt/tls.key do not parse ({exc})")
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    key_der = _public_der(key.public_key())
    versions = list(known)
    by_leaf = next((v for v in versions if v.leaf_der == leaf_der), None)
    by_key = next((v for v in versions if v.public_key_der == key_der), None)
    if _public_der(leaf.public_key()) != key_der:
        return Identified(
            None,
            f"mix: the leaf of {by_leaf.label if by_leaf else 'an unknown certificate'} with "
            f"the key of {by_key.label if by_key else 'an unknown certificate'}",
        )
    if by_leaf is None:
        return Identified(None, "a leaf no version of the scenario has (another revision)")
    return Identified(by_leaf.label)


# ------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class RunRecord:
    """A mutating run as the driver enqueued it, with its outcome from the database."""

    run_id: str
    action: str
    """``execute`` or ``rollback``."""
    pinned: str | None
    """The certificate version current when the execute was enqueued (None for a rollback)."""
    state: str
    results: Mapping[str, tuple[str, str | None]]
    """target name -> (status, error reason)."""


@dataclass(frozen=True)
class OwnerWrite:
    """The team replaced the content of its own Secret (never while ours was live)."""

    target: str
    label: str


Step = RunRecord | OwnerWrite


@dataclass(frozen=True)
class TargetModel:
    """What one target may hold now, and what a rollback must restore."""

    live: frozenset[str]
    snapshot: frozenset[str] | None = None


def replay(initial: Mapping[str, str], steps: Sequence[Step]) -> dict[str, TargetModel]:
    """Apply ``steps`` in order to each target's ``initial`` content (see the module doc)."""
    model = {name: TargetModel(frozenset({label})) for name, label in initial.items()}
    for step in steps:
        if isinstance(step, OwnerWrite):
            before = model[step.target]
            model[step.target] = TargetModel(frozenset({step.label}), before.snapshot)
            continue
        for name, (status, reason) in step.results.items():
            if name in model:
                model[name] = _apply(step, model[name], status, reason)
    return model


def _apply(run: RunRecord, now: TargetModel, status: str, reason: str | None) -> TargetModel:
    if run.action == "execute":
        assert run.pinned is not None, run
        if status in WRITTEN:
            snapshot = now.snapshot
            if snapshot is None:
                snapshot = frozenset(label for label in now.live if not is_ours(label))
            return TargetModel(frozenset({run.pinned}), snapshot)
        if status == "failed" and reason not in REFUSED_BEFORE_WRITE:
            return TargetModel(now.live | {run.pinned}, now.snapshot)
        return now
    if run.action == "rollback":
        if status in RESTORED:
            if now.snapshot is None:  # nothing of ours landed: "unchanged" changed nothing
                return now
            # The snapshot becomes provisional: the next execute snapshots what is live then.
            return TargetModel(now.snapshot, None)
        if status == "failed" and reason not in REFUSED_BEFORE_WRITE and now.snapshot:
            return TargetModel(now.live | now.snapshot, now.snapshot)
        return now
    return now


def owner_may_write(model: TargetModel) -> bool:
    """True when the target surely holds the team's content (none of ours, not absent)."""
    return (
        model.snapshot is None
        and len(model.live) == 1
        and not any(is_ours(label) or label == ABSENT for label in model.live)
    )


# ----------------------------------------------------------------------------- checkers


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which, about what, and why."""

    invariant: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.subject}: {self.detail}"


def known_cause(violation: Violation) -> str | None:
    """A triage hint for a violation with the signature of a known open defect, else None.

    Only a hint printed next to the violation: the checkers stay strict.
    """
    detail = violation.detail
    if violation.invariant.endswith("secret-content") and detail.startswith("holds v"):
        held = detail.split()[1].rstrip(";")
        allowed = detail.split("allowed: ", 1)[-1].split(", ")
        ours = [label for label in allowed if is_ours(label)]
        if is_ours(held) and ours and all(int(held[1:]) > int(label[1:]) for label in ours):
            return "issue 17 §4: a later revision than the run pinned (renewed during the run)"
    if violation.invariant == "webhook" and "the run pinned" in detail:
        return "issue 17 §4: the webhook reports the current revision, not the pinned one"
    return None


@dataclass(frozen=True)
class ObservedRun:
    """A run as the database shows it after the faults stopped."""

    run_id: str
    action: str
    state: str
    results: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    webhook_run: str | None = None
    """The stacked webhook run it started (execute runs), if any."""
    stacked: bool = False
    """A run of a stacked distribution (the webhook), not of the Kubernetes one."""


def check_runs_final(runs: Iterable[ObservedRun]) -> list[Violation]:
    """Every run is final, and a final run has no target still pending or running."""
    found: list[Violation] = []
    for run in runs:
        if run.state in ("queued", "running"):
            found.append(Violation("run-final", run.run_id, f"{run.action} still {run.state}"))
            continue
        for name, (status, _) in sorted(run.results.items()):
            if status in ("pending", "running"):
                found.append(
                    Violation("run-final", run.run_id, f"final run has {name} still {status}")
                )
    return found


def check_no_internal_errors(runs: Iterable[ObservedRun]) -> list[Violation]:
    """No target failed with ``internal_error`` (an exception the worker did not expect)."""
    return [
        Violation("no-internal-error", run.run_id, f"{name} failed internal_error")
        for run in runs
        for name, (status, reason) in sorted(run.results.items())
        if status == "failed" and reason == "internal_error"
    ]


def check_secrets(
    model: Mapping[str, TargetModel], live: Mapping[str, Identified]
) -> list[Violation]:
    """Each Secret holds a content the model allows: the pinned revision of its last
    successful write, or the content before it; never a mix, never another revision."""
    found: list[Violation] = []
    for name, expected in sorted(model.items()):
        seen = live.get(name)
        if seen is None:
            found.append(Violation("secret-content", name, "not observed"))
        elif seen.problem is not None:
            found.append(Violation("secret-content", name, seen.problem))
        elif seen.label not in expected.live:
            found.append(
                Violation(
                    "secret-content",
                    name,
                    f"holds {seen.label}; allowed: {', '.join(sorted(expected.live))}",
                )
            )
    return found


@dataclass(frozen=True)
class ObservedSnapshot:
    """A rollback snapshot row: the content it holds and whether it is final."""

    label: str | None
    final: bool
    problem: str | None = None


def check_snapshots(
    model: Mapping[str, TargetModel], snapshots: Mapping[str, ObservedSnapshot]
) -> list[Violation]:
    """No snapshot holds our own content; a final one holds what was live before our first
    landed write of this generation."""
    found: list[Violation] = []
    for name, snapshot in sorted(snapshots.items()):
        if snapshot.problem is not None:
            found.append(Violation("snapshot", name, snapshot.problem))
            continue
        assert snapshot.label is not None
        if is_ours(snapshot.label):
            found.append(Violation("snapshot", name, f"holds our own content {snapshot.label}"))
            continue
        expected = model[name].snapshot if name in model else None
        if snapshot.final and expected is not None and snapshot.label not in expected:
            found.append(
                Violation(
                    "snapshot",
                    name,
                    f"final snapshot holds {snapshot.label}; what was live before our first "
                    f"write: {', '.join(sorted(expected)) or '(nothing)'}",
                )
            )
    return found


@dataclass(frozen=True)
class Delivery:
    """One POST the webhook receiver recorded."""

    delivery_id: str | None
    trigger_run_id: str | None
    fingerprint: str | None


def check_webhooks(
    runs: Iterable[ObservedRun],
    deliveries: Sequence[Delivery],
    pinned_fingerprints: Mapping[str, str],
) -> list[Violation]:
    """Every succeeded execute delivered its webhook at least once, always with one delivery
    id (its webhook run's id), reporting the revision that execute pinned."""
    found: list[Violation] = []
    by_trigger: dict[str | None, list[Delivery]] = {}
    for delivery in deliveries:
        by_trigger.setdefault(delivery.trigger_run_id, []).append(delivery)
    for run in runs:
        if run.stacked or run.action != "execute" or run.state != "succeeded":
            continue
        got = by_trigger.get(run.run_id, [])
        if run.webhook_run is None:
            found.append(Violation("webhook", run.run_id, "succeeded but no webhook run exists"))
            continue
        if not got:
            found.append(Violation("webhook", run.run_id, "succeeded but nothing was delivered"))
            continue
        ids = {delivery.delivery_id for delivery in got}
        if ids != {run.webhook_run}:
            found.append(
                Violation(
                    "webhook",
                    run.run_id,
                    f"{len(got)} deliveries with ids {sorted(map(str, ids))}, expected only "
                    f"{run.webhook_run}",
                )
            )
        pinned = pinned_fingerprints.get(run.run_id)
        reported = {delivery.fingerprint for delivery in got}
        if pinned is not None and reported != {pinned}:
            found.append(
                Violation(
                    "webhook",
                    run.run_id,
                    f"reported certificate {sorted(map(str, reported))}, the run pinned {pinned}",
                )
            )
    return found


def delivery_from_request(headers: Mapping[str, str], body: bytes) -> Delivery:
    """Read a recorded webhook POST (header lookup is case-insensitive)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    try:
        payload = json.loads(body)
    except ValueError:
        payload = {}
    certificate = payload.get("certificate") or {}
    return Delivery(
        delivery_id=lowered.get("x-certautopilot-delivery"),
        trigger_run_id=payload.get("trigger_run_id"),
        fingerprint=certificate.get("sha256_fingerprint"),
    )
