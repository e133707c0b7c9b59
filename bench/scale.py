"""python -m bench.scale [--sizes 10000,100000] [--explain FILE]

The paths around a large run, alone, on PostgreSQL (tests.testenv starts it; no apiserver, no
broker, no worker): planning a run, the failure-threshold decision after a batch (and the
dispatch of the next one), a reaper pass, `runs show` (a page, the whole report, and
`--all -o json` streamed), `runs list` and `groups show` — through the same functions the
workers and the CLI call, timed, with the statements each sent and the process's memory.

What is not real here, and why: the N targets are inserted in one bulk statement instead of N
`targets add` (that is set-up, not a path under test), and the first batch's outcomes are
written by one UPDATE where workers would record them 32 at a time (the record path is
measured by `python -m bench`, with real writes). The dispatcher only counts what it would
send. With ``--explain`` the plans (EXPLAIN ANALYZE, in a rolled-back transaction) of every
scan the pipeline makes on a run of the largest size are written to FILE.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.run import say
from tests.support.statements import counted

BATCHES = "10%"
"""Ten batches: the decision after a batch is one tenth of the run in."""
THRESHOLD = "10%"
"""Above the 5% of the first batch that fail: the decision goes on to the next batch."""


class CountingDispatcher:
    """A Dispatcher that counts what it was asked to send (no broker)."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def start(self, run_id: str) -> None:
        self.sent["start"] += 1

    def process_targets(self, run_id: str, target_ids: Sequence[str]) -> None:
        self.sent["targets"] += len(target_ids)

    def advance(self, run_id: str, batch_index: int) -> None:
        self.sent["advance"] += 1


@dataclass
class Phase:
    """One path, timed."""

    name: str
    seconds: float
    statements: int
    rss_mb: float
    """The process's RSS after the phase."""
    peak_rss_mb: float
    """The process's peak RSS so far (it never goes down)."""
    note: str = ""


@dataclass
class SizeResult:
    """Every phase at one N."""

    n: int
    run_id: str = ""
    setup_seconds: float = 0.0
    phases: list[Phase] = field(default_factory=list)


def _rss_mb() -> tuple[float, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    current = int(fields["VmRSS"].split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return current, peak


def _timed(result: SizeResult, engine: Any, name: str, path: Callable[[], str | None]) -> None:
    with counted(engine) as seen:
        started = time.perf_counter()
        note = path() or ""
        seconds = time.perf_counter() - started
    rss, peak = _rss_mb()
    result.phases.append(Phase(name, round(seconds, 3), seen["statements"], rss, peak, note))
    say(f"N={result.n} {name}: {seconds:.3f}s, {seen['statements']} statements, RSS {rss:.0f} MB")


def _fleet(rt: Any, n: int) -> tuple[str, str]:
    """N targets (one bulk INSERT), a group of them in ten batches, attached: (run id, group)."""
    from sqlalchemy import insert

    from models import queries
    from models.entities import Target
    from tests.certfactory import make_chain
    from worker.app import service
    from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE

    tag = f"scale{n}"
    credential_id = service.add_kubeconfig_credential(rt, f"{tag}-kc", _kubeconfig())
    rows = [
        {
            "name": f"{tag}-t{index:06d}",
            "connection_mode": "kubeconfig",
            "credential_id": credential_id,
            # A namespace no cluster has: the honest fast failure a real run would meet.
            "namespace_template": "capb-absent",
            "secret_name_template": DEFAULT_SECRET_NAME_TEMPLATE,
        }
        for index in range(n)
    ]
    chain = make_chain(cn=f"{tag}.bench.example")
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    with rt.session() as session:
        session.execute(insert(Target), rows)
        ids = list(
            session.scalars(
                Target.__table__.select()  # type: ignore[attr-defined]
                .with_only_columns(Target.id)
                .where(Target.name.like(f"{tag}-t%"))
                .order_by(Target.name)
            )
        )
        group = queries.create_group(
            session,
            name=f"{tag}-group",
            target_ids=ids,
            batch_size=BATCHES,
            failure_threshold=THRESHOLD,
        )
        distribution = queries.create_distribution(
            session, certificate_id=certificate_id, group_id=group.id
        )
        run = queries.create_run(session, distribution_id=distribution.id, action="execute")
        return run.id, group.name


def _kubeconfig() -> bytes:
    return (
        b"apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n"
        b"    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n"
        b"    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n"
        b"    token: scale-bench\n"
    )


def _finish_batch(rt: Any, run_id: str, batch_index: int, failed_every: int) -> None:
    """What the workers would have recorded for a batch: every ``failed_every``-th target
    failed (namespace not found), the others created."""
    from sqlalchemy import update

    from models import ResultStatus, TargetResult

    with rt.session() as session:
        done = session.execute(
            update(TargetResult)
            .where(TargetResult.run_id == run_id, TargetResult.batch_index == batch_index)
            .values(status=ResultStatus.CREATED, duration_ms=5, attempts=1)
        )
        assert done.rowcount  # type: ignore[attr-defined]
        ids = [r.id for r in queries_list(session, run_id, batch_index)[::failed_every]]
        session.execute(
            update(TargetResult)
            .where(TargetResult.id.in_(ids))
            .values(status=ResultStatus.FAILED, error_reason="NamespaceNotFound")
        )


def queries_list(session: Any, run_id: str, batch_index: int) -> list[Any]:
    """The batch's result rows."""
    from models import queries

    return queries.list_target_results(session, run_id, batch_index=batch_index)


def _cli(env: dict[str, str], *args: str) -> str:
    """Run one CLI command in this process; the size of what it printed."""
    from typer.testing import CliRunner

    from worker.cli.main import app

    outcome = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    if outcome.exit_code != 0:
        raise RuntimeError(f"{' '.join(args)} exited {outcome.exit_code}: {outcome.output[-500:]}")
    return f"{len(outcome.stdout) / 1e6:.1f} MB printed"


def measure(rt: Any, env: dict[str, str], n: int) -> SizeResult:
    """Every phase over a fresh fleet of ``n`` targets."""
    from models import queries
    from worker.app import views
    from worker.app.runs import advance_run, reap, start_run

    result = SizeResult(n=n)
    started = time.perf_counter()
    run_id, group = _fleet(rt, n)
    result.run_id = run_id
    result.setup_seconds = round(time.perf_counter() - started, 1)
    say(f"N={n}: fleet made in {result.setup_seconds}s")
    engine = rt.engine
    sent = CountingDispatcher()

    def plan() -> str:
        start_run(rt, sent, run_id)
        return f"{sent.sent['targets']} targets dispatched"

    _timed(result, engine, "plan (start_run)", plan)
    _finish_batch(rt, run_id, 0, failed_every=20)

    def decide() -> str:
        before = sent.sent["targets"]
        advance_run(rt, sent, run_id, 0)
        return f"next batch: {sent.sent['targets'] - before} targets"

    _timed(result, engine, "failure-threshold decision (advance_run)", decide)
    with rt.session() as session:
        later = queries.database_now(session) + timedelta(
            seconds=rt.settings.tasks.resend_after + 1
        )
        queries.record_worker_heartbeat(session, "scale", "default", now=later)

    def reaper() -> str:
        report = reap(rt, sent, now=later)
        return f"re-sent {sum(report.redispatched.values())} lost targets"

    _timed(result, engine, "reaper pass (everything lost)", reaper)
    _timed(result, engine, "reaper pass (nothing lost)", lambda: str(reap(rt, sent)))
    _timed(
        result,
        engine,
        "run_report (counts only)",
        lambda: str(views.run_report(rt, run_id, limit=0).counts()),
    )
    _timed(
        result,
        engine,
        "run_report (a page of 1000)",
        lambda: f"{len(views.run_report(rt, run_id, limit=1000).results)} rows",
    )
    _timed(
        result,
        engine,
        "run_report (every row)",
        lambda: f"{len(views.run_report(rt, run_id).results)} rows",
    )
    _timed(
        result,
        engine,
        "stream_run_results",
        lambda: f"{sum(1 for _ in views.stream_run_results(rt, run_id))} rows",
    )
    _timed(result, engine, "runs list (API)", lambda: f"{len(views.list_runs(rt))} runs")
    _timed(
        result,
        engine,
        "groups show (API)",
        lambda: f"{len(views.get_group(rt, group).targets)} targets",
    )
    _cli(env, "--help")  # imports, once: a CLI process pays them whatever it runs
    _timed(result, engine, "CLI runs show", lambda: _cli(env, "runs", "show", run_id))
    _timed(
        result,
        engine,
        "CLI runs show --all -o json",
        lambda: _cli(env, "runs", "show", run_id, "--all", "-o", "json"),
    )
    _timed(result, engine, "CLI runs list", lambda: _cli(env, "runs", "list"))
    _timed(result, engine, "CLI runs list -o json", lambda: _cli(env, "runs", "list", "-o", "json"))
    _timed(result, engine, "CLI groups show", lambda: _cli(env, "groups", "show", group))
    return result


#: Every scan the pipeline makes on a run's rows, with the parameters of a real one.
EXPLAINED = {
    "batch done? (each message), as the planner would choose": (
        "SELECT id FROM target_results WHERE run_id = :run AND batch_index = 1 "
        "AND status IN ('pending', 'running') LIMIT 1"
    ),
    # What batch_has_open_row sends: the same probe with sequential scans off.
    "batch done? (each message), as sent": (
        "SET LOCAL enable_seqscan = off; "
        "SELECT id FROM target_results WHERE run_id = :run AND batch_index = 1 "
        "AND status IN ('pending', 'running') LIMIT 1"
    ),
    "claim (each message, 32 targets)": (
        "UPDATE target_results SET status = 'running', attempts = attempts + 1 "
        "WHERE run_id = :run AND target_id IN :ids AND (status = 'pending' OR "
        "(status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < now())))"
    ),
    "record (each target)": (
        "UPDATE target_results SET status = 'created' WHERE run_id = :run AND target_id = :one "
        "AND status = 'running' AND attempts = 1"
    ),
    "reaper: lost rows of the current batch": (
        "UPDATE target_results SET sent_at = now() WHERE run_id = :run AND batch_index = 1 "
        "AND status IN ('pending', 'running') AND (status = 'pending' OR (status = 'running' "
        "AND (lease_expires_at IS NULL OR lease_expires_at < now()))) AND (sent_at IS NULL "
        "OR sent_at < now() - interval '300 seconds') RETURNING target_id"
    ),
    "reaper: running runs": (
        "SELECT id, current_batch, heartbeat_at FROM runs WHERE state = 'running' "
        "ORDER BY heartbeat_at"
    ),
    "failure-threshold decision: counts of a batch": (
        "SELECT status, count(*) FROM target_results WHERE run_id = :run AND batch_index = 0 "
        "GROUP BY status"
    ),
    "runs show: counts": (
        "SELECT run_id, status, count(*) FROM target_results WHERE run_id IN (:run) "
        "GROUP BY run_id, status"
    ),
    "runs show: a page": (
        "SELECT r.*, t.name FROM target_results r JOIN targets t ON t.id = r.target_id "
        "WHERE r.run_id = :run ORDER BY r.batch_index, t.name, r.id LIMIT 1000"
    ),
    "runs list": "SELECT * FROM runs ORDER BY created_at DESC, id LIMIT 20",
    "groups show": (
        "SELECT t.* FROM targets t JOIN target_group_members m ON m.target_id = t.id "
        "WHERE m.group_id = (SELECT group_id FROM distributions d JOIN runs r ON "
        "r.distribution_id = d.id WHERE r.id = :run) ORDER BY m.position"
    ),
}


def explain(rt: Any, run_id: str, path: Path) -> None:
    """EXPLAIN ANALYZE each scan of :data:`EXPLAINED` (rolled back) into ``path``."""
    from sqlalchemy import bindparam, text

    lines = []
    with rt.engine.connect() as connection:
        # What autovacuum does soon after a bulk load; without it the planner guesses sizes.
        connection.execute(text("ANALYZE target_results, runs, targets, target_group_members"))
        connection.commit()
        ids = list(
            connection.scalars(
                text(
                    "SELECT target_id FROM target_results WHERE run_id = :run AND batch_index = 1 "
                    "LIMIT 32"
                ),
                {"run": run_id},
            )
        )
        connection.commit()
        for name, sql in EXPLAINED.items():
            transaction = connection.begin()
            setting, _, sql = sql.rpartition("; ")
            if setting:
                connection.execute(text(setting))
            statement = text(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}")
            if ":ids" in sql:
                statement = statement.bindparams(bindparam("ids", expanding=True))
            params = {"run": run_id, "ids": ids, "one": ids[0]}
            plan = connection.execute(
                statement, {key: value for key, value in params.items() if f":{key}" in sql}
            )
            lines += [f"-- {name}", *([setting] if setting else []), sql]
            lines += [*(row[0] for row in plan), ""]
            transaction.rollback()
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run every phase at each size on a fresh PostgreSQL database; print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sizes", default="10000", help="N, comma-separated (default 10000)")
    parser.add_argument("--explain", type=Path, help="write the scans' query plans here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]

    from models import migrate
    from tests.testenv import TestEnvironment
    from worker.core.crypto import generate_kek
    from worker.platform.runtime import build_runtime, migration_engine
    from worker.platform.settings import load_settings

    environment = TestEnvironment(cluster_count=0, environ=os.environ)
    results: list[SizeResult] = []
    try:
        database_url = environment.postgres().create_database("scale")
        data = environment.workdir / "scale"
        data.mkdir(parents=True, exist_ok=True)
        env = {
            "HOME": str(data),
            "CAP_DATA_DIR": str(data),
            "CAP_DATABASE_URL": database_url,
            "CAP_KEK": f"k1:{generate_kek()}",
            "CAP_COLOR": "never",
        }
        settings = load_settings(env)
        with migration_engine(settings.database.url) as engine:
            migrate.upgrade(engine)
        rt = build_runtime(settings)
        try:
            for n in sizes:
                results.append(measure(rt, env, n))
            if args.explain:
                explain(rt, results[-1].run_id, args.explain)
        finally:
            rt.close()
    finally:
        environment.close()
    out = io.StringIO()
    with redirect_stdout(out):
        for result in results:
            print(f"N={result.n} (fleet set-up {result.setup_seconds}s)")
            print("| path | s | statements | RSS MB after | peak RSS MB | note |")
            print("|---|---:|---:|---:|---:|---|")
            for phase in result.phases:
                print(
                    f"| {phase.name} | {phase.seconds:.3f} | {phase.statements} | "
                    f"{phase.rss_mb:.0f} | {phase.peak_rss_mb:.0f} | {phase.note[:60]} |"
                )
            print()
    sys.stdout.write(out.getvalue())
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
