"""Celery tasks: thin wrappers that hand ids to worker.app.runs.

Importing this module registers the tasks on the (still unconfigured) Celery app and reads
no settings; see worker/platform/celery_app.py for who configures it.

Every argument is an id: certificate, key and kubeconfig bytes are read from the
database and decrypted inside the task, so nothing secret sits in the broker, the
result backend or Flower. Every task is idempotent (see worker/app/runs.py), which
is what makes ``acks_late`` + ``reject_on_worker_lost`` safe.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import group, signals
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Queue  # type: ignore[attr-defined]

from models.errors import NotFoundError
from worker.app import metrics as app_metrics
from worker.app.audit import enqueue_audit
from worker.app.commands import ServiceError, check_target_health
from worker.app.pools import forget_heartbeat, pools_of, record_heartbeat
from worker.app.runs import (
    DATABASE_OUTAGE_ERRORS,
    advance_run,
    process_targets,
    reap,
    start_run,
)
from worker.platform import logs, metrics
from worker.platform.celery_app import app, configured_settings, pool_queue_of, worker_queues
from worker.platform.runtime import Runtime, build_runtime, get_runtime, set_runtime
from worker.platform.settings import Settings, require_kek, target_worst_case

log = logging.getLogger(__name__)

# The task names are a contract with the scheduler (and with messages already queued):
# they never change, even where they have become inexact.
START_RUN = "cap.run.start"
ADVANCE_RUN = "cap.run.advance"
#: One message carries up to MOST_PER_MESSAGE targets of a run; the name is from the time
#: a message carried one target.
PROCESS_TARGETS = "cap.kube.target"
#: A target's health check, run on a worker of the target's pool (see worker.app.pools).
CHECK_HEALTH = "cap.kube.health"
#: Queue audit runs (worker.app.audit): what a Celery beat schedule sends (README, "Audit").
ENQUEUE_AUDIT = "cap.audit.enqueue"

#: A dispatch is spread over at least this many messages before targets share one, so a
#: small batch still reaches every pool process of a typical deployment at once.
SPREAD = 16
#: At most this many targets in one message. A message's targets share its costs: publish,
#: delivery, acknowledgement, four Flower events, and one database transaction each to
#: claim, record and check the batch. bench/ (N=1000, W=1) measured the worker's CPU per
#: target at 4.3 ms with 8 per message and 3.2 ms with 32 (1000 targets in 32 messages).
#: A message still starts a target only while it can finish inside the soft time limit.
MOST_PER_MESSAGE = 32


def targets_per_message(count: int) -> int:
    """How many of ``count`` targets one message carries (1 for small dispatches)."""
    return max(1, min(MOST_PER_MESSAGE, math.ceil(count / SPREAD)))


def message_chunks(target_ids: Sequence[str]) -> list[list[str]]:
    """Split a dispatch into the target lists of its messages (order kept, each target once)."""
    size = targets_per_message(len(target_ids))
    return [list(target_ids[start : start + size]) for start in range(0, len(target_ids), size)]


def start_deadline(settings: Settings, started: float) -> float:
    """The ``time.monotonic()`` after which a message starts no more targets: a target started
    before it finishes, at its worst, with the message's record, inside the soft time limit."""
    worst = target_worst_case(settings.tasks, settings.kube)
    return started + settings.tasks.soft_time_limit - worst.message_minimum


def serving_deadline(settings: Settings, started: float) -> float:
    """The ``time.monotonic()`` by which a message's verify-serving ends: the soft time limit
    minus what recording its outcomes may take at worst (worker.core.budget)."""
    worst = target_worst_case(settings.tasks, settings.kube)
    return started + worst.serving_end(settings.tasks.soft_time_limit)


class CeleryDispatcher:
    """The pipeline's Dispatcher, sending Celery messages."""

    def start(self, run_id: str) -> None:
        """Queue the start of a run."""
        start_run_task.apply_async(args=(run_id,))

    def process_targets(self, run_id: str, target_ids: Sequence[str]) -> None:
        """Queue the targets in messages of a few each, on the queue of each target's pool;
        the workers of each pool take theirs in parallel."""
        if not target_ids:
            return
        for pool, ids in pools_of(get_runtime(), target_ids).items():
            group(
                process_target_task.si(run_id, *chunk) for chunk in message_chunks(ids)
            ).apply_async(queue=self._queue(pool))

    def check_health(self, target_id: str, pool: str, *, record_cluster: bool) -> None:
        """Queue a target's health check on its pool's queue (a worker of it records it)."""
        check_health_task.apply_async(args=(target_id, record_cluster), queue=self._queue(pool))

    @staticmethod
    def _queue(pool: str) -> Queue:
        # Declared on publish, so a message sent before any worker of the pool started
        # waits in the pool's queue instead of being dropped by an exchange with no binding.
        return pool_queue_of(configured_settings(app), pool)

    def advance(self, run_id: str, batch_index: int) -> None:
        """Queue the batch callback of ``batch_index``."""
        advance_run_task.apply_async(args=(run_id, batch_index))


dispatcher = CeleryDispatcher()

#: Retry policy of the three pipeline tasks: a database outage (lost connection, server
#: restarting) is retried with exponential backoff and full jitter, 1 s doubling up to 30 s,
#: ten times (about four minutes in all). Safe because every step is idempotent: a start
#: finds its run already running, a claim its target already claimed, an advance its batch
#: index already moved. Other database errors are defects and are not retried.
DATABASE_RETRY: dict[str, Any] = {
    "autoretry_for": DATABASE_OUTAGE_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 10,
}


@app.task(name=START_RUN, **DATABASE_RETRY)
def start_run_task(run_id: str) -> None:
    """Plan a run into batches and send its first batch."""
    start_run(get_runtime(), dispatcher, run_id)


@app.task(name=PROCESS_TARGETS, **DATABASE_RETRY)
def process_target_task(run_id: str, *target_ids: str) -> None:
    """Dry-run, execute or roll back targets of a run in turn (failures are recorded, not raised).

    The message's targets are claimed together, processed one after the other, and recorded
    together (see worker.app.runs.process_targets); a redelivered message skips the targets
    already final or claimed by another delivery. A target starts only if it can finish
    inside the task's soft time limit even at its worst; the rest go back to the queue in a
    new message. A target the soft time limit interrupts anyway is given back with them, not
    recorded as failed (worker.app.runs.process_targets).
    """
    rt = get_runtime()
    started = time.monotonic()
    left = process_targets(
        rt,
        dispatcher,
        run_id,
        target_ids,
        start_before=start_deadline(rt.settings, started),
        serving_before=serving_deadline(rt.settings, started),
        interrupted_by=(SoftTimeLimitExceeded,),
    )
    if left:
        dispatcher.process_targets(run_id, left)


@app.task(name=CHECK_HEALTH, **DATABASE_RETRY)
def check_health_task(target_id: str, record_cluster: bool = False) -> None:
    """Run a target's health check in this worker's pool and store the outcome on the target."""
    check_target_health(get_runtime(), target_id, record_cluster=record_cluster)


@app.task(name=ENQUEUE_AUDIT, **DATABASE_RETRY)
def enqueue_audit_task(
    distribution: str | None = None, group: str | None = None, every: bool = False
) -> None:
    """Queue one audit run per Kubernetes distribution chosen (for a beat schedule).

    Exactly one of ``distribution`` (id), ``group`` (name or id) or ``every``. A choice that
    names nothing to audit is logged and not retried: the next beat tries again.
    """
    try:
        run_ids = enqueue_audit(
            get_runtime(), dispatcher, distribution=distribution, group=group, every=every
        )
    except (ServiceError, NotFoundError) as exc:
        log.error("audit not queued: %s", exc)
        return
    log.info("queued %d audit run(s): %s", len(run_ids), ", ".join(run_ids))


@app.task(name=ADVANCE_RUN, **DATABASE_RETRY)
def advance_run_task(run_id: str, batch_index: int) -> None:
    """The batch callback: next batch, halt on the failure threshold, or finish."""
    advance_run(get_runtime(), dispatcher, run_id, batch_index)


# ------------------------------------------------------------------ worker life cycle


@signals.worker_init.connect
def _runtime_from_the_app_settings(**_: Any) -> None:
    # In the worker's main process, before the pool forks: the runtime gets exactly the
    # settings the app was configured (and bootstrapped) with. Pool processes inherit it and
    # get_runtime() rebuilds its connections after the fork, keeping those settings.
    require_kek(configured_settings(app))  # a worker opens secrets: refuse to start without
    set_runtime(build_runtime(configured_settings(app)))
    # Metrics (when CAP_METRICS_PORT is set): the multiprocess folder before the pool forks.
    metrics.enable(configured_settings(app).observability)


@signals.worker_process_init.connect
def _fresh_resources_after_fork(**_: Any) -> None:
    # A pool process must not reuse the parent's database or HTTP connections.
    get_runtime()


@signals.worker_process_shutdown.connect
def _close_resources(**_: Any) -> None:
    get_runtime().close()
    metrics.process_died(os.getpid())


# ------------------------------------------------------------------ logs and metrics


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    # CAP_LOG_FORMAT=json: the handlers Celery just set up write one JSON object per line.
    loggers = [logger, logging.getLogger("celery.redirected")]
    logs.apply_format(configured_settings(app).observability.log_format, loggers)


#: What each task's first positional argument is, for the log context of its lines.
_FIRST_ARGUMENT = {
    START_RUN: "run_id",
    PROCESS_TARGETS: "run_id",
    ADVANCE_RUN: "run_id",
    CHECK_HEALTH: "target_id",
}


@signals.task_prerun.connect
def _bind_task_context(
    sender: Any = None, task_id: str | None = None, args: Sequence[Any] = (), **_: Any
) -> None:
    # The context starts empty for each task; a task without ids in its arguments (the audit
    # beat's) names none, rather than passing a target or distribution off as a run.
    field = _FIRST_ARGUMENT.get(getattr(sender, "name", ""))
    logs.set_context(task_id=task_id, **({field: args[0]} if field and args else {}))


@signals.task_postrun.connect
def _clear_task_context(**_: Any) -> None:
    logs.set_context()


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    settings = configured_settings(app)
    # The queues this worker consumes: its pool's (kubernetes.<pool>), the un-pooled one that
    # default-pool workers still drain, and control.
    queues = tuple(worker_queues(settings))
    metrics.serve(settings.observability, app_metrics.collectors(get_runtime, app, queues))


@signals.worker_ready.connect
def _quiet_shutdown_notices(sender: Any = None, **_: Any) -> None:
    # CAP_LOG_FORMAT=json: Celery's SIGTERM/SIGQUIT handlers print "worker: Warm shutdown
    # (MainProcess)" straight to stdout, the one plain line left in a JSON log. The same
    # handlers without that print; _stop_housekeeper logs the shutdown instead.
    if configured_settings(app).observability.log_format != "json":
        return
    from celery.apps import worker as celery_worker

    controller = getattr(sender, "controller", None)
    if controller is None:
        return
    celery_worker.install_worker_term_handler(controller, verbose=False)
    celery_worker.install_worker_term_hard_handler(controller, verbose=False)


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    metrics.disable()


class _Housekeeper(threading.Thread):
    """In the worker's main process: heartbeat file for probes, and the reaper.

    Every worker runs it; the reaper is idempotent (compare-and-set on runs), so
    several replicas reaping at once is harmless and no singleton beat is needed.
    """

    def __init__(self, worker_name: str = "") -> None:
        super().__init__(name="certautopilot-housekeeper", daemon=True)
        self.stopping = threading.Event()
        self.heartbeat_failing = False
        #: This worker's row in the pool heartbeats (its Celery node name).
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        rt = get_runtime()
        interval = rt.settings.tasks.reaper_interval
        while not self.stopping.is_set():
            self.housekeep(rt)
            self.stopping.wait(interval)

    def housekeep(self, rt: Runtime) -> None:
        """One pass: the heartbeats, then the reaper. Neither's failure skips the other."""
        self.beat(rt.settings.tasks.heartbeat_file)
        try:
            # Before the reaper: a pool whose only worker is this one is live for it.
            record_heartbeat(rt, self.worker_name)
        except Exception:
            log.exception("recording this worker's pool heartbeat failed; retrying next pass")
        try:
            reap(rt, dispatcher)
        except Exception:  # the housekeeper must outlive a database blip
            log.exception(
                "reaper pass failed; retrying in %.0fs", rt.settings.tasks.reaper_interval
            )

    def beat(self, heartbeat_file: Path) -> None:
        """Touch the heartbeat file; say so once when that fails, and once when it works again."""
        try:
            heartbeat_file.parent.mkdir(parents=True, exist_ok=True)
            heartbeat_file.touch()
        except OSError as exc:
            # A read-only root or a folder owned by someone else: the liveness probe will
            # fail, which is the signal; repeating the error every few seconds adds nothing.
            if not self.heartbeat_failing:
                log.error(
                    "cannot write the heartbeat file %s (%s): `certautopilot probe liveness` "
                    "will report this worker dead; point CAP_HEARTBEAT_FILE at a writable "
                    "file. The reaper keeps running.",
                    heartbeat_file,
                    exc,
                )
            self.heartbeat_failing = True
            return
        if self.heartbeat_failing:
            log.warning("the heartbeat file %s is writable again", heartbeat_file)
        self.heartbeat_failing = False


_housekeeper: _Housekeeper | None = None


@signals.worker_ready.connect
def _start_housekeeper(sender: Any = None, **_: Any) -> None:
    global _housekeeper
    _housekeeper = _Housekeeper(str(getattr(sender, "hostname", "") or ""))
    _housekeeper.start()


@signals.worker_shutting_down.connect
def _stop_housekeeper(how: str = "", **_: Any) -> None:
    log.info("worker: %s shutdown", how.lower() or "a")
    if _housekeeper is None:
        return
    _housekeeper.stopping.set()
    # A warm shutdown takes no new message: the pool must not look live for this worker while
    # its last tasks finish (runs show names a pool left without workers at once). After the
    # housekeeper's last beat, so that beat cannot bring the row back.
    _housekeeper.join(timeout=10)
    try:
        forget_heartbeat(get_runtime(), _housekeeper.worker_name)
    except Exception:  # the row ages out by itself; a shutdown must not fail on it
        log.warning("could not remove this worker's pool heartbeat; it ages out", exc_info=True)
