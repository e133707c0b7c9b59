"""The Celery application, configured lazily by whoever starts the process.

Importing this module (or ``tasks.distribution``, which registers the tasks on :data:`app`)
reads no settings and touches no file. The composition roots configure the app explicitly
with :func:`configure`: the CLI's ``worker`` and ``flower`` commands and its dispatcher, and
the tests. Only the bare ``celery -A worker.platform.celery_app:app ...`` command line has
no composition root of ours: when Celery first reads its configuration and nobody called
:func:`configure`, the app loads the settings from the environment then (and bootstraps them,
as the CLI would).

Every setting below is explicit on purpose: Celery's defaults are tuned for
throughput of idempotent fire-and-forget work, while a certificate distribution
must survive a worker being killed in the middle of a write.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from worker.core.pools import DEFAULT_POOL, pool_queue
from worker.platform.embedded_broker import celery_broker_url
from worker.platform.settings import Settings

#: Queue for orchestration (start a run, advance a batch), shared by every pool. The
#: Kubernetes work (messages of up to 32 targets each, see tasks/distribution.py, and health
#: checks) goes to the queue of the targets' pool, ``<CAP_KUBE_QUEUE>.<pool>``, so each pool's
#: workers take only the targets they can reach, and an operator can scale or drain apart.
CONTROL_QUEUE = "control"


def pool_queue_of(settings: Settings, pool: str) -> Queue:
    """The queue of ``pool``'s per-target work (``kubernetes.<pool>``), as Celery declares it."""
    name = pool_queue(settings.tasks.kube_queue, pool)
    return Queue(name, Exchange(name), routing_key=name)


def worker_queues(settings: Settings) -> list[str]:
    """The queues a worker consumes: its pool's and the control queue.

    Workers of the default pool also drain the un-pooled queue (``kubernetes``) that releases
    before pools sent per-target work to, so messages queued across an upgrade still run.
    """
    queues = [pool_queue(settings.tasks.kube_queue, settings.tasks.worker_pool), CONTROL_QUEUE]
    if settings.tasks.worker_pool == DEFAULT_POOL:
        queues.append(settings.tasks.kube_queue)
    return queues


def celery_config(settings: Settings) -> dict[str, Any]:
    """Return the complete Celery configuration for ``settings`` (pure; used by tests)."""
    kube_queue = settings.tasks.kube_queue
    own = pool_queue_of(settings, settings.tasks.worker_pool)
    # The broker must not redeliver a message while the task that holds it may
    # still legitimately run, so the visibility timeout exceeds the hard limit.
    # Celery reads it in two places (broker transport and the Redis result
    # backend's transport); both get the same value.
    # (The embedded SQLAlchemy transport has no visibility timeout and hands its
    # transport options to create_engine, so it gets none; lost deliveries there
    # are recovered by the reaper.)
    redis_like = settings.broker.url.startswith(("redis", "rediss", "sentinel"))
    visibility = {"visibility_timeout": settings.broker.visibility_timeout} if redis_like else {}
    return {
        # The embedded default's sqla+ URL goes to its tuned transport (embedded_broker).
        "broker_url": celery_broker_url(settings.broker.url),
        "result_backend": settings.broker.result_backend,
        "broker_transport_options": dict(visibility),
        "result_backend_transport_options": (
            dict(visibility) if settings.broker.result_backend.startswith("redis") else {}
        ),
        # Keep retrying the broker at start-up instead of crash-looping the pod.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Only JSON crosses the broker: no pickle, so a message cannot run code,
        # and task arguments stay readable ids in Flower.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Acknowledge after the task body ran; a worker that dies mid-task gets its
        # message redelivered (tasks are idempotent, see tasks/distribution.py).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message reserved per process: a killed process strands at most one.
        "worker_prefetch_multiplier": 1,
        # A hung API call cannot hold a process forever.
        "task_soft_time_limit": settings.tasks.soft_time_limit,
        "task_time_limit": settings.tasks.time_limit,
        # The database is the source of truth for run progress; task return values
        # are never read, so they are not stored (less backend traffic, nothing to leak).
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Flower needs events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # Routing: Kubernetes work on the pool's queue, orchestration on "control". The
        # dispatcher names the queue of each target's pool; this process's own pool is the
        # default route (and what Flower lists when no worker reports its queues).
        "task_queues": (
            own,
            Queue(CONTROL_QUEUE, Exchange(CONTROL_QUEUE), routing_key=CONTROL_QUEUE),
            Queue(kube_queue, Exchange(kube_queue), routing_key=kube_queue),
        ),
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": {"cap.kube.*": {"queue": own.name, "routing_key": own.routing_key}},
        # A task running when the broker connection drops finishes its work: its claims are
        # leases in the database and its outcomes are recorded there, so nothing depends on
        # its acknowledgement (the message comes back after the visibility timeout and finds
        # its targets final). Cancelling it instead (True) wasted the work and, in Celery 5.6,
        # announced the cancel to the result backend on the Redis that had just gone away: an
        # "unrecoverable error" that ended the worker (found by tests/chaos, seed 300).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def configure(celery_app: Celery, settings: Settings) -> None:
    """Configure ``celery_app`` for ``settings`` (first time, or again with other settings).

    Tasks are bound to the module-level app, so a process that learns its settings
    late re-configures that app instead of creating a second one.
    """
    celery_app.conf.update(celery_config(settings))
    _configured[celery_app] = settings
    # The app caches its connection and producer pools; kombu keeps the pools
    # themselves in a registry keyed by connection, so forgetting the cached ones
    # makes the next send look up (or create) the pool for the new URL.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


_configured: WeakKeyDictionary[Celery, Settings] = WeakKeyDictionary()
"""The settings each app was configured with by :func:`configure`."""


def configured_settings(celery_app: Celery) -> Settings:
    """The settings ``celery_app`` is configured with (from the environment if nobody did).

    The worker's main process builds its runtime from them, so the worker uses exactly the
    settings its composition root loaded and bootstrapped.
    """
    _configure_from_environment(celery_app)
    return _configured[celery_app]


def _configure_from_environment(sender: Celery, **_: Any) -> None:
    # Celery sends on_configure when it first reads the configuration. An app no
    # composition root configured (the bare `celery -A ...` command line) configures
    # itself from the environment here, exactly as the CLI's commands would.
    if sender in _configured:
        return
    from worker.platform.bootstrap import bootstrap
    from worker.platform.settings import load_settings

    configure(sender, bootstrap(load_settings()))


app = Celery("certautopilot", include=["tasks.distribution"])
"""The worker's Celery app; unconfigured until :func:`configure` or first use (see above)."""
app.on_configure.connect(_configure_from_environment, weak=False)
