"""Metrics across processes, the log format, and the label mappings (no services needed).

Multiprocess mode changes prometheus_client's process-wide value class, so the tests that
enable it run in a child interpreter, as the worker's consumer would.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from models.enums import DistributionKind, ResultStatus, RunAction, RunState
from models.queries.observability import DeployedCertificate
from worker.app import metrics as app_metrics
from worker.kube.client import retry_status_class
from worker.kube.errors import KubeApiError, KubeTimeout, Unreachable
from worker.platform import logs
from worker.platform import metrics as platform_metrics
from worker.platform.settings import ObservabilitySettings, load_settings

REPO = Path(__file__).resolve().parents[2]

_FORKED_POOL = textwrap.dedent(
    """
    import multiprocessing, os, sys
    from pathlib import Path
    from prometheus_client import generate_latest
    from models.enums import RunAction
    from worker.app import metrics as app_metrics
    from worker.platform import metrics
    from worker.platform.settings import ObservabilitySettings

    folder = Path(sys.argv[1])
    settings = ObservabilitySettings(metrics_port=9808, metrics_dir=folder)
    metrics.enable(settings)                      # the consumer, before the pool forks
    app_metrics.observe_reaper("advance")         # counted in the consumer itself

    def pool_process():
        app_metrics.observe_skipped(RunAction.EXECUTE, 3)
        app_metrics.kube_retry("5xx")
        metrics.process_died(os.getpid())

    for _ in range(2):                            # two pool processes, one after the other
        child = multiprocessing.get_context("fork").Process(target=pool_process)
        child.start()
        child.join()
        assert child.exitcode == 0
    sys.stdout.write(generate_latest(metrics.registry()).decode())
    """
)


def _scrape_after_pool(folder: Path) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", _FORKED_POOL, str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def _sample(scrape: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_a_counter_incremented_in_a_pool_process_appears_in_the_scrape(tmp_path: Path) -> None:
    scrape = _scrape_after_pool(tmp_path / "metrics")
    skipped = _sample(
        scrape,
        "certautopilot_targets_processed_total",
        action="execute",
        outcome="skipped",
        reason="halted",
        cluster="",
    )
    assert skipped == 6  # 3 in each of two forked processes, both dead before the scrape
    assert _sample(scrape, "certautopilot_kube_api_retries_total", status_class="5xx") == 2
    assert _sample(scrape, "certautopilot_reaper_resumptions_total", resumed="advance") == 1


def test_a_restarted_worker_does_not_count_what_the_previous_one_did(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    _scrape_after_pool(folder)
    assert list(folder.glob("*.db"))  # the first worker's per-process files
    scrape = _scrape_after_pool(folder)  # a new worker on the same folder wipes them first
    assert _sample(scrape, "certautopilot_kube_api_retries_total", status_class="5xx") == 2


def test_metrics_are_off_by_default_and_observing_is_then_a_no_op() -> None:
    assert load_settings({"HOME": "/nonexistent"}).observability.metrics_port is None
    assert platform_metrics.enable(ObservabilitySettings()) is None
    assert platform_metrics.current() is None
    app_metrics.observe_reaper("targets")
    app_metrics.kube_retry("429")
    app_metrics.observe_skipped(RunAction.EXECUTE, 2)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KubeApiError("too many", status=429), "429"),
        (KubeApiError("boom", status=503), "5xx"),
        (KubeApiError("boom", status=500), "5xx"),
        (KubeTimeout("slow"), "timeout"),
        (Unreachable("refused"), "connection"),
        (None, "connection"),
    ],
)
def test_retry_status_classes(error: Exception | None, expected: str) -> None:
    assert retry_status_class(error) == expected


def _deployed(diff: dict[str, object] | None) -> DeployedCertificate:
    return DeployedCertificate(
        distribution_id="d1",
        run_id="r1",
        common_name="app.example.com",
        stored_not_after=datetime(2031, 1, 1, tzinfo=UTC),
        diff=diff,
    )


def test_the_deployed_expiry_is_what_the_run_wrote_not_a_later_renewal() -> None:
    diff = {
        "data": [
            {"key": "tls.key", "new": {"public_key_sha256": "ab"}},
            {"key": "tls.crt", "new": {"not_after": "2030-02-03T04:05:06Z"}},
        ]
    }
    written = app_metrics.deployed_expiry(_deployed(diff))
    assert written == datetime(2030, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.mark.parametrize(
    "diff", [None, {}, {"data": [{"key": "tls.crt", "new": {"not_after": "garbage"}}]}]
)
def test_without_a_readable_diff_the_stored_certificate_is_reported(diff: object) -> None:
    deployed = _deployed(diff)  # type: ignore[arg-type]
    assert app_metrics.deployed_expiry(deployed) == datetime(2031, 1, 1, tzinfo=UTC)


def test_metric_labels_never_carry_target_ids_or_urls() -> None:
    created = platform_metrics.Metrics.create()
    labels = {
        "targets_processed": created.targets_processed._labelnames,
        "target_seconds": created.target_seconds._labelnames,
        "runs_finished": created.runs_finished._labelnames,
        "run_seconds": created.run_seconds._labelnames,
        "reaper_resumptions": created.reaper_resumptions._labelnames,
        "api_retries": created.api_retries._labelnames,
    }
    assert labels == {
        "targets_processed": ("action", "outcome", "reason", "cluster", "pool"),
        "target_seconds": ("action",),
        "runs_finished": ("kind", "action", "state"),
        "run_seconds": ("kind", "action"),
        "reaper_resumptions": ("resumed",),
        "api_retries": ("status_class",),
    }
    assert {status.value for status in ResultStatus} >= {"created", "skipped", "failed"}
    assert {kind.value for kind in DistributionKind} == {"kubernetes", "webhook"}
    assert RunState.HALTED.value == "halted"


# ------------------------------------------------------------------------------------ logs


def _json_line(message: str, *args: object, exc: bool = False) -> dict[str, object]:
    record = logging.LogRecord("worker.app.runs", logging.INFO, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("inner")
        except ValueError:
            record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line  # one object per line, even with a traceback
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_a_json_log_line_has_time_level_logger_message_and_the_bound_context() -> None:
    logs.set_context(run_id="run-1", task_id="task-9")
    try:
        with logs.log_context(target_id="t-3", batch=2):
            inside = _json_line("target %s: %s", "t-3", "created")
        after = _json_line("done")
    finally:
        logs.set_context()
    assert inside["message"] == "target t-3: created"
    assert (inside["level"], inside["logger"]) == ("INFO", "worker.app.runs")
    assert str(inside["time"]).endswith("Z")
    assert datetime.fromisoformat(str(inside["time"]).replace("Z", "+00:00")).tzinfo is not None
    assert (inside["run_id"], inside["task_id"], inside["target_id"], inside["batch"]) == (
        "run-1",
        "task-9",
        "t-3",
        2,
    )
    assert "target_id" not in after and after["run_id"] == "run-1"
    assert "run_id" not in _json_line("no task")


def test_a_json_log_line_carries_the_traceback_in_one_field() -> None:
    line = _json_line("failed", exc=True)
    assert "ValueError: inner" in str(line["exception"])


def test_text_format_keeps_the_handlers_formatters() -> None:
    logger = logging.getLogger("certautopilot-test-format")
    handler = logging.StreamHandler()
    original = logging.Formatter("%(message)s")
    handler.setFormatter(original)
    logger.addHandler(handler)
    try:
        logs.apply_format("text", [logger])
        assert handler.formatter is original
        logs.apply_format("json", [logger])
        assert isinstance(handler.formatter, logs.JsonFormatter)
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("raw", "ok"), [("json", True), ("TEXT", True), ("xml", False)])
def test_log_format_setting(raw: str, ok: bool) -> None:
    environ = {"HOME": "/nonexistent", "CAP_LOG_FORMAT": raw}
    if ok:
        assert load_settings(environ).observability.log_format == raw.lower()
    else:
        with pytest.raises(
            ValueError, match="CAP_LOG_FORMAT='xml' is invalid: expected text or json"
        ):
            load_settings(environ)


@pytest.mark.parametrize("raw", ["0", "65536", "http", "-1"])
def test_metrics_port_setting_refuses_what_is_not_a_port(raw: str) -> None:
    with pytest.raises(ValueError, match="CAP_METRICS_PORT"):
        load_settings({"HOME": "/nonexistent", "CAP_METRICS_PORT": raw})


def test_a_metrics_port_another_process_listens_on_is_refused_at_start() -> None:
    import socket

    from worker.platform.settings import SettingsError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ObservabilitySettings(metrics_port=port, metrics_address="127.0.0.1")
        with pytest.raises(SettingsError, match=rf"CAP_METRICS_PORT={port}: cannot listen"):
            platform_metrics.check_port_free(settings)
    platform_metrics.check_port_free(settings)  # free again: accepted
    platform_metrics.check_port_free(ObservabilitySettings())  # metrics off: nothing to check


def test_warnings_become_json_lines_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    captured = logging.getLogger("py.warnings")
    saved = (captured.handlers[:], captured.propagate)
    try:
        logs.warnings_as_json("json")
        warnings.warn("running as root", UserWarning, stacklevel=1)
        line = json.loads(capsys.readouterr().err.strip())
        assert line["logger"] == "py.warnings" and "running as root" in line["message"]
    finally:
        logging.captureWarnings(False)
        captured.handlers, captured.propagate = saved
