"""Models, migrations and key rotation on the real PostgreSQL of the test environment.

The database-agnostic tests of ``tests/unit/test_models_sqlite.py`` are imported below and
run again here: this module overrides their ``db_url`` fixture with a freshly migrated
PostgreSQL database, so every model round-trip, constraint and query is checked on both
backends. PostgreSQL-only claims (column types, concurrent migrations, the full
upgrade/downgrade/upgrade cycle with data) follow.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from models import (
    Base,
    Certificate,
    Credential,
    Distribution,
    ResultStatus,
    RollbackSnapshot,
    Run,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
    migrate,
    queries,
)
from tests.unit.test_models_sqlite import (  # noqa: F401 - fixtures and shared tests
    KEK1,
    KEK2,
    KUBECONFIG,
    PREVIOUS,
    TABLES,
    _reveal,
    _save,
    bundle,
    current,
    downgrade,
    engine,
    factory,
    other_bundle,
    ring,
    sealer,
    session,
    test_a_claim_is_lost_when_its_lease_runs_out_not_while_it_is_renewed,
    test_a_database_filled_at_0001_upgrades_with_every_row_and_secret_intact,
    test_a_database_filled_at_0003_upgrades_with_revisions_pinned_and_secrets_intact,
    test_a_final_snapshot_is_never_overwritten,
    test_a_pending_target_is_lost_only_once_its_message_is_overdue,
    test_a_provisional_snapshot_is_replaced_by_the_next_attempt_in_place,
    test_a_reaper_recovery_is_counted_in_sql_only_on_a_running_and_still_stale_run,
    test_a_revision_key_copied_into_another_certificate_does_not_open,
    test_a_snapshot_of_our_own_other_revision_is_taken_only_when_none_exists,
    test_certificate_round_trips_with_a_sealed_private_key,
    test_child_process_after_fork_uses_its_own_connections,
    test_claims_are_exclusive_until_released_or_expired,
    test_concurrent_snapshot_saves_store_exactly_one,
    test_counts_and_skipping_drive_batch_decisions,
    test_credential_in_use_cannot_be_deleted,
    test_credential_names_are_unique_with_a_clear_error,
    test_credential_secret_is_sealed_and_revealed_only_on_request,
    test_data_survives_a_second_upgrade,
    test_database_enforces_credential_iff_kubeconfig,
    test_database_enforces_previous_iff_existed,
    test_database_enforces_the_destination_xor,
    test_deleting_a_group_removes_its_memberships,
    test_distributions_stack_in_position_order,
    test_downgrade_to_base_removes_everything_and_upgrade_restores_it,
    test_group_keeps_its_targets_in_order_and_can_reorder_them,
    test_group_rollback_availability_is_one_query_and_prefers_an_existing_secret,
    test_json_columns_keep_types,
    test_naive_datetimes_are_refused,
    test_one_result_per_run_and_target,
    test_position_is_unique_per_certificate,
    test_relationships_never_lazy_load,
    test_renewal_adds_a_revision_and_runs_keep_the_one_they_were_enqueued_with,
    test_renewed_certificate_replaces_content_and_keeps_its_id,
    test_rollback_availability_explains_the_greyed_out_button,
    test_rotation_rewraps_every_envelope_and_old_kek_can_be_dropped,
    test_rotation_stops_at_a_row_it_cannot_authenticate,
    test_rows_under_the_old_kek_stay_readable_until_rotated,
    test_run_lifecycle_records_plan_results_and_timestamps,
    test_run_parent_link_survives_and_is_cleared_on_parent_delete,
    test_run_transitions_are_guarded,
    test_secret_copied_into_another_row_does_not_decrypt,
    test_session_scope_commits_on_success_and_rolls_back_on_error,
    test_snapshot_of_an_absent_secret_stores_no_content,
    test_snapshot_records_what_we_wrote_for_drift_detection,
    test_snapshots_sealed_before_the_one_snapshot_type_still_read_back,
    test_target_result_records_outcome_and_duration,
    test_target_round_trips_every_field,
    test_the_database_clock_is_aware_utc,
    test_the_reaper_finds_running_runs_and_resends_each_lost_start_once,
    test_timestamps_come_back_timezone_aware_in_utc,
    test_unknown_enum_values_are_refused,
    test_upgrade_creates_every_table_and_matches_the_models,
    test_upgrade_twice_is_a_no_op,
    upgrade,
)
from tests.unit.test_scale_queries import (  # noqa: F401 - fixture and shared tests
    runtime,
    test_a_database_filled_before_the_scan_indexes_upgrades_with_every_row_intact,
    test_runs_list_reads_counts_not_rows_and_the_rows_on_request,
)
from tests.unit.test_serving_models import (  # noqa: F401 - shared with SQLite
    test_a_database_filled_before_the_serving_revision_upgrades_with_every_row_intact,
)
from worker.core.bundle import TlsBundle
from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE
from worker.platform.db import make_engine, make_session_factory, session_scope
from worker.platform.runtime import KeyringSealer

pytestmark = pytest.mark.integration


@pytest.fixture
def db_url(postgres_url: str) -> str:
    """A fresh PostgreSQL database, migrated to head (overrides the SQLite fixture)."""
    upgrade(postgres_url)
    return postgres_url


def test_the_shared_tests_really_run_on_postgresql(engine: Engine) -> None:  # noqa: F811
    assert engine.dialect.name == "postgresql"
    assert engine.url.drivername == "postgresql+psycopg"


def test_postgres_columns_use_native_types(engine: Engine) -> None:  # noqa: F811
    inspector = inspect(engine)
    columns = {c["name"]: c["type"] for c in inspector.get_columns("targets")}
    assert type(columns["variables"]).__name__ == "JSONB"
    assert type(columns["created_at"]).__name__ == "TIMESTAMP"
    assert columns["created_at"].timezone is True  # type: ignore[attr-defined]
    secrets = {c["name"]: c["type"] for c in inspector.get_columns("credentials")}
    assert type(secrets["secret"]).__name__ == "BYTEA"
    checks = {c["name"] for c in inspector.get_check_constraints("distributions")}
    assert "ck_distributions_destination_matches_kind" in checks


def test_concurrent_migrations_queue_instead_of_racing(postgres_url: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(postgres_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert current(postgres_url) == migrate.head()


def _populate_every_model(
    sessions: sessionmaker[Session], keys: KeyringSealer, tls: TlsBundle
) -> dict[str, Any]:
    now = datetime.now(UTC)
    with session_scope(sessions) as db:
        certificate = queries.store_certificate(db, keys, tls)
        credential = queries.store_credential(db, keys, "cluster-a", "kubeconfig", KUBECONFIG)
        target = queries.create_target(
            db,
            name="cluster-a",
            connection_mode="kubeconfig",
            credential_id=credential.id,
            namespace_template="{{ .tenant }}-edge",
            secret_name_template=DEFAULT_SECRET_NAME_TEMPLATE,
            variables={"tenant": "acme"},
        )
        group = queries.create_group(db, name="edge", target_ids=[target.id], batch_size=[1, "20%"])
        distribution = queries.create_distribution(
            db, certificate_id=certificate.id, group_id=group.id, store_content=True
        )
        run = queries.create_run(db, distribution_id=distribution.id, action="execute")
        queries.start_run(db, run.id, batch_plan=[[target.id]], now=now)
        claims = queries.claim_results(
            db, run.id, [target.id], now=now, lease_until=now + timedelta(seconds=60)
        )
        record = queries.ResultRecord(
            claim=queries.HeldClaim(run.id, target.id, claims[target.id].attempts),
            status=ResultStatus.CREATED,
            diff=None,
            error_reason=None,
            error_message=None,
            finished_at=now,
            duration_ms=5,
            resource_version="17",
            secret_name=None,
            namespace=None,
        )
        assert queries.record_results(db, [record]) == 1
        _save(db, keys, PREVIOUS, distribution_id=distribution.id, target_id=target.id)
        return {
            "certificate": certificate.id,
            "credential": credential.id,
            "target": target.id,
            "group": group.id,
            "distribution": distribution.id,
            "run": run.id,
        }


def test_upgrade_round_trip_downgrade_and_upgrade_again(db_url: str, bundle: TlsBundle) -> None:  # noqa: F811
    k1 = ring({"k1": KEK1})
    pg_engine = make_engine(db_url)
    sessions = make_session_factory(pg_engine)
    try:
        ids = _populate_every_model(sessions, k1, bundle)
        with session_scope(sessions) as db:
            counts = {
                model.__tablename__: len(db.scalars(select(model)).all())
                for model in (
                    Certificate,
                    Credential,
                    Target,
                    TargetGroup,
                    TargetGroupMember,
                    Distribution,
                    Run,
                    TargetResult,
                    RollbackSnapshot,
                )
            }
            assert counts == dict.fromkeys(TABLES, 1)
            assert queries.reveal_credential(db, k1, ids["credential"]) == KUBECONFIG
            assert queries.reveal_private_key(db, k1, ids["certificate"]) == (bundle.key_pem)
            group = queries.get_group(db, ids["group"])
            assert group.batch_size == [1, "20%"]
            content = _reveal(db, k1, distribution_id=ids["distribution"], target_id=ids["target"])
            assert content.data == PREVIOUS.data
        pg_engine.dispose()

        downgrade(db_url, "base")
        assert current(db_url) is None
        assert set(inspect(pg_engine).get_table_names()) == {"alembic_version"}

        upgrade(db_url)
        assert current(db_url) == migrate.head()
        with session_scope(sessions) as db:
            assert queries.list_certificates(db) == []
        assert set(Base.metadata.tables) <= set(inspect(pg_engine).get_table_names())
    finally:
        pg_engine.dispose()


def test_kek_rotation_end_to_end(db_url: str, bundle: TlsBundle) -> None:  # noqa: F811
    """Write under KEK1, rotate to KEK2, read with only KEK2 loaded (fresh pg_engine each step)."""
    kek1 = ring({"kek1": KEK1})
    pg_engine = make_engine(db_url)
    try:
        ids = _populate_every_model(make_session_factory(pg_engine), kek1, bundle)
    finally:
        pg_engine.dispose()

    both = ring({"kek1": KEK1, "kek2": KEK2}, current_key_id="kek2")
    pg_engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(pg_engine)) as db:
            # The key, its revision's copy, the kubeconfig, the snapshot.
            assert queries.envelope_key_usage(db, both) == {"kek1": 4}
            assert queries.rotate_keys(db, both, "kek2") == 4
    finally:
        pg_engine.dispose()

    only_kek2 = ring({"kek2": KEK2})
    pg_engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(pg_engine)) as db:
            assert queries.envelope_key_usage(db, only_kek2) == {"kek2": 4}
            assert queries.reveal_credential(db, only_kek2, ids["credential"]) == KUBECONFIG
            assert queries.reveal_private_key(db, only_kek2, ids["certificate"]) == bundle.key_pem
            revision = queries.current_revision(db, ids["certificate"])
            assert queries.reveal_revision_key(db, only_kek2, revision.id) == bundle.key_pem
            snapshot = _reveal(
                db, only_kek2, distribution_id=ids["distribution"], target_id=ids["target"]
            )
            assert snapshot.data == PREVIOUS.data
    finally:
        pg_engine.dispose()
