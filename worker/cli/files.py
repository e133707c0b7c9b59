"""Reading the files an operator names on the command line."""

from __future__ import annotations

from pathlib import Path

from worker.app.commands import ServiceError


def read_file(path: Path) -> bytes:
    """Read a file the operator named, with an error that says which file failed."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}") from None
