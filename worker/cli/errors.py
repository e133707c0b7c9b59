"""How the CLI reports errors: ``error: <message>`` on stderr and an exit code.

Every error a user can cause is printed as ``error: <message>`` on stderr with exit code 2
(bad input: nothing was written) or 1 (a run failed, a service is unreachable). Anything not
classified here is a bug and propagates with its traceback.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer
from rich.text import Text

from worker.cli.output import make_console, plain

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "CliError", "fail", "handled"]

P = ParamSpec("P")
R = TypeVar("R")

EXIT_FAILED = 1
"""A run failed or halted, or a service (database, broker) is not usable."""
EXIT_BAD_INPUT = 2
"""The request was refused; nothing was written."""


class CliError(Exception):
    """An error the CLI reports as ``error: <message>`` with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_LIST_HINTS = {
    "certificate": "certautopilot certs list",
    "credential": "certautopilot credentials list",
    "target": "certautopilot targets list",
    "group": "certautopilot groups list",
    "distribution": "certautopilot distributions list",
    "run": "certautopilot runs list",
}


# Bundle messages name the Python API's parameters; on the command line they are options.
_BUNDLE_FLAGS = {"cert_pem": "--cert", "chain_pem": "--chain", "key_pem": "--key", "ca_pem": "--ca"}
_BUNDLE_INPUT = re.compile(r"\b(?:cert|chain|key|ca)_pem\b")


def _classify(exc: Exception) -> tuple[str, int] | None:
    """The message and exit code for an expected error, or None for a bug."""
    # Imported here: `certautopilot --help` must not pay for SQLAlchemy/kubernetes imports.
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import DBAPIError

    from models.migrate import MigrationError
    from models.queries import AlreadyExistsError, InvalidRecordError, NotFoundError
    from worker.core.bundle import BundleError
    from worker.core.crypto import CryptoError, UnknownKeyError
    from worker.core.fanout import FanoutConfigError
    from worker.core.limits import InputTooLarge, InvalidName
    from worker.core.names import SystemNamespaceRefused, TemplateError
    from worker.kube.errors import KubeError
    from worker.platform.db import DatabaseUrlError
    from worker.platform.settings import SettingsError

    if isinstance(exc, CliError):
        return str(exc), exc.exit_code
    if isinstance(exc, NotFoundError):
        hint = _LIST_HINTS.get(exc.entity)
        return f"{exc}" + (f" (see `{hint}`)" if hint else ""), EXIT_BAD_INPUT
    bad_input = (
        BundleError,
        TemplateError,
        FanoutConfigError,
        InputTooLarge,
        InvalidName,
        SystemNamespaceRefused,
        InvalidRecordError,
        AlreadyExistsError,
        KubeError,
        UnknownKeyError,
        SettingsError,
        DatabaseUrlError,
    )
    if isinstance(exc, BundleError):
        return _BUNDLE_INPUT.sub(lambda m: _BUNDLE_FLAGS[m.group(0)], str(exc)), EXIT_BAD_INPUT
    if isinstance(exc, bad_input):
        return str(exc), EXIT_BAD_INPUT
    from worker.app.service import ServiceError

    if isinstance(exc, ServiceError):
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, CryptoError):
        return f"{exc} (check CAP_KEK / CAP_KEK_FILE: every key id in use must be loaded)", 1
    if isinstance(exc, DBAPIError):
        # The driver's first line names the cause ("connection refused", "no such table");
        # SQLAlchemy's full text would add the statement and parameters.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        return f"database error: {reason}", EXIT_FAILED
    if isinstance(exc, BrokerError):
        return (
            f"cannot reach the message broker ({exc}); the run stays queued and a worker "
            "starts it once the broker is reachable",
            EXIT_FAILED,
        )
    if isinstance(exc, MigrationError):
        return str(exc), EXIT_FAILED
    return None


def fail(message: str, exit_code: int) -> NoReturn:
    """Print ``error: <message>`` on stderr (the message literally) and exit."""
    make_console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", plain(message)))
    raise typer.Exit(exit_code)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the domain's errors into ``error: <message>`` and the right exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            classified = _classify(exc)
            if classified is None:
                raise
            fail(*classified)

    return wrapper
