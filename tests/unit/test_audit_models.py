"""The audit's schema revision (SQLite here; PostgreSQL in tests/integration/
test_audit_models_postgres.py): a filled database upgrades with every row intact, audit rows
are stored, and the downgrade refuses while audit runs exist."""

from __future__ import annotations

from datetime import timedelta
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from models import ResultStatus, RunAction, TargetResult, queries
from models.sealing import Sealer
from tests.unit.test_models_sqlite import (
    NOW,
    PREVIOUS,
    _all_rows,
    _columns,
    _distribution,
    _save,
    _started_run,
    bundle,
    current,
    db_url,
    downgrade,
    engine,
    factory,
    migration_module,
    sealer,
    upgrade,
)
from worker.core.bundle import TlsBundle
from worker.platform.db import session_scope

__all__ = ["bundle", "db_url", "engine", "factory", "sealer"]  # fixtures, imported for use here


def _migration() -> ModuleType:
    return migration_module("0007_audit_runs.py")


def _record_audit(session: Session, distribution_id: str, target_id: str) -> str:
    run = queries.create_run(session, distribution_id=distribution_id, action=RunAction.AUDIT)
    queries.start_run(session, run.id, batch_plan=[[target_id]], now=NOW)
    claims = queries.claim_results(
        session, run.id, [target_id], now=NOW, lease_until=NOW + timedelta(seconds=60)
    )
    claim = claims[target_id]
    written = queries.record_results(
        session,
        [
            queries.ResultRecord(
                claim=queries.HeldClaim(run.id, target_id, claim.attempts),
                status=ResultStatus.OUTDATED,
                diff=None,
                error_reason=None,
                error_message=None,
                finished_at=NOW,
                duration_ms=3,
                resource_version="7",
                secret_name="app-example-com-tls",
                namespace="acme-edge",
                deployed_serial="0abc",
                deployed_not_after=NOW + timedelta(days=12),
                finding={"state": "outdated", "detail": "it holds revision 1", "revision": 1},
            )
        ],
    )
    assert written == 1
    return run.id


def test_a_database_filled_before_the_audit_revision_upgrades_with_every_row_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Read from the migration, so re-chaining it onto another revision keeps this test true.
    migration = _migration()
    before_audit, audit = migration.down_revision, migration.revision
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        _started_run(session, distribution, [[target.id]])
    downgrade(db_url, before_audit)
    assert current(db_url) == before_audit
    result_columns = {c["name"] for c in inspect(engine).get_columns("target_results")}
    assert "finding" not in result_columns
    columns_before = _columns(engine)
    rows_before = _all_rows(engine, columns_before)
    assert all(rows_before[table] for table in ("targets", "runs", "target_results"))

    upgrade(db_url, audit)

    assert current(db_url) == audit
    assert _all_rows(engine, columns_before) == rows_before
    upgrade(db_url)  # the models are head's: later revisions may add columns they read
    with session_scope(factory) as session:
        # Existing results have no audit columns filled; an audit run and its finding fit.
        old = session.execute(select(TargetResult.deployed_serial, TargetResult.finding)).one()
        assert tuple(old) == (None, None)
        run_id = _record_audit(session, ids["distribution_id"], ids["target_id"])
    with session_scope(factory) as session:
        result = session.scalars(select(TargetResult).where(TargetResult.run_id == run_id)).one()
        assert result.status is ResultStatus.OUTDATED
        assert (result.deployed_serial, result.deployed_not_after) == (
            "0abc",
            NOW + timedelta(days=12),
        )
        assert result.finding == {
            "state": "outdated",
            "detail": "it holds revision 1",
            "revision": 1,
        }

    # The downgrade refuses while an audit run exists (the old CHECK could not hold it) ...
    downgrade(db_url, audit)
    with pytest.raises(RuntimeError, match=r"1 audit run\(s\) exist.*delete them first"):
        downgrade(db_url, before_audit)
    assert current(db_url) == audit
    # ... and, once it is gone, drops what the revision added and keeps the rest. (Plain SQL:
    # head's models may read columns this revision does not have.)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM target_results WHERE run_id = :id"), {"id": run_id})
        connection.execute(text("DELETE FROM runs WHERE id = :id"), {"id": run_id})
    downgrade(db_url, before_audit)
    assert _all_rows(engine, columns_before) == rows_before


def test_an_audit_takes_no_mutation_lock(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    # The one-active-mutation index covers execute and rollback only: an audit queued or
    # running never stops an execute from being enqueued, nor the other way round.
    with session_scope(factory) as session:
        distribution, _ = _distribution(session, sealer, bundle)
        audit = queries.create_run(session, distribution_id=distribution.id, action="audit")
        execute = queries.create_run(session, distribution_id=distribution.id, action="execute")
        second_audit = queries.create_run(session, distribution_id=distribution.id, action="audit")
        assert len({audit.id, execute.id, second_audit.id}) == 3
