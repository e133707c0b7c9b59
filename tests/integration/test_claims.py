"""A message's targets are claimed together and recorded together: the claim rules still hold.

These drive ``worker.app.runs`` directly, against real PostgreSQL and real apiservers, to
reach interleavings a live worker only meets by bad luck: a message that runs out of time
before its last targets (their claims must be given back untouched), and a delivery whose
lease expired while it worked (its late record must not overwrite the delivery that took
the targets over). The Dispatcher here only writes down what the pipeline asks to send;
the same paths through real Celery workers are in test_pipeline.py and test_faults.py.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from models import queries
from models.base import utcnow
from models.entities import TargetResult
from tests.support.faults import FaultyApiProxy, build_faulty_fleet
from tests.support.pipeline import Pipeline, build_fleet, pipeline
from worker.app import runs as flow
from worker.app import service


class RecordingDispatcher:
    """Writes down the messages the pipeline asks for instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def start(self, run_id: str) -> None:
        self.sent.append(("start", run_id))

    def process_targets(self, run_id: str, target_ids: Sequence[str]) -> None:
        self.sent.append(("targets", list(target_ids)))

    def advance(self, run_id: str, batch_index: int) -> None:
        self.sent.append(("advance", batch_index))

    def targets(self) -> list[str]:
        return [tid for kind, ids in self.sent if kind == "targets" for tid in ids]


@pytest.fixture
def pipe(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with pipeline(postgres_url, redis_url, tmp_path) as made:
        yield made


def _started_run(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, targets: int
) -> tuple[str, list[str], RecordingDispatcher]:
    namespace = f"claims-{uuid.uuid4().hex[:6]}"
    fleet = build_fleet(
        pipe, clusters[:2], make_service_account, targets=targets, namespace=namespace
    )
    sent = RecordingDispatcher()
    run_id = service.enqueue_run(pipe.runtime, sent, fleet.distribution_id, "execute")
    flow.start_run(pipe.runtime, sent, run_id)
    target_ids = sent.targets()
    assert len(target_ids) == targets  # one batch (the default batch size is 100%)
    return run_id, target_ids, sent


def _results(pipe: Pipeline, run_id: str) -> dict[str, service.TargetResultView]:
    return {r.target_id: r for r in service.run_report(pipe.runtime, run_id).results}


def test_targets_a_message_cannot_start_in_time_are_given_back_untouched(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any
) -> None:
    run_id, target_ids, sent = _started_run(pipe, clusters, make_service_account, 5)

    # The deadline has passed: only the first target starts, the rest are released.
    left = flow.process_targets(
        pipe.runtime, sent, run_id, target_ids, start_before=time.monotonic() - 1
    )

    assert left == target_ids[1:]
    results = _results(pipe, run_id)
    assert results[target_ids[0]].status == "created"
    assert results[target_ids[0]].attempts == 1
    for target_id in left:
        assert (results[target_id].status, results[target_id].attempts) == ("pending", 0)
    assert ("advance", 0) not in sent.sent  # the batch is not done

    # The re-queued message claims them at once: a released claim holds no lease.
    assert flow.process_targets(pipe.runtime, sent, run_id, left) == []
    results = _results(pipe, run_id)
    assert {r.status for r in results.values()} == {"created"}
    assert {r.attempts for r in results.values()} == {1}
    assert ("advance", 0) in sent.sent


def test_a_delivery_whose_lease_was_taken_over_records_nothing(
    pipe: Pipeline,
    clusters: list[Any],
    make_service_account: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = pipe.runtime
    run_id, target_ids, sent = _started_run(pipe, clusters, make_service_account, 3)

    slow = flow._claim(rt, run_id, target_ids)  # the first delivery claims and works ...
    assert [job.target.id for job in slow] == target_ids
    slow_done = [(job, flow._process_one(rt, job)) for job in slow]
    assert {outcome.status.value for _, outcome in slow_done} == {"created"}
    # ... and outlives its lease; a redelivery takes the targets over and finishes them.
    with rt.session() as session:
        session.execute(
            update(TargetResult)
            .where(TargetResult.run_id == run_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert flow.process_targets(rt, sent, run_id, target_ids) == []
    taken_over = _results(pipe, run_id)
    assert {(r.status, r.attempts) for r in taken_over.values()} == {("unchanged", 2)}

    with caplog.at_level(logging.WARNING, logger=flow.log.name):
        flow._record(rt, slow_done)  # the first delivery's late record

    assert _results(pipe, run_id) == taken_over
    assert "3 of 3 outcomes not recorded" in caplog.text
    # Recorded targets are final: no delivery claims them again.
    assert flow._claim(rt, run_id, target_ids) == []


class _SoftLimit(Exception):
    """Raised in the main thread by a signal, as billiard raises the soft time limit."""


def test_a_target_the_soft_limit_interrupts_after_its_write_landed_is_given_back_not_failed(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    # Issue 17 §3. The pool's parent delivers the soft limit as a signal; here the fault proxy
    # sends it the moment the API server has answered the second target's create (the write
    # landed) and before the worker hears the answer.
    proxy = FaultyApiProxy(clusters[0].server, clusters[0].ca_pem)
    try:
        fleet = build_faulty_fleet(
            pipe,
            clusters[:1],
            make_service_account,
            f"claims-{uuid.uuid4().hex[:6]}",
            targets=3,
            proxy_for={clusters[0].name: proxy},
        )
        sent = RecordingDispatcher()
        run_id = service.enqueue_run(pipe.runtime, sent, fleet.distribution_id, "execute")
        flow.start_run(pipe.runtime, sent, run_id)
        target_ids = sent.targets()
        creates = 0

        def interrupt_on_the_second_create(method: str, path: str, status: int) -> None:
            nonlocal creates
            if method == "POST" and "/secrets" in path and status == 201:
                creates += 1
                if creates == 2:
                    os.kill(os.getpid(), signal.SIGUSR1)

        def raise_soft_limit(*_: Any) -> None:
            raise _SoftLimit

        previous = signal.signal(signal.SIGUSR1, raise_soft_limit)
        proxy.after_forward = interrupt_on_the_second_create
        try:
            left = flow.process_targets(
                pipe.runtime, sent, run_id, target_ids, interrupted_by=(_SoftLimit,)
            )
        finally:
            signal.signal(signal.SIGUSR1, previous)
            proxy.after_forward = None

        # The first target is recorded; the interrupted one and the one after are given back
        # (pending, attempt restored) for the caller to re-queue — none is "failed".
        assert left == target_ids[1:]
        results = _results(pipe, run_id)
        assert results[target_ids[0]].status == "created"
        for target_id in left:
            assert (results[target_id].status, results[target_id].attempts) == ("pending", 0)
        # The re-queued message finishes them: the interrupted write is found in place.
        assert flow.process_targets(pipe.runtime, sent, run_id, left) == []
        results = _results(pipe, run_id)
        assert results[target_ids[1]].status == "unchanged"
        assert results[target_ids[2]].status == "created"
        assert ("advance", 0) in sent.sent
        # And its rollback snapshot knows our write landed (a rollback will not call it drift).
        with pipe.runtime.session() as session:
            snapshot = queries.get_snapshot(session, fleet.distribution_id, target_ids[1])
            assert snapshot is not None and snapshot.written_fingerprint is not None
    finally:
        proxy.close()
