"""The Celery configuration is explicit and internally consistent."""

from __future__ import annotations

import pytest
from kombu import Exchange, Queue

from worker.platform.celery_app import CONTROL_QUEUE, celery_config
from worker.platform.embedded_broker import celery_broker_url
from worker.platform.settings import load_settings


def _settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings({"CAP_KEK": "k1:" + "A" * 43 + "=", **env})


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1"])
def test_visibility_timeout_exceeds_the_hard_time_limit_wherever_celery_reads_it(
    broker: str,
) -> None:
    config = celery_config(
        _settings(
            CAP_BROKER_URL=broker,
            CAP_RESULT_BACKEND=broker,
            CAP_DATABASE_URL="postgresql+psycopg://u@h/db",
        )
    )
    limit = config["task_time_limit"]
    assert config["task_soft_time_limit"] < limit
    assert config["broker_transport_options"]["visibility_timeout"] > limit
    assert config["result_backend_transport_options"]["visibility_timeout"] > limit


def test_settings_refuse_a_visibility_timeout_not_above_the_hard_limit() -> None:
    with pytest.raises(ValueError, match="CAP_BROKER_VISIBILITY_TIMEOUT"):
        _settings(CAP_TASK_TIME_LIMIT="700", CAP_BROKER_VISIBILITY_TIMEOUT="700")


def test_embedded_broker_gets_no_transport_options_it_would_pass_to_create_engine(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    config = celery_config(_settings(CAP_DATA_DIR=str(tmp_path)))
    assert config["broker_url"].startswith("cap-sqla+sqlite:///")  # embedded_broker.Transport
    assert config["broker_transport_options"] == {}


def test_late_acks_single_prefetch_json_only_events_and_routing() -> None:
    config = celery_config(_settings())
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["worker_send_task_events"] is True
    assert config["broker_connection_retry_on_startup"] is True
    # Per-target work goes to the queue of a pool (this process's own by default); the
    # un-pooled "kubernetes" queue is still declared so the default pool can drain it.
    assert config["task_routes"]["cap.kube.*"]["queue"] == "kubernetes.default"
    assert config["task_default_queue"] == CONTROL_QUEUE
    assert {queue.name for queue in config["task_queues"]} == {
        "kubernetes.default",
        "kubernetes",
        CONTROL_QUEUE,
    }


def test_every_task_has_a_stable_explicit_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import tasks.distribution as tasks
    from worker.platform.celery_app import app, configure

    # Reading a task's name finalizes the app: configure it first, as every composition root does.
    configure(app, _settings(CAP_DATA_DIR=str(tmp_path)))
    names = {
        tasks.start_run_task.name,
        tasks.process_target_task.name,
        tasks.advance_run_task.name,
        tasks.check_health_task.name,
        tasks.enqueue_audit_task.name,
    }
    assert names == {
        "cap.run.start", "cap.kube.target", "cap.run.advance", "cap.kube.health",
        "cap.audit.enqueue",
    }  # fmt: skip
    # The scheduler's contract: exactly these (the health check is sent by `targets add` and
    # `targets check` for a target of another pool; the audit by a Celery beat schedule), no
    # task nobody sends.
    assert {name for name in app.tasks if name.startswith("cap.")} == names
    assert tasks.PROCESS_TARGETS == "cap.kube.target"


def test_configure_points_the_app_at_the_given_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from worker.platform.celery_app import app, configure

    settings = _settings(CAP_DATA_DIR=str(tmp_path / "a"))
    configure(app, settings)
    assert app.conf.broker_url == celery_broker_url(settings.broker.url)
    other = _settings(CAP_DATA_DIR=str(tmp_path / "b"))
    configure(app, other)
    assert app.conf.broker_url == celery_broker_url(other.broker.url)
    assert app.conf.task_default_queue == CONTROL_QUEUE
    # The worker's main process builds its runtime from exactly these settings.
    from worker.platform.celery_app import configured_settings

    assert configured_settings(app) is other


@pytest.mark.parametrize(
    ("targets", "per_message"),
    [(1, 1), (16, 1), (17, 2), (32, 2), (100, 7), (128, 8), (500, 32), (512, 32), (1000, 32)],
)
def test_small_dispatches_spread_one_target_per_message_and_large_ones_share_up_to_32(
    targets: int, per_message: int
) -> None:
    from tasks.distribution import targets_per_message

    assert targets_per_message(targets) == per_message


def test_a_dispatch_sends_every_target_exactly_once_in_order() -> None:
    from tasks.distribution import MOST_PER_MESSAGE, SPREAD, message_chunks

    for count in range(1, 700):
        ids = [f"t{i}" for i in range(count)]
        chunks = message_chunks(ids)
        assert [t for chunk in chunks for t in chunk] == ids
        assert max(len(chunk) for chunk in chunks) <= MOST_PER_MESSAGE
        if count <= SPREAD:
            assert len(chunks) == count  # small dispatches: one target per message


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("cap.run.start", {"run_id": "first", "task_id": "t"}),
        ("cap.kube.target", {"run_id": "first", "task_id": "t"}),
        ("cap.run.advance", {"run_id": "first", "task_id": "t"}),
        ("cap.kube.health", {"target_id": "first", "task_id": "t"}),
        ("cap.audit.enqueue", {"task_id": "t"}),
    ],
)
def test_each_task_names_its_first_argument_rightly_in_the_log_context(
    task: str, expected: dict[str, str]
) -> None:
    from types import SimpleNamespace

    import tasks.distribution as tasks
    from worker.platform import logs

    logs.set_context(run_id="left over from the previous task")
    tasks._bind_task_context(sender=SimpleNamespace(name=task), task_id="t", args=("first",))
    assert dict(logs.context()) == expected
    logs.set_context()


def test_the_embedded_broker_polls_an_idle_queue_ten_times_a_second(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from celery import Celery

    from worker.platform import embedded_broker
    from worker.platform.celery_app import configure

    embedded = Celery("embedded-polling")
    configure(embedded, _settings(CAP_DATA_DIR=str(tmp_path)))
    assert embedded.conf.broker_url.startswith("cap-sqla+sqlite:///")
    with embedded.connection_for_read() as connection:
        assert isinstance(connection.transport, embedded_broker.Transport)
        # kombu's default is 1 s: a message reaching an idle worker waited up to that long.
        assert connection.transport.polling_interval == embedded_broker.POLLING_INTERVAL == 0.1


def test_an_embedded_drain_returns_within_one_polling_interval(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Celery's blocking consumer loop acknowledges only between drains of 2 s; a drain that
    # held on while every prefetched message was in work stalled the worker (bench/).
    import socket
    import time

    from celery import Celery
    from kombu import Consumer

    from worker.platform.celery_app import configure

    embedded = Celery("embedded-drain")
    configure(embedded, _settings(CAP_DATA_DIR=str(tmp_path)))
    with embedded.connection_for_read() as connection:
        channel = connection.channel()
        queue = Queue("drain-test", Exchange("drain-test"), routing_key="drain-test")
        with Consumer(channel, [queue], callbacks=[lambda body, message: None]):
            started = time.monotonic()
            with pytest.raises(socket.timeout):
                connection.drain_events(timeout=2.0)
            assert time.monotonic() - started < 1.0


def test_only_sqla_urls_are_mapped_onto_the_embedded_transport() -> None:
    assert (
        celery_broker_url("sqla+sqlite:////data/broker.db") == "cap-sqla+sqlite:////data/broker.db"
    )
    assert celery_broker_url("redis://cache:6379/0") == "redis://cache:6379/0"
