"""Input the operator gives on the command line: files or stdin, and ``--var name=value``."""

from __future__ import annotations

import sys
from pathlib import Path

from worker.cli.errors import CliError
from worker.core.limits import PEM_FILE, Limit

__all__ = ["read_input", "read_optional", "variables"]


def read_input(path: Path | None, stdin: bool, what: str, limit: Limit) -> bytes:
    """Bytes from exactly one of --file PATH and --stdin, at most ``limit`` of them."""
    # It imports the service layer: not for `--help`.
    from worker.cli.files import read_file, read_limited

    if (path is None) == (not stdin):
        raise CliError(f"give the {what} with exactly one of --file PATH or --stdin")
    if stdin:
        data = read_limited(sys.stdin.buffer, limit, f"the {what} on stdin")
    else:
        data = read_file(path, limit)  # type: ignore[arg-type]
    if not data.strip():
        raise CliError(f"the {what} is empty")
    return data


def read_optional(path: Path | None) -> bytes | None:
    """The PEM file's bytes, or None when the option was not given."""
    from worker.cli.files import read_file

    return None if path is None else read_file(path, PEM_FILE)


def variables(pairs: list[str] | None) -> dict[str, str]:
    """``--var k=v`` options as a mapping."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--var {pair!r} must look like name=value, e.g. --var tenant=shop")
        result[key.strip()] = value
    return result
