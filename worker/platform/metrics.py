"""Prometheus metrics: the metric definitions, multiprocess mode, the /metrics endpoint.

A Celery prefork worker is one consumer process and N pool processes (re-forked when one
dies), so a counter lives in many processes. prometheus_client's multiprocess mode keeps each
process's values in files under ``PROMETHEUS_MULTIPROC_DIR``; the endpoint (in the consumer
process) sums them at scrape time. The life cycle:

* :func:`enable` — in the consumer, before the pool forks (Celery's ``worker_init``): empties
  the folder (values of an earlier worker on this folder would otherwise be counted again),
  points prometheus_client at it and creates the metrics. The pool processes inherit them;
  prometheus_client notices the new pid at the first write and opens its own file.
* :func:`serve` — once the pool runs (``worker_ready``): the HTTP endpoint, whose registry
  merges the files and asks the extra collectors (queue lengths, certificate expiry) for
  their values at scrape time.
* :func:`process_died` — from ``worker_process_shutdown``: prometheus_client's bookkeeping for
  a dead pool process (counter values stay: what it counted still happened).
* :func:`disable` — at worker shutdown: stops the endpoint, removes a folder it created.

With metrics off (no ``CAP_METRICS_PORT``, the default) nothing is created and every
``observe`` call is a no-op. Label values are bounded: actions, outcomes, reason codes,
credential names, queue names; never a target id, a Secret name or a URL.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram
    from prometheus_client.registry import Collector

    from worker.platform.settings import ObservabilitySettings

__all__ = [
    "PREFIX",
    "Metrics",
    "check_port_free",
    "current",
    "disable",
    "enable",
    "metrics_dir",
    "process_died",
    "queue_length_collector",
    "registry",
    "serve",
]

log = logging.getLogger(__name__)

PREFIX = "certautopilot_"
"""Every metric's name starts with this."""

#: Per-target processing time: a write is tens of milliseconds, retries stretch it to the
#: retry budget (CAP_KUBE_RETRY_MAX_SECONDS, 30 s by default).
TARGET_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Whole runs: from a one-target dry-run (under a second) to fleets of thousands.
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class Metrics:
    """The worker's own metrics (the collectors computed at scrape time are separate)."""

    targets_processed: Counter
    target_seconds: Histogram
    runs_finished: Counter
    run_seconds: Histogram
    reaper_resumptions: Counter
    api_retries: Counter

    @classmethod
    def create(cls) -> Metrics:
        """Create the metrics (unregistered: the endpoint reads them from the process files)."""
        from prometheus_client import Counter, Histogram

        return cls(
            targets_processed=Counter(
                PREFIX + "targets_processed",
                "Targets processed, by run action, outcome (the result's status), reason code "
                "(none on success), cluster (the kubeconfig credential's name, in-cluster, "
                "or empty for targets skipped before reaching a cluster) and worker pool "
                "(empty for skipped targets).",
                ["action", "outcome", "reason", "cluster", "pool"],
                registry=None,
            ),
            target_seconds=Histogram(
                PREFIX + "target_processing_seconds",
                "Time to process one target (render, read, diff, write, retries), by action.",
                ["action"],
                buckets=TARGET_BUCKETS,
                registry=None,
            ),
            runs_finished=Counter(
                PREFIX + "runs_finished",
                "Runs that reached a final state, by distribution kind, action and state.",
                ["kind", "action", "state"],
                registry=None,
            ),
            run_seconds=Histogram(
                PREFIX + "run_duration_seconds",
                "From a run's start to its final state, by distribution kind and action.",
                ["kind", "action"],
                buckets=RUN_BUCKETS,
                registry=None,
            ),
            reaper_resumptions=Counter(
                PREFIX + "reaper_resumptions",
                "Stalled runs the reaper resumed, by what it re-sent (start, targets, advance).",
                ["resumed"],
                registry=None,
            ),
            api_retries=Counter(
                PREFIX + "kube_api_retries",
                "Kubernetes API calls retried after a transient failure, by status class "
                "(429, 5xx, timeout, connection).",
                ["status_class"],
                registry=None,
            ),
        )


@dataclass
class _State:
    metrics: Metrics
    directory: Path
    created_directory: bool
    server: Any = None
    thread: threading.Thread | None = None


_state: _State | None = None
_lock = threading.Lock()


def current() -> Metrics | None:
    """The metrics of this worker, or None when metrics are off (callers then do nothing)."""
    state = _state
    return state.metrics if state is not None else None


def metrics_dir() -> Path | None:
    """The multiprocess folder in use, or None when metrics are off."""
    state = _state
    return state.directory if state is not None else None


def enable(settings: ObservabilitySettings) -> Metrics | None:
    """Prepare multiprocess metrics in the consumer before the pool forks (None when off)."""
    global _state
    if settings.metrics_port is None:
        return None
    with _lock:
        if _state is not None:
            return _state.metrics
        if settings.metrics_dir is not None:
            directory, created = settings.metrics_dir, False
            directory.mkdir(parents=True, exist_ok=True)
            _empty(directory)
        else:
            directory = Path(tempfile.mkdtemp(prefix="certautopilot-metrics-"))
            created = True
        # prometheus_client picks its value class from this variable; the pool processes
        # inherit it with the environment.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        _state = _State(Metrics.create(), directory, created)
        return _state.metrics


def _empty(directory: Path) -> None:
    """Remove the metric files an earlier worker left (prometheus_client's ``*.db`` files)."""
    for leftover in directory.glob("*.db"):
        leftover.unlink(missing_ok=True)


def registry(extra: Iterable[Collector] = ()) -> Any:
    """A registry summing every process's files, plus ``extra`` collectors."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    state = _state
    if state is None:
        raise RuntimeError("metrics are off: call enable() first")
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(state.directory))  # type: ignore[no-untyped-call]
    for collector in extra:
        merged.register(collector)
    return merged


def check_port_free(settings: ObservabilitySettings) -> None:
    """Refuse at start, naming the fix, when the metrics address cannot be bound (another
    worker on the host has the port): a worker would otherwise run with nothing scrapeable."""
    if settings.metrics_port is None or settings.metrics_port == 0:
        return
    import socket

    from worker.platform.settings import SettingsError

    family = socket.AF_INET6 if ":" in settings.metrics_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the HTTP server will bind: address reuse on, so only a live listener refuses.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.metrics_address, settings.metrics_port))
        except OSError as exc:
            raise SettingsError(
                f"CAP_METRICS_PORT={settings.metrics_port}: cannot listen on "
                f"{settings.metrics_address}:{settings.metrics_port} ({exc.strerror}); another "
                "process (another worker on this host?) has it. Give each worker its own port, "
                "or leave CAP_METRICS_PORT unset"
            ) from None


def serve(settings: ObservabilitySettings, extra: Iterable[Collector] = ()) -> int | None:
    """Start the /metrics endpoint (a daemon thread); the port it listens on, None when off."""
    from prometheus_client import start_http_server

    state = _state
    if state is None or settings.metrics_port is None:
        return None
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_address, registry=registry(extra)
    )
    state.server, state.thread = server, thread
    port = int(server.server_address[1])
    log.info("serving Prometheus metrics on %s:%d/metrics", settings.metrics_address, port)
    return port


def process_died(pid: int) -> None:
    """prometheus_client's bookkeeping for a pool process that exits."""
    state = _state
    if state is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(state.directory))  # type: ignore[no-untyped-call]


def disable() -> None:
    """Stop the endpoint and remove the folder :func:`enable` created (worker shutdown)."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is None:
        return
    if state.server is not None:
        state.server.shutdown()
        state.server.server_close()
    if state.created_directory:
        shutil.rmtree(state.directory, ignore_errors=True)


# --------------------------------------------------------------------- queue lengths


def queue_length_collector(queues: Callable[[], Iterable[str]], size: Callable[[str], int]) -> Any:
    """A collector for ``certautopilot_queue_length{queue}``, asking the broker at scrape time.

    ``size`` returns the number of messages waiting in a queue (see
    :func:`worker.platform.celery_app.queue_length`); a broker that cannot be reached gives
    no sample rather than a wrong one, and ``certautopilot_queue_length_up`` says so.
    """
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class QueueLengths(Collector):
        def collect(self) -> Iterable[Any]:
            lengths = GaugeMetricFamily(
                PREFIX + "queue_length",
                "Messages waiting in a broker queue (Redis: LLEN over its priority lists; "
                "the embedded SQLAlchemy broker: visible rows of kombu_message).",
                labels=["queue"],
            )
            up = GaugeMetricFamily(
                PREFIX + "queue_length_up",
                "1 when the broker answered the last queue-length read, 0 when it did not.",
            )
            ok = 1.0
            for queue in queues():
                try:
                    lengths.add_metric([queue], float(size(queue)))
                except Exception as exc:  # noqa: BLE001 - a broker outage must not fail the scrape
                    log.warning("queue length of %s unavailable (%s)", queue, type(exc).__name__)
                    ok = 0.0
            up.add_metric([], ok)
            return [lengths, up]

    return QueueLengths()


def broker_queue_length(celery_app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` on ``celery_app``'s broker (one short connection).

    kombu answers a passive declare with the queue's size: LLEN over the queue's priority
    lists on Redis, a count of the visible rows of ``kombu_message`` on the SQLAlchemy
    transport. A Redis queue without messages has no key, which kombu reports as "no such
    queue": that is a length of 0.
    """
    from kombu.exceptions import ChannelError

    with celery_app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        try:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True)[1])
        except ChannelError:
            return 0
