"""The run state machine: start a run, process one target, advance batches, reap stalls.

The database is the source of truth (DESIGN.md decision 5). Redis, or the
embedded broker, only carries messages that say "look at run X / target Y";
every step here re-reads the database and decides from what it finds, so a
message delivered twice, late, or never is harmless:

* ``start_run`` moves a queued run to running with compare-and-set and creates
  one pending result per target; a duplicate start finds the run running.
* ``process_targets`` claims the result rows of one message's targets with
  compare-and-set (a lease of ``stale_after`` seconds on the database's clock, renewed by a
  thread while the message works), does each target's work in turn outside any transaction,
  and records each outcome only if it still holds that claim (one transaction for the
  claims, one for the records). It never raises for a target's failure: the failure is
  recorded and the batch goes on.
* After its last record, each message checks (in a new transaction) whether its
  batch has an open row left; the one that finishes the batch last, as the
  database sees it, asks for ``advance_run``; the advance compares-and-sets the
  batch index, so of several concurrent advances exactly one acts. This replaces a
  chord counter, which would live only in the result backend and would
  double-count redeliveries.
* ``reap`` re-sends only work that is really lost: targets whose claim's lease expired (the
  worker holding them died), targets sent longer than ``resend_after`` ago that nobody
  claimed (a message lost with a Redis restart), a finished batch whose callback did not
  come within ``stale_after``, and starts of runs still queued after ``resend_after``; it
  writes on the run that it did so. A long, healthy run is never touched.

Celery is not imported here: tasks/ hands in a :class:`~worker.app.dispatch.Dispatcher`. The
statements live in :mod:`models.queries` (runs, results); the webhook run is
:mod:`worker.app.webhook`; API clients come from :mod:`worker.app.clients`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from models import queries
from models.base import utcnow
from models.entities import CertificateRevision, Distribution, Run, Target, TargetGroup
from models.enums import DistributionKind, ResultStatus, RunAction, RunState
from models.errors import DATABASE_OUTAGE_ERRORS
from worker.app.clients import kube_client
from worker.app.dispatch import Dispatcher, queue_next_stacked
from worker.app.fanout import group_fanout
from worker.app.metrics import (
    observe_reaper,
    observe_run_finished,
    observe_skipped,
    observe_target,
)
from worker.app.pools import check_cluster, hold_back_silent_pools
from worker.app.serving import ServingRequest, verify_requests
from worker.app.webhook import redeliver_webhook, run_webhook
from worker.core.bundle import (
    BundleError,
    CertificateInfo,
    TlsBundle,
    build_bundle,
    describe_certificates,
)
from worker.core.crypto import CryptoError
from worker.core.fanout import (
    BatchDecision,
    FanoutConfigError,
    decide_after_batch,
    parse_batch_size,
    plan_batches,
)
from worker.core.formats import output_formats
from worker.core.lru import LruCache
from worker.core.names import (
    SystemNamespaceRefused,
    TemplateError,
    refuse_system_namespace,
    render_namespace,
    render_secret_name,
    template_variables,
)
from worker.core.secret import desired_secret
from worker.core.serving import (
    DEFAULT_DEADLINE_SECONDS,
    OWN_CHAIN,
    REQUIRE_SERVING_OPTION,
    EndpointResult,
    ServingState,
    default_sni,
    not_serving_message,
    parse_endpoint,
    summarise,
    verification_window,
)
from worker.core.snapshot import PreviousSecret
from worker.kube.client import KubeClient
from worker.kube.consumers import list_consumers
from worker.kube.deploy import DeployOutcome, audit_secret, deploy_secret, rollback_secret
from worker.kube.errors import KubeError
from worker.platform.logs import log_context
from worker.platform.runtime import Runtime

__all__ = [
    "DATABASE_OUTAGE_ERRORS",
    "HEARTBEAT_EVERY",
    "Dispatcher",
    "ReapReport",
    "TargetJob",
    "TargetOutcome",
    "advance_run",
    "claim_lease",
    "process_targets",
    "reap",
    "start_run",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest interval between two heartbeats of a running run (seconds; capped at a tenth of
#: the reaper's stale_after).
HEARTBEAT_EVERY = 1.0

_OPEN = (ResultStatus.PENDING, ResultStatus.RUNNING)


# ------------------------------------------------------------------------------ start


def start_run(rt: Runtime, dispatch: Dispatcher, run_id: str) -> None:
    """Plan a queued run into batches and dispatch its first batch (idempotent)."""
    first_batch: list[str] = []
    webhook = False
    try:
        with rt.session() as session:
            now = queries.database_now(session)
            try:
                run = queries.get_run(session, run_id)
            except queries.NotFoundError:
                log.warning("run %s does not exist; nothing to start", run_id)
                return
            if run.state is not RunState.QUEUED:
                return  # a duplicate or late start message: the run already went on
            distribution = queries.get_distribution(session, run.distribution_id)
            if distribution.kind is DistributionKind.WEBHOOK:
                queries.start_run(session, run_id, batch_plan=[], now=now)
                webhook = True
            else:
                try:
                    plan = _plan(rt, session, distribution, run.action)
                except FanoutConfigError as exc:
                    queries.finish_run(
                        session, run_id, RunState.FAILED, now=now, reason=f"cannot plan: {exc}"
                    )
                    observe_run_finished(distribution.kind, run)
                    return
                queries.start_run(session, run_id, batch_plan=plan, now=now)
                first_batch = plan[0]
    except queries.RunStateError:
        # A duplicate start delivered at the same moment read "queued" too, then lost the
        # compare-and-set (the row lock) to this one's twin: the run is already going on.
        return
    if webhook:
        run_webhook(rt, dispatch, run_id)
    else:
        dispatch.process_targets(run_id, first_batch)


def _group(session: Session, distribution: Distribution) -> TargetGroup | None:
    if distribution.group_id is None:
        return None
    return queries.get_group(session, distribution.group_id)


#: An audit reads and writes nothing: a canary batch protects nothing, so all targets go in one
#: batch (still split into messages of up to 32 targets, per pool).
_AUDIT_BATCH = parse_batch_size("100%")


def _plan(
    rt: Runtime, session: Session, distribution: Distribution, action: RunAction
) -> list[list[str]]:
    # Ids only: planning a large fleet builds no ORM object per target.
    target_ids = queries.distribution_target_ids(session, distribution)
    if action is RunAction.AUDIT:
        return plan_batches(target_ids, _AUDIT_BATCH)
    fanout = group_fanout(rt, _group(session, distribution))
    return plan_batches(target_ids, fanout.batch_size)


# --------------------------------------------------------------------- process a target


@dataclass(frozen=True)
class TargetJob:
    """Everything one target's work needs, read in one short transaction."""

    run_id: str
    action: RunAction
    options: Mapping[str, Any]
    distribution_id: str
    store_content: bool
    target: Target
    certificate: CertificateRevision
    """The revision the run was pinned to when it was enqueued (every message deploys it)."""
    group_variables: Mapping[str, Any]
    batch_index: int
    attempt: int
    claimed_at: datetime
    """The ``started_at`` this delivery's claim wrote (the result's duration counts from it)."""
    credential_envelope: bytes | None = field(default=None, repr=False)
    """The target's sealed kubeconfig, to find the cached client without another query."""
    snapshot_final: bool = False
    """A final rollback snapshot (one our write landed after) existed at the claim."""
    pkcs12_envelope: bytes | None = field(default=None, repr=False)
    """The sealed password of the target's PKCS#12 keystore (None: no keystore)."""

    def keystore_password(self, rt: Runtime) -> bytes | None:
        """The target's PKCS#12 password, unsealed now (None when it writes no keystore)."""
        credential_id = self.target.pkcs12_credential_id
        if credential_id is None or self.pkcs12_envelope is None:
            return None
        return queries.unseal_credential(rt.sealer, credential_id, self.pkcs12_envelope)

    revisions: Mapping[str, int] = field(default_factory=dict)
    """Audit runs: every revision of the certificate, {SHA-256 fingerprint: number}."""
    require_serving: bool = False
    """The group counts a target whose endpoints do not serve the new leaf as failed."""

    @property
    def pool(self) -> str:
        """The worker pool that processes this target (a label for metrics)."""
        return self.target.pool

    @property
    def claim(self) -> queries.HeldClaim:
        """The claim this job holds on its result row."""
        return queries.HeldClaim(self.run_id, self.target.id, self.attempt)


@dataclass
class TargetOutcome:
    """What happened to one target, as recorded in its result row."""

    status: ResultStatus
    diff: dict[str, Any] | None = None
    error_reason: str | None = None
    error_message: str | None = None
    resource_version: str | None = None
    secret_name: str | None = None
    namespace: str | None = None
    finished_at: datetime | None = None
    duration_ms: int = 0
    """The target's own processing time (targets of a message are processed in turn)."""
    deployed_serial: str | None = None
    deployed_not_after: datetime | None = None
    finding: dict[str, Any] | None = None
    """Audit runs: what the read found (worker.core.audit.AuditFinding.to_dict())."""
    serving_status: str | None = None
    serving: list[dict[str, Any]] | None = None
    """Verify serving, per endpoint (worker.core.serving.EndpointResult.to_dict())."""


def process_targets(
    rt: Runtime,
    dispatch: Dispatcher,
    run_id: str,
    target_ids: Sequence[str],
    *,
    start_before: float | None = None,
    serving_before: float | None = None,
    interrupted_by: tuple[type[BaseException], ...] = (),
) -> list[str]:
    """Process the targets of one message, then ask for the batch to advance if it is done.

    The targets are claimed together (one transaction), processed in turn outside any
    transaction, and recorded together (one transaction): per-target transactions were
    half of a worker's CPU per target (bench/). While they are processed, a thread renews
    the message's claims, so a long healthy message never looks lost.

    A target after the first starts only while ``time.monotonic()`` is below
    ``start_before``. A target interrupted by one of ``interrupted_by`` (the task's soft
    time limit) is not a failure of the target: it is given back with those not started, and
    their ids are returned for the caller to re-queue; what finished before is recorded.

    Verify serving runs after the message's writes, for all of its targets that name
    endpoints at once (worker.app.serving): a message costs at most one deadline however
    many targets it holds, and never past ``serving_before`` (``time.monotonic()``; the
    task's soft time limit minus the time the record needs). The claims of those targets
    stay renewed meanwhile, and their outcomes are recorded with everything else after it.
    """
    # A database outage while claiming rolls the claims back and propagates: the task retries.
    jobs = _claim(rt, run_id, target_ids)
    finished: list[tuple[TargetJob, TargetOutcome]] = []
    not_started: list[TargetJob] = []
    with _LeaseKeeper(rt, [job.claim for job in jobs]) as keeper:
        for index, job in enumerate(jobs):
            if index and start_before is not None and time.monotonic() > start_before:
                not_started = jobs[index:]
                break
            try:
                with log_context(target_id=job.target.id, batch=job.batch_index + 1):
                    outcome = _process_one(rt, job, interrupted_by)
            except interrupted_by:
                log.warning(
                    "run %s target %s: interrupted by the task's time limit; given back to be "
                    "done again (%d target(s) of this message re-queued)",
                    run_id,
                    job.target.id,
                    len(jobs) - index,
                )
                not_started = jobs[index:]
                break
            finished.append((job, outcome))
            if not _verifies_serving(job, outcome):
                keeper.finished(job.claim)
        _verify_serving(rt, finished, serving_before, interrupted_by)
    # What landed is recorded first: an outage that outlasts the retries after this loses
    # only the give-back (those claims expire and the reaper re-sends them).
    if finished:
        _through_outage(rt, partial(_record, rt, finished))
    if not_started:
        _through_outage(rt, partial(_release, rt, not_started))
    # One check per batch after the record committed is enough: whoever records a batch's
    # last open row checks after that commit and sees every earlier one.
    for batch_index in sorted({job.batch_index for job, _ in finished}):
        if _through_outage(rt, partial(_batch_is_done, rt, run_id, batch_index)):
            dispatch.advance(run_id, batch_index)
    return [job.target.id for job in not_started]


class _LeaseKeeper:
    """Renews a message's claims while it works on them (a thread in the pool process).

    A claim holds for ``lease_seconds`` on the database's clock; the keeper extends those not
    finished yet every quarter of that. If the process dies, renewals stop and the claims
    expire: that, not a long target, is what lets another delivery or the reaper take over.
    """

    def __init__(self, rt: Runtime, claims: Sequence[queries.HeldClaim]) -> None:
        self._rt = rt
        self._held = {(claim.target_id, claim.attempt): claim for claim in claims}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="certautopilot-lease-keeper", daemon=True
        )

    def __enter__(self) -> _LeaseKeeper:
        if self._held:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def finished(self, claim: queries.HeldClaim) -> None:
        """Stop renewing a claim whose outcome is about to be recorded."""
        with self._lock:
            self._held.pop((claim.target_id, claim.attempt), None)

    def _run(self) -> None:
        lease = self._rt.settings.tasks.lease_seconds
        while not self._stopping.wait(lease / 4):
            with self._lock:
                held = list(self._held.values())
            if not held:
                continue
            try:
                with self._rt.session() as session:
                    now = queries.database_now(session)
                    queries.renew_claims(session, held, lease_until=now + timedelta(seconds=lease))
            except Exception as exc:  # noqa: BLE001 - a renewal that fails is retried next turn
                log.warning("could not renew %d claim(s) (%s)", len(held), type(exc).__name__)


def _process_one(
    rt: Runtime, job: TargetJob, interrupted_by: tuple[type[BaseException], ...] = ()
) -> TargetOutcome:
    """Deploy, dry-run or roll back one claimed target; its outcome is recorded later."""
    started = time.monotonic()
    outcome = _perform(rt, job, interrupted_by)
    outcome.duration_ms = round((time.monotonic() - started) * 1000)
    outcome.finished_at = utcnow()
    if not _verifies_serving(job, outcome):
        _observe(rt, job, outcome)  # else once serving is known (it may fail the target)
    return outcome


def _observe(rt: Runtime, job: TargetJob, outcome: TargetOutcome) -> None:
    log.info(
        "run %s target %s: %s%s (%d ms)%s",
        job.run_id,
        job.target.id,
        outcome.status.value,
        f" [{outcome.error_reason}]" if outcome.error_reason else "",
        outcome.duration_ms,
        f"; serving {outcome.serving_status}" if outcome.serving_status else "",
    )
    observe_target(
        rt, job.action, job.target, outcome.status, outcome.error_reason, outcome.duration_ms / 1000
    )


_WRITTEN = (ResultStatus.CREATED, ResultStatus.UPDATED, ResultStatus.UNCHANGED)


def _verifies_serving(job: TargetJob, outcome: TargetOutcome) -> bool:
    """An execute that wrote (or found unchanged) the Secret of a target naming endpoints."""
    return (
        job.action is RunAction.EXECUTE
        and outcome.status in _WRITTEN
        and bool(job.target.serving_endpoints)
    )


def _verify_serving(
    rt: Runtime,
    finished: Sequence[tuple[TargetJob, TargetOutcome]],
    serving_before: float | None,
    interrupted_by: tuple[type[BaseException], ...],
) -> None:
    """Probe the endpoints of the written targets concurrently; put the verdicts on their
    outcomes (a failed target, reason not_serving, when the group requires serving)."""
    due = [(job, outcome) for job, outcome in finished if _verifies_serving(job, outcome)]
    if not due:
        return
    now = time.monotonic()
    seconds_left = float("inf") if serving_before is None else serving_before - now
    requests = []
    for job, _ in due:
        configured = job.target.serving_deadline_seconds or DEFAULT_DEADLINE_SECONDS
        window, cut = verification_window(configured, seconds_left=seconds_left)
        if cut:
            log.warning(
                "run %s target %s: serving deadline cut from %ss to %.0fs by the task's soft "
                "time limit",
                job.run_id,
                job.target.id,
                configured,
                window,
            )
        requests.append(_serving_request(rt, job, window, serving_before))
    try:
        verdicts = verify_requests(requests)
    except interrupted_by:
        # The soft limit came anyway: the writes are done and stay recorded, unverified.
        verdicts = {
            job.target.id: [
                EndpointResult(
                    endpoint,
                    ServingState.NOT_VERIFIED,
                    0.0,
                    0,
                    reason="interrupted by the task's soft time limit",
                )
                for endpoint in job.target.serving_endpoints
            ]
            for job, _ in due
        }
    for job, outcome in due:
        results = verdicts[job.target.id]
        state = summarise(results)
        outcome.serving_status = state.value
        outcome.serving = [result.to_dict() for result in results]
        if state is not ServingState.VERIFIED and job.require_serving:
            written = outcome.status.value
            outcome.status = ResultStatus.FAILED
            outcome.error_reason = "not_serving"
            outcome.error_message = not_serving_message(written, results)
        _observe(rt, job, outcome)


def _serving_request(
    rt: Runtime, job: TargetJob, window: float, until: float | None
) -> ServingRequest:
    bundle = _bundle(rt, job.certificate)  # cached by revision since the write
    ca = job.target.serving_ca
    if ca == OWN_CHAIN:
        own = [pem.decode("ascii") for pem in bundle.chain_pems]
        if bundle.ca_pem is not None:
            own.append(bundle.ca_pem.decode("ascii"))
        # Without intermediates or a CA, the leaf itself is the only anchor there is.
        ca = "".join(own) or bundle.leaf_pem.decode("ascii")
    return ServingRequest(
        key=job.target.id,
        endpoints=tuple(parse_endpoint(text) for text in job.target.serving_endpoints),
        expected_sha256=bundle.leaf.sha256_fingerprint,
        sni=default_sni(bundle.leaf.common_name, bundle.leaf.sans),
        deadline=window,
        until=until,
        public_only=job.target.serving_public_only,
        ca_pem=ca,
    )


def _through_outage(rt: Runtime, step: Callable[[], T]) -> T:
    """Run ``step``, repeating it while the database is unreachable, for at most the database
    retry time (shorter than a claim's lease, which cannot be renewed meanwhile; counted in
    worker.core.budget); then let the error propagate."""
    retrying = Retrying(
        retry=retry_if_exception_type(DATABASE_OUTAGE_ERRORS),
        wait=wait_exponential(multiplier=0.25, max=5),
        stop=stop_after_delay(rt.settings.tasks.database_retry_seconds),
        before_sleep=_log_outage,
        reraise=True,
    )
    return retrying(step)


def _log_outage(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    # The class name only: a driver's message may quote connection parameters.
    log.warning("database unavailable (%s); retrying", type(error).__name__)


def claim_lease(rt: Runtime) -> timedelta:
    """How long a claim holds unless its message renews it."""
    return timedelta(seconds=rt.settings.tasks.lease_seconds)


def _claim(rt: Runtime, run_id: str, target_ids: Sequence[str]) -> list[TargetJob]:
    """Claim whichever of ``target_ids`` are free, in one transaction; their jobs, in order."""
    # Three statements for the whole message: every round trip here used to be paid once
    # per target, and the database, not the Kubernetes API, dominated (py-spy, bench/).
    with rt.session() as session:
        # The database's clock comes with the run (one statement, not two).
        loaded = queries.load_run_context_at(session, run_id)
        if loaded is None or loaded[0].state is not RunState.RUNNING:
            return []
        run, distribution, certificate, variables, now = loaded
        claims = queries.claim_results(
            session, run_id, target_ids, now=now, lease_until=now + claim_lease(rt)
        )
        if not claims:
            return []  # all final already, or held by other deliveries
        targets = queries.load_claimed_targets(session, distribution.id, list(claims))
        # One statement per message, for audits only: what the deployed leaf is compared with.
        revisions = (
            queries.revision_numbers(session, certificate.certificate_id)
            if run.action is RunAction.AUDIT
            else {}
        )
    jobs = []
    for target_id in dict.fromkeys(target_ids):  # message order, each target once
        claim = claims.get(target_id)
        if claim is None:
            continue
        loaded_target = targets[target_id]
        jobs.append(
            TargetJob(
                run_id=run_id,
                action=run.action,
                options=dict(run.options or {}),
                distribution_id=distribution.id,
                store_content=distribution.store_content,
                target=loaded_target.target,
                certificate=certificate,
                group_variables=variables,
                batch_index=claim.batch_index,
                attempt=claim.attempts,
                claimed_at=now,
                credential_envelope=loaded_target.credential_envelope,
                snapshot_final=loaded_target.snapshot_final,
                pkcs12_envelope=loaded_target.pkcs12_envelope,
                revisions=revisions,
                require_serving=bool((run.options or {}).get(REQUIRE_SERVING_OPTION, False)),
            )
        )
    return jobs


def _perform(
    rt: Runtime, job: TargetJob, interrupted_by: tuple[type[BaseException], ...] = ()
) -> TargetOutcome:
    outcome = TargetOutcome(status=ResultStatus.FAILED)
    audit = job.action is RunAction.AUDIT
    try:
        # An audit needs the leaf for the name templates, never the private key.
        leaf = _leaf(job.certificate) if audit else _bundle(rt, job.certificate).leaf
        variables = template_variables(
            leaf,
            group_variables=job.group_variables,
            target_variables=job.target.variables,
        )
        outcome.namespace = render_namespace(job.target.namespace_template, variables)
        refuse_system_namespace(
            outcome.namespace,
            allowed=job.target.allow_system_namespace,
            target=job.target.name,
        )
        outcome.secret_name = render_secret_name(job.target.secret_name_template, variables)
        check_cluster(rt, job.target)  # in-cluster: this worker runs in the target's cluster
        client = _through_outage(
            rt,
            lambda: kube_client(rt, job.target, sealed_credential=job.credential_envelope),
        )
        if audit:
            _audit(job, client, outcome)
            return outcome
        if job.action is RunAction.ROLLBACK:
            deployed = _rollback(rt, job, client, outcome.namespace, outcome.secret_name)
        else:
            bundle = _bundle(rt, job.certificate)
            deployed = _deploy(rt, job, client, bundle, outcome.namespace, outcome.secret_name)
        outcome.status = _result_status(job.action, deployed.action)
        outcome.diff = deployed.diff.to_dict() if deployed.diff is not None else None
        if job.action is RunAction.DRY_RUN and outcome.diff is not None:
            # Who picks the change up (volume mounts) and who needs a restart (env, subPath).
            consumers = list_consumers(client, outcome.namespace, outcome.secret_name)
            outcome.diff["consumers"] = consumers.to_dict()
        outcome.resource_version = deployed.resource_version
    except KubeError as exc:
        outcome.error_reason, outcome.error_message = exc.reason, str(exc)
        # A refusal (unmanaged, other type, immutable, drift) carries the diff that
        # explains it; keep it on the result so `runs show --diff` can show why.
        refused_diff = exc.details.get("diff")
        if isinstance(refused_diff, dict):
            outcome.diff = refused_diff
    except TemplateError as exc:
        outcome.error_reason, outcome.error_message = "template_invalid", str(exc)
    except SystemNamespaceRefused as exc:
        outcome.error_reason, outcome.error_message = exc.reason, str(exc)
    except BundleError as exc:
        outcome.error_reason, outcome.error_message = "certificate_invalid", str(exc)
    except CryptoError as exc:
        outcome.error_reason, outcome.error_message = "decryption_failed", str(exc)
    except queries.NotFoundError as exc:
        outcome.error_reason, outcome.error_message = "not_found", str(exc)
    except DATABASE_OUTAGE_ERRORS:
        raise  # not the target's fault, and longer than the in-task retries: the task retries
    except interrupted_by:
        raise  # the task's time limit, not the target's failure: the caller gives it back
    except ValueError as exc:  # e.g. a target variable whose name templates cannot use
        outcome.error_reason, outcome.error_message = "invalid_configuration", str(exc)
    except Exception as exc:  # a target's failure must never stop its batch
        log.exception("run %s target %s: unexpected error", job.run_id, job.target.id)
        outcome.error_reason = "internal_error"
        outcome.error_message = (
            f"internal error ({type(exc).__name__}); the worker log has the traceback"
        )
    if outcome.error_reason is not None:
        outcome.status = ResultStatus.FAILED
    return outcome


def _result_status(action: RunAction, deploy_action: str) -> ResultStatus:
    """Map the Kubernetes module's outcome onto the result row's status."""
    if action is RunAction.ROLLBACK and deploy_action in ("created", "updated"):
        return ResultStatus.ROLLED_BACK
    if deploy_action == "would_be_unchanged":
        return ResultStatus.UNCHANGED
    return ResultStatus(deploy_action)


def _audit(job: TargetJob, client: KubeClient, outcome: TargetOutcome) -> None:
    """One GET, classified against the pinned revision; fills ``outcome`` (writes nothing)."""
    assert outcome.namespace is not None and outcome.secret_name is not None
    read = audit_secret(
        client,
        namespace=outcome.namespace,
        name=outcome.secret_name,
        revisions=job.revisions,
        pinned_revision=job.certificate.number,
    )
    finding = read.finding
    outcome.status = ResultStatus(finding.state)
    outcome.resource_version = read.resource_version
    outcome.finding = finding.to_dict()
    if finding.leaf is not None:
        outcome.deployed_serial = finding.leaf.serial_hex
        outcome.deployed_not_after = finding.leaf.not_after


#: Described leaves by certificate revision id (a revision never changes): audits render the
#: name templates from it without opening the private key.
_leaves: LruCache[str, CertificateInfo] = LruCache(256)


def _leaf(certificate: CertificateRevision) -> CertificateInfo:
    cached = _leaves.get(certificate.id)
    if cached is None:
        cached = describe_certificates(certificate.leaf_pem.encode("ascii"))[0]
        _leaves.put(certificate.id, cached)
    return cached


def _bundle(rt: Runtime, certificate: CertificateRevision) -> TlsBundle:
    # A revision never changes: its id alone names the bundle, and the leaf, chain and key
    # all come from that one row (a renewal in between cannot pair an old leaf with a new key).
    key = certificate.id
    cached: TlsBundle | None = rt.bundles.get(key)
    if cached is not None:
        return cached

    def reveal_key() -> bytes:
        with rt.session() as session:
            return queries.reveal_revision_key(session, rt.sealer, certificate.id)

    key_pem = _through_outage(rt, reveal_key)
    bundle = build_bundle(
        certificate.leaf_pem.encode("ascii"),
        key_pem,
        certificate.chain_pem.encode("ascii"),
        certificate.ca_pem.encode("ascii") if certificate.ca_pem else None,
        now=utcnow(),
    )
    rt.bundles.put(key, bundle)
    return bundle


class _DatabaseSnapshotStore:
    """Rollback snapshots through the database (sealed; provisional until our write lands)."""

    def __init__(self, rt: Runtime, distribution_id: str, target_id: str, *, final: bool) -> None:
        self._rt = rt
        self._distribution_id = distribution_id
        self._target_id = target_id
        self._final = final

    def snapshot_is_final(self) -> bool:
        # Read with the claim. A stale "no" is harmless: saving never replaces a snapshot
        # that became final meanwhile.
        return self._final

    def save_snapshot(self, previous: PreviousSecret, *, replace_provisional: bool = True) -> None:
        def save() -> None:
            with self._rt.session() as session:
                queries.save_snapshot(
                    session,
                    self._rt.sealer,
                    distribution_id=self._distribution_id,
                    target_id=self._target_id,
                    previous=previous.to_dict(),
                    replace_provisional=replace_provisional,
                )

        _through_outage(self._rt, save)


def _deploy(
    rt: Runtime,
    job: TargetJob,
    client: KubeClient,
    bundle: TlsBundle,
    namespace: str,
    secret_name: str,
) -> DeployOutcome:
    keystore_password = job.keystore_password(rt)
    desired = desired_secret(
        name=secret_name,
        namespace=namespace,
        tls_crt=bundle.tls_crt(),
        tls_key=bundle.tls_key(),
        ca_crt=bundle.ca_crt() if job.target.include_ca else None,
        leaf=bundle.leaf,
        distribution_id=job.distribution_id,
        extra_data=output_formats(
            bundle, combined=job.target.combined_pem, keystore_password=keystore_password
        ),
    )
    dry_run = job.action is RunAction.DRY_RUN
    store = (
        _DatabaseSnapshotStore(rt, job.distribution_id, job.target.id, final=job.snapshot_final)
        if job.store_content and not dry_run
        else None
    )
    outcome = deploy_secret(
        client,
        desired,
        dry_run=dry_run,
        server_dry_run=rt.settings.kube.server_dry_run,
        adopt_unmanaged=job.target.adopt_unmanaged,
        snapshot_store=store,
        keystore_password=keystore_password,
    )
    if store is not None and outcome.action in ("created", "updated", "unchanged"):

        def record_write() -> None:
            with rt.session() as session:
                queries.record_snapshot_write(
                    session,
                    job.distribution_id,
                    job.target.id,
                    fingerprint=bundle.leaf.sha256_fingerprint,
                    resource_version=outcome.resource_version,
                )

        # After the write: retried on its own so an outage here does not redo the write
        # (which would then be reported "unchanged" instead of what this run did).
        _through_outage(rt, record_write)
    return outcome


def _rollback(
    rt: Runtime, job: TargetJob, client: KubeClient, namespace: str, secret_name: str
) -> DeployOutcome:
    def reveal() -> tuple[str | None, dict[str, Any]]:
        with rt.session() as session:
            snapshot, previous = queries.reveal_snapshot(
                session, rt.sealer, job.distribution_id, job.target.id
            )
            return snapshot.written_fingerprint, previous

    written_fingerprint, previous = _through_outage(rt, reveal)
    outcome = rollback_secret(
        client,
        namespace=namespace,
        name=secret_name,
        previous=PreviousSecret.from_dict(previous),
        written_fingerprint=written_fingerprint,
        force=bool(job.options.get("force", False)),
        keystore_password=job.keystore_password(rt),
    )

    def reopen_snapshot() -> None:
        with rt.session() as session:
            queries.make_snapshot_provisional(session, job.distribution_id, job.target.id)

    # The previous Secret is back: the next execute snapshots whatever is live by then.
    _through_outage(rt, reopen_snapshot)
    return outcome


def _record(rt: Runtime, finished: Sequence[tuple[TargetJob, TargetOutcome]]) -> None:
    """Write the outcomes whose claims this delivery still holds, in one transaction."""
    now = utcnow()
    records = [
        queries.ResultRecord(
            claim=job.claim,
            status=outcome.status,
            diff=outcome.diff,
            error_reason=outcome.error_reason,
            error_message=outcome.error_message,
            finished_at=outcome.finished_at or now,
            duration_ms=outcome.duration_ms,
            resource_version=outcome.resource_version,
            secret_name=outcome.secret_name,
            namespace=outcome.namespace,
            deployed_serial=outcome.deployed_serial,
            deployed_not_after=outcome.deployed_not_after,
            finding=outcome.finding,
            serving_status=outcome.serving_status,
            serving=outcome.serving,
        )
        for job, outcome in finished
    ]
    run_id = finished[0][0].run_id
    with rt.session() as session:
        written = queries.record_results(session, records)
        # The heartbeat tells the reaper when the run last recorded (a finished batch whose
        # callback is overdue); writing it at most every HEARTBEAT_EVERY keeps concurrent
        # messages from queueing on the run row's lock.
        # On the database's clock, read inside the UPDATE (no SELECT now() round trip).
        every = timedelta(seconds=min(HEARTBEAT_EVERY, rt.settings.tasks.stale_after / 10))
        queries.heartbeat_now(session, run_id, every=every)
    if 0 <= written < len(records):
        # A lease expired (the message outlived it) and another delivery took those
        # targets over: it records its own outcomes.
        log.warning(
            "run %s: %d of %d outcomes not recorded; their claims were taken over",
            run_id,
            len(records) - written,
            len(records),
        )


def _release(rt: Runtime, jobs: Sequence[TargetJob]) -> None:
    """Give back claims this delivery will not start (re-queued by the caller)."""
    with rt.session() as session:
        now = queries.database_now(session)
        queries.release_claims(session, [job.claim for job in jobs], now=now)


def _batch_is_done(rt: Runtime, run_id: str, batch_index: int) -> bool:
    # Runs in its own transaction, after the record committed: of two targets finishing
    # together, the later commit is then sure to see both (inside one transaction neither
    # might).
    with rt.session() as session:
        return not queries.batch_has_open_row(session, run_id, batch_index)


# --------------------------------------------------------------------------- advance


def advance_run(rt: Runtime, dispatch: Dispatcher, run_id: str, batch_index: int) -> None:
    """After batch ``batch_index`` finished: start the next one, halt, or finish the run.

    A webhook run has no batches: its batch index counts delivery attempts, and an advance
    (which the reaper sends when the delivering worker went silent) claims the next attempt
    with the same compare-and-set, so of concurrent advances exactly one redelivers.
    """
    next_batch: list[str] = []
    cascade_run_id: str | None = None
    redeliver = False
    with rt.session() as session:
        now = queries.database_now(session)
        try:
            run = queries.get_run(session, run_id)
        except queries.NotFoundError:
            return
        if run.state is not RunState.RUNNING or run.current_batch != batch_index:
            return
        if run.batch_plan:
            next_batch, cascade_run_id = _after_batch(rt, session, run, batch_index, now)
        else:
            redeliver = queries.advance_batch(session, run_id, from_batch=batch_index, now=now)
    if redeliver:
        redeliver_webhook(rt, dispatch, run_id, attempt=batch_index + 1)
    if next_batch:
        dispatch.process_targets(run_id, next_batch)
    if cascade_run_id is not None:
        dispatch.start(cascade_run_id)


def _after_batch(
    rt: Runtime, session: Session, run: Run, batch_index: int, now: datetime
) -> tuple[list[str], str | None]:
    """Decide what follows a finished batch: (the next batch's targets, a stacked run to start)."""
    run_id = run.id
    batch_counts = queries.count_results(session, run_id, batch_index=batch_index)
    # Never decide a batch with open rows, nor an empty one (there is nothing to decide).
    if not batch_counts or any(batch_counts.get(status, 0) for status in _OPEN):
        return [], None
    all_counts = queries.count_results(session, run_id)
    total = sum(all_counts.values())
    failed = all_counts.get(ResultStatus.FAILED, 0)
    distribution = queries.get_distribution(session, run.distribution_id)
    if run.action is RunAction.AUDIT:
        # Read-only: a failed read harms nothing, so nothing halts an audit; the group's
        # failure threshold does not apply (the run ends failed if any target was unreadable).
        decision = BatchDecision(halt=False, reason=None)
    else:
        decision = decide_after_batch(
            total_targets=total,
            failed_so_far=failed,
            batch_size=sum(batch_counts.values()),
            batch_failed=batch_counts.get(ResultStatus.FAILED, 0),
            threshold=group_fanout(rt, _group(session, distribution)).threshold,
        )
    last = batch_index + 1 >= len(run.batch_plan)
    # Compare-and-set on the batch index: of concurrent advances exactly one acts.
    if not queries.advance_batch(session, run_id, from_batch=batch_index, now=now):
        return [], None
    recovered = _recovery_note(run)
    if decision.halt:
        # A breach halts the run whichever batch it happens in (the last one included):
        # the state and the reason say the same thing everywhere.
        reason = f"halted after batch {batch_index + 1}: {decision.reason}"
        if not last:
            skipped = queries.skip_pending_results(
                session, run_id, from_batch=batch_index + 1, reason=f"skipped: {reason}", now=now
            )
            reason += f"; {skipped} target(s) skipped"
            observe_skipped(run.action, skipped)
        queries.finish_run(session, run_id, RunState.HALTED, now=now, reason=reason + recovered)
        observe_run_finished(distribution.kind, run)
    elif last and failed:
        reason = (
            f"audit incomplete: {failed} of {total} target(s) could not be read"
            if run.action is RunAction.AUDIT
            else f"partially failed: {failed} of {total} target(s) failed, within the failure "
            "threshold"
        )
        queries.finish_run(session, run_id, RunState.FAILED, now=now, reason=reason + recovered)
        observe_run_finished(distribution.kind, run)
    elif last:
        reason = _success_reason(all_counts) + recovered
        queries.finish_run(session, run_id, RunState.SUCCEEDED, now=now, reason=reason)
        observe_run_finished(distribution.kind, run)
        if run.cascade and run.action is RunAction.EXECUTE:
            return [], queue_next_stacked(session, distribution, run_id)
    else:
        queries.mark_batch_sent(session, run_id, batch_index + 1, now=now)
        return list(run.batch_plan[batch_index + 1]), None
    return [], None


def _success_reason(counts: Mapping[ResultStatus, int]) -> str:
    parts = [f"{count} {status.value}" for status, count in sorted(counts.items()) if count]
    return "succeeded: " + ", ".join(parts)


def _recovery_note(run: Run) -> str:
    recoveries = queries.recoveries(run)
    if not recoveries:
        return ""
    return f" (the reaper resumed this run {recoveries} time(s) after lost work)"


# ------------------------------------------------------------------------------ reaper


@dataclass(frozen=True)
class ReapReport:
    """What one reaper pass did."""

    restarted: tuple[str, ...] = ()
    redispatched: Mapping[str, int] = field(default_factory=dict)
    advanced: tuple[str, ...] = ()


def reap(rt: Runtime, dispatch: Dispatcher, *, now: datetime | None = None) -> ReapReport:
    """Re-send what is really lost: lost target messages, overdue batch callbacks, lost starts.

    Every condition is compared on the database's clock (``now`` only for tests) and taken
    with compare-and-set, so several reapers (one per worker) re-send each lost thing once per
    period.
    """
    tasks = rt.settings.tasks
    redispatched: dict[str, list[str]] = {}
    advanced: list[tuple[str, int]] = []
    with rt.session() as session:
        now = now or queries.database_now(session)
        resend_before = now - timedelta(seconds=tasks.resend_after)
        stale_before = now - timedelta(seconds=tasks.stale_after)
        restarted = queries.resend_queued_starts(session, now=now, resend_before=resend_before)
        for run in queries.running_runs(session):
            lost = queries.resend_lost(
                session, run.id, run.current_batch, now=now, resend_before=resend_before
            )
            # Targets whose pool has no live worker are held back (their messages wait in that
            # pool's queue); marked sent now, they are looked at again after CAP_RESEND_AFTER.
            lost, waiting = hold_back_silent_pools(
                rt, session, run.id, lost, now=now, stale_before=stale_before
            )
            if lost:
                queries.note_recovery(
                    session,
                    run.id,
                    reason=(
                        f"the reaper re-sent {len(lost)} target(s) at {now:%Y-%m-%d %H:%M:%S}Z: "
                        "their worker stopped renewing its claim, or their message was not "
                        f"claimed within {tasks.resend_after:.0f}s{waiting}"
                    ),
                    now=now,
                )
                redispatched[run.id] = lost
                continue
            if waiting:
                continue  # only pools with no live worker: noted on the run, nothing re-sent
                continue
            # A batch without open rows whose callback has not moved the run for stale_after
            # (its advance message was lost): the conditional note wins for one reaper.
            stale = run.heartbeat_at is None or run.heartbeat_at < stale_before
            if not stale or queries.batch_has_open_row(session, run.id, run.current_batch):
                continue
            if queries.note_recovery(
                session,
                run.id,
                reason=(
                    f"the reaper re-sent the callback of batch {run.current_batch + 1} at "
                    f"{now:%Y-%m-%d %H:%M:%S}Z after {tasks.stale_after:.0f}s without it"
                ),
                now=now,
                stale_before=stale_before,
            ):
                advanced.append((run.id, run.current_batch))
    observe_reaper("start", len(restarted))
    observe_reaper("targets", len(redispatched))
    observe_reaper("advance", len(advanced))
    for run_id in restarted:
        log.warning("reaper: run %s still queued; re-sending its start", run_id)
        dispatch.start(run_id)
    for run_id, target_ids in redispatched.items():
        log.warning("reaper: run %s: re-sending %d lost target(s)", run_id, len(target_ids))
        dispatch.process_targets(run_id, target_ids)
    for run_id, batch_index in advanced:
        log.warning("reaper: run %s: re-sending the callback of batch %d", run_id, batch_index)
        dispatch.advance(run_id, batch_index)
    return ReapReport(
        restarted=tuple(restarted),
        redispatched={run_id: len(ids) for run_id, ids in redispatched.items()},
        advanced=tuple(run_id for run_id, _ in advanced),
    )
