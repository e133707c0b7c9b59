"""Output formats over the database (SQLite; PostgreSQL in tests/integration): revision 0006
keeps every row, a target stores its formats, and only a PKCS#12 password credential fits."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session, sessionmaker

from models import ConnectionMode, CredentialKind, queries
from models.errors import InvalidRecordError
from models.sealing import Sealer
from tests.unit.test_models_sqlite import (
    KUBECONFIG,
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
from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE
from worker.platform.db import session_scope

__all__ = ["bundle", "db_url", "engine", "factory", "sealer"]  # fixtures, imported for use here

PASSWORD = b"keystore-pass-1"


def _migration() -> ModuleType:
    return migration_module("0006_output_formats.py")


def test_a_database_filled_before_the_formats_revision_upgrades_with_every_row_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Read from the migration, so re-chaining it onto another revision keeps this test true.
    migration = _migration()
    before, formats = migration.down_revision, migration.revision
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        _started_run(session, distribution, [[target.id]])
        queries.store_credential(session, sealer, "hook", CredentialKind.WEBHOOK_HMAC, b"x" * 32)
        target_id = target.id
    downgrade(db_url, before)
    assert current(db_url) == before
    target_columns = {c["name"] for c in inspect(engine).get_columns("targets")}
    assert not {"combined_pem", "pkcs12_credential_id"} & target_columns
    columns_before = _columns(engine)
    rows_before = _all_rows(engine, columns_before)
    assert all(rows_before[table] for table in ("targets", "credentials", "runs"))

    upgrade(db_url, formats)

    assert current(db_url) == formats
    assert _all_rows(engine, columns_before) == rows_before
    upgrade(db_url)  # the models are head's
    with session_scope(factory) as session:
        stored = queries.get_target(session, target_id)
        assert (stored.combined_pem, stored.pkcs12_credential_id) == (False, None)
        # The new kind fits the widened CHECK.
        queries.store_credential(session, sealer, "ks", CredentialKind.PKCS12_PASSWORD, PASSWORD)
    with session_scope(factory) as session:
        password = queries.get_credential_by_name(session, "ks")
        assert queries.reveal_credential(session, sealer, password.id) == PASSWORD


def test_a_target_stores_its_formats_and_takes_only_a_pkcs12_password_credential(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        kubeconfig = queries.store_credential(
            session, sealer, "kc", CredentialKind.KUBECONFIG, KUBECONFIG
        )
        password = queries.store_credential(
            session, sealer, "ks", CredentialKind.PKCS12_PASSWORD, PASSWORD
        )
        common: dict[str, Any] = {
            "connection_mode": ConnectionMode.KUBECONFIG,
            "credential_id": kubeconfig.id,
            "namespace_template": "apps",
            "secret_name_template": DEFAULT_SECRET_NAME_TEMPLATE,
        }
        target = queries.create_target(
            session, name="java", combined_pem=True, pkcs12_credential_id=password.id, **common
        )
        target_id = target.id
        with pytest.raises(InvalidRecordError, match="holds a kubeconfig, not a PKCS#12 password"):
            queries.create_target(
                session, name="wrong", pkcs12_credential_id=kubeconfig.id, **common
            )
    with session_scope(factory) as session:
        stored = queries.get_target(session, target_id)
        assert (stored.combined_pem, stored.pkcs12_credential_id) == (True, password.id)
        assert [t.name for t in queries.list_targets(session)] == ["java"]
        # The claim's one statement brings the sealed password along with the kubeconfig.
        (claimed,) = queries.load_claimed_targets(session, "no-distribution", [target_id]).values()
        assert claimed.pkcs12_envelope is not None
        revealed = queries.unseal_credential(sealer, password.id, claimed.pkcs12_envelope)
        assert revealed == PASSWORD


def test_a_downgrade_below_the_formats_revision_is_refused_while_a_password_exists(
    factory: sessionmaker[Session], sealer: Sealer, db_url: str
) -> None:
    migration = _migration()
    with session_scope(factory) as session:
        queries.store_credential(session, sealer, "ks", CredentialKind.PKCS12_PASSWORD, PASSWORD)
    with pytest.raises(RuntimeError, match="1 PKCS#12 password credential"):
        downgrade(db_url, migration.down_revision)
    assert current(db_url) != migration.down_revision
