"""The audit's orchestration over the database (SQLite; the dispatcher records what it would
send): requests refused with nothing queued, one batch whatever the group's batch size, no
halt on failed reads, and the merged report's order. The real pipeline is
tests/integration/test_audit.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models import DistributionKind, ResultStatus, queries
from models.sealing import Sealer
from tests.unit.test_models_sqlite import NOW, _target, bundle, db_url, sealer
from tests.unit.test_pools_models import Recorder, runtime
from worker.app.audit import audit_report, enqueue_audit
from worker.app.commands import ServiceError
from worker.app.runs import advance_run, start_run
from worker.core.bundle import TlsBundle
from worker.platform.runtime import Runtime

__all__ = ["bundle", "db_url", "runtime", "sealer"]  # fixtures, imported for use here


def _group_distribution(rt: Runtime, sealer: Sealer, bundle: TlsBundle) -> tuple[str, list[str]]:
    with rt.session() as session:
        certificate = queries.store_certificate(session, sealer, bundle)
        targets = [_target(session, sealer, f"edge-{n}").id for n in range(3)]
        group = queries.create_group(
            session, name="edge", target_ids=targets, batch_size=[1, "50%"], failure_threshold=0
        )
        distribution = queries.create_distribution(
            session, certificate_id=certificate.id, group_id=group.id
        )
        return distribution.id, targets


def _record(rt: Runtime, run_id: str, outcomes: dict[str, tuple[ResultStatus, str | None]]) -> None:
    with rt.session() as session:
        claims = queries.claim_results(
            session, run_id, list(outcomes), now=NOW, lease_until=NOW + timedelta(seconds=60)
        )
        queries.record_results(
            session,
            [
                queries.ResultRecord(
                    claim=queries.HeldClaim(run_id, target_id, claims[target_id].attempts),
                    status=status,
                    diff=None,
                    error_reason=reason,
                    error_message=f"{reason}: refused" if reason else None,
                    finished_at=NOW,
                    duration_ms=2,
                    resource_version=None,
                    secret_name="app-tls",
                    namespace="acme-edge",
                    deployed_serial="0a" if status is ResultStatus.CURRENT else None,
                    deployed_not_after=NOW + timedelta(days=40)
                    if status is ResultStatus.CURRENT
                    else None,
                    finding={"state": status.value, "detail": "d"}
                    if status is not ResultStatus.FAILED
                    else None,
                )
                for target_id, (status, reason) in outcomes.items()
            ],
        )


def test_an_audit_is_one_batch_and_a_failed_read_never_halts_it(
    runtime: Runtime, sealer: Sealer, bundle: TlsBundle
) -> None:
    rt = runtime
    distribution_id, targets = _group_distribution(rt, sealer, bundle)
    sent = Recorder()
    (run_id,) = enqueue_audit(rt, sent, group="edge")
    assert sent.sent == [("start", (run_id,))]

    start_run(rt, sent, run_id)

    # The group's progressive batch size [1, "50%"] is for writes; an audit reads all at once.
    assert sent.sent[-1] == ("process", (run_id, tuple(targets)))
    pending = audit_report(rt, [run_id])
    assert not pending.finished and {row.state for row in pending.rows} == {"pending"}

    # Two reads fail (threshold 0 would halt an execute); the audit goes on and ends failed.
    _record(
        rt,
        run_id,
        {
            targets[0]: (ResultStatus.FAILED, "forbidden"),
            targets[1]: (ResultStatus.CURRENT, None),
            targets[2]: (ResultStatus.FAILED, "unreachable"),
        },
    )
    advance_run(rt, sent, run_id, 0)
    report = audit_report(rt, [run_id], now=NOW)
    (run,) = report.runs
    assert (run.state, run.reason) == (
        "failed",
        "audit incomplete: 2 of 3 target(s) could not be read",
    )
    # Unreadable before current; two of a rank by target name (edge-0, edge-2).
    assert [row.state for row in report.rows] == ["forbidden", "unreachable", "current"]
    current = report.rows[-1]
    assert (current.serial, current.days_left) == ("0a", 40)
    assert report.counts() == {"forbidden": 1, "unreachable": 1, "current": 1}
    assert distribution_id == run.distribution_id


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "choose exactly one of --distribution DIST, --group GROUP or --all"),
        ({"every": True, "group": "edge"}, "choose exactly one of"),
        ({"group": "lonely"}, "group 'lonely' has no Kubernetes distribution attached"),
        ({"distribution": "webhook"}, "is a webhook distribution"),
    ],
)
def test_a_bad_audit_request_is_refused_and_queues_nothing(
    runtime: Runtime, sealer: Sealer, bundle: TlsBundle, kwargs: dict[str, object], message: str
) -> None:
    rt = runtime
    with rt.session() as session:
        certificate = queries.store_certificate(session, sealer, bundle)
        queries.create_group(session, name="lonely", target_ids=[])
        webhook = queries.create_distribution(
            session,
            certificate_id=certificate.id,
            kind=DistributionKind.WEBHOOK,
            webhook_url="https://hooks.example.com/x",
        )
    if kwargs.get("distribution") == "webhook":
        kwargs = {"distribution": webhook.id}
    sent = Recorder()
    with pytest.raises(ServiceError, match=message):
        enqueue_audit(rt, sent, **kwargs)  # type: ignore[arg-type]
    assert sent.sent == []
    with rt.session() as session:
        assert queries.list_runs(session) == []


def test_an_audit_report_refuses_runs_that_are_not_audits(
    runtime: Runtime, sealer: Sealer, bundle: TlsBundle
) -> None:
    rt = runtime
    distribution_id, _ = _group_distribution(rt, sealer, bundle)
    with rt.session() as session:
        run_id = queries.create_run(session, distribution_id=distribution_id, action="dry_run").id
    with pytest.raises(ServiceError, match="is a dry_run run, not an audit"):
        audit_report(rt, [run_id])
    with pytest.raises(ServiceError, match="--warn-days must be 0 or more"):
        audit_report(rt, [run_id], warn_days=-1)
