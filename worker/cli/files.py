"""Reading the files an operator names on the command line (``-`` is stdin, as in kubectl)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from worker.app.commands import ServiceError
from worker.core.limits import PEM_FILE, InputTooLarge, Limit

STDIN = "-"
"""The file name that means standard input (``--cert -``, ``--file -``)."""


def is_stdin(path: Path | str | None) -> bool:
    """True when the option names standard input."""
    return path is not None and str(path) == STDIN


def one_stdin(options: Mapping[str, Path | None]) -> None:
    """Refuse two options reading stdin in one command: stdin can be read once."""
    named = [name for name, path in options.items() if is_stdin(path)]
    if len(named) > 1:
        raise ServiceError(
            f"{', '.join(named[:-1])} and {named[-1]} "
            f"{'both' if len(named) == 2 else 'all'} read stdin ('-'), which can be read only "
            "once: give at most one of them as '-' and the others as files"
        )


def read_file(path: Path, limit: Limit = PEM_FILE) -> bytes:
    """Read a file the operator named (``-``: stdin), at most ``limit`` bytes, naming it on failure.

    Callers pass the limit of what the file holds (``KUBECONFIG``, ``PEM_FILE``, ...).
    Never more than ``limit.maximum + 1`` bytes are read, so a 20 MB file is refused
    after reading 256 KiB, and a FIFO or ``/dev/zero`` cannot make the CLI read forever.
    """
    if is_stdin(path):
        return read_limited(sys.stdin.buffer, limit, "stdin")
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
