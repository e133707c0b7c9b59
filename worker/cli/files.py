"""Reading the files an operator names on the command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from worker.app.commands import ServiceError
from worker.core.limits import PEM_FILE, InputTooLarge, Limit


def read_file(path: Path, limit: Limit = PEM_FILE) -> bytes:
    """Read a file the operator named, at most ``limit`` bytes, naming the file on failure.

    Callers pass the limit of what the file holds (``KUBECONFIG``, ``PEM_FILE``, ...).
    Never more than ``limit.maximum + 1`` bytes are read, so a 20 MB file is refused
    after reading 256 KiB, and a FIFO or ``/dev/zero`` cannot make the CLI read forever.
    """
    try:
        with path.open("rb") as stream:
            return read_limited(stream, limit, f"the file {path}")
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}") from None


def read_limited(stream: BinaryIO, limit: Limit, input_name: str) -> bytes:
    """Read ``stream`` to its end, refusing it with InputTooLarge past ``limit`` bytes."""
    data = stream.read(limit.maximum + 1)
    if len(data) > limit.maximum:
        raise InputTooLarge(input_name, limit, _known_size(stream))
    return data


def _known_size(stream: BinaryIO) -> int | None:
    """The size of a regular file (for the message); None for a pipe or a device."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None
