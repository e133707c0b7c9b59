"""Commands: what the scheduler and the CLI ask the backend to do (store, create, attach,
enqueue). Bad input raises :class:`ServiceError` (or a more specific domain error) *before*
anything is written: the transaction is rolled back and no cluster is touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models import queries
from models.base import utcnow
from models.enums import (
    ConnectionMode,
    CredentialKind,
    DistributionKind,
    RunAction,
    RunState,
)
from worker.app.clients import kube_client
from worker.app.dispatch import Dispatcher
from worker.app.pools import HealthSender, pool_last_seen, wait_for_health_check
from worker.app.views import (
    GroupView,
    distribution_rollback_availability,
    group_view,
    resolve_credential,
    resolve_group,
    resolve_target,
)
from worker.app.webhook import WebhookError, check_webhook_url
from worker.core.bundle import (
    BundleError,
    TlsBundle,
    build_bundle,
    certificate_names,
    describe_certificates,
    name_change,
)
from worker.core.crypto import UnknownKeyError
from worker.core.fanout import FanoutConfigError, parse_batch_size, parse_failure_threshold
from worker.core.formats import KeystorePasswordError, check_keystore_password
from worker.core.limits import (
    PKCS12_PASSWORD,
    WEBHOOK_SECRET,
    WEBHOOK_URL,
    check_name,
    check_size,
)
from worker.core.names import (
    CERTIFICATE_VARIABLES,
    DEFAULT_SECRET_NAME_TEMPLATE,
    TemplateError,
    check_variables,
    refuse_system_namespace,
    render_if_decided,
    render_namespace,
    validate_template,
    variables_left_for_the_run,
)
from worker.core.pools import DEFAULT_POOL, PoolNameError, check_pool_name
from worker.core.serving import (
    OWN_CHAIN,
    REQUIRE_SERVING_OPTION,
    ServingConfigError,
    parse_deadline,
    parse_endpoints,
)
from worker.kube.connect import in_cluster_available, minimal_kubeconfig, vet_kubeconfig
from worker.kube.deploy import HealthReport, health_check
from worker.kube.errors import InClusterUnavailable, KubeError
from worker.kube.identity import in_cluster_identity, refuse_other_cluster
from worker.platform.runtime import Runtime


class ServiceError(ValueError):
    """A request the backend refuses; the message names the problem and the fix."""


class RunAlreadyActive(ServiceError):
    """The distribution has a queued or running execute or rollback; the message names it."""

    def __init__(self, message: str, active_run_id: str) -> None:
        super().__init__(message)
        self.active_run_id = active_run_id


class RollbackUnavailable(ServiceError):
    """Rollback cannot run for this distribution; the message is the greyed-out tooltip."""


# --------------------------------------------------------------------------- credentials


def add_kubeconfig_credential(rt: Runtime, name: str, kubeconfig: bytes) -> str:
    """Vet and store a kubeconfig credential (sealed); returns its id."""
    check_name("credential", name)
    # Vetting first: a kubeconfig that would run programs or read files never gets stored.
    kubeconfig = minimal_kubeconfig(kubeconfig)  # the whole file vetted, one context kept
    with rt.session() as session:
        credential = queries.store_credential(
            session, rt.sealer, name, CredentialKind.KUBECONFIG, kubeconfig
        )
        return credential.id


def add_webhook_secret(rt: Runtime, name: str, secret: bytes) -> str:
    """Store an HMAC secret for signing webhook notifications; returns its id."""
    check_name("credential", name)
    check_size(WEBHOOK_SECRET, secret, f"webhook secret {name!r}")
    if len(secret) < 16:
        raise ServiceError(
            f"webhook secret {name!r} is {len(secret)} bytes; use at least 16 random bytes "
            "(e.g. `openssl rand -hex 32`)"
        )
    with rt.session() as session:
        credential = queries.store_credential(
            session, rt.sealer, name, CredentialKind.WEBHOOK_HMAC, secret
        )
        return credential.id


def add_pkcs12_password(rt: Runtime, name: str, password: bytes) -> str:
    """Store the password of targets' PKCS#12 keystores (sealed); returns its id.

    Refused (nothing stored) unless Java's keytool would accept it: at least 6 printable ASCII
    characters. Replacing it later (``replace_credential_secret``) makes every target using it
    write a new keystore on its next execute: the live one no longer opens with it.
    """
    check_name("credential", name)
    check_size(PKCS12_PASSWORD, password, f"PKCS#12 password {name!r}")
    try:
        check_keystore_password(password, what=f"PKCS#12 password {name!r}")
    except KeystorePasswordError as exc:
        raise ServiceError(str(exc)) from None
    with rt.session() as session:
        credential = queries.store_credential(
            session, rt.sealer, name, CredentialKind.PKCS12_PASSWORD, password
        )
        return credential.id


# --------------------------------------------------------------------------- certificates


def import_certificate(
    rt: Runtime,
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes = b"",
    ca_pem: bytes | None = None,
    *,
    allow_expired: bool = False,
    passphrase: bytes | None = None,
    allow_duplicate: bool = True,
) -> str:
    """Validate a certificate bundle and store it (key sealed); returns its id.

    allow_duplicate=False refuses a leaf that is already stored (the CLI's default): a second
    copy would renew and expire on its own, apart from the distributions of the first.
    """
    bundle = build_bundle(
        cert_pem,
        key_pem,
        chain_pem,
        ca_pem,
        now=utcnow(),
        allow_expired=allow_expired,
        passphrase=passphrase,
    )
    with rt.session() as session:
        if not allow_duplicate:
            stored = queries.certificate_ids_with_fingerprint(
                session, bundle.leaf.sha256_fingerprint
            )
            if stored:
                raise ServiceError(
                    f"this certificate is already stored as {stored[0]} (same leaf, SHA-256 "
                    f"{bundle.leaf.sha256_fingerprint[:16]}…): attach that one "
                    f"(certautopilot distributions attach {stored[0]} ...), or import a second "
                    "copy with --allow-duplicate"
                )
        return queries.store_certificate(session, rt.sealer, bundle).id


def renew_certificate(
    rt: Runtime,
    certificate_id: str,
    bundle_pems: Mapping[str, bytes],
    *,
    allow_name_change: bool = False,
) -> TlsBundle:
    """Replace a certificate's content with a renewed bundle (same id, so distributions follow).

    A renewal that shares no name with the certificate it replaces is refused unless
    allow_name_change: every distribution would push another service's certificate to its
    whole fleet, which is almost always the wrong file, not a renewal.

    Without a "ca", the stored CA is kept when it issues the renewal's chain (renewals come
    from the same CA as a rule; dropping it would remove ca.crt from every target that includes
    it); a renewal from another CA is stored without one.
    """

    def build(ca_pem: bytes | None) -> TlsBundle:
        return build_bundle(
            bundle_pems["cert"],
            bundle_pems["key"],
            bundle_pems.get("chain", b""),
            ca_pem,
            now=utcnow(),
        )

    given_ca = bundle_pems.get("ca")
    bundle: TlsBundle | None = None
    if given_ca is None:
        with rt.session() as session:
            stored_ca = queries.get_certificate(session, certificate_id).ca_pem
        if stored_ca:
            try:
                bundle = build(stored_ca.encode("ascii"))
            except BundleError:
                bundle = None  # not issued under it: build as given, and say what is wrong
    if bundle is None:
        bundle = build(given_ca)
    with rt.session() as session:
        current = queries.get_certificate(session, certificate_id)
        before = certificate_names(current.common_name, current.sans)
        after = certificate_names(bundle.leaf.common_name, bundle.leaf.sans)
        if before and after and name_change(before, after).unrelated and not allow_name_change:
            raise ServiceError(
                f"the renewal is for {', '.join(after)} but certificate {certificate_id} is for "
                f"{', '.join(before)}: no name in common, so this looks like another service's "
                "certificate. Import it as a new certificate (certautopilot certs import), or, "
                "if this service really changed all its names, renew with --allow-name-change "
                "(Python API: allow_name_change=True)"
            )
        queries.replace_certificate(session, rt.sealer, certificate_id, bundle)
    return bundle


# ------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetSpec:
    """What an operator fills in on Settings → Distribution → Targets → New."""

    name: str
    namespace: str
    connection_mode: ConnectionMode = ConnectionMode.KUBECONFIG
    credential: str | None = None
    """Credential name or id (kubeconfig mode)."""
    secret_name: str = DEFAULT_SECRET_NAME_TEMPLATE
    include_ca: bool = False
    allow_insecure: bool = False
    adopt_unmanaged: bool = False
    allow_system_namespace: bool = False
    variables: Mapping[str, Any] = field(default_factory=dict)
    pool: str = DEFAULT_POOL
    """The worker pool that processes the target (in-cluster: a pool running in its cluster)."""
    combined_pem: bool = False
    """Also write ``tls-combined.pem`` (key + leaf + chain, for HAProxy and similar)."""
    pkcs12_password_credential: str | None = None
    """A ``pkcs12_password`` credential (name or id): also write ``keystore.p12`` with it."""
    verify_serving: Sequence[str] = ()
    """Endpoints to verify after an execute, ``host:port[,sni=NAME]`` (worker.core.serving)."""
    serving_deadline: str | int | None = None
    """Per-endpoint verification deadline (``120``, ``90s``, ``2m``); None = 120 s."""
    serving_ca: str | None = None
    """PEM bundle the served chain must validate against, or "own-chain"."""
    serving_public_only: bool = False
    """Refuse loopback, private and link-local endpoints (at save and when resolved)."""


def _serving_settings(spec: TargetSpec) -> tuple[list[str], int | None, str | None]:
    """The target's verify-serving settings, validated and canonical (ServiceError if bad)."""
    try:
        endpoints = parse_endpoints(spec.verify_serving, public_only=spec.serving_public_only)
        deadline = (
            parse_deadline(spec.serving_deadline) if spec.serving_deadline is not None else None
        )
    except ServingConfigError as exc:
        raise ServiceError(f"target {spec.name!r}: {exc}") from None
    ca = spec.serving_ca
    if ca is not None and ca != OWN_CHAIN:
        try:
            describe_certificates(ca.encode("utf-8"))  # size-checked, then parsed
        except ValueError as exc:  # BundleError, InputTooLarge
            raise ServiceError(
                f"target {spec.name!r}: serving CA: {exc}; give a PEM file of CA certificates, "
                f"or {OWN_CHAIN!r} to trust the certificate's own chain"
            ) from None
    if not endpoints and (deadline is not None or ca is not None or spec.serving_public_only):
        raise ServiceError(
            f"target {spec.name!r}: a serving deadline, CA or public-only setting needs an "
            "endpoint to verify (--verify-serving host:port)"
        )
    return [str(endpoint) for endpoint in endpoints], deadline, ca


def create_target(
    rt: Runtime,
    spec: TargetSpec,
    *,
    check: bool = True,
    sender: HealthSender | None = None,
    check_timeout: float = 30.0,
) -> tuple[str, HealthResult | None]:
    """Validate and save a target, then (like the UI's Save) run its health check.

    The check runs where the target's work will: here when the target's pool is this
    process's (``CAP_WORKER_POOL``), else as a task on a worker of that pool through
    ``sender`` (see :func:`check_target_health_in_pool`).
    """
    check_name("target", spec.name)
    try:
        check_pool_name(spec.pool, what=f"target {spec.name!r}: pool")
    except PoolNameError as exc:
        raise ServiceError(str(exc)) from None
    own_pool = spec.pool == rt.settings.tasks.worker_pool
    check_variables(spec.variables)
    known = [*CERTIFICATE_VARIABLES, *spec.variables]
    validate_template(spec.namespace, "namespace", known)
    validate_template(spec.secret_name, "secret name", known)
    _refuse_names_decided_at_save(spec)
    serving_endpoints, serving_deadline, serving_ca = _serving_settings(spec)
    mode = ConnectionMode(spec.connection_mode)
    if (
        mode is ConnectionMode.IN_CLUSTER
        and own_pool
        and not in_cluster_available(rt.settings.kube.serviceaccount_dir, rt.environ)
    ):
        raise InClusterUnavailable(
            "in-cluster connection mode is available only when CertAutoPilot runs inside "
            f"Kubernetes: no service-account token in {rt.settings.kube.serviceaccount_dir} "
            "or KUBERNETES_SERVICE_HOST is not set; save it with --pool naming the worker pool "
            "that runs in the target's cluster (its health check then runs there)"
        )
    with rt.session() as session:
        credential_id: str | None = None
        if spec.credential is not None:
            credential_id = resolve_credential(session, spec.credential)
            if mode is ConnectionMode.KUBECONFIG:
                # Refuse a kubeconfig the connection code would refuse, at save time.
                kubeconfig = queries.reveal_credential(session, rt.sealer, credential_id)
                vet_kubeconfig(kubeconfig, allow_insecure=spec.allow_insecure)
        pkcs12_credential_id = _pkcs12_credential(session, spec)
        target = queries.create_target(
            session,
            name=spec.name,
            connection_mode=mode,
            namespace_template=spec.namespace,
            credential_id=credential_id,
            secret_name_template=spec.secret_name,
            include_ca=spec.include_ca,
            allow_insecure=spec.allow_insecure,
            adopt_unmanaged=spec.adopt_unmanaged,
            allow_system_namespace=spec.allow_system_namespace,
            variables=dict(spec.variables),
            pool=spec.pool,
            combined_pem=spec.combined_pem,
            pkcs12_credential_id=pkcs12_credential_id,
            serving_endpoints=serving_endpoints,
            serving_deadline_seconds=serving_deadline,
            serving_ca=serving_ca,
            serving_public_only=spec.serving_public_only,
        )
        target_id = target.id
    report = (
        check_target_health_in_pool(rt, target_id, sender=sender, timeout=check_timeout)
        if check
        else None
    )
    return target_id, report


def _pkcs12_credential(session: Any, spec: TargetSpec) -> str | None:
    """The id of the target's PKCS#12 password credential; a missing one is refused by name."""
    if spec.pkcs12_password_credential is None:
        return None
    try:
        return resolve_credential(session, spec.pkcs12_password_credential)
    except queries.NotFoundError:
        raise ServiceError(
            f"target {spec.name!r}: PKCS#12 password credential "
            f"{spec.pkcs12_password_credential!r} does not exist; store it first with "
            f"`certautopilot credentials add-pkcs12-password "
            f"{spec.pkcs12_password_credential}` (nothing was saved)"
        ) from None


def _refuse_names_decided_at_save(spec: TargetSpec) -> None:
    """At save: a namespace or Secret name that the target's own variables already decide
    (fixed, or from them alone) must be valid, and the namespace not a system one. One that
    needs certificate or group variables is checked when a run renders it."""
    own = dict(spec.variables)
    namespace = render_if_decided(spec.namespace, "namespace", own)
    render_if_decided(spec.secret_name, "secret name", own)
    if namespace is not None:
        refuse_system_namespace(namespace, allowed=spec.allow_system_namespace, target=spec.name)


@dataclass(frozen=True)
class HealthResult:
    """A stored health-check outcome."""

    target_id: str
    status: str
    message: str
    report: HealthReport | None


def check_target_health(
    rt: Runtime, target_id: str, *, record_cluster: bool = False
) -> HealthResult:
    """Read the namespace and review the secret verbs; store the outcome on the target.

    For an in-cluster target it also compares the cluster this process runs in with the one
    recorded on the target (recording it when none is, or when ``record_cluster``).
    """
    with rt.session() as session:
        target = queries.get_target(session, target_id)
    report: HealthReport | None = None
    healthy: bool | None
    own = dict(target.variables)
    later = variables_left_for_the_run(target.namespace_template, "namespace", own)
    if later:
        # Not a finding: the namespace is only known once a run supplies these variables.
        healthy, message = (
            None,
            f"not checked: the namespace template reads {', '.join(sorted(later))}, which a run "
            "supplies (certificate or group variables); `certautopilot run DIST --dry-run` "
            "checks each target's rendered namespace",
        )
    else:
        try:
            namespace = render_namespace(target.namespace_template, own)
            _check_cluster_for_health(rt, target, record=record_cluster)
            report = health_check(kube_client(rt, target), namespace)
            healthy, message = report.healthy, report.message
        except (TemplateError, KubeError) as exc:
            healthy, message = False, str(exc)
    with rt.session() as session:
        stored = queries.record_health(session, target_id, healthy=healthy, message=message)
        return HealthResult(target_id, stored.health_status.value, message, report)


def _check_cluster_for_health(rt: Runtime, target: Any, *, record: bool) -> None:
    """In-cluster: record the cluster this process sees (if none is, or asked to), or refuse
    (WrongCluster) when another one is recorded."""
    if target.connection_mode is not ConnectionMode.IN_CLUSTER:
        return
    seen = in_cluster_identity(rt.settings.kube.serviceaccount_dir)
    with rt.session() as session:
        recorded = queries.pin_cluster_identity(session, target.id, seen, replace=record)
    refuse_other_cluster(
        target=target.name,
        pool=rt.settings.tasks.worker_pool,
        expected=recorded or seen,
        seen=seen,
    )


def check_target_health_in_pool(
    rt: Runtime,
    target_id: str,
    *,
    sender: HealthSender | None,
    timeout: float = 30.0,
    record_cluster: bool = False,
) -> HealthResult:
    """Run the health check where the target's work runs: here if its pool is this process's,
    else as a task on its pool, waiting at most ``timeout`` seconds for a worker to record it.

    No answer in time is not an error of the target: the result's status is "unknown" and
    the message names the pool, when a worker of it was last seen, and the fix. The queued
    check still runs once a worker of the pool starts.
    """
    with rt.session() as session:
        target = queries.get_target(session, target_id)
        pool, name, checked_before = target.pool, target.name, target.health_checked_at
    if pool == rt.settings.tasks.worker_pool:
        return check_target_health(rt, target_id, record_cluster=record_cluster)
    if sender is None:
        return HealthResult(
            target_id,
            "unknown",
            f"not checked: target {name!r} belongs to pool {pool!r} and this process is in pool "
            f"{rt.settings.tasks.worker_pool!r}; run `certautopilot targets check {name}`",
            None,
        )
    sender.check_health(target_id, pool, record_cluster=record_cluster)
    if wait_for_health_check(rt, target_id, checked_before, timeout=timeout):
        with rt.session() as session:
            stored = queries.get_target(session, target_id)
            return HealthResult(
                target_id, stored.health_status.value, stored.health_message or "", None
            )
    silent_for = pool_last_seen(rt, pool)
    seen = (
        "no live worker of that pool: none seen yet, or the last one stopped"
        if silent_for is None
        else f"a worker of that pool was last seen {silent_for:.0f}s ago"
    )
    return HealthResult(
        target_id,
        "unknown",
        f"no worker of pool {pool!r} answered the health check within {timeout:g}s ({seen}); "
        f"the check stays queued and runs when one starts. Start a worker with "
        f"CAP_WORKER_POOL={pool} where it reaches this target's cluster (the chart's `pool` "
        f"value), then run `certautopilot targets check {name}`",
        None,
    )


# -------------------------------------------------------------------------------- groups


def create_group(
    rt: Runtime,
    name: str,
    target_names: Sequence[str],
    *,
    batch_size: Any = None,
    failure_threshold: Any = None,
    variables: Mapping[str, Any] | None = None,
    require_serving: bool = False,
) -> str:
    """Create a target group with its fan-out settings; returns its id.

    With ``require_serving``, a member whose endpoints do not serve the new certificate by
    its deadline is a failed target (reason ``not_serving``) for the failure threshold.

    The settings are parsed here, once: the group stores them in their canonical JSON form
    (``"1,5,20%"`` becomes ``[1, 5, "20%"]``), and runs read them with worker.app.fanout.
    """
    check_name("group", name)
    check_variables(variables or {}, origin="group")
    try:
        batch = parse_batch_size(batch_size).as_config() if batch_size is not None else None
        threshold = (
            parse_failure_threshold(failure_threshold).as_config()
            if failure_threshold is not None
            else None
        )
    except FanoutConfigError as exc:
        raise FanoutConfigError(f"group {name!r}: {exc}") from None
    repeated = sorted(item for item, n in Counter(target_names).items() if n > 1)
    if repeated:
        raise ServiceError(
            f"group {name!r}: target(s) {', '.join(map(repr, repeated))} listed more than once; "
            "list each target once (the order of first mention is the fan-out order)"
        )
    with rt.session() as session:
        target_ids = [resolve_target(session, item) for item in target_names]
        group = queries.create_group(
            session,
            name=name,
            target_ids=target_ids,
            batch_size=batch,
            failure_threshold=threshold,
            variables=dict(variables or {}),
            require_serving=require_serving,
        )
        return group.id


# ------------------------------------------------------------------------- distributions


def attach(
    rt: Runtime,
    certificate_id: str,
    *,
    target: str | None = None,
    group: str | None = None,
    store_content: bool = False,
    allow_duplicate: bool = True,
) -> str:
    """Attach a certificate to a target or a group (a Kubernetes distribution); returns its id.

    allow_duplicate=False (the CLI's default) refuses a second distribution of the certificate
    to the same target or group: both would write the same Secrets, and executes of one would
    not wait for the other's.
    """
    with rt.session() as session:
        target_id = resolve_target(session, target) if target is not None else None
        group_id = None
        if group is not None:
            group_id = resolve_group(session, group)
            if not queries.group_target_ids(session, group_id):
                raise ServiceError(
                    f"group {group!r} has no targets; add targets before attaching a distribution"
                )
        if not allow_duplicate:
            for existing in queries.list_distributions(session, certificate_id):
                if existing.kind is DistributionKind.KUBERNETES and (
                    existing.target_id,
                    existing.group_id,
                ) == (target_id, group_id):
                    raise ServiceError(
                        f"certificate {certificate_id} is already attached to "
                        f"{target or group!r}: distribution {existing.id}; run that one "
                        f"(certautopilot run {existing.id} ...), or attach a second with "
                        "--allow-duplicate"
                    )
        return queries.create_distribution(
            session,
            certificate_id=certificate_id,
            target_id=target_id,
            group_id=group_id,
            store_content=store_content,
        ).id


def attach_webhook(rt: Runtime, certificate_id: str, url: str, *, secret: str | None) -> str:
    """Stack a webhook distribution after the certificate's existing ones; returns its id."""
    check_size(WEBHOOK_URL, url, "the webhook URL")
    try:
        check_webhook_url(url)
    except WebhookError as exc:
        raise ServiceError(str(exc)) from None
    with rt.session() as session:
        credential_id = resolve_credential(session, secret) if secret is not None else None
        if credential_id is not None:
            credential = queries.get_credential(session, credential_id)
            if credential.kind is not CredentialKind.WEBHOOK_HMAC:
                raise ServiceError(
                    f"credential {credential.name!r} holds a {credential.kind.value}, not a "
                    "webhook secret; store one with `certautopilot credentials "
                    "add-webhook-secret NAME` and pass that name"
                )
        return queries.create_distribution(
            session,
            certificate_id=certificate_id,
            kind=DistributionKind.WEBHOOK,
            webhook_url=url,
            webhook_credential_id=credential_id,
        ).id


# ----------------------------------------------------------------------------------- runs


def enqueue_run(
    rt: Runtime,
    dispatch: Dispatcher,
    distribution_id: str,
    action: RunAction | str,
    *,
    force: bool = False,
    cascade: bool = True,
) -> str:
    """Queue a dry-run, execute, rollback or audit of a distribution; returns the run id.

    An audit (read-only, see :mod:`worker.app.audit`) never conflicts with an active execute.
    """
    run_action = RunAction(action)
    with rt.session() as session:
        distribution = queries.get_distribution(session, distribution_id)
        if run_action is RunAction.ROLLBACK:
            availability = distribution_rollback_availability(session, distribution)
            if not availability.available:
                raise RollbackUnavailable(availability.reason)
        if distribution.kind is DistributionKind.WEBHOOK and run_action is not RunAction.EXECUTE:
            raise ServiceError("a webhook distribution can only be executed")
        options: dict[str, Any] = {"force": True} if force else {}
        if (
            run_action is RunAction.EXECUTE
            and distribution.group_id is not None
            and queries.get_group(session, distribution.group_id).require_serving
        ):
            # Pinned like the certificate revision: the run keeps the rule it was enqueued
            # under, and its messages need no extra query to know it.
            options[REQUIRE_SERVING_OPTION] = True
        try:
            run = queries.create_run(
                session,
                distribution_id=distribution_id,
                action=run_action,
                options=options,
                cascade=cascade and run_action is RunAction.EXECUTE,
            )
        except queries.ActiveRunError as exc:
            raise RunAlreadyActive(str(exc), exc.active_run_id) from None
        run_id = run.id
    dispatch.start(run_id)
    return run_id


#: The reason a cancelled run records (the CLI and the scheduler's API say the same).
CANCELLED_BY_OPERATOR = "cancelled by the operator"


def cancel_run(rt: Runtime, run_id: str) -> tuple[str, int]:
    """Halt a queued or running run now: its pending targets are skipped (nothing is sent for
    them any more) and the distribution is free for a new run; targets a worker is processing
    at this moment finish and are recorded. Returns the run's id and the skipped count.

    The way out of a run that cannot progress — a target of a pool with no worker (a typo in
    ``--pool``), a long rollout that must stop — without waiting for it.
    """
    with rt.session() as session:
        run = queries.get_run(session, run_id, lock=True)
        if run.state.is_terminal:
            raise ServiceError(f"run {run.id} is already {run.state.value}: nothing to cancel")
        now = queries.database_now(session)
        skipped = queries.skip_pending_results(
            session, run.id, from_batch=0, reason=CANCELLED_BY_OPERATOR, now=now
        )
        queries.finish_run(
            session,
            run.id,
            RunState.HALTED,
            now=now,
            reason=f"{CANCELLED_BY_OPERATOR}: {skipped} pending target(s) skipped",
        )
        return run.id, skipped


def add_group_targets(rt: Runtime, group: str, target_names: Sequence[str]) -> GroupView:
    """Append targets (names or ids) to a group's fan-out order; returns the updated group."""
    with rt.session() as session:
        group_id = resolve_group(session, group)
        current = queries.group_target_ids(session, group_id)
        added = [resolve_target(session, item) for item in target_names]
        pairs = zip(target_names, added, strict=True)
        already = sorted(name for name, target_id in pairs if target_id in current)
        if already:
            raise ServiceError(
                f"group {group!r} already contains {', '.join(repr(n) for n in already)}; "
                "list only targets that are not members yet"
            )
        queries.set_group_members(session, group_id, [*current, *added])
        return group_view(rt, session, queries.get_group(session, group_id))


# ----------------------------------------------------------------------------------- keys


def rotate_keys(rt: Runtime, to_key_id: str) -> tuple[int, Counter[str]]:
    """Re-wrap every stored secret under KEK ``to_key_id``; the count and envelopes per KEK after.

    Resumable: secrets already under ``to_key_id`` are skipped.
    """
    if not rt.keyring.has_key(to_key_id):
        raise UnknownKeyError(
            f"cannot rotate to KEK {to_key_id!r}: it is not loaded (loaded: "
            f"{', '.join(repr(k) for k in rt.keyring.key_ids)}); add it to CAP_KEK/CAP_KEK_FILE"
        )
    with rt.session() as session:
        count = queries.rotate_keys(session, rt.sealer, to_key_id)
        return count, queries.envelope_key_usage(session, rt.sealer)
