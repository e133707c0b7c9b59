"""Verify serving over the database (SQLite; PostgreSQL runs the shared tests too): the schema
revision, saving a target's serving settings (and refusing bad ones with nothing stored), the
group's require-serving pinned on its runs, and the outcome recorded on a result."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from models import Target, TargetGroup, TargetResult, queries
from models.enums import ConnectionMode, ResultStatus
from models.sealing import Sealer
from tests.certfactory import make_chain
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
    runtime,
    sealer,
    upgrade,
)
from worker.app import commands, service
from worker.app.runs import TargetOutcome, _record
from worker.app.webhook import webhook_payload
from worker.core.bundle import TlsBundle
from worker.core.serving import REQUIRE_SERVING_OPTION
from worker.platform.db import session_scope
from worker.platform.runtime import Runtime

__all__ = ["bundle", "db_url", "engine", "factory", "runtime", "sealer"]  # fixtures


def test_a_database_filled_before_the_serving_revision_upgrades_with_every_row_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Read from the migration, so re-chaining it onto another revision keeps this test true.
    migration = migration_module("0008_verify_serving.py")
    before, serving = migration.down_revision, migration.revision
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        queries.create_group(session, name="g", target_ids=[target.id], batch_size=1)
        _started_run(session, distribution, [[target.id]])
        target_id = target.id
    downgrade(db_url, before)
    assert current(db_url) == before
    columns_before = _columns(engine)
    assert "serving_endpoints" not in columns_before["targets"]
    assert "require_serving" not in columns_before["target_groups"]
    assert "serving_status" not in columns_before["target_results"]
    rows_before = _all_rows(engine, columns_before)
    assert all(rows_before[t] for t in ("targets", "target_groups", "runs", "target_results"))

    upgrade(db_url, serving)

    assert current(db_url) == serving
    assert _all_rows(engine, columns_before) == rows_before
    with engine.connect() as connection:
        # Existing rows: nothing to verify, nothing required, no outcome yet.
        assert connection.execute(
            select(
                Target.serving_endpoints,
                Target.serving_deadline_seconds,
                Target.serving_ca,
                Target.serving_public_only,
            ).where(Target.id == target_id)
        ).one() == ([], None, None, False)
        assert connection.scalar(select(TargetGroup.require_serving)) is False
        assert connection.execute(
            select(TargetResult.serving_status, TargetResult.serving)
        ).one() == (None, None)
    # And back: the downgrade drops what the revision added and keeps the rest.
    downgrade(db_url, before)
    assert _all_rows(engine, columns_before) == rows_before
    assert "serving_endpoints" not in [c["name"] for c in inspect(engine).get_columns("targets")]
    upgrade(db_url)


def _spec(**serving: object) -> commands.TargetSpec:
    # An in-cluster target of another pool: saved without a kubeconfig or a health check here.
    return commands.TargetSpec(
        name="edge",
        namespace="ingress",
        connection_mode=ConnectionMode.IN_CLUSTER,
        pool="elsewhere",
        **serving,  # type: ignore[arg-type]
    )


def test_a_target_saves_its_endpoints_in_canonical_form(runtime: Runtime) -> None:
    rt = runtime
    ca = make_chain(cn="ca-check.example.com").root_pem.decode()
    target_id, _ = commands.create_target(
        rt,
        _spec(
            verify_serving=("LB.example.net:443,sni=Shop.Example.com", "[2001:db8::1]:8443"),
            serving_deadline="2m",
            serving_ca=ca,
        ),
        check=False,
    )
    view = service.get_target(rt, target_id)
    assert view.verify_serving == ("lb.example.net:443,sni=shop.example.com", "[2001:db8::1]:8443")
    assert view.serving_deadline_seconds == 120
    assert view.serving_ca == "bundle"
    assert view.serving_public_only is False


@pytest.mark.parametrize(
    ("serving", "says"),
    [
        ({"verify_serving": ("shop.example.com",)}, "give host:port with the port"),
        ({"verify_serving": ("shop.example.com:70000",)}, "not a port number from 1 to 65535"),
        ({"verify_serving": ("https://shop.example.com",)}, "not a URL"),
        (
            {"verify_serving": ("10.0.0.5:443",), "serving_public_only": True},
            "10.0.0.5 is a private address, and the target requires public endpoints",
        ),
        (
            {"verify_serving": ("169.254.169.254:443",), "serving_public_only": True},
            "is a link-local address",
        ),
        ({"verify_serving": ("lb:443",), "serving_deadline": "0"}, "from 1 s to 600 s"),
        ({"verify_serving": ("lb:443",), "serving_deadline": "soon"}, "whole seconds or minutes"),
        ({"verify_serving": ("lb:443",), "serving_ca": "not a pem"}, "serving CA:"),
        ({"serving_deadline": "30s"}, "needs an endpoint to verify"),
        ({"serving_ca": "own-chain"}, "needs an endpoint to verify"),
        ({"verify_serving": ("lb:443", "lb:443")}, "listed twice"),
    ],
)
def test_bad_serving_settings_are_refused_at_save_and_nothing_is_stored(
    runtime: Runtime, serving: dict[str, object], says: str
) -> None:
    rt = runtime
    with pytest.raises(commands.ServiceError) as caught:
        commands.create_target(rt, _spec(**serving), check=False)
    assert says in str(caught.value)
    assert "target 'edge'" in str(caught.value)
    with rt.session() as session:
        assert session.scalar(select(func.count()).select_from(Target)) == 0


class _NoDispatch:
    def start(self, run_id: str) -> None:
        pass


def test_require_serving_is_pinned_on_execute_runs_of_the_group(
    runtime: Runtime, bundle: TlsBundle
) -> None:
    rt = runtime
    commands.create_target(rt, _spec(verify_serving=("lb:443",)), check=False)
    chain = make_chain(cn="shop.example.com")
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    service.create_group(rt, "strict", ["edge"], batch_size=1, require_serving=True)
    assert service.get_group(rt, "strict").require_serving is True
    strict = service.attach(rt, certificate_id, group="strict")
    executed = service.enqueue_run(rt, _NoDispatch(), strict, "execute")  # type: ignore[arg-type]
    dry = service.enqueue_run(rt, _NoDispatch(), strict, "dry_run")  # type: ignore[arg-type]
    with rt.session() as session:
        assert queries.get_run(session, executed).options == {REQUIRE_SERVING_OPTION: True}
        assert queries.get_run(session, dry).options == {}


def test_the_serving_outcome_is_recorded_and_shown(
    factory: sessionmaker[Session], sealer: Sealer, bundle: TlsBundle, runtime: Runtime
) -> None:
    from worker.app.runs import _claim

    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        run = _started_run(session, distribution, [[target.id]])
        run_id, target_id = run.id, target.id
    (job,) = _claim(runtime, run_id, [target_id])
    line = {
        "endpoint": "127.0.0.1:8443",
        "state": "stale",
        "seconds": 5.0,
        "attempts": 4,
        "serial": "0bad",
        "not_after": (NOW + timedelta(days=1)).isoformat(),
        "reason": None,
        "chain": None,
        "line": "still serving serial 0bad (not-after …) after 5.0 s",
    }
    outcome = TargetOutcome(
        status=ResultStatus.FAILED,
        error_reason="not_serving",
        error_message="the Secret was updated, but …",
        serving_status="stale",
        serving=[line],
    )
    _record(runtime, [(job, outcome)])
    (result,) = service.run_report(runtime, run_id).results
    assert (result.status, result.error_reason) == ("failed", "not_serving")
    assert result.serving_status == "stale"
    assert result.serving_lines() == [f"serving 127.0.0.1:8443: {line['line']}"]
    # A webhook stacked after the run carries the verdict per target (no key material).
    with session_scope(factory) as session:
        parent = queries.get_run(session, run_id)
        distribution = queries.get_distribution(session, parent.distribution_id)
        webhook = queries.create_distribution(
            session,
            certificate_id=distribution.certificate_id,
            kind="webhook",
            webhook_url="https://hooks.example.com/x",
        )
        child = queries.create_run(
            session, distribution_id=webhook.id, action="execute", parent_run_id=run_id
        )
        payload = webhook_payload(session, child, webhook)
    (target,) = payload["targets"]
    assert target["serving"] == "stale"
    assert target["serving_endpoints"] == [
        {"endpoint": "127.0.0.1:8443", "state": "stale", "seconds": 5.0, "line": line["line"]}
    ]
