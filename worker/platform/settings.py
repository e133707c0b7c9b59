"""The worker's settings: one typed, frozen object read from the environment in one place.

:func:`load_settings` is called by the composition roots (the CLI's commands, the bare
``celery -A worker.platform.celery_app:app`` command line) and the result is passed down
explicitly. Every setting of the worker, ``FLOWER_BASIC_AUTH`` included, is read here and
nowhere else. (Two readers of the environment remain outside: Flower, started by
``certautopilot flower``, reads its own ``FLOWER_*`` options, and the runtime keeps the process
environment for the Kubernetes client's in-cluster detection, ``KUBERNETES_SERVICE_*``.)

Each variable is declared once, in the table below (:data:`ENV_VARS` is derived from it); the
secret ones (database, broker and result-backend URLs, Flower's login) can instead name a
file holding the value (``NAME_FILE``, as Docker and Kubernetes mount secrets), so nothing
secret has to be an environment variable. Setting both ``NAME`` and ``NAME_FILE`` is an error.

Loading settings writes nothing: it reads the environment and the files the environment
names (``CAP_KEK_FILE``, the ``*_FILE`` variants). With nothing set, everything runs on an
embedded default that needs no server: SQLite for the data, kombu's SQLAlchemy transport on
SQLite for the broker and Celery's database result backend (which supports chords), all under
``CAP_DATA_DIR``. In that mode a KEK file is generated once (mode 0600) so secrets are still
encrypted at rest; :func:`worker.platform.bootstrap.bootstrap` creates the folder and that
file and loads the key. With any other database, a KEK must be configured explicitly:
silently generating one on a single pod of a cluster would make the other pods unable to
read what it wrote.

Invalid values raise :class:`SettingsError` naming the variable, the offending value (URL
passwords masked, KEKs and Flower's login never shown) and the expected form.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.core.budget import DATABASE_RETRY_SECONDS, WorstCase, worst_case
from worker.core.crypto import KEK_BYTES, is_valid_key_id
from worker.core.fanout import FanoutConfigError, parse_batch_size, parse_failure_threshold
from worker.core.pools import DEFAULT_POOL, POOL_NAME_RULE, PoolNameError, check_pool_name
from worker.platform.redaction import redact_url

__all__ = [
    "ENV_VARS",
    "FILE_VARIANTS",
    "GENERATED_KEK_ID",
    "BatchSizeValue",
    "BrokerSettings",
    "CryptoSettings",
    "DatabaseSettings",
    "FanoutSettings",
    "FlowerSettings",
    "KubeSettings",
    "ObservabilitySettings",
    "Settings",
    "SettingsError",
    "TaskSettings",
    "ThresholdValue",
    "load_settings",
    "normalize_database_url",
    "read_kek_file",
    "require_kek",
    "target_worst_case",
]

GENERATED_KEK_ID = "k1"
"""Key id of the KEK generated for the embedded default."""

BatchSizeValue = int | str | tuple[int | str, ...]
"""A batch size as configured: a count, a percentage such as "25%", or a progressive list."""
ThresholdValue = int | str
"""A failure threshold as configured: a count or a percentage such as "10%"."""


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and the expected form."""


def normalize_database_url(url: str) -> str:
    """Point bare ``postgresql://``/``postgres://`` URLs at the installed psycopg 3 driver."""
    # SQLAlchemy's default PostgreSQL driver is psycopg2, which this project does not ship.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True, repr=False)
class DatabaseSettings:
    """Where the worker keeps certificates, targets, runs and rollback snapshots."""

    url: str
    """SQLAlchemy URL (``CAP_DATABASE_URL``); default ``sqlite:///{data_dir}/certautopilot.db``.
    Supported: ``sqlite:///path`` and ``postgresql+psycopg://user:password@host:5432/db``."""

    is_default: bool
    """True when ``url`` is the embedded-default SQLite file (nothing configured)."""

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return make_url(self.url).get_backend_name()

    def __repr__(self) -> str:
        return f"DatabaseSettings(url={redact_url(self.url)!r}, is_default={self.is_default!r})"


@dataclass(frozen=True, repr=False)
class BrokerSettings:
    """Celery's message transport and result store."""

    url: str
    """Broker URL (``CAP_BROKER_URL``); default ``sqla+sqlite:///{data_dir}/broker.db``
    (kombu's SQLAlchemy transport, no server). Production: ``redis://host:6379/0``."""

    result_backend: str
    """Result backend URL (``CAP_RESULT_BACKEND``); default ``db+sqlite:///{data_dir}/results.db``.
    Must support chords (database or Redis backends do)."""

    visibility_timeout: float
    """Seconds (``CAP_BROKER_VISIBILITY_TIMEOUT``, default 3600) before an unacknowledged message
    is redelivered; must exceed ``CAP_TASK_TIME_LIMIT`` or long tasks would run twice."""

    def __repr__(self) -> str:
        return (
            f"BrokerSettings(url={redact_url(self.url)!r}, "
            f"result_backend={redact_url(self.result_backend)!r}, "
            f"visibility_timeout={self.visibility_timeout!r})"
        )


@dataclass(frozen=True, repr=False)
class CryptoSettings:
    """The key-encryption keys (KEKs) that wrap every stored data key."""

    keys: Mapping[str, bytes]
    """KEK bytes (32 each) by key id, in load order: ``CAP_KEK`` entries first, then
    ``CAP_KEK_FILE`` lines. For the embedded default, empty until
    :func:`worker.platform.bootstrap.bootstrap` loads the generated ``generated_file``."""

    current_key_id: str
    """Key id used for new writes (``CAP_KEK_CURRENT``); default the first listed."""

    source: str
    """Where the keys came from, for operators (never contains key material)."""

    generated_file: Path | None = None
    """The embedded default's KEK file (``{data_dir}/kek``), generated once by the bootstrap;
    None when KEKs are configured."""

    missing: str | None = None
    """Why no KEK is available (a non-default database and no ``CAP_KEK``/``CAP_KEK_FILE``);
    None when keys are loaded. Commands that decrypt or encrypt nothing (listings, shows,
    probes, ``version``) work without a KEK; anything that seals or opens a secret, and the
    worker itself, stops with this message (:func:`require_kek`)."""

    def __repr__(self) -> str:
        # Key ids are fine to show; the key bytes never are.
        return (
            f"CryptoSettings(key_ids={list(self.keys)!r}, "
            f"current_key_id={self.current_key_id!r}, source={self.source!r})"
        )


@dataclass(frozen=True)
class KubeSettings:
    """How the Kubernetes module talks to API servers."""

    serviceaccount_dir: Path
    """Folder with the mounted service-account token, ca.crt and namespace
    (``CAP_SERVICEACCOUNT_DIR``, default ``/var/run/secrets/kubernetes.io/serviceaccount``)."""

    connect_timeout: float
    """Seconds to establish a connection (``CAP_KUBE_CONNECT_TIMEOUT``, default 5)."""

    read_timeout: float
    """Seconds to wait for a response (``CAP_KUBE_READ_TIMEOUT``, default 15)."""

    retry_attempts: int
    """Attempts per API call for transient failures (``CAP_KUBE_RETRY_ATTEMPTS``, default 5)."""

    retry_max_seconds: float
    """Upper bound in seconds on the total time spent retrying one call
    (``CAP_KUBE_RETRY_MAX_SECONDS``, default 30)."""

    server_dry_run: bool
    """Whether dry-runs also send ``dryRun=All`` writes to surface RBAC/admission errors
    (``CAP_SERVER_DRY_RUN``, default true)."""


@dataclass(frozen=True)
class FanoutSettings:
    """Defaults for groups that do not set their own fan-out parameters."""

    default_batch_size: BatchSizeValue
    """Batch size (``CAP_DEFAULT_BATCH_SIZE``, default "100%"): a count ("5"), a percentage
    ("25%") or a progressive list ("1,5,20%" or JSON ``[1, 5, "20%"]``; the last step repeats)."""

    default_failure_threshold: ThresholdValue
    """Failures tolerated before a run halts (``CAP_DEFAULT_FAILURE_THRESHOLD``, default 0):
    a count ("2") or a percentage ("10%"); the run halts when failures strictly exceed it."""


@dataclass(frozen=True)
class TaskSettings:
    """Celery worker and task behaviour."""

    soft_time_limit: float
    """Seconds before a task gets SoftTimeLimitExceeded (``CAP_TASK_SOFT_TIME_LIMIT``, 600).
    Must hold one target at its worst (worker.core.budget), which the retry settings decide;
    a message starts a target only while that worst case still fits."""

    time_limit: float
    """Seconds before a task's process is killed (``CAP_TASK_TIME_LIMIT``, default 660)."""

    reaper_interval: float
    """Seconds between scans for stalled runs (``CAP_REAPER_INTERVAL``, default 15)."""

    stale_after: float
    """Seconds a claim holds without being renewed (``CAP_STALE_AFTER``, default 60): the
    delivering message renews its claims while it works, so only a dead worker's claims
    expire, and the reaper re-sends them. Also how long a finished batch may wait for its
    callback before the reaper sends it again."""

    resend_after: float
    """Seconds after which a sent target message that no worker claimed counts as lost and is
    re-sent (``CAP_RESEND_AFTER``, default 300); raise it if your queue legitimately holds work
    longer (a backlog of long runs on few workers)."""

    @property
    def lease_seconds(self) -> float:
        """How long a claim holds unless renewed (the stale-after period)."""
        return self.stale_after

    @property
    def database_retry_seconds(self) -> float:
        """How long a database step inside a task rides out an outage: shorter than the lease
        (which cannot be renewed while the database is down), at most
        worker.core.budget.DATABASE_RETRY_SECONDS."""
        return min(DATABASE_RETRY_SECONDS, self.stale_after / 2)

    worker_concurrency: int
    """Worker processes per worker (``CAP_WORKER_CONCURRENCY``, default 4)."""

    kube_queue: str
    """Celery queue the Kubernetes tasks are routed to (``CAP_KUBE_QUEUE``, default
    "kubernetes")."""

    heartbeat_file: Path
    """File the worker touches while alive, read by the liveness probe (``CAP_HEARTBEAT_FILE``,
    default ``{data_dir}/worker-heartbeat``)."""

    log_level: str
    """One of DEBUG, INFO, WARNING, ERROR, CRITICAL (``CAP_LOG_LEVEL``, default INFO)."""

    worker_pool: str = "default"
    """The pool this worker belongs to (``CAP_WORKER_POOL``, default "default"): it takes the
    per-target work of that pool's targets only, from the queue ``<kube_queue>.<pool>``."""


@dataclass(frozen=True, repr=False)
class FlowerSettings:
    """Flower, the monitoring UI started by ``certautopilot flower``."""

    basic_auth: str | None
    """Flower's login, ``user:password[,user2:password2]`` (``FLOWER_BASIC_AUTH`` or
    ``FLOWER_BASIC_AUTH_FILE``); None when not configured."""

    def __repr__(self) -> str:
        shown = None if self.basic_auth is None else "***"
        return f"FlowerSettings(basic_auth={shown!r})"


@dataclass(frozen=True)
class ObservabilitySettings:
    """Prometheus metrics and the log format (see the README's Observability section)."""

    metrics_port: int | None = None
    """TCP port of the worker's ``/metrics`` endpoint (``CAP_METRICS_PORT``); None (the
    default) serves no metrics. The Helm chart sets 9808."""

    metrics_address: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod's address
    """Address the metrics endpoint binds (``CAP_METRICS_ADDRESS``, default 0.0.0.0)."""

    metrics_dir: Path | None = None
    """Folder for prometheus_client's per-process metric files (``PROMETHEUS_MULTIPROC_DIR``);
    emptied when the worker starts. None: a private temporary folder per worker."""

    log_format: str = "text"
    """``text`` (Celery's layout) or ``json``, one object per line (``CAP_LOG_FORMAT``)."""


@dataclass(frozen=True)
class Settings:
    """Everything the worker is configured with, grouped by concern."""

    data_dir: Path
    """Folder for the embedded default's files (``CAP_DATA_DIR``, default
    ``~/.local/share/certautopilot``)."""

    database: DatabaseSettings
    """Where data lives (``CAP_DATABASE_URL``)."""
    broker: BrokerSettings
    """Celery transport and results (``CAP_BROKER_URL``, ``CAP_RESULT_BACKEND``, ...)."""
    crypto: CryptoSettings
    """KEKs for envelope encryption (``CAP_KEK``, ``CAP_KEK_FILE``, ``CAP_KEK_CURRENT``)."""
    kube: KubeSettings
    """Kubernetes API access (``CAP_KUBE_*``, ``CAP_SERVICEACCOUNT_DIR``, ...)."""
    fanout: FanoutSettings
    """Group fan-out defaults (``CAP_DEFAULT_BATCH_SIZE``, ``CAP_DEFAULT_FAILURE_THRESHOLD``)."""
    tasks: TaskSettings
    """Worker and task limits (``CAP_TASK_*``, ``CAP_WORKER_CONCURRENCY``, ...)."""
    flower: FlowerSettings = field(default_factory=lambda: FlowerSettings(basic_auth=None))
    """Flower's login (``FLOWER_BASIC_AUTH``)."""
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    """Metrics endpoint and log format (``CAP_METRICS_*``, ``CAP_LOG_FORMAT``)."""

    ignored_variables: tuple[str, ...] = field(default=())
    """``CAP_*`` variables that were set but are not settings (likely typos); for a warning."""

    @property
    def embedded_default(self) -> bool:
        """True when the database is the default embedded SQLite file."""
        return self.database.is_default

    @property
    def uses_data_dir(self) -> bool:
        """True when a default file under ``data_dir`` is in use (database, broker, results)."""
        return (
            self.database.is_default
            or self.broker.url == _default_broker_url(self.data_dir)
            or self.broker.result_backend == _default_result_backend(self.data_dir)
        )


# --------------------------------------------------------------------------- parsing helpers

_T = TypeVar("_T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_KEK_HINT = "generate a key with: head -c 32 /dev/urandom | base64"


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when unset or blank (blank means "use the default")."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _invalid(name: str, value: str, expected: str) -> SettingsError:
    return SettingsError(f"{name}={value!r} is invalid: expected {expected}")


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    if home:
        return Path(home)
    # No HOME in the given mapping: ask the password database rather than os.environ.
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _path(environ: Mapping[str, str], raw: str) -> Path:
    if raw == "~" or raw.startswith("~/"):
        raw = str(_home(environ)) + raw[1:]
    return Path(raw).absolute()


def _text(raw: str) -> str:
    return raw


def _positive_float(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 and value != float("inf") else None


def _positive_int(raw: str) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def _boolean(raw: str) -> bool | None:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def _log_level(raw: str) -> str | None:
    return raw.upper() if raw.upper() in _LOG_LEVELS else None


def _port(raw: str) -> int | None:
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= 65535 else None


def _log_format(raw: str) -> str | None:
    return raw.lower() if raw.lower() in ("text", "json") else None


def _queue_name(raw: str) -> str | None:
    return raw if _QUEUE_NAME.fullmatch(raw) else None


def _pool_name(raw: str) -> str | None:
    try:
        return check_pool_name(raw.strip())
    except PoolNameError:
        return None


def _step(raw: str) -> int | str:
    # Digits become counts; anything else stays text for worker.core.fanout to judge.
    text = raw.strip()
    return int(text) if text.isdigit() else text


def _batch_size(raw: str) -> BatchSizeValue | None:
    """Split the variable into steps; worker.core.fanout.parse_batch_size judges their values."""
    text = raw.strip()
    steps: list[int | str]
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not all(
            isinstance(item, int | str) and not isinstance(item, bool) for item in items
        ):
            return None
        steps = [_step(item) if isinstance(item, str) else item for item in items]
    else:
        steps = [_step(piece) for piece in text.split(",")]
    try:
        parse_batch_size(steps)
    except FanoutConfigError:
        return None
    return steps[0] if len(steps) == 1 else tuple(steps)


def _threshold(raw: str) -> ThresholdValue | None:
    value = _step(raw)
    try:
        parse_failure_threshold(value)
    except FanoutConfigError:
        return None
    return value


def _basic_auth(raw: str) -> str | None:
    # Flower's form: "user:password" pairs separated by commas, neither part empty.
    pairs = [pair.partition(":") for pair in raw.split(",")]
    return raw if all(user and sep and password for user, sep, password in pairs) else None


# --------------------------------------------------------------------------- the variables

_DECLARED: list[_Variable[Any]] = []


class _Variable(Generic[_T]):
    """One environment variable, declared once: its name, parser, default and expected form.

    ``parse`` returns None for a value it refuses; the error then names the variable, the
    value (unless ``secret``: a secret is never echoed) and ``expected``. A ``secret`` variable
    may instead be given as ``NAME_FILE``, the path of a file holding the value.
    """

    def __init__(
        self,
        name: str,
        parse: Callable[[str], _T | None],
        expected: str,
        default: _T | None = None,
        *,
        secret: bool = False,
    ) -> None:
        self.name = name
        self.parse = parse
        self.expected = expected
        self.default = default
        self.secret = secret
        _DECLARED.append(self)

    @property
    def file_variant(self) -> str | None:
        """``NAME_FILE`` for secret variables."""
        return f"{self.name}_FILE" if self.secret else None

    def raw(self, environ: Mapping[str, str]) -> tuple[str | None, str]:
        """The configured text (None when unset or blank) and how to name it in errors."""
        direct = _get(environ, self.name)
        file_name = self.file_variant
        file_raw = _get(environ, file_name) if file_name else None
        if file_name is None or file_raw is None:
            return direct, self.name
        if direct is not None:
            raise SettingsError(
                f"both {self.name} and {file_name} are set: set only one ({file_name} names a "
                f"file holding the value of {self.name})"
            )
        path = _path(environ, file_raw)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(
                f"{file_name}={str(path)!r} cannot be read ({exc.strerror}); expected a file "
                f"holding the value of {self.name}"
            ) from None
        except UnicodeDecodeError:
            raise SettingsError(
                f"{file_name}={str(path)!r} is not UTF-8 text; expected a file holding the "
                f"value of {self.name}"
            ) from None
        if not text:
            raise SettingsError(
                f"{file_name}={str(path)!r} is empty; expected a file holding the value of "
                f"{self.name}"
            )
        return text, f"{self.name} (from {file_name}={str(path)!r})"

    def read(self, environ: Mapping[str, str]) -> _T | None:
        """The parsed value, or ``default`` when unset."""
        raw, label = self.raw(environ)
        if raw is None:
            return self.default
        parsed = self.parse(raw)
        if parsed is None:
            if self.secret:
                raise SettingsError(
                    f"{label} is invalid (value not shown): expected {self.expected}"
                )
            raise _invalid(label, raw, self.expected)
        return parsed

    def value(self, environ: Mapping[str, str]) -> _T:
        """The parsed value of a variable with a default."""
        parsed = self.read(environ)
        assert parsed is not None, f"{self.name} has no default"
        return parsed


def _seconds(name: str, default: float) -> _Variable[float]:
    return _Variable(name, _positive_float, f"a number of seconds > 0, e.g. {default:g}", default)


_PATH = "a path"
DATA_DIR = _Variable("CAP_DATA_DIR", _text, _PATH)
DATABASE_URL = _Variable("CAP_DATABASE_URL", _text, "a SQLAlchemy URL", secret=True)
BROKER_URL = _Variable("CAP_BROKER_URL", _text, "a broker URL", secret=True)
RESULT_BACKEND = _Variable("CAP_RESULT_BACKEND", _text, "a result backend URL", secret=True)
KEK = _Variable("CAP_KEK", _text, "'keyid:base64[,...]'")
KEK_FILE = _Variable("CAP_KEK_FILE", _text, _PATH)
KEK_CURRENT = _Variable("CAP_KEK_CURRENT", _text, "a loaded key id")
SERVICEACCOUNT_DIR = _Variable("CAP_SERVICEACCOUNT_DIR", _text, _PATH)
KUBE_CONNECT_TIMEOUT = _seconds("CAP_KUBE_CONNECT_TIMEOUT", 5)
KUBE_READ_TIMEOUT = _seconds("CAP_KUBE_READ_TIMEOUT", 15)
KUBE_RETRY_ATTEMPTS = _Variable(
    "CAP_KUBE_RETRY_ATTEMPTS", _positive_int, "a whole number >= 1, e.g. 5", 5
)
KUBE_RETRY_MAX_SECONDS = _seconds("CAP_KUBE_RETRY_MAX_SECONDS", 30)
SERVER_DRY_RUN = _Variable("CAP_SERVER_DRY_RUN", _boolean, "true or false", True)
DEFAULT_BATCH_SIZE: _Variable[BatchSizeValue] = _Variable(
    "CAP_DEFAULT_BATCH_SIZE",
    _batch_size,
    'a count >= 1 ("5"), a whole percentage in [1%, 100%] ("25%") or a progressive '
    'list ("1,5,20%" or [1, 5, "20%"]; the last step repeats)',
    "100%",
)
DEFAULT_FAILURE_THRESHOLD: _Variable[ThresholdValue] = _Variable(
    "CAP_DEFAULT_FAILURE_THRESHOLD",
    _threshold,
    'a count >= 0 ("2") or a whole percentage in [0%, 100%] ("10%")',
    0,
)
TASK_SOFT_TIME_LIMIT = _seconds("CAP_TASK_SOFT_TIME_LIMIT", 600)
TASK_TIME_LIMIT = _seconds("CAP_TASK_TIME_LIMIT", 660)
BROKER_VISIBILITY_TIMEOUT = _seconds("CAP_BROKER_VISIBILITY_TIMEOUT", 3600)
REAPER_INTERVAL = _seconds("CAP_REAPER_INTERVAL", 15)
STALE_AFTER = _seconds("CAP_STALE_AFTER", 60)
RESEND_AFTER = _seconds("CAP_RESEND_AFTER", 300)
WORKER_CONCURRENCY = _Variable(
    "CAP_WORKER_CONCURRENCY", _positive_int, "a whole number >= 1, e.g. 4", 4
)
KUBE_QUEUE = _Variable(
    "CAP_KUBE_QUEUE",
    _queue_name,
    "a queue name of letters, digits, '.', '_', ':' or '-', e.g. kubernetes",
    "kubernetes",
)
HEARTBEAT_FILE = _Variable("CAP_HEARTBEAT_FILE", _text, _PATH)
WORKER_POOL = _Variable("CAP_WORKER_POOL", _pool_name, POOL_NAME_RULE, DEFAULT_POOL)
LOG_LEVEL = _Variable("CAP_LOG_LEVEL", _log_level, "one of " + ", ".join(_LOG_LEVELS), "INFO")
METRICS_PORT = _Variable("CAP_METRICS_PORT", _port, "a TCP port 1-65535, e.g. 9808")
METRICS_ADDRESS = _Variable("CAP_METRICS_ADDRESS", _text, "an address to bind, e.g. 0.0.0.0")
METRICS_DIR = _Variable("PROMETHEUS_MULTIPROC_DIR", _text, _PATH)
LOG_FORMAT = _Variable("CAP_LOG_FORMAT", _log_format, "text or json", "text")
FLOWER_BASIC_AUTH = _Variable(
    "FLOWER_BASIC_AUTH",
    _basic_auth,
    "'user:password' pairs separated by commas, e.g. admin:a-long-password",
    secret=True,
)

ENV_VARS = tuple(variable.name for variable in _DECLARED)
"""Every environment variable the worker reads, one per setting (all other ``CAP_*`` are
reported as ignored)."""

FILE_VARIANTS = tuple(v.file_variant for v in _DECLARED if v.file_variant is not None)
"""The ``NAME_FILE`` forms of the secret settings."""


# ------------------------------------------------------------------------------- sections


def _default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'certautopilot.db'}"


def _default_broker_url(data_dir: Path) -> str:
    return f"sqla+sqlite:///{data_dir / 'broker.db'}"


def _default_result_backend(data_dir: Path) -> str:
    return f"db+sqlite:///{data_dir / 'results.db'}"


def _database(environ: Mapping[str, str], data_dir: Path) -> DatabaseSettings:
    default = _default_database_url(data_dir)
    raw, label = DATABASE_URL.raw(environ)
    if raw is None or raw == default:
        return DatabaseSettings(url=default, is_default=True)
    url = normalize_database_url(raw)
    expected = (
        "a SQLAlchemy URL such as sqlite:////var/lib/certautopilot/data.db or "
        "postgresql+psycopg://user:password@host:5432/certautopilot"
    )
    try:
        backend = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise _invalid(label, redact_url(raw), expected) from None
    if backend not in ("sqlite", "postgresql"):
        raise SettingsError(
            f"{label}={redact_url(raw)!r} uses the unsupported database {backend!r}: "
            f"expected {expected}"
        )
    return DatabaseSettings(url=url, is_default=False)


def _transport_url(
    environ: Mapping[str, str],
    variable: _Variable[str],
    default: str,
    aliases: frozenset[str],
    example: str,
) -> str:
    raw, label = variable.raw(environ)
    if raw is None:
        return default
    scheme, sep, _ = raw.partition("://")
    # "sqla+sqlite://" and "db+postgresql://" name the transport/backend before the "+".
    if not sep or scheme.split("+", 1)[0].lower() not in aliases:
        known = ", ".join(sorted(aliases))
        raise _invalid(label, redact_url(raw), f"a URL like {example} (schemes: {known})")
    return raw


def _broker_aliases() -> frozenset[str]:
    from kombu.transport import TRANSPORT_ALIASES

    return frozenset(TRANSPORT_ALIASES)


def _backend_aliases() -> frozenset[str]:
    from celery.app.backends import BACKEND_ALIASES

    return frozenset(BACKEND_ALIASES)


def _decode_kek(source: str, key_id: str, encoded: str) -> bytes:
    try:
        material = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(
            f"{source}: the KEK with id {key_id!r} is not valid base64; expected "
            f"'keyid:base64-of-{KEK_BYTES}-bytes' ({_KEK_HINT})"
        ) from None
    if len(material) != KEK_BYTES:
        raise SettingsError(
            f"{source}: the KEK with id {key_id!r} decodes to {len(material)} bytes; expected "
            f"exactly {KEK_BYTES} bytes ({_KEK_HINT})"
        )
    return material


def _parse_kek_entry(source: str, entry: str, keys: dict[str, bytes]) -> None:
    key_id, sep, encoded = entry.partition(":")
    key_id = key_id.strip()
    if not sep or not encoded.strip():
        # Never echo the entry: it may be a bare key someone pasted without its id.
        raise SettingsError(
            f"{source}: an entry has no key id; expected 'keyid:base64' entries such as "
            f"'k1:<base64>' ({_KEK_HINT})"
        )
    if not is_valid_key_id(key_id):
        shown = key_id if len(key_id) <= 64 else key_id[:20] + "..."
        raise SettingsError(
            f"{source}: key id {shown!r} is invalid; expected 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    material = _decode_kek(source, key_id, encoded)
    if key_id in keys and keys[key_id] != material:
        raise SettingsError(
            f"{source}: key id {key_id!r} is defined twice with different keys; every KEK "
            "needs its own id"
        )
    keys[key_id] = material


def read_kek_file(path: Path, variable: str, keys: dict[str, bytes]) -> None:
    """Add the KEKs of ``path`` (one ``keyid:base64`` per line) to ``keys``.

    ``variable`` names the file's origin in errors (``CAP_KEK_FILE``, "generated KEK file").
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(
            f"{variable}={str(path)!r} cannot be read ({exc.strerror}); expected a file with "
            "one 'keyid:base64' KEK per line"
        ) from None
    before = len(keys)
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            _parse_kek_entry(f"{variable} {path} line {number}", stripped, keys)
    if len(keys) == before:
        raise SettingsError(
            f"{variable}={str(path)!r} holds no KEK; expected one 'keyid:base64' per line"
        )


_NO_KEK = (
    "no KEK configured: CAP_DATABASE_URL points at a non-default database, so set "
    "CAP_KEK='keyid:base64' or CAP_KEK_FILE=/path/to/file (one 'keyid:base64' per "
    f"line) on every worker ({_KEK_HINT}). Only the embedded default SQLite "
    "database generates a KEK by itself"
)


def require_kek(settings: Settings) -> None:
    """Refuse, naming the fix, when no KEK is configured (before anything seals or opens)."""
    if settings.crypto.missing is not None:
        raise SettingsError(settings.crypto.missing)


def _crypto(environ: Mapping[str, str], data_dir: Path, embedded: bool) -> CryptoSettings:
    keys: dict[str, bytes] = {}
    sources: list[str] = []
    generated_file: Path | None = None
    inline = KEK.read(environ)
    if inline is not None:
        for entry in inline.split(","):
            if entry.strip():
                _parse_kek_entry(KEK.name, entry.strip(), keys)
        if not keys:
            raise SettingsError(
                f"{KEK.name} holds no KEK; expected 'keyid:base64[,...]' ({_KEK_HINT})"
            )
        sources.append(KEK.name)
    file_raw = KEK_FILE.read(environ)
    if file_raw is not None:
        kek_file = _path(environ, file_raw)
        read_kek_file(kek_file, KEK_FILE.name, keys)
        sources.append(f"{KEK_FILE.name}={kek_file}")
    key_ids = list(keys)
    if not keys:
        if not embedded:
            if KEK_CURRENT.read(environ) is not None:
                raise SettingsError(
                    f"{KEK_CURRENT.name} is set but no KEK is configured: set CAP_KEK or "
                    f"CAP_KEK_FILE ({_KEK_HINT})"
                )
            # Not an error yet: reading runs, targets and groups needs no key (require_kek).
            return CryptoSettings(
                keys=MappingProxyType({}), current_key_id="", source="none", missing=_NO_KEK
            )
        # The bootstrap generates this file (with this one key id) and loads it.
        generated_file = data_dir / "kek"
        key_ids = [GENERATED_KEK_ID]
        sources.append(f"generated file {generated_file}")
    current = KEK_CURRENT.read(environ)
    if current is None:
        current = key_ids[0]
    elif current not in key_ids:
        loaded = ", ".join(repr(key_id) for key_id in key_ids)
        raise SettingsError(
            f"{KEK_CURRENT.name}={current!r} is not a loaded key id; expected one of {loaded}"
        )
    return CryptoSettings(
        keys=MappingProxyType(keys),
        current_key_id=current,
        source=" + ".join(sources),
        generated_file=generated_file,
    )


def _tasks(environ: Mapping[str, str], data_dir: Path) -> TaskSettings:
    soft = TASK_SOFT_TIME_LIMIT.value(environ)
    hard = TASK_TIME_LIMIT.value(environ)
    if soft >= hard:
        raise SettingsError(
            f"CAP_TASK_SOFT_TIME_LIMIT={soft:g} must be lower than CAP_TASK_TIME_LIMIT={hard:g}, "
            "so a task can clean up before it is killed"
        )
    heartbeat_raw = HEARTBEAT_FILE.read(environ)
    return TaskSettings(
        soft_time_limit=soft,
        time_limit=hard,
        reaper_interval=REAPER_INTERVAL.value(environ),
        stale_after=STALE_AFTER.value(environ),
        resend_after=RESEND_AFTER.value(environ),
        worker_concurrency=WORKER_CONCURRENCY.value(environ),
        kube_queue=KUBE_QUEUE.value(environ),
        heartbeat_file=(
            _path(environ, heartbeat_raw) if heartbeat_raw else data_dir / "worker-heartbeat"
        ),
        log_level=LOG_LEVEL.value(environ),
        worker_pool=WORKER_POOL.value(environ),
    )


def target_worst_case(tasks: TaskSettings, kube: KubeSettings) -> WorstCase:
    """One target's longest time, and a message's closing steps, under these settings."""
    return worst_case(
        attempts=kube.retry_attempts,
        retry_max_seconds=kube.retry_max_seconds,
        connect_timeout=kube.connect_timeout,
        read_timeout=kube.read_timeout,
        database_retry_seconds=tasks.database_retry_seconds,
    )


def _check_soft_limit_holds_a_target(tasks: TaskSettings, kube: KubeSettings) -> None:
    worst = target_worst_case(tasks, kube)
    if tasks.soft_time_limit < worst.message_minimum:
        raise SettingsError(
            f"CAP_TASK_SOFT_TIME_LIMIT={tasks.soft_time_limit:g} cannot hold one target at its "
            f"worst: {worst.explain()}, so it must be at least {worst.message_minimum:g}. Raise "
            "CAP_TASK_SOFT_TIME_LIMIT (and CAP_TASK_TIME_LIMIT above it), or lower "
            "CAP_KUBE_RETRY_MAX_SECONDS, CAP_KUBE_RETRY_ATTEMPTS, CAP_KUBE_CONNECT_TIMEOUT or "
            "CAP_KUBE_READ_TIMEOUT"
        )


def _observability(environ: Mapping[str, str]) -> ObservabilitySettings:
    metrics_dir = METRICS_DIR.read(environ)
    return ObservabilitySettings(
        metrics_port=METRICS_PORT.read(environ),
        metrics_address=METRICS_ADDRESS.read(environ) or ObservabilitySettings.metrics_address,
        metrics_dir=_path(environ, metrics_dir) if metrics_dir else None,
        log_format=LOG_FORMAT.value(environ),
    )


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read and validate every setting from ``environ`` (see module docstring); writes nothing."""
    data_raw = DATA_DIR.read(environ)
    data_dir = (
        _path(environ, data_raw)
        if data_raw
        else _home(environ) / ".local" / "share" / "certautopilot"
    )
    database = _database(environ, data_dir)
    tasks = _tasks(environ, data_dir)
    visibility = BROKER_VISIBILITY_TIMEOUT.value(environ)
    if visibility <= tasks.time_limit:
        raise SettingsError(
            f"CAP_BROKER_VISIBILITY_TIMEOUT={visibility:g} must exceed CAP_TASK_TIME_LIMIT="
            f"{tasks.time_limit:g}; otherwise the broker redelivers tasks that are still running"
        )
    broker = BrokerSettings(
        url=_transport_url(
            environ,
            BROKER_URL,
            _default_broker_url(data_dir),
            _broker_aliases(),
            "redis://127.0.0.1:6379/0",
        ),
        result_backend=_transport_url(
            environ,
            RESULT_BACKEND,
            _default_result_backend(data_dir),
            _backend_aliases(),
            "redis://127.0.0.1:6379/1 or db+postgresql+psycopg://user:password@host/db",
        ),
        visibility_timeout=visibility,
    )
    sa_raw = SERVICEACCOUNT_DIR.read(environ)
    kube = KubeSettings(
        serviceaccount_dir=(
            _path(environ, sa_raw)
            if sa_raw
            else Path("/var/run/secrets/kubernetes.io/serviceaccount")
        ),
        connect_timeout=KUBE_CONNECT_TIMEOUT.value(environ),
        read_timeout=KUBE_READ_TIMEOUT.value(environ),
        retry_attempts=KUBE_RETRY_ATTEMPTS.value(environ),
        retry_max_seconds=KUBE_RETRY_MAX_SECONDS.value(environ),
        server_dry_run=SERVER_DRY_RUN.value(environ),
    )
    _check_soft_limit_holds_a_target(tasks, kube)
    fanout = FanoutSettings(
        default_batch_size=DEFAULT_BATCH_SIZE.value(environ),
        default_failure_threshold=DEFAULT_FAILURE_THRESHOLD.value(environ),
    )
    known = set(ENV_VARS) | set(FILE_VARIANTS)
    ignored = tuple(sorted(n for n in environ if n.startswith("CAP_") and n not in known))
    return Settings(
        data_dir=data_dir,
        database=database,
        broker=broker,
        crypto=_crypto(environ, data_dir, database.is_default),
        kube=kube,
        fanout=fanout,
        tasks=tasks,
        flower=FlowerSettings(basic_auth=FLOWER_BASIC_AUTH.read(environ)),
        observability=_observability(environ),
        ignored_variables=ignored,
    )
