"""Models, query functions, constraints, rollback availability and key rotation on SQLite.

The database-agnostic tests here are imported again by
``tests/integration/test_models_postgres.py``, which overrides the ``db_url`` fixture, so the
same claims are checked on the real PostgreSQL of the test environment.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, inspect, select, text, update
from sqlalchemy.exc import IntegrityError, InvalidRequestError, StatementError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from models import (
    Base,
    Certificate,
    ConnectionMode,
    Credential,
    CredentialKind,
    Distribution,
    DistributionKind,
    HealthStatus,
    ResultStatus,
    RollbackSnapshot,
    Run,
    RunAction,
    RunState,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
    migrate,
    queries,
    rollback_availability,
)
from models.rollback import (
    NOT_KUBERNETES,
    NOTHING_DEPLOYED_YET,
    PREVIOUSLY_ABSENT,
    STORE_CONTENT_OFF,
)
from models.sealing import Sealer
from tests.certfactory import make_chain
from worker.app import commands, views
from worker.app.clients import kube_client
from worker.core.bundle import TlsBundle, build_bundle
from worker.core.crypto import DecryptionError, Keyring, UnknownKeyError, envelope_key_id
from worker.core.fanout import FanoutConfigError
from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE
from worker.core.snapshot import PreviousSecret
from worker.kube.connect import ClientCache
from worker.platform.db import (
    DatabaseUrlError,
    dispose_after_fork,
    make_engine,
    make_session_factory,
    session_scope,
)
from worker.platform.runtime import (
    KeyringSealer,
    Runtime,
    build_runtime,
    migration_engine,
)
from worker.platform.settings import load_settings

KEK1 = bytes(range(32))
KEK2 = bytes(range(64, 96))
KUBECONFIG = b"apiVersion: v1\nkind: Config\nusers: [{name: u, user: {token: t0ken-s3cret}}]\n"
LEASE = timedelta(seconds=60)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "certificates",
    "credentials",
    "targets",
    "target_groups",
    "target_group_members",
    "distributions",
    "runs",
    "target_results",
    "rollback_snapshots",
}


# ---------------------------------------------------------------------------------- helpers


def ring(keys: dict[str, bytes], current_key_id: str | None = None) -> KeyringSealer:
    """A sealer over a keyring of these KEKs (what a process's Runtime.sealer is)."""
    return KeyringSealer(Keyring(keys, current_key_id))


def upgrade(url: str, rev: str = "head") -> None:
    with migration_engine(url) as engine:
        migrate.upgrade(engine, rev)


def migration_module(filename: str) -> ModuleType:
    """A revision file of models/migrations/versions as a module (its revision ids)."""
    path = Path(__file__).parents[2] / "models/migrations/versions" / filename
    spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade(url: str, rev: str) -> None:
    with migration_engine(url) as engine:
        migrate.downgrade(engine, rev)


def current(url: str) -> str | None:
    with migration_engine(url) as engine:
        return migrate.current(engine)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A freshly migrated SQLite database file (PostgreSQL tests override this)."""
    url = f"sqlite:///{tmp_path / 'cap.db'}"
    upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session:
        yield session


@pytest.fixture
def sealer() -> Keyring:
    return ring({"k1": KEK1})


@pytest.fixture
def runtime(db_url: str, tmp_path: Path) -> Iterator[Runtime]:
    """The application's runtime on this database (KEK k1), for checks that moved to commands."""
    settings = load_settings(
        {
            "HOME": str(tmp_path),
            "CAP_DATA_DIR": str(tmp_path / "data"),
            "CAP_DATABASE_URL": db_url,
            "CAP_KEK": "k1:" + base64.b64encode(KEK1).decode(),
        }
    )
    rt = build_runtime(settings)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def bundle() -> TlsBundle:
    chain = make_chain(cn="app.example.com", sans=["app.example.com", "www.example.com"])
    return build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=datetime.now(UTC)
    )


@pytest.fixture(scope="module")
def other_bundle() -> TlsBundle:
    """A second certificate (another key): what a renewal brings."""
    chain = make_chain(cn="app.example.com", sans=["app.example.com"])
    return build_bundle(
        chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=datetime.now(UTC)
    )


def _credential(session: Session, sealer: Sealer, name: str = "cluster-a") -> Credential:
    return queries.store_credential(session, sealer, name, "kubeconfig", KUBECONFIG)


def _target(session: Session, sealer: Sealer, name: str = "edge-a", **kwargs: Any) -> Target:
    credential = _credential(session, sealer, f"{name}-kubeconfig")
    kwargs.setdefault("secret_name_template", DEFAULT_SECRET_NAME_TEMPLATE)
    return queries.create_target(
        session,
        name=name,
        connection_mode="kubeconfig",
        credential_id=credential.id,
        namespace_template="{{ .tenant }}-edge",
        **kwargs,
    )


def _distribution(
    session: Session, sealer: Sealer, bundle: TlsBundle, *, store_content: bool = True
) -> tuple[Distribution, Target]:
    certificate = queries.store_certificate(session, sealer, bundle)
    target = _target(session, sealer)
    distribution = queries.create_distribution(
        session, certificate_id=certificate.id, target_id=target.id, store_content=store_content
    )
    return distribution, target


def _started_run(
    session: Session, distribution: Distribution, plan: list[list[str]], action: str = "execute"
) -> Run:
    run = queries.create_run(session, distribution_id=distribution.id, action=action)
    return queries.start_run(session, run.id, batch_plan=plan, now=NOW)


# -------------------------------------------------------------------------------- migrations


def test_upgrade_creates_every_table_and_matches_the_models(engine: Engine, db_url: str) -> None:
    assert current(db_url) == migrate.head()
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(db_url: str) -> None:
    downgrade(db_url, "base")
    assert current(db_url) is None
    check = make_engine(db_url)
    try:
        assert set(inspect(check).get_table_names()) & TABLES == set()
        upgrade(db_url)
        assert TABLES <= set(inspect(check).get_table_names())
    finally:
        check.dispose()
    assert current(db_url) == migrate.head()


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    assert current(db_url) == migrate.head()


def test_data_survives_a_second_upgrade(
    factory: sessionmaker[Session], sealer: Sealer, db_url: str
) -> None:
    with session_scope(factory) as session:
        credential_id = _credential(session, sealer).id
    upgrade(db_url)
    with session_scope(factory) as session:
        assert queries.reveal_credential(session, sealer, credential_id) == KUBECONFIG


def _all_rows(
    engine: Engine, columns: dict[str, list[str]] | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (only ``columns`` where given), ordered, for comparisons."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in sorted(TABLES):
            names = (columns or {}).get(table) or [
                column["name"] for column in inspect(connection).get_columns(table)
            ]
            query = f"SELECT {', '.join(names)} FROM {table}"  # noqa: S608 - schema names
            rows[table] = sorted((tuple(row) for row in connection.execute(text(query))), key=repr)
    return rows


def _columns(engine: Engine) -> dict[str, list[str]]:
    with engine.connect() as connection:
        inspector = inspect(connection)
        return {t: [c["name"] for c in inspector.get_columns(t)] for t in sorted(TABLES)}


def test_a_database_filled_at_0001_upgrades_with_every_row_and_secret_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Revision 0002 adds the one-active-mutation index, 0003 a target column. The rows are
    # written through today's models, the database is taken back to 0001 (rows kept), and a
    # second active mutation of one distribution — possible at 0001 — is added there.
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        queries.record_snapshot_write(session, **ids, fingerprint="ab" * 32, resource_version="9")
        older = _started_run(session, distribution, [[target.id]])
        dry = queries.create_run(session, distribution_id=distribution.id, action="dry_run")
        certificate_id, credential_id = distribution.certificate_id, target.credential_id
        older_id, dry_id = older.id, dry.id
    downgrade(db_url, "0001")
    newer_id = "00000000-0000-4000-8000-00000000a002"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (id, distribution_id, action, state, current_batch, "
                "batch_plan, options, cascade, created_at) VALUES (:id, :distribution, "
                "'rollback', 'queued', 0, '[]', '{}', :no, :created)"
            ),
            {
                "id": newer_id,
                "distribution": distribution.id,
                "no": False,
                "created": datetime.now(UTC) + timedelta(seconds=1),
            },
        )
    columns_at_0001 = _columns(engine)
    before = _all_rows(engine, columns_at_0001)

    upgrade(db_url)

    assert current(db_url) == migrate.head()
    # Every column that 0001 had still holds what it held; new columns have their defaults.
    after = _all_rows(engine, columns_at_0001)
    changed = {table for table in TABLES if before[table] != after[table]}
    assert changed == {"runs"}, changed
    with session_scope(factory) as session:
        superseded = queries.get_run(session, newer_id)
        assert superseded.state is RunState.FAILED
        assert "revision 0002" in (superseded.reason or "")
        assert queries.get_run(session, older_id).state is RunState.RUNNING
        assert queries.get_run(session, dry_id).state is RunState.QUEUED
        # Every other row is byte for byte what it was; the sealed secrets still open.
        unchanged = [row for row in before["runs"] if newer_id not in row]
        assert all(row in after["runs"] for row in unchanged)
        assert queries.reveal_private_key(session, sealer, certificate_id) == bundle.key_pem
        assert credential_id is not None
        assert queries.reveal_credential(session, sealer, credential_id) == KUBECONFIG
        assert _reveal(session, sealer, **ids) == PREVIOUS
        assert queries.get_target(session, target.id).allow_system_namespace is False  # 0003
    # And the index now holds: a second execute is refused, naming the active one.
    with session_scope(factory) as session, pytest.raises(queries.ActiveRunError, match=older_id):
        queries.create_run(session, distribution_id=distribution.id, action="execute")


def test_a_database_filled_at_0003_upgrades_with_revisions_pinned_and_secrets_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Revision 0004 adds certificate revisions (each certificate gets revision 1, a copy of its
    # content), pins every run to it, and adds send times and leases to results. The rows are
    # written through today's models, then the database goes back to 0003 (rows kept).
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        running = _started_run(session, distribution, [[target.id]])
        dry = queries.create_run(session, distribution_id=distribution.id, action="dry_run")
        certificate_id, credential_id = distribution.certificate_id, target.credential_id
        run_ids = {running.id, dry.id}
    downgrade(db_url, "0003")
    assert "certificate_revisions" not in inspect(engine).get_table_names()
    columns_at_0003 = _columns(engine)
    before = _all_rows(engine, columns_at_0003)

    upgrade(db_url, "0004")

    assert _all_rows(engine, columns_at_0003) == before  # nothing that 0003 had changed
    with session_scope(factory) as session:
        revision = queries.current_revision(session, certificate_id)
        certificate = queries.get_certificate(session, certificate_id)
        assert revision.number == 1
        for column in ("serial_hex", "sha256_fingerprint", "leaf_pem", "chain_pem", "ca_pem"):
            assert getattr(revision, column) == getattr(certificate, column), column
        assert revision.not_after == certificate.not_after
        # The copied envelope opens (sealed for the certificate), as does everything else.
        assert queries.reveal_revision_key(session, sealer, revision.id) == bundle.key_pem
        assert queries.reveal_private_key(session, sealer, certificate_id) == bundle.key_pem
        assert credential_id is not None
        assert queries.reveal_credential(session, sealer, credential_id) == KUBECONFIG
        assert _reveal(session, sealer, **ids) == PREVIOUS
        for run_id in run_ids:
            assert queries.get_run(session, run_id).certificate_revision_id == revision.id
        loaded = queries.load_run_context(session, running.id)
        assert loaded is not None and loaded[2].id == revision.id
        # The columns of 0004 only: later revisions add columns this schema does not have yet.
        result = session.execute(select(TargetResult.sent_at, TargetResult.lease_expires_at)).one()
        assert result.sent_at is None and result.lease_expires_at is None


def test_renewal_adds_a_revision_and_runs_keep_the_one_they_were_enqueued_with(
    session: Session, sealer: Sealer, bundle: TlsBundle, other_bundle: TlsBundle
) -> None:
    distribution, _ = _distribution(session, sealer, bundle)
    certificate_id = distribution.certificate_id
    before = queries.create_run(session, distribution_id=distribution.id, action="dry_run")
    first = queries.current_revision(session, certificate_id)

    queries.replace_certificate(session, sealer, certificate_id, other_bundle)
    after = queries.create_run(session, distribution_id=distribution.id, action="dry_run")
    second = queries.current_revision(session, certificate_id)

    assert (first.number, second.number) == (1, 2)
    assert before.certificate_revision_id == first.id
    assert after.certificate_revision_id == second.id
    assert first.sha256_fingerprint == bundle.leaf.sha256_fingerprint
    assert second.sha256_fingerprint == other_bundle.leaf.sha256_fingerprint
    # Each revision pairs its own leaf with its own key: never the old leaf with the new key.
    assert queries.reveal_revision_key(session, sealer, first.id) == bundle.key_pem
    assert queries.reveal_revision_key(session, sealer, second.id) == other_bundle.key_pem


def test_a_revision_key_copied_into_another_certificate_does_not_open(
    session: Session, sealer: Sealer, bundle: TlsBundle, other_bundle: TlsBundle
) -> None:
    mine = queries.store_certificate(session, sealer, bundle)
    theirs = queries.store_certificate(session, sealer, other_bundle)
    stolen = queries.current_revision(session, mine.id)
    target = queries.current_revision(session, theirs.id)
    target.private_key = stolen.private_key
    session.flush()
    with pytest.raises(DecryptionError):
        queries.reveal_revision_key(session, sealer, target.id)


# ------------------------------------------------------------------------------ engine / db


def test_sqlite_engine_uses_wal_foreign_keys_and_a_busy_timeout(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_in_memory_sqlite_is_shared_between_sessions() -> None:
    memory = make_engine("sqlite://")
    Base.metadata.create_all(memory)
    factory = make_session_factory(memory)
    with session_scope(factory) as session:
        queries.store_credential(session, ring({"k1": KEK1}), "c", "kubeconfig", b"x")
    with session_scope(factory) as session:
        assert [c.name for c in queries.list_credentials(session)] == ["c"]
    memory.dispose()


def test_missing_sqlite_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUrlError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path}/absent/cap.db")


def test_unsupported_backend_is_refused_without_showing_the_password() -> None:
    with pytest.raises(DatabaseUrlError, match="unsupported backend 'mysql'") as caught:
        make_engine("mysql://user:pw-123@host/db")
    assert "pw-123" not in str(caught.value)


def test_bare_postgresql_urls_get_the_psycopg_driver() -> None:
    engine = make_engine("postgresql://user:pw@127.0.0.1:1/db")
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()


def test_session_scope_commits_on_success_and_rolls_back_on_error(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        _credential(session, sealer, "kept")
    with pytest.raises(RuntimeError), session_scope(factory) as session:
        _credential(session, sealer, "discarded")
        raise RuntimeError("boom")
    with session_scope(factory) as session:
        assert [c.name for c in queries.list_credentials(session)] == ["kept"]


def test_objects_stay_readable_after_the_scope_commits(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        credential = _credential(session, sealer)
    assert credential.name == "cluster-a"


def test_child_process_after_fork_uses_its_own_connections(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        _credential(session, sealer, "before-fork")
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's pooled connection
        code = 1
        try:
            dispose_after_fork(engine)
            with session_scope(factory) as session:
                _credential(session, sealer, "from-child")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with session_scope(factory) as session:
        names = [c.name for c in queries.list_credentials(session)]
    assert names == ["before-fork", "from-child"]


# ----------------------------------------------------------------------- timestamps and types


def test_timestamps_come_back_timezone_aware_in_utc(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    moment = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(hours=0)
    with session_scope(factory) as session:
        target = _target(session, sealer)
        queries.record_health(session, target.id, healthy=True, message="ok", checked_at=moment)
    with session_scope(factory) as session:
        loaded = queries.get_target(session, target.id)
        assert loaded.health_checked_at == moment
        assert loaded.health_checked_at is not None
        assert loaded.health_checked_at.utcoffset() == timedelta(0)
        assert loaded.created_at.tzinfo is not None


def test_naive_datetimes_are_refused(session: Session, sealer: Sealer) -> None:
    target = _target(session, sealer)
    target.health_checked_at = datetime(2025, 1, 1)  # naive on purpose
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_unknown_enum_values_are_refused(session: Session, sealer: Sealer) -> None:
    with pytest.raises(ValueError):
        queries.store_credential(session, sealer, "c", "password", b"x")
    target = _target(session, sealer)
    target.health_status = "sick"  # type: ignore[assignment]
    with pytest.raises(StatementError):
        session.flush()


# ------------------------------------------------------------------------------ certificates


def test_certificate_round_trips_with_a_sealed_private_key(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        certificate_id = queries.store_certificate(session, sealer, bundle).id
    with session_scope(factory) as session:
        stored = queries.get_certificate(session, certificate_id)
        assert stored.common_name == "app.example.com"
        assert stored.sans == ["app.example.com", "www.example.com"]
        assert stored.serial_hex == bundle.leaf.serial_hex
        assert stored.issuer == bundle.leaf.issuer
        assert stored.not_before == bundle.leaf.not_before
        assert stored.not_after == bundle.leaf.not_after
        assert stored.sha256_fingerprint == bundle.leaf.sha256_fingerprint
        assert stored.leaf_pem.encode() == bundle.leaf_pem
        assert stored.chain_pem.encode() == b"".join(bundle.chain_pems)
        assert stored.ca_pem is not None and stored.ca_pem.encode() == bundle.ca_pem
        assert bundle.key_pem not in stored.private_key
        assert queries.reveal_private_key(session, sealer, certificate_id) == bundle.key_pem
        assert [c.id for c in queries.list_certificates(session)] == [certificate_id]


def test_renewed_certificate_replaces_content_and_keeps_its_id(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    renewed_chain = make_chain(cn="app.example.com", key_type="rsa2048", intermediates=0)
    renewed = build_bundle(
        renewed_chain.leaf_pem,
        renewed_chain.key_pem,
        b"",
        renewed_chain.root_pem,
        now=datetime.now(UTC),
    )
    with session_scope(factory) as session:
        certificate_id = queries.store_certificate(session, sealer, bundle).id
    with session_scope(factory) as session:
        queries.replace_certificate(session, sealer, certificate_id, renewed)
    with session_scope(factory) as session:
        stored = queries.get_certificate(session, certificate_id)
        assert stored.sha256_fingerprint == renewed.leaf.sha256_fingerprint
        assert stored.chain_pem == ""
        assert queries.reveal_private_key(session, sealer, certificate_id) == renewed.key_pem
        assert len(queries.list_certificates(session)) == 1


def test_certificate_repr_never_shows_the_key(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    certificate = queries.store_certificate(session, sealer, bundle)
    text_repr = repr(certificate)
    assert "app.example.com" in text_repr
    assert "PRIVATE KEY" not in text_repr and "private_key" not in text_repr


def test_missing_rows_raise_not_found_with_the_id(session: Session) -> None:
    with pytest.raises(queries.NotFoundError, match="certificate with id 'nope' not found"):
        queries.get_certificate(session, "nope")
    with pytest.raises(queries.NotFoundError, match="target with name 'ghost' not found"):
        queries.get_target_by_name(session, "ghost")


# ------------------------------------------------------------------------------- credentials


def test_credential_secret_is_sealed_and_revealed_only_on_request(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        credential_id = _credential(session, sealer).id
    with session_scope(factory) as session:
        credential = queries.get_credential_by_name(session, "cluster-a")
        assert credential.id == credential_id
        assert credential.kind is CredentialKind.KUBECONFIG
        assert b"t0ken-s3cret" not in credential.secret
        assert envelope_key_id(credential.secret) == "k1"
        assert "t0ken" not in repr(credential) and "secret=" not in repr(credential)
        assert queries.reveal_credential(session, sealer, credential_id) == KUBECONFIG


def test_credential_names_are_unique_with_a_clear_error(session: Session, sealer: Sealer) -> None:
    _credential(session, sealer)
    with pytest.raises(queries.AlreadyExistsError, match="credential named 'cluster-a' already"):
        _credential(session, sealer)


def test_empty_credential_secret_is_refused(session: Session, sealer: Sealer) -> None:
    with pytest.raises(queries.InvalidRecordError, match="secret is empty"):
        queries.store_credential(session, sealer, "c", "kubeconfig", b"")


def test_replaced_credential_secret_is_readable(session: Session, sealer: Sealer) -> None:
    credential = _credential(session, sealer)
    queries.replace_credential_secret(session, sealer, credential.id, b"new kubeconfig")
    assert queries.reveal_credential(session, sealer, credential.id) == b"new kubeconfig"


def test_secret_copied_into_another_row_does_not_decrypt(session: Session, sealer: Sealer) -> None:
    first = _credential(session, sealer, "first")
    second = queries.store_credential(session, sealer, "second", "kubeconfig", b"other")
    session.execute(
        update(Credential).where(Credential.id == second.id).values(secret=first.secret)
    )
    session.expire_all()
    with pytest.raises(DecryptionError, match=second.id):
        queries.reveal_credential(session, sealer, second.id)


# ----------------------------------------------------------------------------------- targets


def test_target_defaults_follow_the_spec(session: Session, sealer: Sealer) -> None:
    target = _target(session, sealer)
    session.expire_all()
    loaded = queries.get_target(session, target.id)
    # The default template is the application's (a new target's form starts with it).
    assert commands.TargetSpec(name="t", namespace="n").secret_name == DEFAULT_SECRET_NAME_TEMPLATE
    assert loaded.secret_name_template == DEFAULT_SECRET_NAME_TEMPLATE
    assert DEFAULT_SECRET_NAME_TEMPLATE == '{{ .cn | replaceAll "." "-" }}-tls'
    assert (loaded.include_ca, loaded.allow_insecure, loaded.adopt_unmanaged) == (
        False,
        False,
        False,
    )
    assert loaded.health_status is HealthStatus.UNKNOWN
    assert loaded.module == "kubernetes"
    assert loaded.variables == {}


def test_target_round_trips_every_field(factory: sessionmaker[Session], sealer: Sealer) -> None:
    with session_scope(factory) as session:
        target_id = _target(
            session,
            sealer,
            secret_name_template="ingress-nginx-tls",
            include_ca=True,
            allow_insecure=True,
            adopt_unmanaged=True,
            variables={"tenant": "acme", "nested": {"a": [1, 2]}},
        ).id
        queries.record_health(session, target_id, healthy=False, message="namespace missing")
    with session_scope(factory) as session:
        target = queries.get_target_by_name(session, "edge-a")
        assert target.id == target_id
        assert target.connection_mode is ConnectionMode.KUBECONFIG
        assert target.namespace_template == "{{ .tenant }}-edge"
        assert target.secret_name_template == "ingress-nginx-tls"
        assert (target.include_ca, target.allow_insecure, target.adopt_unmanaged) == (
            True,
            True,
            True,
        )
        assert target.variables == {"tenant": "acme", "nested": {"a": [1, 2]}}
        assert target.health_status is HealthStatus.UNHEALTHY
        assert target.health_message == "namespace missing"
        assert [t.name for t in queries.list_targets(session)] == ["edge-a"]


def test_in_cluster_target_needs_no_credential(session: Session) -> None:
    target = queries.create_target(
        session,
        name="local",
        connection_mode="in_cluster",
        namespace_template="ingress",
        secret_name_template="app-tls",
    )
    assert target.credential_id is None


@pytest.mark.parametrize(
    ("mode", "with_credential", "credential_kind", "expected"),
    [
        ("kubeconfig", False, None, "needs a credential holding the kubeconfig"),
        ("in_cluster", True, "kubeconfig", "takes no credential"),
        ("kubeconfig", True, "webhook_hmac", "not a kubeconfig"),
    ],
)
def test_target_credential_rules_are_explained(
    session: Session,
    sealer: Sealer,
    mode: str,
    with_credential: bool,
    credential_kind: str | None,
    expected: str,
) -> None:
    credential_id = None
    if with_credential:
        assert credential_kind is not None
        credential_id = queries.store_credential(session, sealer, "cred", credential_kind, b"x").id
    with pytest.raises(queries.InvalidRecordError, match=expected):
        queries.create_target(
            session,
            name="t",
            connection_mode=mode,
            credential_id=credential_id,
            namespace_template="ns",
            secret_name_template="app-tls",
        )


@pytest.mark.parametrize(("mode", "with_credential"), [("kubeconfig", False), ("in_cluster", True)])
def test_database_enforces_credential_iff_kubeconfig(
    factory: sessionmaker[Session], sealer: Sealer, mode: str, with_credential: bool
) -> None:
    with session_scope(factory) as session:
        credential_id = _credential(session, sealer).id
    with pytest.raises(IntegrityError, match=r"credential_iff_kubeconfig|check constraint"):
        with session_scope(factory) as session:
            session.add(
                Target(
                    name="raw",
                    connection_mode=ConnectionMode(mode),
                    credential_id=credential_id if with_credential else None,
                    namespace_template="ns",
                    secret_name_template="app-tls",
                )
            )


def test_relationships_never_lazy_load(factory: sessionmaker[Session], sealer: Sealer) -> None:
    with session_scope(factory) as session:
        target_id = _target(session, sealer).id
    with session_scope(factory) as session:
        target = queries.get_target(session, target_id)
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = target.credential
        eager = session.scalars(
            select(Target).options(selectinload(Target.credential)).where(Target.id == target_id)
        ).one()
        assert eager.credential is not None and eager.credential.name == "edge-a-kubeconfig"


def test_credential_in_use_cannot_be_deleted(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        credential_id = _target(session, sealer).credential_id
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.execute(text("DELETE FROM credentials WHERE id = :id"), {"id": credential_id})


# ------------------------------------------------------------------------------------ groups


def test_group_keeps_its_targets_in_order_and_can_reorder_them(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        ids = [_target(session, sealer, f"cluster-{n}").id for n in range(3)]
        group = queries.create_group(
            session,
            name="edge",
            target_ids=ids,
            batch_size=[1, "50%"],
            failure_threshold="10%",
            variables={"tenant": "acme"},
        )
        group_id = group.id
    with session_scope(factory) as session:
        assert [t.id for t in queries.group_targets(session, group_id)] == ids
        # Swapping positions must not trip the unique (group, position) constraint.
        queries.set_group_members(session, group_id, list(reversed(ids)))
    with session_scope(factory) as session:
        group = queries.get_group_by_name(session, "edge")
        assert group.batch_size == [1, "50%"]
        assert group.failure_threshold == "10%"
        assert group.variables == {"tenant": "acme"}
        assert [t.id for t in queries.group_targets(session, group_id)] == list(reversed(ids))
        loaded = session.scalars(
            select(TargetGroup).options(selectinload(TargetGroup.members))
        ).one()
        assert [m.position for m in loaded.members] == [0, 1, 2]
        assert [g.name for g in queries.list_groups(session)] == ["edge"]


def test_group_fanout_defaults_to_the_settings(session: Session, sealer: Sealer) -> None:
    group = queries.create_group(session, name="g", target_ids=[_target(session, sealer).id])
    assert group.batch_size is None and group.failure_threshold is None


@pytest.mark.parametrize(
    ("batch_size", "threshold"),
    [(0, None), ("150%", None), ([], None), (None, -1), (None, "101%")],
)
def test_group_fanout_values_are_validated(
    runtime: Runtime, sealer: Sealer, batch_size: Any, threshold: Any
) -> None:
    # Validation is the application's (commands.create_group); the models store what it parsed.
    with runtime.session() as session:
        target_name = _target(session, sealer).name
    with pytest.raises(FanoutConfigError, match="group 'g'"):
        commands.create_group(
            runtime, "g", [target_name], batch_size=batch_size, failure_threshold=threshold
        )
    with runtime.session() as session:
        assert queries.list_groups(session) == []


def test_group_fanout_values_are_stored_in_their_canonical_form(
    runtime: Runtime, sealer: Sealer
) -> None:
    with runtime.session() as session:
        target_name = _target(session, sealer).name
    group_id = commands.create_group(
        runtime, "g", [target_name], batch_size="1, 5,20 %", failure_threshold=" 10% "
    )
    with runtime.session() as session:
        group = queries.get_group(session, group_id)
        assert (group.batch_size, group.failure_threshold) == ([1, 5, "20%"], "10%")


def test_group_members_must_be_distinct_existing_targets(session: Session, sealer: Sealer) -> None:
    target = _target(session, sealer)
    with pytest.raises(queries.InvalidRecordError, match="more than once"):
        queries.create_group(session, name="g", target_ids=[target.id, target.id])
    with pytest.raises(queries.NotFoundError, match="target with id 'missing'"):
        queries.create_group(session, name="h", target_ids=["missing"])


def test_deleting_a_group_removes_its_memberships(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        target_id = _target(session, sealer).id
        group_id = queries.create_group(session, name="g", target_ids=[target_id]).id
    with session_scope(factory) as session:
        session.delete(queries.get_group(session, group_id))
    with session_scope(factory) as session:
        assert session.scalars(select(TargetGroupMember)).all() == []
        assert queries.get_target(session, target_id).name == "edge-a"


# ----------------------------------------------------------------------------- distributions


def test_distributions_stack_in_position_order(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    group = queries.create_group(session, name="g", target_ids=[target.id])
    grouped = queries.create_distribution(
        session, certificate_id=distribution.certificate_id, group_id=group.id
    )
    webhook = queries.create_distribution(
        session,
        certificate_id=distribution.certificate_id,
        kind="webhook",
        webhook_url="https://hooks.example/rollout",
    )
    assert [d.position for d in (distribution, grouped, webhook)] == [0, 1, 2]
    assert queries.next_distribution(session, distribution) is grouped
    assert queries.next_distribution(session, grouped) is webhook
    assert queries.next_distribution(session, webhook) is None
    assert queries.distribution_target_ids(session, grouped) == [target.id]
    assert queries.distribution_target_ids(session, distribution) == [target.id]
    assert queries.distribution_target_ids(session, webhook) == []
    listed = queries.list_distributions(session, distribution.certificate_id)
    assert [d.id for d in listed] == [distribution.id, grouped.id, webhook.id]
    assert webhook.kind is DistributionKind.WEBHOOK


def test_position_is_unique_per_certificate(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        certificate_id = distribution.certificate_id
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        queries.create_distribution(
            session, certificate_id=certificate_id, target_id=target.id, position=0
        )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "exactly one target or one group"),
        ({"target": True, "group": True}, "exactly one target or one group"),
        ({"target": True, "webhook_url": "https://x"}, "takes no webhook"),
        ({"kind": "webhook"}, "needs a webhook URL"),
        ({"kind": "webhook", "webhook_url": "https://x", "target": True}, "needs a webhook URL"),
    ],
)
def test_distribution_destination_rules_are_explained(
    session: Session,
    sealer: Sealer,
    bundle: TlsBundle,
    arguments: dict[str, Any],
    expected: str,
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    group = queries.create_group(session, name="g", target_ids=[target.id])
    with pytest.raises(queries.InvalidRecordError, match=expected):
        queries.create_distribution(
            session,
            certificate_id=distribution.certificate_id,
            kind=arguments.get("kind", "kubernetes"),
            target_id=target.id if arguments.get("target") else None,
            group_id=group.id if arguments.get("group") else None,
            webhook_url=arguments.get("webhook_url"),
        )


@pytest.mark.parametrize(
    ("kind", "target", "group", "webhook_url"),
    [
        ("kubernetes", False, False, None),
        ("kubernetes", True, True, None),
        ("kubernetes", True, False, "https://x"),
        ("webhook", False, False, None),
        ("webhook", True, False, "https://x"),
    ],
    ids=["neither", "both", "k8s with url", "webhook without url", "webhook with target"],
)
def test_database_enforces_the_destination_xor(
    factory: sessionmaker[Session],
    sealer: Sealer,
    bundle: TlsBundle,
    kind: str,
    target: bool,
    group: bool,
    webhook_url: str | None,
) -> None:
    with session_scope(factory) as session:
        distribution, existing_target = _distribution(session, sealer, bundle)
        group_id = queries.create_group(session, name="g", target_ids=[existing_target.id]).id
        certificate_id, target_id = distribution.certificate_id, existing_target.id
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(
            Distribution(
                certificate_id=certificate_id,
                kind=DistributionKind(kind),
                target_id=target_id if target else None,
                group_id=group_id if group else None,
                webhook_url=webhook_url,
                position=7,
            )
        )


# -------------------------------------------------------------------------------------- runs


def test_run_lifecycle_records_plan_results_and_timestamps(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, first = _distribution(session, sealer, bundle)
        second = _target(session, sealer, "edge-b")
        run = queries.create_run(
            session,
            distribution_id=distribution.id,
            action=RunAction.DRY_RUN,
            options={"force": True},
            cascade=True,
        )
        assert run.state is RunState.QUEUED
        queries.start_run(session, run.id, batch_plan=[[first.id], [second.id]], now=NOW)
        run_id, first_id, second_id = run.id, first.id, second.id
    with session_scope(factory) as session:
        run = queries.get_run(session, run_id, lock=True)
        assert run.state is RunState.RUNNING
        assert run.batch_plan == [[first_id], [second_id]]
        assert run.options == {"force": True} and run.cascade is True
        assert run.started_at == NOW and run.heartbeat_at == NOW
        results = queries.list_target_results(session, run_id)
        assert [(r.target_id, r.batch_index, r.status) for r in results] == [
            (first_id, 0, ResultStatus.PENDING),
            (second_id, 1, ResultStatus.PENDING),
        ]
        # PostgreSQL plans in one INSERT ... SELECT: the same rows as SQLite's executemany.
        assert [(r.attempts, r.sent_at, r.started_at) for r in results] == [
            (0, NOW, None),
            (0, None, None),
        ]
        assert all(str(uuid.UUID(r.id, version=4)) == r.id for r in results)
        assert run.batch_count == 2
        later = NOW + timedelta(seconds=3)
        assert queries.advance_batch(session, run_id, from_batch=0, now=later)
        assert not queries.advance_batch(session, run_id, from_batch=0, now=later)  # once only
        queries.finish_run(session, run_id, "succeeded", now=later, reason="2 of 2 targets ok")
    with session_scope(factory) as session:
        run = queries.get_run(session, run_id)
        assert (run.state, run.current_batch, run.reason) == (
            RunState.SUCCEEDED,
            1,
            "2 of 2 targets ok",
        )
        assert run.finished_at == later
        assert [r.id for r in queries.list_runs(session, distribution_id=distribution.id)] == [
            run_id
        ]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["start", "start"], "is running; it cannot become running"),
        (["start", "finish", "finish"], "is succeeded; it cannot become succeeded"),
        (["start", "finish", "start"], "is succeeded; it cannot become running"),
    ],
)
def test_run_transitions_are_guarded(
    session: Session, sealer: Sealer, bundle: TlsBundle, steps: list[str], expected: str
) -> None:
    distribution, _ = _distribution(session, sealer, bundle)
    run = queries.create_run(session, distribution_id=distribution.id, action="execute")

    def step(name: str) -> None:
        if name == "start":
            queries.start_run(session, run.id, batch_plan=[], now=NOW)
        else:
            queries.finish_run(session, run.id, "succeeded", now=NOW, reason=None)

    for name in steps[:-1]:
        step(name)
    with pytest.raises(queries.RunStateError, match=expected):
        step(steps[-1])


def test_queued_run_cannot_succeed_without_running(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, _ = _distribution(session, sealer, bundle)
    run = queries.create_run(session, distribution_id=distribution.id, action="execute")
    with pytest.raises(queries.RunStateError, match="is queued; it cannot become succeeded"):
        queries.finish_run(session, run.id, RunState.SUCCEEDED, now=NOW, reason=None)
    queries.finish_run(session, run.id, RunState.FAILED, now=NOW, reason="cannot plan")
    assert run.state is RunState.FAILED
    with pytest.raises(queries.RunStateError, match="terminal state"):
        queries.finish_run(session, run.id, RunState.RUNNING, now=NOW, reason=None)


def test_the_reaper_finds_running_runs_and_resends_each_lost_start_once(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    # Dry-runs: several may be active at once (only one execute or rollback may).
    running = _started_run(session, distribution, [[target.id]], "dry_run")
    queued = queries.create_run(session, distribution_id=distribution.id, action="dry_run")
    session.flush()
    assert [run.id for run in queries.running_runs(session)] == [running.id]
    created = queries.get_run(session, queued.id).created_at
    # Not yet overdue: nothing to re-send.
    assert queries.resend_queued_starts(session, now=created, resend_before=created) == []
    later = created + timedelta(minutes=10)
    overdue = created + timedelta(seconds=1)
    assert queries.resend_queued_starts(session, now=later, resend_before=overdue) == [queued.id]
    # Marked re-sent at `later`: another reaper with the same view gets nothing.
    assert queries.resend_queued_starts(session, now=later, resend_before=overdue) == []


def test_a_pending_target_is_lost_only_once_its_message_is_overdue(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    run_id = _started_run(session, distribution, [[target.id]]).id  # batch 0 sent at NOW

    def resend(now: datetime) -> list[str]:
        return queries.resend_lost(
            session, run_id, 0, now=now, resend_before=now - timedelta(minutes=5)
        )

    assert resend(NOW + timedelta(minutes=4)) == []  # merely queued
    assert resend(NOW + timedelta(minutes=6)) == [target.id]  # sent 6 min ago, never claimed
    assert resend(NOW + timedelta(minutes=6)) == []  # re-sent just now (one reaper wins)
    assert resend(NOW + timedelta(minutes=12)) == [target.id]  # that message was lost too


def test_a_claim_is_lost_when_its_lease_runs_out_not_while_it_is_renewed(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    run_id = _started_run(session, distribution, [[target.id]]).id
    claim = queries.claim_results(session, run_id, [target.id], now=NOW, lease_until=NOW + LEASE)
    held = queries.HeldClaim(run_id, target.id, claim[target.id].attempts)

    def resend(now: datetime) -> list[str]:
        return queries.resend_lost(session, run_id, 0, now=now, resend_before=now - LEASE * 5)

    # A long, healthy target: its message renews the lease, the reaper leaves it alone.
    for minute in range(1, 4):
        now = NOW + timedelta(minutes=minute)
        assert queries.renew_claims(session, [held], lease_until=now + LEASE) == 1
        assert resend(now + timedelta(seconds=30)) == []
        assert queries.count_live_claims(session, run_id, 0, now=now) == 1
    # The worker died after its last renewal (at minute 3): lost as soon as the lease ends.
    dead = NOW + timedelta(minutes=4, seconds=1)
    assert queries.count_live_claims(session, run_id, 0, now=dead) == 0
    assert resend(dead) == [target.id]
    assert resend(dead + timedelta(seconds=1)) == []  # re-sent; not again until overdue
    # A renewal of another attempt (a delivery that lost its claim) extends nothing.
    stale = queries.HeldClaim(run_id, target.id, held.attempt + 1)
    assert queries.renew_claims(session, [stale], lease_until=dead + LEASE) == 0


def test_the_database_clock_is_aware_utc(session: Session) -> None:
    now = queries.database_now(session)
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_a_reaper_recovery_is_counted_in_sql_only_on_a_running_and_still_stale_run(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    run = _started_run(session, distribution, [[target.id]])
    finished = _started_run(session, distribution, [[target.id]], "dry_run")
    queries.finish_run(session, finished.id, RunState.SUCCEEDED, now=NOW, reason="succeeded: ok")
    stale_before = NOW + timedelta(minutes=1)

    def note(run_id: str, moment: datetime) -> bool:
        return queries.note_recovery(
            session, run_id, reason=f"resumed at {moment}", now=moment, stale_before=stale_before
        )

    # The reaper's "now" is past its stale bound (now - stale_after).
    assert note(run.id, NOW + timedelta(minutes=2))
    # Its heartbeat is fresh now: a second reaper with the same view loses the race.
    assert not note(run.id, NOW + timedelta(minutes=2))
    # A finished run keeps the reason its batch callback wrote.
    assert not note(finished.id, NOW + timedelta(minutes=2))
    session.expire_all()
    assert queries.get_run(session, finished.id).reason == "succeeded: ok"
    assert queries.recoveries(queries.get_run(session, run.id)) == 1
    assert queries.note_recovery(
        session,
        run.id,
        reason="again",
        now=NOW + timedelta(minutes=5),
        stale_before=NOW + timedelta(minutes=4),
    )
    session.expire_all()
    again = queries.get_run(session, run.id)
    assert (queries.recoveries(again), again.reason) == (2, "again")
    assert again.options.get("force") is None  # other options untouched


def test_run_parent_link_survives_and_is_cleared_on_parent_delete(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, _ = _distribution(session, sealer, bundle)
        parent = queries.create_run(session, distribution_id=distribution.id, action="execute")
        child = queries.create_run(
            session, distribution_id=distribution.id, action="execute", parent_run_id=parent.id
        )
        parent_id, child_id = parent.id, child.id
    with session_scope(factory) as session:
        assert queries.get_run(session, child_id).parent_run_id == parent_id
        session.delete(queries.get_run(session, parent_id))
    with session_scope(factory) as session:
        assert queries.get_run(session, child_id).parent_run_id is None


# ---------------------------------------------------------------------------- target results


def _result(session: Session, run_id: str, target_id: str) -> TargetResult:
    (row,) = [r for r in queries.list_target_results(session, run_id) if r.target_id == target_id]
    return row


def _record(
    session: Session, run_id: str, claims: dict[str, queries.Claim], status: str, **fields: Any
) -> int:
    """Record ``status`` on each claimed target (the path worker.app.runs takes)."""
    values: dict[str, Any] = {
        "diff": None,
        "error_reason": None,
        "error_message": None,
        "finished_at": NOW,
        "duration_ms": 0,
        "resource_version": None,
        "secret_name": None,
        "namespace": None,
    }
    values.update(fields)
    records = [
        queries.ResultRecord(
            claim=queries.HeldClaim(run_id, claim.target_id, claim.attempts),
            status=ResultStatus(status),
            **values,
        )
        for claim in claims.values()
    ]
    return queries.record_results(session, records)


def test_target_result_records_outcome_and_duration(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        run_id = _started_run(session, distribution, [[target.id]]).id
        target_id = target.id
        claims = queries.claim_results(
            session, run_id, [target_id], now=NOW, lease_until=NOW + LEASE
        )
        assert claims == {target_id: queries.Claim(target_id, 0, 1)}
        written = _record(
            session,
            run_id,
            claims,
            ResultStatus.UPDATED,
            diff={"action": "update", "entries": [{"key": "tls.crt", "serial": ["01", "02"]}]},
            finished_at=NOW + timedelta(milliseconds=1234),
            duration_ms=1234,
            resource_version="4711",
            secret_name="app-example-com-tls",
            namespace="acme-edge",
        )
        assert written == 1
    with session_scope(factory) as session:
        result = _result(session, run_id, target_id)
        assert result.status is ResultStatus.UPDATED
        assert result.attempts == 1
        assert result.started_at == NOW
        assert result.duration_ms == 1234
        assert result.diff == {
            "action": "update",
            "entries": [{"key": "tls.crt", "serial": ["01", "02"]}],
        }
        assert (result.resource_version, result.secret_name, result.namespace) == (
            "4711",
            "app-example-com-tls",
            "acme-edge",
        )
        assert result.error_reason is None
        # The claim is spent: a late second record of the same delivery writes nothing.
        late = _record(session, run_id, claims, "failed", error_reason="forbidden")
        assert late == 0
        session.expire_all()
        assert _result(session, run_id, target_id).secret_name == "app-example-com-tls"


def test_claims_are_exclusive_until_released_or_expired(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    run_id = _started_run(session, distribution, [[target.id]]).id
    first = queries.claim_results(session, run_id, [target.id], now=NOW, lease_until=NOW + LEASE)
    assert (
        queries.claim_results(session, run_id, [target.id], now=NOW, lease_until=NOW + LEASE) == {}
    )
    assert queries.batch_has_open_row(session, run_id, 0)
    queries.release_claims(
        session, [queries.HeldClaim(run_id, target.id, first[target.id].attempts)], now=NOW
    )
    session.expire_all()
    released = _result(session, run_id, target.id)
    assert (released.status, released.attempts, released.started_at) == (
        ResultStatus.PENDING,
        0,
        None,
    )
    again = queries.claim_results(session, run_id, [target.id], now=NOW, lease_until=NOW + LEASE)
    later = NOW + LEASE + timedelta(seconds=1)  # the lease expired, nobody renewed it
    taken_over = queries.claim_results(
        session, run_id, [target.id], now=later, lease_until=later + LEASE
    )
    assert (again[target.id].attempts, taken_over[target.id].attempts) == (1, 2)
    assert _record(session, run_id, again, "created") == 0  # the lease was taken over
    assert _record(session, run_id, taken_over, "created") == 1
    assert not queries.batch_has_open_row(session, run_id, 0)


def test_one_result_per_run_and_target(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        run_id, target_id = _started_run(session, distribution, [[target.id]]).id, target.id
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(TargetResult(run_id=run_id, target_id=target_id, batch_index=0))


def test_counts_and_skipping_drive_batch_decisions(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, first = _distribution(session, sealer, bundle)
    others = [_target(session, sealer, f"t{n}") for n in range(3)]
    plan = [[first.id, others[0].id], [others[1].id], [others[2].id]]
    run = _started_run(session, distribution, plan)
    first_claim = queries.claim_results(
        session, run.id, [first.id], now=NOW, lease_until=NOW + LEASE
    )
    other_claim = queries.claim_results(
        session, run.id, [others[0].id], now=NOW, lease_until=NOW + LEASE
    )
    _record(session, run.id, first_claim, "failed")
    _record(session, run.id, other_claim, "created")
    assert queries.count_results(session, run.id, batch_index=0) == {
        ResultStatus.FAILED: 1,
        ResultStatus.CREATED: 1,
    }
    skipped = queries.skip_pending_results(
        session, run.id, from_batch=1, reason="halted: threshold exceeded", now=NOW
    )
    assert skipped == 2
    counts = queries.count_results(session, run.id)
    assert counts[ResultStatus.SKIPPED] == 2 and counts[ResultStatus.PENDING] == 0
    session.expire_all()
    skipped_row = _result(session, run.id, others[2].id)
    assert skipped_row.status is ResultStatus.SKIPPED
    assert skipped_row.error_message == "halted: threshold exceeded"
    assert len(queries.list_target_results(session, run.id, batch_index=1)) == 1


# ------------------------------------------------------------------------ rollback snapshots

PREVIOUS = PreviousSecret(
    existed=True,
    type="kubernetes.io/tls",
    data={"tls.crt": base64.b64encode(b"old cert").decode(), "tls.key": "b2xkIGtleQ=="},
    labels={"team": "edge"},
    annotations={"owner": "someone-else"},
    resource_version="812",
)


def _save(session: Session, sealer: Sealer, previous: PreviousSecret, **ids: Any) -> bool:
    return queries.save_snapshot(session, sealer, previous=previous.to_dict(), **ids)


def _reveal(session: Session, sealer: Sealer, **ids: Any) -> PreviousSecret:
    _, content = queries.reveal_snapshot(session, sealer, **ids)
    return PreviousSecret.from_dict(content)


def test_a_final_snapshot_is_never_overwritten(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        # Our write landed after it: the snapshot is final.
        assert queries.record_snapshot_write(
            session, **ids, fingerprint="ab" * 32, resource_version="813"
        )
    with session_scope(factory) as session:
        ours = replace(PREVIOUS, data={"tls.crt": "b3Vycw==", "tls.key": "b3Vycw=="})
        assert not _save(session, sealer, ours, **ids)
    with session_scope(factory) as session:
        content = _reveal(session, sealer, **ids)
        assert content.existed is True
        assert content.type == "kubernetes.io/tls"
        assert content.data == PREVIOUS.data
        assert content.labels == {"team": "edge"}
        assert content.annotations == {"owner": "someone-else"}
        assert content.resource_version == "812"
        assert "b2xkIGtleQ==" not in repr(content)
        row = queries.get_snapshot(session, **ids)
        assert row is not None and row.previous is not None
        assert b"b2xkIGtleQ==" not in row.previous


def test_a_provisional_snapshot_is_replaced_by_the_next_attempt_in_place(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        # First attempt: no Secret; the write then failed (nothing recorded).
        assert _save(session, sealer, PreviousSecret.absent(), **ids)
        first = queries.get_snapshot(session, **ids)
        assert first is not None
        row_id = first.id
    with session_scope(factory) as session:
        # Next attempt: the owner's Secret is live now, and it replaces the provisional one.
        assert _save(session, sealer, PREVIOUS, **ids)
    with session_scope(factory) as session:
        row = queries.get_snapshot(session, **ids)
        assert row is not None and row.id == row_id and row.existed
        assert _reveal(session, sealer, **ids).data == PREVIOUS.data
        # A rollback put it back: provisional again, so the next execute re-snapshots.
        assert queries.record_snapshot_write(
            session, **ids, fingerprint="cd" * 32, resource_version="900"
        )
        queries.make_snapshot_provisional(session, **ids)
        assert queries.get_snapshot(session, **ids).written_fingerprint is None  # type: ignore[union-attr]
        newer = replace(PREVIOUS, labels={"team": "edge", "rotated": "yes"})
        assert _save(session, sealer, newer, **ids)
        assert _reveal(session, sealer, **ids).labels == newer.labels


def test_a_snapshot_of_our_own_other_revision_is_taken_only_when_none_exists(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}

    def save_ours(previous: PreviousSecret) -> bool:
        return queries.save_snapshot(
            session, sealer, previous=previous.to_dict(), replace_provisional=False, **ids
        )

    # None yet (store content turned on after our earlier write): it is the first snapshot.
    assert save_ours(PREVIOUS)
    assert _reveal(session, sealer, **ids).data == PREVIOUS.data
    # A provisional one exists: our unrecorded write never replaces it.
    assert not save_ours(replace(PREVIOUS, labels={"ours": "older-revision"}))
    assert _reveal(session, sealer, **ids).data == PREVIOUS.data
    assert _reveal(session, sealer, **ids).labels == PREVIOUS.labels


def test_snapshot_of_an_absent_secret_stores_no_content(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
    assert _save(session, sealer, PreviousSecret.absent(), **ids)
    row = queries.get_snapshot(session, **ids)
    assert row is not None and row.previous is None
    content = _reveal(session, sealer, **ids)
    assert (content.existed, content.type, dict(content.data)) == (False, None, {})


def test_snapshots_sealed_before_the_one_snapshot_type_still_read_back(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    # What save_snapshot_if_absent sealed before PreviousSecret.to_dict() was the stored
    # form: the same keys without "existed" (only existing Secrets had content).
    distribution, target = _distribution(session, sealer, bundle)
    row_id = "00000000-0000-4000-8000-000000000001"
    legacy = {
        "type": PREVIOUS.type,
        "data": PREVIOUS.data,
        "labels": PREVIOUS.labels,
        "annotations": PREVIOUS.annotations,
        "resourceVersion": PREVIOUS.resource_version,
    }
    sealed = sealer.seal(
        json.dumps(legacy, sort_keys=True).encode(),
        table="rollback_snapshots",
        row_id=row_id,
        purpose="previous",
    )
    session.add(
        RollbackSnapshot(
            id=row_id,
            distribution_id=distribution.id,
            target_id=target.id,
            existed=True,
            previous=sealed,
        )
    )
    session.flush()
    assert _reveal(session, sealer, distribution_id=distribution.id, target_id=target.id) == (
        PREVIOUS
    )


def test_snapshot_records_what_we_wrote_for_drift_detection(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, target = _distribution(session, sealer, bundle)
    ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
    assert not queries.record_snapshot_write(session, **ids, fingerprint="ab", resource_version="1")
    _save(session, sealer, PREVIOUS, **ids)
    assert queries.record_snapshot_write(
        session, **ids, fingerprint="ab" * 32, resource_version="900", written_at=NOW
    )
    row, content = queries.reveal_snapshot(session, sealer, **ids)
    assert (row.written_fingerprint, row.written_resource_version) == ("ab" * 32, "900")
    assert row.written_at == NOW
    assert content["resourceVersion"] == "812"  # the previous Secret is untouched


def test_reveal_of_a_missing_snapshot_is_not_found(session: Session, sealer: Sealer) -> None:
    with pytest.raises(queries.NotFoundError, match="rollback snapshot"):
        queries.reveal_snapshot(session, sealer, "d", "t")


@pytest.mark.parametrize(("existed", "previous"), [(True, None), (False, b"CAPE")])
def test_database_enforces_previous_iff_existed(
    factory: sessionmaker[Session],
    sealer: Sealer,
    bundle: TlsBundle,
    existed: bool,
    previous: bytes | None,
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(RollbackSnapshot(existed=existed, previous=previous, **ids))


def test_concurrent_snapshot_saves_store_exactly_one(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle
) -> None:
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
    first_inserted = threading.Event()
    outcomes: dict[str, bool] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with session_scope(factory) as session:
                outcomes["first"] = _save(session, sealer, PREVIOUS, **ids)
                # Its write landed in the same breath: the snapshot the second meets is final.
                queries.record_snapshot_write(
                    session, **ids, fingerprint="ab" * 32, resource_version="813"
                )
                first_inserted.set()
                time.sleep(0.3)  # hold the transaction open while the second one tries
        except BaseException as exc:
            errors.append(exc)
            first_inserted.set()

    def second() -> None:
        first_inserted.wait(10)
        try:
            with session_scope(factory) as session:
                outcomes["second"] = _save(
                    session, sealer, replace(PREVIOUS, resource_version="9"), **ids
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert outcomes == {"first": True, "second": False}
    with session_scope(factory) as session:
        assert _reveal(session, sealer, **ids).resource_version == "812"


snapshot_maps = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5)


@given(data=snapshot_maps, labels=snapshot_maps, annotations=snapshot_maps)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_snapshot_content_round_trips_any_maps(
    factory: sessionmaker[Session],
    sealer: Sealer,
    bundle: TlsBundle,
    data: dict[str, str],
    labels: dict[str, str],
    annotations: dict[str, str],
) -> None:
    with factory() as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        previous = PreviousSecret(
            existed=True, type="Opaque", data=data, labels=labels, annotations=annotations
        )
        _save(session, sealer, previous, **ids)
        content = _reveal(session, sealer, **ids)
        assert (content.data, content.labels, content.annotations) == (data, labels, annotations)
        session.rollback()


# ------------------------------------------------------------------------ rollback availability


@pytest.mark.parametrize(
    ("store_content", "snapshot", "available", "reason"),
    [
        (False, None, False, STORE_CONTENT_OFF),
        (False, "existed", False, STORE_CONTENT_OFF),
        (True, None, False, NOTHING_DEPLOYED_YET),
        (True, "absent", False, PREVIOUSLY_ABSENT),
        (True, "existed", True, "Restores the Secret as it was before"),
    ],
    ids=["toggle off", "toggle off later", "nothing written yet", "did not exist", "available"],
)
def test_rollback_availability_explains_the_greyed_out_button(
    session: Session,
    sealer: Sealer,
    bundle: TlsBundle,
    store_content: bool,
    snapshot: str | None,
    available: bool,
    reason: str,
) -> None:
    distribution, target = _distribution(session, sealer, bundle, store_content=store_content)
    ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
    if snapshot is not None:
        _save(
            session, sealer, PREVIOUS if snapshot == "existed" else PreviousSecret.absent(), **ids
        )
    answer = rollback_availability(distribution, queries.get_snapshot(session, **ids))
    assert answer.available is available
    assert answer.reason.startswith(reason)


def test_store_content_off_tooltip_is_the_documented_text() -> None:
    assert STORE_CONTENT_OFF == (
        "Rollback is unavailable: 'Store content' was off for this distribution, so the "
        "previous Secret was not captured."
    )


def test_webhook_distributions_cannot_roll_back(
    session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    certificate = queries.store_certificate(session, sealer, bundle)
    webhook = queries.create_distribution(
        session,
        certificate_id=certificate.id,
        kind="webhook",
        webhook_url="https://hooks.example",
        store_content=True,
    )
    assert rollback_availability(webhook, None).reason == NOT_KUBERNETES


# ------------------------------------------------------------------------------ key rotation


def test_rotation_rewraps_every_envelope_and_old_kek_can_be_dropped(
    factory: sessionmaker[Session], bundle: TlsBundle
) -> None:
    old_ring = ring({"k1": KEK1})
    with session_scope(factory) as session:
        distribution, target = _distribution(session, old_ring, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        _save(session, old_ring, PREVIOUS, **ids)
        certificate_id = distribution.certificate_id
        credential_id = target.credential_id
        assert credential_id is not None
        before = {row.id: row.private_key for row in session.scalars(select(Certificate))}
        revision_id = queries.current_revision(session, certificate_id).id
        # The certificate's key, its revision's copy, the kubeconfig, the snapshot.
        assert queries.envelope_key_usage(session, old_ring) == {"k1": 4}

    both = ring({"k1": KEK1, "k2": KEK2}, current_key_id="k2")
    with session_scope(factory) as session:
        assert queries.rotate_keys(session, both, "k2") == 4
    with session_scope(factory) as session:
        assert queries.envelope_key_usage(session, both) == {"k2": 4}
        assert queries.rotate_keys(session, both, "k2") == 0  # idempotent / resumable
        after = queries.get_certificate(session, certificate_id).private_key
        tail = len(bundle.key_pem) + 12 + 16
        assert after[-tail:] == before[certificate_id][-tail:]  # payload untouched

    only_new = ring({"k2": KEK2})
    with session_scope(factory) as session:
        assert queries.reveal_private_key(session, only_new, certificate_id) == bundle.key_pem
        assert queries.reveal_revision_key(session, only_new, revision_id) == bundle.key_pem
        assert queries.reveal_credential(session, only_new, credential_id) == KUBECONFIG
        assert _reveal(session, only_new, **ids).data == PREVIOUS.data
        with pytest.raises(UnknownKeyError, match="no KEK 'k2' loaded"):
            queries.reveal_credential(session, old_ring, credential_id)


def test_rows_under_the_old_kek_stay_readable_until_rotated(
    session: Session, bundle: TlsBundle
) -> None:
    old = queries.store_credential(session, ring({"k1": KEK1}), "old", "kubeconfig", b"a")
    both = ring({"k1": KEK1, "k2": KEK2}, current_key_id="k2")
    new = queries.store_credential(session, both, "new", "kubeconfig", b"b")
    assert envelope_key_id(new.secret) == "k2"
    assert queries.reveal_credential(session, both, old.id) == b"a"
    assert queries.reveal_credential(session, both, new.id) == b"b"


def test_rotation_to_an_unloaded_kek_is_refused(runtime: Runtime) -> None:
    with runtime.session() as session:
        _credential(session, runtime.sealer)
    with pytest.raises(UnknownKeyError, match="cannot rotate to KEK 'k9'"):
        commands.rotate_keys(runtime, "k9")
    with runtime.session() as session:
        assert queries.envelope_key_usage(session, runtime.sealer) == {"k1": 1}


def test_rotation_stops_at_a_row_it_cannot_authenticate(session: Session) -> None:
    both = ring({"k1": KEK1, "k2": KEK2})
    credential = queries.store_credential(session, both, "c", "kubeconfig", b"x")
    tampered = bytearray(credential.secret)
    tampered[20] ^= 1
    session.execute(
        update(Credential).where(Credential.id == credential.id).values(secret=bytes(tampered))
    )
    with pytest.raises(DecryptionError, match=credential.id):
        queries.rotate_keys(session, both, "k2")


def test_every_envelope_column_is_covered_by_rotation() -> None:
    binary_columns = {
        (table.name, column.name)
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if column.type.python_type is bytes
    }
    covered = {(model.__tablename__, column) for model, column in queries.ENVELOPE_COLUMNS}
    assert binary_columns == covered


def test_json_columns_keep_types(session: Session, sealer: Sealer) -> None:
    variables = {"int": 1, "float": 1.5, "list": [1, "a", None], "bool": True, "text": "ü"}
    target = _target(session, sealer, variables=variables)
    session.flush()
    session.expire_all()
    assert queries.get_target(session, target.id).variables == json.loads(json.dumps(variables))


# ------------------------------------------------------- application: the one client cache

VALID_KUBECONFIG = b"""apiVersion: v1
kind: Config
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: first-t0ken}}]
"""


def test_target_client_is_rebuilt_only_when_its_sealed_credential_changes(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    closed: list[Any] = []

    class FakeApi:
        def __init__(self, spec: Any) -> None:
            self.spec = spec
            self.server = spec.server

        def close(self) -> None:
            closed.append(self)

    def builder(spec: Any, **_: Any) -> FakeApi:
        built.append(FakeApi(spec))
        return built[-1]

    runtime.clients = ClientCache(connect_timeout=1, read_timeout=1, builder=builder)
    decrypts: list[str] = []
    unseal = queries.unseal_credential

    def counting_unseal(sealer: Sealer, credential_id: str, sealed: bytes) -> bytes:
        decrypts.append(credential_id)
        return unseal(sealer, credential_id, sealed)

    monkeypatch.setattr(queries, "unseal_credential", counting_unseal)
    credential_id = commands.add_kubeconfig_credential(runtime, "c", VALID_KUBECONFIG)
    with runtime.session() as session:
        target = queries.create_target(
            session,
            name="t",
            connection_mode="kubeconfig",
            credential_id=credential_id,
            namespace_template="ns",
            secret_name_template="app-tls",
        )
        insecure = queries.create_target(
            session,
            name="t-insecure",
            connection_mode="kubeconfig",
            credential_id=credential_id,
            namespace_template="ns",
            secret_name_template="app-tls",
            allow_insecure=True,
        )

    kube_client(runtime, target)
    kube_client(runtime, target)  # the same sealed bytes: the cached client, no decrypt
    assert (len(built), decrypts) == (1, [credential_id])
    kube_client(runtime, insecure)  # allow_insecure has its own slot ...
    kube_client(runtime, target)  # ... and does not evict the other one
    assert len(built) == 2 and closed == []

    with runtime.session() as session:
        queries.replace_credential_secret(
            session, runtime.sealer, credential_id, VALID_KUBECONFIG.replace(b"first", b"next")
        )
    kube_client(runtime, target)
    assert len(built) == 3 and built[-1].spec.token == "next-t0ken"
    assert closed == [built[0]]  # the rotated credential's old client is dropped
    assert decrypts == [credential_id] * 3


def test_group_rollback_availability_is_one_query_and_prefers_an_existing_secret(
    engine: Engine, session: Session, sealer: Sealer, bundle: TlsBundle
) -> None:
    distribution, first = _distribution(session, sealer, bundle)
    others = [_target(session, sealer, f"t{n}") for n in range(3)]
    group = queries.create_group(
        session, name="g", target_ids=[first.id, *(target.id for target in others)]
    )
    grouped = queries.create_distribution(
        session, certificate_id=distribution.certificate_id, group_id=group.id, store_content=True
    )
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    def availability() -> Any:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            return views.distribution_rollback_availability(session, grouped)
        finally:
            event.remove(engine, "before_cursor_execute", count)

    assert availability().reason == NOTHING_DEPLOYED_YET
    assert len(statements) == 1
    earlier, later = NOW, NOW + timedelta(hours=1)
    ids = {"distribution_id": grouped.id}
    queries.save_snapshot(
        session, sealer, previous={"existed": False}, target_id=first.id, taken_at=earlier, **ids
    )
    assert availability().reason == PREVIOUSLY_ABSENT
    for target, taken in ((others[2], earlier), (others[1], later)):
        _save(session, sealer, PREVIOUS, target_id=target.id, **ids)
        session.execute(
            update(RollbackSnapshot)
            .where(RollbackSnapshot.target_id == target.id)
            .values(taken_at=taken)
        )
    # The first target in fan-out order whose Secret existed decides (others[1], not [2]).
    answer = availability()
    assert answer.available and f"({later:%Y-%m-%d %H:%M:%S} UTC)" in answer.reason
    assert len(statements) == 1
