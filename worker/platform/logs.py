"""The worker's log format (``CAP_LOG_FORMAT``) and the context its JSON lines carry.

``text`` (the default) keeps Celery's layout. ``json`` writes one JSON object per line::

    {"time": "2026-12-04T17:40:01.123Z", "level": "INFO", "logger": "worker.app.runs",
     "message": "...", "run_id": "...", "task_id": "...", "target_id": "...", "batch": 1}

``run_id``, ``task_id``, ``target_id`` and ``batch`` (1-based, as the CLI's tables count) are
present where they apply: the task signals set the run and the Celery task id for a task's
duration, and the run state machine binds the target and batch while it processes one target
(:func:`log_context`). They live in a :class:`contextvars.ContextVar`, so threads and tasks do
not see each other's.

Nothing secret is added here: the fields are ids, and the message is the one the text format
shows (the leak tests search both formats).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "apply_format",
    "context",
    "log_context",
    "set_context",
    "warnings_as_json",
    "write_json_line",
]

CONTEXT_FIELDS = ("run_id", "target_id", "task_id", "batch")
"""The context keys a JSON line may carry, in this order."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("certautopilot_log_context", default=_EMPTY)


def context() -> Mapping[str, Any]:
    """The fields bound in the current context."""
    return _context.get()


def set_context(**fields: Any) -> None:
    """Replace the whole context (a task's start: nothing of the previous task remains)."""
    _context.set({key: value for key, value in fields.items() if value is not None})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to the context for the ``with`` block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _context.get()
        for key in CONTEXT_FIELDS:
            if key in bound:
                line[key] = bound[key]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def write_json_line(level: int, logger: str, message: str) -> None:
    """One JSON line on stderr, for what a command says before any logging is set up."""
    import sys

    record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
    sys.stderr.write(JsonFormatter().format(record) + "\n")
    sys.stderr.flush()


def warnings_as_json(log_format: str) -> None:
    """``json``: Python warnings (Celery's running-as-root SecurityWarning, deprecations) become
    JSON lines on stderr too, including those raised before Celery sets up its logging."""
    if log_format != "json":
        return
    import sys

    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    captured = logging.getLogger("py.warnings")
    captured.handlers = [handler]
    captured.propagate = False


def apply_format(log_format: str, loggers: Iterable[logging.Logger]) -> None:
    """Give every handler of ``loggers`` the JSON formatter (``json``); ``text`` keeps theirs."""
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
