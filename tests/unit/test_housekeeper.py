"""The worker's housekeeper: the reaper runs even when the heartbeat file cannot be written.

A read-only root (or a tmpfs folder owned by root) makes the heartbeat write fail on every
pass. The reaper used to run after the heartbeat in the same try block, so it never ran and
stalled runs were never resumed (issue 19). Here the housekeeper thread runs for real
against a SQLite database and the embedded broker, with a heartbeat path that cannot exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from models import queries
from models.migrate import upgrade
from tasks.distribution import _Housekeeper
from tests.certfactory import make_chain
from worker.core.bundle import build_bundle
from worker.platform.bootstrap import bootstrap
from worker.platform.celery_app import app, configure
from worker.platform.runtime import Runtime, build_runtime, migration_engine, set_runtime
from worker.platform.settings import load_settings

LONG_AGO = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KUBECONFIG = b"apiVersion: v1\nkind: Config\nusers: [{name: u, user: {token: t0ken}}]\n"


@dataclass
class Worker:
    runtime: Runtime
    heartbeat_file: Path


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the heartbeat's folder is a file: no write can succeed, even as root
    settings = bootstrap(
        load_settings(
            {
                "HOME": str(tmp_path),
                "CAP_DATA_DIR": str(tmp_path / "data"),
                "CAP_HEARTBEAT_FILE": str(blocker / "heartbeat"),
                "CAP_REAPER_INTERVAL": "0.1",
                "CAP_STALE_AFTER": "0.1",
                "CAP_RESEND_AFTER": "0.1",  # every pass finds the target lost again
            }
        )
    )
    with migration_engine(settings.database.url) as engine:
        upgrade(engine)
    configure(app, settings)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    try:
        yield Worker(runtime, settings.tasks.heartbeat_file)
    finally:
        set_runtime(None)
        runtime.close()


def _stalled_run(rt: Runtime) -> str:
    """A running run whose heartbeat is long past and whose one target was never processed."""
    chain = make_chain(cn="app.example.com", sans=["app.example.com"])
    bundle = build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=datetime.now(UTC)
    )
    with rt.session() as session:
        certificate = queries.store_certificate(session, rt.sealer, bundle)
        credential = queries.store_credential(
            session, rt.sealer, "cluster-a", "kubeconfig", KUBECONFIG
        )
        target = queries.create_target(
            session,
            name="edge-a",
            connection_mode="kubeconfig",
            credential_id=credential.id,
            namespace_template="edge",
            secret_name_template="edge-tls",
        )
        distribution = queries.create_distribution(
            session, certificate_id=certificate.id, target_id=target.id
        )
        run = queries.create_run(session, distribution_id=distribution.id, action="execute")
        queries.start_run(session, run.id, batch_plan=[[target.id]], now=LONG_AGO)
        return run.id


def _recoveries(rt: Runtime, run_id: str) -> int:
    with rt.session() as session:
        options = queries.get_run(session, run_id).options or {}
        return int(options.get("reaper_recoveries", 0))


def test_the_reaper_runs_although_the_heartbeat_cannot_be_written(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _stalled_run(worker.runtime)
    housekeeper = _Housekeeper()
    with caplog.at_level(logging.INFO, logger="tasks.distribution"):
        housekeeper.start()
        try:
            deadline = time.monotonic() + 20
            while _recoveries(worker.runtime, run_id) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            housekeeper.stopping.set()
            housekeeper.join(timeout=10)
    assert _recoveries(worker.runtime, run_id) >= 3, "the reaper never resumed the stalled run"
    assert not worker.heartbeat_file.exists()
    # Said once, clearly, although every pass failed to write it.
    failures = [r for r in caplog.records if "cannot write the heartbeat file" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert str(worker.heartbeat_file) in failures[0].getMessage()


def test_a_heartbeat_that_works_again_is_reported_and_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "run"
    folder.write_text("")  # in the way: the first beat fails
    heartbeat = folder / "heartbeat"
    housekeeper = _Housekeeper()
    with caplog.at_level(logging.INFO, logger="tasks.distribution"):
        housekeeper.beat(heartbeat)
        housekeeper.beat(heartbeat)
        folder.unlink()  # the operator fixed the mount
        housekeeper.beat(heartbeat)
    assert heartbeat.is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write the heartbeat file" in m for m in messages) == 1
    assert sum("is writable again" in m for m in messages) == 1
