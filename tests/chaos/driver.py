"""The randomized fault scenario on the real environment: one *round* per seed.

A round builds a fresh world (a new PostgreSQL database, an emptied Redis, a namespace in
every cluster, a group of targets spread over the clusters with progressive batches, store
content on, a stacked webhook to a local receiver, half the targets already holding a team's
Secret), starts real worker processes and plays :func:`tests.chaos.model.fault_schedule`
against it: executes, rollbacks, worker SIGKILL/SIGTERM (and replacements), Redis restarts
(kept and wiped), a PostgreSQL restart, apiserver cuts (a :class:`TcpGate` in front of each
apiserver), a rival controller's label, a team rotating its own Secret, and renewals.

When the schedule ends every fault is undone, and within ``settle_seconds`` every run must be
final. Then the round reads what is there (runs, results, Secrets, snapshots, webhook
deliveries) and hands it to the pure checkers; finally a quiet rollback must restore exactly
what the model says was live before our first write of that generation.

Every process the round starts (workers) it stops by PID; gates and the receiver close; the
database is dropped. Redis and PostgreSQL are restarted in place and left running.
"""

from __future__ import annotations

import base64
import contextlib
import random
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from kubernetes import client as k8s

from models import queries
from models.errors import DATABASE_OUTAGE_ERRORS
from tests.certfactory import make_chain
from tests.chaos.model import (
    ABSENT,
    SEED,
    Delivery,
    Fault,
    Identified,
    ObservedRun,
    ObservedSnapshot,
    OwnerWrite,
    RunRecord,
    Step,
    Version,
    Violation,
    check_no_internal_errors,
    check_runs_final,
    check_secrets,
    check_snapshots,
    check_webhooks,
    delivery_from_request,
    fault_schedule,
    identify,
    known_cause,
    owner_may_write,
    replay,
    version_of,
)
from tests.support.faults import TcpGate, gated_kubeconfig, seed_previous_secrets
from tests.support.pipeline import Pipeline, build_fleet, pipeline, read_secret
from tests.support.receiver import WebhookReceiver
from tests.support.workers import WorkerProcess
from tests.testenv.access import create_service_account
from worker.app import service

CN = "shop.example.com"


@dataclass
class Services:
    """What a round runs on: the clusters, a restartable Redis and PostgreSQL of its own."""

    clusters: list[Any]
    redis: Any
    """A private :class:`~tests.testenv.services.RedisServer` with appendonly."""
    postgres: Any
    """A private :class:`~tests.testenv.services.PostgresServer` (restartable)."""
    admin_api: Callable[[Any], Any]
    workdir: Path


@dataclass(frozen=True)
class RoundOptions:
    """The size of a round."""

    targets: int = 12
    workers: int = 3
    concurrency: int = 2
    fault_seconds: float = 75.0
    settle_seconds: float = 150.0
    quiet_seconds: float = 60.0
    """Bound for the quiet rollback after the checks (no faults by then: a few seconds)."""
    skip: frozenset[str] = frozenset()
    """Fault kinds left out of the schedule (``--skip``)."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra settings for this process and the workers (``--env KEY=VALUE``), e.g. to try a
    configuration change against the same schedule."""


@dataclass
class RoundResult:
    """What a round did and found."""

    seed: int
    violations: list[Violation]
    events: list[str]
    faults: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    logs: Path | None = None

    def report(self) -> str:
        """The seed, the violations and the whole event log (to replay with ``--seed``)."""
        lines = [
            f"seed {self.seed}: {len(self.violations)} violation(s) "
            f"(replay: python -m tests.chaos --seed {self.seed} --rounds 1)",
            *(f"  {violation}{_hint(violation)}" for violation in self.violations),
            f"worker logs: {self.logs}",
            "event log:",
            *(f"  {event}" for event in self.events),
        ]
        return "\n".join(lines)


@dataclass
class _Attempt:
    """An enqueue the driver made, in order, with the version current at that moment."""

    action: str
    pinned: str | None
    run_id: str | None
    """None when the enqueue raised something else than a refusal (the run may exist)."""
    wall: float


class Round:
    """One seeded round; :meth:`run` returns its :class:`RoundResult`."""

    def __init__(self, services: Services, seed: int, options: RoundOptions) -> None:
        self.services = services
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed * 7919 + 1)
        self.events: list[str] = []
        self.faults: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.workers: list[WorkerProcess] = []
        self.every_worker: list[WorkerProcess] = []
        self.restarts_due: list[float] = []
        self.cuts: list[tuple[float, TcpGate, str]] = []
        self.gates: dict[str, TcpGate] = {}
        self.versions: list[Version] = []
        self.current = "v0"
        self.steps: list[_Attempt | OwnerWrite] = []
        self.owners = 0
        self.worker_serial = 0
        self.exited: list[str] = []
        self.terminated: list[WorkerProcess] = []

    # ----------------------------------------------------------------------- bookkeeping

    def log(self, text: str) -> None:
        """Append a timestamped line to the event log."""
        self.events.append(f"{time.monotonic() - self.t0:7.2f}s {text}")

    def _count(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    # ------------------------------------------------------------------------------ run

    def run(self) -> RoundResult:
        """Set up, drive the schedule, settle, check; always tear down."""
        workdir = self.services.workdir / f"round-{self.seed}-{uuid.uuid4().hex[:4]}"
        workdir.mkdir(parents=True)
        redis.Redis.from_url(self.services.redis.url).flushall()
        database = self.services.postgres.create_database("chaos")
        violations: list[Violation] = []
        runs: dict[str, int] = {}
        try:
            with (
                pipeline(
                    database, self.services.redis.url, workdir, dict(self.options.env)
                ) as pipe,
                WebhookReceiver() as hook,
            ):
                try:
                    self._setup(pipe, hook)
                    self._drive(pipe)
                    self._undo_faults(pipe)
                    violations, runs = self._settle_and_check(pipe, hook)
                except Exception:
                    violations.append(
                        Violation("driver", "round", traceback.format_exc(limit=6).strip())
                    )
                finally:
                    self._stop_workers()
                    for gate in self.gates.values():
                        gate.close()
        finally:
            with contextlib.suppress(Exception):
                self.services.postgres.drop_database(database)
        return RoundResult(
            seed=self.seed,
            violations=violations,
            events=self.events,
            faults=dict(sorted(self.faults.items())),
            runs=runs,
            seconds=time.monotonic() - self.t0,
            logs=workdir,
        )

    # ---------------------------------------------------------------------------- setup

    def _setup(self, pipe: Pipeline, hook: WebhookReceiver) -> None:
        options = self.options
        self.namespace = f"chaos-{self.seed % 100000}-{uuid.uuid4().hex[:5]}"
        kubeconfigs: dict[str, str] = {}
        for cluster in self.services.clusters:
            gate = TcpGate("127.0.0.1", cluster.port, stable_port=True)
            self.gates[cluster.name] = gate
            access = create_service_account(
                self.services.admin_api(cluster), cluster, self.namespace
            )
            kubeconfigs[cluster.name] = gated_kubeconfig(access.kubeconfig, gate)
        batch_size = self.rng.choice([[1, 3, "50%"], [2, "25%"], [1, 2, 4]])
        threshold = self.rng.choice(["100%", "50%", "25%"])

        def no_account(*_: Any) -> Any:
            raise AssertionError("every cluster has a kubeconfig already")

        self.fleet = build_fleet(
            pipe,
            self.services.clusters,
            no_account,
            targets=options.targets,
            namespace=self.namespace,
            batch_size=batch_size,
            failure_threshold=threshold,
            store_content=True,
            kubeconfigs=kubeconfigs,
            cn=CN,
        )
        # The team's Secrets exist for the first three quarters of the targets; the last ones
        # are absent (their snapshot says "did not exist"). Absent targets come last so a
        # rollback's first, small batches restore instead of halting on "nothing to restore".
        seeded = self.fleet.target_names[: options.targets - max(1, options.targets // 4)]
        seed_chain = seed_previous_secrets(
            self.services.admin_api,
            [self.fleet.placement[name] for name in seeded],
            self.fleet.distribution_id,
        )
        self.initial = {
            name: (SEED if name in seeded else ABSENT) for name in self.fleet.target_names
        }
        self.versions = [
            version_of(SEED, seed_chain.leaf_pem, seed_chain.key_pem),
            version_of("v0", self.fleet.chain.leaf_pem, self.fleet.chain.key_pem),
        ]
        service.add_webhook_secret(pipe.runtime, f"{self.namespace}-hmac", b"chaos-hmac-" * 3)
        service.attach_webhook(
            pipe.runtime, self.fleet.certificate_id, hook.url, secret=f"{self.namespace}-hmac"
        )
        self.log(
            f"setup: {options.targets} targets over {len(self.services.clusters)} clusters, "
            f"batches {batch_size}, threshold {threshold}, seeded {len(seeded)}, "
            f"{options.workers} workers x {options.concurrency}"
        )
        for _ in range(options.workers):
            self._start_worker(pipe)
        for worker in self.workers:
            worker.wait_ready()

    def _start_worker(self, pipe: Pipeline) -> WorkerProcess:
        self.worker_serial += 1
        worker = WorkerProcess(
            f"chaos{self.worker_serial}",
            pipe.env,
            pipe.log_dir,
            concurrency=self.options.concurrency,
        )
        self.workers.append(worker)
        self.every_worker.append(worker)
        self.log(f"worker {worker.name} started (pid {worker.process.pid})")
        return worker

    # ---------------------------------------------------------------------------- drive

    def _drive(self, pipe: Pipeline) -> None:
        schedule = fault_schedule(
            self.seed, duration=self.options.fault_seconds, skip=self.options.skip
        )
        self.log(f"schedule: {len(schedule)} events over {self.options.fault_seconds:.0f}s")
        start = time.monotonic()
        for fault in schedule:
            while time.monotonic() - start < fault.at:
                self._maintain(pipe)
                time.sleep(0.05)
            self._maintain(pipe)
            try:
                self._apply(pipe, fault)
            except DATABASE_OUTAGE_ERRORS as exc:
                self.log(f"{fault.describe()}: database unavailable ({type(exc).__name__})")
            self._count(fault.kind)

    def _maintain(self, pipe: Pipeline) -> None:
        """Restore cuts and start replacements that are due; reap workers that left."""
        now = time.monotonic()
        for worker in list(self.workers):
            if not worker.alive():
                # Not one of ours: a worker that exits by itself is a finding (its log tail goes
                # into the event log); the fleet keeps its size, as a Deployment would.
                self.workers.remove(worker)
                # A worker that never became ready and stops with an error at boot (a
                # dependency down at that moment) fails fast by design, and is only logged;
                # a ready worker must survive every fault the schedule holds.
                ready = " ready." in worker.log_text()
                if ready:
                    self.exited.append(worker.name)
                tail = " | ".join(worker.log_text().strip().splitlines()[-6:])
                self.log(
                    f"worker {worker.name} exited by itself "
                    f"{'' if ready else 'during boot '}(status "
                    f"{worker.process.returncode}); its log ends: {tail[-1500:]}"
                )
                self._start_worker(pipe)
        for due, gate, name in list(self.cuts):
            if due <= now:
                gate.restore()
                self.cuts.remove((due, gate, name))
                self.log(f"apiserver {name} restored")
        for due in list(self.restarts_due):
            if due <= now:
                self.restarts_due.remove(due)
                self._start_worker(pipe)

    def _apply(self, pipe: Pipeline, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("execute", "rollback"):
            self._enqueue(pipe, kind)
        elif kind in ("worker_kill", "worker_term"):
            alive = [worker for worker in self.workers if worker.alive()]
            if not alive:
                self.log(f"{fault.describe()}: no worker alive")
                return
            worker = alive[fault.arg % len(alive)]
            self.workers.remove(worker)
            if kind == "worker_kill":
                worker.kill()
            else:
                # Before Celery has installed its handlers (still booting, nothing consumed),
                # SIGTERM's default action ends the process: only a ready worker owes a warm
                # shutdown with status 0.
                ready = " ready." in worker.log_text()
                worker.terminate()
                if ready:
                    self.terminated.append(worker)
            self.log(f"{fault.describe()}: {worker.name} (pid {worker.process.pid})")
            self.restarts_due.append(time.monotonic() + fault.seconds)
        elif kind == "redis_restart":
            self.services.redis.restart()
            self.log("redis restarted (appendonly: acknowledged data kept)")
        elif kind == "redis_wipe":
            redis.Redis.from_url(self.services.redis.url).flushall()
            self.services.redis.restart()
            self.log("redis wiped and restarted (as without persistence: everything lost)")
        elif kind == "postgres_restart":
            self.services.postgres.restart()
            self.log("postgres restarted")
        elif kind == "apiserver_cut":
            cluster = self.services.clusters[fault.arg % len(self.services.clusters)]
            gate = self.gates[cluster.name]
            if gate.is_open:
                gate.cut()
                self.cuts.append((time.monotonic() + fault.seconds, gate, cluster.name))
                self.log(f"{fault.describe()}: apiserver {cluster.name} cut")
        elif kind == "rival_label":
            self._rival(fault)
        elif kind == "owner_rotate":
            self._owner_rotate(pipe, fault)
        elif kind == "renew":
            self._renew(pipe)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    def _enqueue(self, pipe: Pipeline, action: str) -> None:
        pinned = self.current if action == "execute" else None
        attempt = _Attempt(action, pinned, None, time.time())
        try:
            attempt.run_id = pipe.enqueue(self.fleet.distribution_id, action)
        except (service.RunAlreadyActive, service.RollbackUnavailable) as exc:
            self.log(f"{action}: refused ({type(exc).__name__}: {exc})")
            return
        except Exception as exc:  # the run may have been stored before the failure
            self.log(f"{action}: enqueue raised {type(exc).__name__}: {exc}")
            self.steps.append(attempt)
            return
        self.steps.append(attempt)
        self.log(f"{action} {attempt.run_id} enqueued (pinned {pinned})")

    def _rival(self, fault: Fault) -> None:
        name = self.fleet.target_names[fault.arg % len(self.fleet.target_names)]
        cluster, namespace, secret_name = self.fleet.placement[name]
        api = k8s.CoreV1Api(self.services.admin_api(cluster))
        patch = {"metadata": {"labels": {"rival.example.com/stamp": str(fault.arg)}}}
        try:
            api.patch_namespaced_secret(secret_name, namespace, patch)
            self.log(f"rival stamped a label on {name}")
        except k8s.ApiException as exc:
            self.log(f"rival on {name}: {exc.status}")

    def _owner_rotate(self, pipe: Pipeline, fault: Fault) -> None:
        # Only while no execute or rollback is queued or running: the team's write never races
        # ours, so the model knows the order. Our own content is never replaced this way.
        reports = service.list_runs(
            pipe.runtime, distribution_id=self.fleet.distribution_id, limit=100_000
        )  # states only
        if any(not report.finished for report in reports):
            self.log("owner_rotate: skipped (a run is active)")
            return
        model = replay(self.initial, self._steps(pipe))
        candidates = sorted(name for name, state in model.items() if owner_may_write(state))
        if not candidates:
            self.log("owner_rotate: skipped (no target holds the team's content)")
            return
        name = candidates[fault.arg % len(candidates)]
        self.owners += 1
        label = f"owner-{self.owners}"
        chain = make_chain(cn=CN, fresh_leaf_key=True)
        cluster, namespace, secret_name = self.fleet.placement[name]
        api = k8s.CoreV1Api(self.services.admin_api(cluster))
        live = api.read_namespaced_secret(secret_name, namespace)
        live.data = {
            **(live.data or {}),
            "tls.crt": base64.b64encode(chain.fullchain_pem).decode(),
            "tls.key": base64.b64encode(chain.key_pem).decode(),
        }
        self.versions.append(version_of(label, chain.leaf_pem, chain.key_pem))
        api.replace_namespaced_secret(secret_name, namespace, live)
        self.steps.append(OwnerWrite(name, label))
        self.log(f"owner rotated {name} to {label}")

    def _renew(self, pipe: Pipeline) -> None:
        chain = make_chain(cn=CN, fresh_leaf_key=True)
        label = f"v{sum(1 for v in self.versions if v.label.startswith('v'))}"
        version = version_of(label, chain.leaf_pem, chain.key_pem)
        self.versions.append(version)  # known even if the renewal's answer is lost
        pems = {"cert": chain.leaf_pem, "key": chain.key_pem, "chain": chain.chain_pem}
        deadline = time.monotonic() + 60
        while True:
            try:
                service.renew_certificate(pipe.runtime, self.fleet.certificate_id, pems)
                break
            except DATABASE_OUTAGE_ERRORS:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.current = label
        self.log(f"renewed: the certificate is now {label} ({version.fingerprint[:12]})")

    # -------------------------------------------------------------------------- undoing

    def _undo_faults(self, pipe: Pipeline) -> None:
        for _, gate, name in self.cuts:
            gate.restore()
            self.log(f"apiserver {name} restored (faults over)")
        self.cuts.clear()
        self.restarts_due.clear()
        alive = [worker for worker in self.workers if worker.alive()]
        self.workers = alive
        while len(self.workers) < self.options.workers:
            self._start_worker(pipe)
        for worker in self.workers:
            worker.wait_ready(timeout=120)
        self.log(f"faults over: {len(self.workers)} workers ready")

    def _stop_workers(self) -> None:
        # By PID (each worker's own process group), including those SIGTERMed earlier.
        for worker in self.every_worker:
            worker.kill()
            worker.stop(timeout=5)

    # ------------------------------------------------------------------------ observing

    def _steps(self, pipe: Pipeline) -> list[Step]:
        """The driver's steps with each run's outcome from the database, in order."""
        reports = {
            report.id: report
            for report in service.list_runs(
                pipe.runtime,
                distribution_id=self.fleet.distribution_id,
                limit=100_000,
                with_results=True,
            )
            if report.action in ("execute", "rollback")
        }
        known = {step.run_id for step in self.steps if isinstance(step, _Attempt)}
        # A run stored by an enqueue that then raised: matched to that attempt by time.
        unknown = sorted(
            (report for run_id, report in reports.items() if run_id not in known),
            key=lambda report: report.created_at,
        )
        steps: list[Step] = []
        for step in self.steps:
            if isinstance(step, OwnerWrite):
                steps.append(step)
                continue
            report = reports.get(step.run_id) if step.run_id else None
            if report is None and step.run_id is None:
                report = next(
                    (
                        candidate
                        for candidate in unknown
                        if candidate.action == step.action
                        and abs(_epoch(candidate.created_at) - step.wall) < 30
                    ),
                    None,
                )
                if report is not None:
                    unknown.remove(report)
                    step.run_id = report.id
            if report is None:
                continue
            steps.append(
                RunRecord(
                    run_id=report.id,
                    action=report.action,
                    pinned=step.pinned,
                    state=report.state,
                    results={
                        result.target_name: (result.status, result.error_reason)
                        for result in report.results
                    },
                )
            )
        for report in unknown:  # never expected: the model cannot place it
            raise AssertionError(f"run {report.id} ({report.action}) was not enqueued by us")
        return steps

    def _observe_secrets(self) -> dict[str, Identified]:
        seen: dict[str, Identified] = {}
        for name, (cluster, namespace, secret_name) in self.fleet.placement.items():
            secret = read_secret(self.services.admin_api, cluster, namespace, secret_name)
            if secret is None:
                seen[name] = identify(None, None, self.versions)
                continue
            data = secret.data or {}
            seen[name] = identify(
                base64.b64decode(data["tls.crt"]) if "tls.crt" in data else b"",
                base64.b64decode(data["tls.key"]) if "tls.key" in data else b"",
                self.versions,
            )
        return seen

    def _observe_snapshots(self, pipe: Pipeline) -> dict[str, ObservedSnapshot]:
        found: dict[str, ObservedSnapshot] = {}
        rt = pipe.runtime
        distribution_id = self.fleet.distribution_id
        with rt.session() as session:
            for name in self.fleet.target_names:
                target = queries.get_target_by_name(session, name)
                row = queries.get_snapshot(session, distribution_id, target.id)
                if row is None:
                    continue
                _, previous = queries.reveal_snapshot(
                    session, rt.sealer, distribution_id, target.id
                )
                final = row.written_fingerprint is not None
                if not previous.get("existed", True):
                    found[name] = ObservedSnapshot(ABSENT, final)
                    continue
                data = previous.get("data") or {}
                seen = identify(
                    base64.b64decode(data.get("tls.crt", "")),
                    base64.b64decode(data.get("tls.key", "")),
                    self.versions,
                )
                found[name] = ObservedSnapshot(seen.label, final, seen.problem)
        return found

    def _observe_runs(self, pipe: Pipeline) -> list[ObservedRun]:
        observed: list[ObservedRun] = []
        for report in service.list_runs(pipe.runtime, limit=100_000, with_results=True):
            child = None
            stacked = report.distribution_id != self.fleet.distribution_id
            if report.action == "execute" and not stacked:
                chain = service.stacked_runs(pipe.runtime, report.id)
                child = chain[0] if chain else None
            observed.append(
                ObservedRun(
                    run_id=report.id,
                    action=report.action,
                    state=report.state,
                    results={
                        result.target_name: (result.status, result.error_reason)
                        for result in report.results
                    },
                    webhook_run=child,
                    stacked=stacked,
                )
            )
        return observed

    # ------------------------------------------------------------------------- checking

    def _wait_all_final(self, pipe: Pipeline, deadline: float) -> list[ObservedRun]:
        runs: list[ObservedRun] = []
        while True:
            try:
                runs = self._observe_runs(pipe)
                succeeded = [
                    run
                    for run in runs
                    if run.action == "execute"
                    and run.state == "succeeded"
                    and not run.stacked
                    and run.webhook_run is None
                ]
                if not check_runs_final(runs) and not succeeded:
                    return runs
            except DATABASE_OUTAGE_ERRORS:
                pass
            if time.monotonic() > deadline:
                return runs
            time.sleep(1.0)

    def _settle_and_check(
        self, pipe: Pipeline, hook: WebhookReceiver
    ) -> tuple[list[Violation], dict[str, int]]:
        settled_at = time.monotonic()
        runs = self._wait_all_final(pipe, settled_at + self.options.settle_seconds)
        self.log(f"settled in {time.monotonic() - settled_at:.1f}s")
        states: dict[str, int] = {}
        for run in runs:
            key = f"{run.action}:{run.state}"
            states[key] = states.get(key, 0) + 1
        steps = self._steps(pipe)
        for step in steps:
            if isinstance(step, RunRecord):
                counts: dict[str, int] = {}
                for status, reason in step.results.values():
                    key = status if reason is None else f"{status}/{reason}"
                    counts[key] = counts.get(key, 0) + 1
                self.log(
                    f"result {step.action} {step.run_id} {step.state} pinned "
                    f"{step.pinned}: {dict(sorted(counts.items()))}"
                )
            else:
                self.log(f"result owner write {step.target} -> {step.label}")
        violations = check_runs_final(runs) + check_no_internal_errors(runs)
        violations += [
            Violation("worker-alive", name, "exited without being signalled (see the event log)")
            for name in self.exited
        ]
        # SIGTERM is a warm shutdown: the tasks in flight finish (within the hard time limit),
        # then the worker exits 0; give the last one up to 30 s more.
        patience = time.monotonic() + 30
        for worker in self.terminated:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, patience - time.monotonic()))
        violations += [
            Violation(
                "worker-warm-shutdown",
                worker.name,
                "still running after the settle"
                if worker.process.poll() is None
                else f"exited with status {worker.process.returncode} after SIGTERM",
            )
            for worker in self.terminated
            if worker.process.poll() != 0
        ]
        model = replay(self.initial, steps)
        violations += check_secrets(model, self._observe_secrets())
        violations += check_snapshots(model, self._observe_snapshots(pipe))
        pinned = {
            step.run_id: self._fingerprint(step.pinned)
            for step in steps
            if isinstance(step, RunRecord) and step.pinned is not None
        }
        deliveries: list[Delivery] = [
            delivery_from_request(headers, body) for headers, body in list(hook.requests)
        ]
        violations += check_webhooks(runs, deliveries, pinned)
        self.log(f"webhook deliveries received: {len(deliveries)}")
        if not any(v.invariant == "run-final" for v in violations):
            violations += self._quiet_rollback(pipe, steps)
        return violations, dict(sorted(states.items()))

    def _fingerprint(self, label: str) -> str:
        return next(v.fingerprint for v in self.versions if v.label == label)

    def _quiet_rollback(self, pipe: Pipeline, steps: list[Step]) -> list[Violation]:
        """Without faults: a rollback restores what the model says was live before our first
        write of this generation, in every target it reports restored."""
        try:
            run_id = pipe.enqueue(self.fleet.distribution_id, "rollback")
        except service.RollbackUnavailable as exc:
            self.log(f"quiet rollback: unavailable ({exc})")
            return []
        report = pipe.wait(run_id, timeout=self.options.quiet_seconds)
        record = RunRecord(
            run_id=report.id,
            action="rollback",
            pinned=None,
            state=report.state,
            results={r.target_name: (r.status, r.error_reason) for r in report.results},
        )
        self.log(f"quiet rollback {run_id}: {report.state} {report.counts()}")
        model = replay(self.initial, [*steps, record])
        found = check_secrets(model, self._observe_secrets())
        found += check_no_internal_errors(
            [ObservedRun(report.id, "rollback", report.state, record.results)]
        )
        return [
            Violation(f"after-quiet-rollback:{v.invariant}", v.subject, v.detail) for v in found
        ]


def _hint(violation: Violation) -> str:
    cause = known_cause(violation)
    return f"  <- likely {cause}" if cause else ""


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@contextlib.contextmanager
def own_services(workdir: Path, cluster_count: int = 3) -> Iterator[Services]:
    """A whole test environment of its own (for ``python -m tests.chaos``); closed after."""
    import os
    import sys

    from tests.testenv import TestEnvironment, admin_api_client

    environment = TestEnvironment(
        cluster_count=cluster_count, environ=os.environ, progress=lambda: sys.stderr
    )
    apis: dict[str, Any] = {}

    def admin_api(cluster: Any) -> Any:
        if cluster.name not in apis:
            apis[cluster.name] = admin_api_client(cluster)
        return apis[cluster.name]

    try:
        clusters = environment.clusters()
        yield Services(
            clusters=clusters,
            redis=environment.new_redis(appendonly=True),
            postgres=environment.new_postgres(),
            admin_api=admin_api,
            workdir=workdir,
        )
    finally:
        for api in apis.values():
            with contextlib.suppress(Exception):
                api.close()
        environment.close()


def run_round(services: Services, seed: int, options: RoundOptions | None = None) -> RoundResult:
    """Play one seeded round on ``services`` and check every invariant."""
    return Round(services, seed, options or RoundOptions()).run()
