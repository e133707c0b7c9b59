"""The worker's settings: one typed, frozen object read from the environment in one place.

:func:`load_settings` is called once by the composition root (CLI, Celery app) and the result
is passed down explicitly; no other module reads the environment.

With nothing set, everything runs on an embedded default that needs no server: SQLite for
the data, kombu's SQLAlchemy transport on SQLite for the broker and Celery's database result
backend (which supports chords), all under ``CAP_DATA_DIR``. In that mode a KEK file is
generated once (mode 0600) so secrets are still encrypted at rest. With any other database,
a KEK must be configured explicitly: silently generating one on a single pod of a cluster
would make the other pods unable to read what it wrote.

Invalid values raise :class:`SettingsError` naming the variable, the offending value (URL
passwords masked, KEKs never shown) and the expected form.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pwd
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.core.crypto import KEK_BYTES, generate_kek, is_valid_key_id
from worker.core.fanout import FanoutConfigError, parse_batch_size, parse_failure_threshold

__all__ = [
    "ENV_VARS",
    "GENERATED_KEK_ID",
    "BatchSizeValue",
    "BrokerSettings",
    "CryptoSettings",
    "DatabaseSettings",
    "FanoutSettings",
    "KubeSettings",
    "Settings",
    "SettingsError",
    "TaskSettings",
    "ThresholdValue",
    "load_settings",
    "normalize_database_url",
    "redact_url",
]

ENV_VARS = (
    "CAP_DATA_DIR",
    "CAP_DATABASE_URL",
    "CAP_BROKER_URL",
    "CAP_RESULT_BACKEND",
    "CAP_KEK",
    "CAP_KEK_FILE",
    "CAP_KEK_CURRENT",
    "CAP_SERVICEACCOUNT_DIR",
    "CAP_KUBE_CONNECT_TIMEOUT",
    "CAP_KUBE_READ_TIMEOUT",
    "CAP_KUBE_RETRY_ATTEMPTS",
    "CAP_KUBE_RETRY_MAX_SECONDS",
    "CAP_SERVER_DRY_RUN",
    "CAP_DEFAULT_BATCH_SIZE",
    "CAP_DEFAULT_FAILURE_THRESHOLD",
    "CAP_TASK_SOFT_TIME_LIMIT",
    "CAP_TASK_TIME_LIMIT",
    "CAP_BROKER_VISIBILITY_TIMEOUT",
    "CAP_REAPER_INTERVAL",
    "CAP_STALE_AFTER",
    "CAP_WORKER_CONCURRENCY",
    "CAP_KUBE_QUEUE",
    "CAP_HEARTBEAT_FILE",
    "CAP_LOG_LEVEL",
)
"""Every environment variable the worker reads (all others are ignored)."""

GENERATED_KEK_ID = "k1"
"""Key id of the KEK generated for the embedded default."""

BatchSizeValue = int | str | tuple[int | str, ...]
"""A batch size as configured: a count, a percentage such as "25%", or a progressive list."""
ThresholdValue = int | str
"""A failure threshold as configured: a count or a percentage such as "10%"."""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_KEK_HINT = "generate a key with: head -c 32 /dev/urandom | base64"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and the expected form."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for messages and logs)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        return url
    netloc = parts.netloc
    userinfo, _, hostinfo = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


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
    ``CAP_KEK_FILE`` lines, or the generated ``{data_dir}/kek`` for the embedded default."""

    current_key_id: str
    """Key id used for new writes (``CAP_KEK_CURRENT``); default the first listed."""

    source: str
    """Where the keys came from, for operators (never contains key material)."""

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
    """Seconds before a task gets SoftTimeLimitExceeded (``CAP_TASK_SOFT_TIME_LIMIT``, 240)."""

    time_limit: float
    """Seconds before a task's process is killed (``CAP_TASK_TIME_LIMIT``, default 300)."""

    reaper_interval: float
    """Seconds between scans for stalled runs (``CAP_REAPER_INTERVAL``, default 15)."""

    stale_after: float
    """Seconds without progress after which a running run counts as stalled
    (``CAP_STALE_AFTER``, default 60)."""

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

    ignored_variables: tuple[str, ...] = field(default=())
    """``CAP_*`` variables that were set but are not settings (likely typos); for a warning."""

    @property
    def embedded_default(self) -> bool:
        """True when the database is the default embedded SQLite file."""
        return self.database.is_default


# --------------------------------------------------------------------------- parsing helpers

_T = TypeVar("_T")


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when unset or blank (blank means "use the default")."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _invalid(name: str, value: str, expected: str) -> SettingsError:
    return SettingsError(f"{name}={value!r} is invalid: expected {expected}")


def _parse_with(
    environ: Mapping[str, str],
    name: str,
    default: _T,
    parse: Callable[[str], _T | None],
    expected: str,
) -> _T:
    raw = _get(environ, name)
    if raw is None:
        return default
    parsed = parse(raw)
    if parsed is None:
        raise _invalid(name, raw, expected)
    return parsed


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


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    return _parse_with(
        environ, name, default, _positive_float, f"a number of seconds > 0, e.g. {default:g}"
    )


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


# ------------------------------------------------------------------------------- sections


def _database(environ: Mapping[str, str], data_dir: Path) -> DatabaseSettings:
    default = f"sqlite:///{data_dir / 'certautopilot.db'}"
    raw = _get(environ, "CAP_DATABASE_URL")
    if raw is None or raw == default:
        return DatabaseSettings(url=default, is_default=True)
    url = normalize_database_url(raw)
    expected = (
        "a SQLAlchemy URL such as sqlite:////var/lib/certautopilot/data.db or "
        "postgresql+psycopg://user:password@host:5432/certautopilot"
    )
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise _invalid("CAP_DATABASE_URL", redact_url(raw), expected) from None
    if backend not in ("sqlite", "postgresql"):
        raise SettingsError(
            f"CAP_DATABASE_URL={redact_url(raw)!r} uses the unsupported database {backend!r}: "
            f"expected {expected}"
        )
    return DatabaseSettings(url=url, is_default=False)


def _transport_url(
    environ: Mapping[str, str], name: str, default: str, aliases: frozenset[str], example: str
) -> str:
    raw = _get(environ, name)
    if raw is None:
        return default
    scheme, sep, _ = raw.partition("://")
    # "sqla+sqlite://" and "db+postgresql://" name the transport/backend before the "+".
    if not sep or scheme.split("+", 1)[0].lower() not in aliases:
        known = ", ".join(sorted(aliases))
        raise _invalid(name, redact_url(raw), f"a URL like {example} (schemes: {known})")
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


def _read_kek_file(path: Path, variable: str, keys: dict[str, bytes]) -> None:
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


def _generated_kek_file(data_dir: Path) -> Path:
    """Create ``{data_dir}/kek`` once (0600), race-free across concurrently starting processes."""
    path = data_dir / "kek"
    if path.exists():
        return path
    content = (
        "# CertAutoPilot key-encryption key, generated for the embedded default.\n"
        "# Keep it secret and back it up: without it no stored secret can be decrypted.\n"
        f"{GENERATED_KEK_ID}:{generate_kek()}\n"
    )
    # Unique per process *and* thread: two starters must never share a temporary file.
    temporary = data_dir / f".kek.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        # link() fails if another process won the race; readers never see a half-written file.
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _crypto(environ: Mapping[str, str], data_dir: Path, embedded: bool) -> CryptoSettings:
    keys: dict[str, bytes] = {}
    sources: list[str] = []
    inline = _get(environ, "CAP_KEK")
    if inline is not None:
        for entry in inline.split(","):
            if entry.strip():
                _parse_kek_entry("CAP_KEK", entry.strip(), keys)
        if not keys:
            raise SettingsError(
                f"CAP_KEK holds no KEK; expected 'keyid:base64[,...]' ({_KEK_HINT})"
            )
        sources.append("CAP_KEK")
    file_raw = _get(environ, "CAP_KEK_FILE")
    if file_raw is not None:
        kek_file = _path(environ, file_raw)
        _read_kek_file(kek_file, "CAP_KEK_FILE", keys)
        sources.append(f"CAP_KEK_FILE={kek_file}")
    if not keys:
        if not embedded:
            raise SettingsError(
                "no KEK configured: CAP_DATABASE_URL points at a non-default database, so set "
                "CAP_KEK='keyid:base64' or CAP_KEK_FILE=/path/to/file (one 'keyid:base64' per "
                f"line) on every worker ({_KEK_HINT}). Only the embedded default SQLite "
                "database generates a KEK by itself"
            )
        generated = _generated_kek_file(data_dir)
        _read_kek_file(generated, "generated KEK file", keys)
        sources.append(f"generated file {generated}")
    current = _get(environ, "CAP_KEK_CURRENT")
    if current is None:
        current = next(iter(keys))
    elif current not in keys:
        loaded = ", ".join(repr(key_id) for key_id in keys)
        raise SettingsError(
            f"CAP_KEK_CURRENT={current!r} is not a loaded key id; expected one of {loaded}"
        )
    return CryptoSettings(
        keys=MappingProxyType(keys), current_key_id=current, source=" + ".join(sources)
    )


def _step(raw: str) -> int | str:
    # Digits become counts; anything else stays text for worker.core.fanout to judge.
    text = raw.strip()
    return int(text) if text.isdigit() else text


def _batch_size(raw: str) -> BatchSizeValue | None:
    """Split the variable into steps; worker.fanout.parse_batch_size judges their values."""
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


def _fanout(environ: Mapping[str, str]) -> FanoutSettings:
    default_batch: BatchSizeValue = "100%"
    default_threshold: ThresholdValue = 0
    return FanoutSettings(
        default_batch_size=_parse_with(
            environ,
            "CAP_DEFAULT_BATCH_SIZE",
            default_batch,
            _batch_size,
            'a count >= 1 ("5"), a whole percentage in [1%, 100%] ("25%") or a progressive '
            'list ("1,5,20%" or [1, 5, "20%"]; the last step repeats)',
        ),
        default_failure_threshold=_parse_with(
            environ,
            "CAP_DEFAULT_FAILURE_THRESHOLD",
            default_threshold,
            _threshold,
            'a count >= 0 ("2") or a whole percentage in [0%, 100%] ("10%")',
        ),
    )


def _kube(environ: Mapping[str, str]) -> KubeSettings:
    sa_raw = _get(environ, "CAP_SERVICEACCOUNT_DIR")
    return KubeSettings(
        serviceaccount_dir=(
            _path(environ, sa_raw)
            if sa_raw
            else Path("/var/run/secrets/kubernetes.io/serviceaccount")
        ),
        connect_timeout=_seconds(environ, "CAP_KUBE_CONNECT_TIMEOUT", 5),
        read_timeout=_seconds(environ, "CAP_KUBE_READ_TIMEOUT", 15),
        retry_attempts=_parse_with(
            environ, "CAP_KUBE_RETRY_ATTEMPTS", 5, _positive_int, "a whole number >= 1, e.g. 5"
        ),
        retry_max_seconds=_seconds(environ, "CAP_KUBE_RETRY_MAX_SECONDS", 30),
        server_dry_run=_parse_with(environ, "CAP_SERVER_DRY_RUN", True, _boolean, "true or false"),
    )


def _tasks(environ: Mapping[str, str], data_dir: Path) -> TaskSettings:
    soft = _seconds(environ, "CAP_TASK_SOFT_TIME_LIMIT", 240)
    hard = _seconds(environ, "CAP_TASK_TIME_LIMIT", 300)
    if soft >= hard:
        raise SettingsError(
            f"CAP_TASK_SOFT_TIME_LIMIT={soft:g} must be lower than CAP_TASK_TIME_LIMIT={hard:g}, "
            "so a task can clean up before it is killed"
        )
    heartbeat_raw = _get(environ, "CAP_HEARTBEAT_FILE")
    level = _parse_with(
        environ,
        "CAP_LOG_LEVEL",
        "INFO",
        lambda raw: raw.upper() if raw.upper() in _LOG_LEVELS else None,
        "one of " + ", ".join(_LOG_LEVELS),
    )
    return TaskSettings(
        soft_time_limit=soft,
        time_limit=hard,
        reaper_interval=_seconds(environ, "CAP_REAPER_INTERVAL", 15),
        stale_after=_seconds(environ, "CAP_STALE_AFTER", 60),
        worker_concurrency=_parse_with(
            environ, "CAP_WORKER_CONCURRENCY", 4, _positive_int, "a whole number >= 1, e.g. 4"
        ),
        kube_queue=_parse_with(
            environ,
            "CAP_KUBE_QUEUE",
            "kubernetes",
            lambda raw: raw if _QUEUE_NAME.fullmatch(raw) else None,
            "a queue name of letters, digits, '.', '_', ':' or '-', e.g. kubernetes",
        ),
        heartbeat_file=(
            _path(environ, heartbeat_raw) if heartbeat_raw else data_dir / "worker-heartbeat"
        ),
        log_level=level,
    )


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read and validate every ``CAP_*`` setting from ``environ`` (see module docstring)."""
    data_raw = _get(environ, "CAP_DATA_DIR")
    data_dir = (
        _path(environ, data_raw)
        if data_raw
        else _home(environ) / ".local" / "share" / "certautopilot"
    )
    database = _database(environ, data_dir)
    tasks = _tasks(environ, data_dir)
    visibility = _seconds(environ, "CAP_BROKER_VISIBILITY_TIMEOUT", 3600)
    if visibility <= tasks.time_limit:
        raise SettingsError(
            f"CAP_BROKER_VISIBILITY_TIMEOUT={visibility:g} must exceed CAP_TASK_TIME_LIMIT="
            f"{tasks.time_limit:g}; otherwise the broker redelivers tasks that are still running"
        )
    broker = BrokerSettings(
        url=_transport_url(
            environ,
            "CAP_BROKER_URL",
            f"sqla+sqlite:///{data_dir / 'broker.db'}",
            _broker_aliases(),
            "redis://127.0.0.1:6379/0",
        ),
        result_backend=_transport_url(
            environ,
            "CAP_RESULT_BACKEND",
            f"db+sqlite:///{data_dir / 'results.db'}",
            _backend_aliases(),
            "redis://127.0.0.1:6379/1 or db+postgresql+psycopg://user:password@host/db",
        ),
        visibility_timeout=visibility,
    )
    uses_data_dir = (
        database.is_default
        or _get(environ, "CAP_BROKER_URL") is None
        or _get(environ, "CAP_RESULT_BACKEND") is None
    )
    if uses_data_dir:
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(
                f"CAP_DATA_DIR={str(data_dir)!r} cannot be created ({exc.strerror}); point "
                "CAP_DATA_DIR at a writable folder or configure CAP_DATABASE_URL, "
                "CAP_BROKER_URL and CAP_RESULT_BACKEND"
            ) from None
    known = set(ENV_VARS)
    ignored = tuple(sorted(n for n in environ if n.startswith("CAP_") and n not in known))
    return Settings(
        data_dir=data_dir,
        database=database,
        broker=broker,
        crypto=_crypto(environ, data_dir, database.is_default),
        kube=_kube(environ),
        fanout=_fanout(environ),
        tasks=tasks,
        ignored_variables=ignored,
    )
