"""What a process does once before it works: create the embedded default's files.

:func:`worker.platform.settings.load_settings` only reads. The composition roots (the CLI's
commands, the bare ``celery`` command line, tests) then call :func:`bootstrap`, which

* creates ``CAP_DATA_DIR`` (mode 0700) when a default file there is in use (the SQLite
  database, broker or result store), and
* for the embedded default, generates the KEK file ``{data_dir}/kek`` once (mode 0600) and
  loads it, so secrets are still encrypted at rest with nothing configured.

With a configured database, broker, result backend and KEK it writes nothing. Calling it
again, or from many processes starting at once, is safe.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from worker.core.crypto import generate_kek
from worker.platform.settings import GENERATED_KEK_ID, Settings, SettingsError, read_kek_file

__all__ = ["bootstrap"]


def bootstrap(settings: Settings) -> Settings:
    """Create what ``settings`` needs on disk; return them with every KEK loaded."""
    if settings.uses_data_dir:
        _create_data_dir(settings.data_dir)
    crypto = settings.crypto
    if crypto.generated_file is None:
        return settings
    keys: dict[str, bytes] = {}
    read_kek_file(_generate_kek_once(crypto.generated_file), "generated KEK file", keys)
    return replace(settings, crypto=replace(crypto, keys=MappingProxyType(keys)))


def _create_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"CAP_DATA_DIR={str(data_dir)!r} cannot be created ({exc.strerror}); point "
            "CAP_DATA_DIR at a writable folder or configure CAP_DATABASE_URL, "
            "CAP_BROKER_URL and CAP_RESULT_BACKEND"
        ) from None


def _generate_kek_once(path: Path) -> Path:
    """Create ``path`` once (0600), race-free across concurrently starting processes."""
    if path.exists():
        return path
    content = (
        "# CertAutoPilot key-encryption key, generated for the embedded default.\n"
        "# Keep it secret and back it up: without it no stored secret can be decrypted.\n"
        f"{GENERATED_KEK_ID}:{generate_kek()}\n"
    )
    # Unique per process *and* thread: two starters must never share a temporary file.
    temporary = path.with_name(f".kek.{os.getpid()}.{secrets.token_hex(8)}.tmp")
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
