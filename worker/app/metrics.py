"""What the runs report to Prometheus, in the run's own terms (the metrics are in platform).

:mod:`worker.app.runs` calls the ``observe_*`` functions where a target's outcome is produced,
a run finishes and the reaper resumes a run; the Kubernetes client reports retries through
:func:`kube_retry`. Each is a no-op while metrics are off (the default) and never raises: a
metric must not fail a target. Labels are bounded (see :mod:`worker.platform.metrics`): the
cluster is the kubeconfig credential's *name* (``in-cluster`` for in-cluster targets), never
its server URL; targets and Secrets are not labels.

:func:`collectors` adds what is read at scrape time, in the worker's consumer process: the
broker's queue lengths, and per Kubernetes distribution the expiry of the certificate its
last successful execute deployed (like cert-manager's
``certmanager_certificate_expiration_timestamp_seconds``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from models import queries
from models.enums import ConnectionMode, DistributionKind, ResultStatus, RunAction
from models.queries.observability import DeployedCertificate, deployed_certificates
from worker.core.lru import LruCache
from worker.core.pools import pool_queue
from worker.platform import metrics

if TYPE_CHECKING:
    from models.entities import Run, Target
    from worker.platform.runtime import Runtime

__all__ = [
    "IN_CLUSTER",
    "collectors",
    "deployed_expiry",
    "kube_retry",
    "observe_reaper",
    "observe_run_finished",
    "observe_skipped",
    "observe_target",
]

log = logging.getLogger(__name__)

IN_CLUSTER = "in-cluster"
"""The cluster label of targets that use the worker's own ServiceAccount."""

_credential_names: LruCache[str, str] = LruCache(1024)


def _cluster(rt: Runtime, target: Target) -> str:
    """The credential's name (cached per process; one query the first time)."""
    if target.connection_mode is ConnectionMode.IN_CLUSTER or target.credential_id is None:
        return IN_CLUSTER
    name = _credential_names.get(target.credential_id)
    if name is None:
        with rt.session() as session:
            name = queries.get_credential(session, target.credential_id).name
        _credential_names.put(target.credential_id, name)
    return name


def observe_target(
    rt: Runtime,
    action: RunAction,
    target: Target,
    status: ResultStatus,
    reason: str | None,
    seconds: float,
) -> None:
    """One target's outcome: ``targets_processed`` and ``target_processing_seconds``."""
    recorded = metrics.current()
    if recorded is None:
        return
    try:
        cluster = _cluster(rt, target)
    except Exception as exc:  # noqa: BLE001 - a metric must never fail a target
        log.debug("no cluster name for the metrics (%s)", type(exc).__name__)
        cluster = "unknown"
    recorded.targets_processed.labels(
        action.value, status.value, reason or "none", cluster, target.pool
    ).inc()
    recorded.target_seconds.labels(action.value).observe(seconds)


def observe_skipped(action: RunAction, count: int, reason: str = "halted") -> None:
    """Targets a halted run recorded as skipped (they reached no cluster: empty cluster)."""
    recorded = metrics.current()
    if recorded is not None and count > 0:
        recorded.targets_processed.labels(
            action.value, ResultStatus.SKIPPED.value, reason, "", ""
        ).inc(count)


def observe_run_finished(kind: DistributionKind, run: Run) -> None:
    """``run`` just reached its final state: ``runs_finished`` and ``run_duration_seconds``."""
    recorded = metrics.current()
    if recorded is None:
        return
    recorded.runs_finished.labels(kind.value, run.action.value, run.state.value).inc()
    if run.started_at is not None and run.finished_at is not None:
        seconds = (_utc(run.finished_at) - _utc(run.started_at)).total_seconds()
        recorded.run_seconds.labels(kind.value, run.action.value).observe(max(0.0, seconds))


def observe_reaper(resumed: str, count: int = 1) -> None:
    """The reaper resumed ``count`` run(s) by re-sending ``resumed`` (start/targets/advance)."""
    recorded = metrics.current()
    if recorded is not None and count > 0:
        recorded.reaper_resumptions.labels(resumed).inc(count)


def kube_retry(status_class: str) -> None:
    """The Kubernetes client retries a call after a transient failure of ``status_class``."""
    recorded = metrics.current()
    if recorded is not None:
        recorded.api_retries.labels(status_class).inc()


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# ------------------------------------------------------------------ read at scrape time


def deployed_expiry(deployed: DeployedCertificate) -> datetime:
    """The not-after of what the run wrote (its diff's ``tls.crt``), else the stored one."""
    for entry in (deployed.diff or {}).get("data") or ():
        if isinstance(entry, dict) and entry.get("key") == "tls.crt":
            new = entry.get("new") or {}
            raw = new.get("not_after") if isinstance(new, dict) else None
            if isinstance(raw, str):
                try:
                    return datetime.strptime(raw, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                except ValueError:
                    break
    return _utc(deployed.stored_not_after)


def _certificate_collector(runtime: Callable[[], Runtime]) -> Any:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class DeployedCertificates(Collector):
        def collect(self) -> Iterable[Any]:
            gauge = GaugeMetricFamily(
                metrics.PREFIX + "certificate_expiration_timestamp_seconds",
                "Not-after (Unix seconds) of the certificate each Kubernetes distribution's "
                "last successful execute deployed, by distribution id and common name.",
                labels=["distribution", "common_name"],
            )
            try:
                rt = runtime()
                with rt.session() as session:
                    found = deployed_certificates(session)
            except Exception as exc:  # noqa: BLE001 - the database may be down: the rest still counts
                log.warning("certificate expiry metrics unavailable (%s)", type(exc).__name__)
                return [gauge]
            for deployed in found:
                gauge.add_metric(
                    [deployed.distribution_id, deployed.common_name or ""],
                    deployed_expiry(deployed).timestamp(),
                )
            return [gauge]

    return DeployedCertificates()


def watched_queues(runtime: Callable[[], Runtime], own: Sequence[str]) -> list[str]:
    """The queues whose length a worker reports: its own, and every pool's that a target names.

    A pool whose workers are all gone reports nothing itself, so its backlog — the failure
    pools add — must come from the workers that are still there (the chart's alert takes the
    max by queue, so several workers reporting one queue is harmless).
    """
    rt = runtime()
    try:
        with rt.session() as session:
            pools = queries.pools_in_use(session)
    except Exception as exc:  # noqa: BLE001 - a database outage must not fail the scrape
        log.warning("pools for queue lengths unavailable (%s)", type(exc).__name__)
        pools = []
    kube_queue = rt.settings.tasks.kube_queue
    return list(dict.fromkeys([*own, *(pool_queue(kube_queue, pool) for pool in pools)]))


def collectors(runtime: Callable[[], Runtime], celery_app: Any, queues: Sequence[str]) -> list[Any]:
    """The scrape-time collectors of a worker: queue lengths and deployed-certificate expiry."""
    return [
        metrics.queue_length_collector(
            lambda: watched_queues(runtime, queues),
            lambda queue: metrics.broker_queue_length(celery_app, queue),
        ),
        _certificate_collector(runtime),
    ]
