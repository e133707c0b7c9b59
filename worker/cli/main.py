"""The operator CLI, ``certautopilot``: the spec's UI flows on the command line.

The CLI is a composition root: it reads the settings from the environment once
(:func:`worker.settings.load_settings`), builds the process runtime and calls
:mod:`worker.app.service`. Every error a user can cause is printed as ``error: <message>``
on stderr with exit code 2 (bad input: nothing was written) or 1 (a run failed, a
service is unreachable). Secret material (kubeconfigs, keys, tokens) is never printed.

With the embedded default (nothing configured) the database schema is created on first
use, so ``certautopilot demo`` and the quickstart work on a fresh machine; any other
database is migrated explicitly with ``certautopilot migrate``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.table import Table

from worker.cli.output import (
    OutputFormat,
    emit_json,
    follow_run,
    format_time,
    make_console,
    print_report,
    run_headline,
)

if TYPE_CHECKING:
    from worker.app.runs import Dispatcher
    from worker.platform.runtime import Runtime
    from worker.platform.settings import Settings

__all__ = ["CliError", "app", "main"]

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="certautopilot",
    help="CertAutoPilot Kubernetes distribution worker: deploy TLS certificates as "
    "kubernetes.io/tls Secrets into one or many clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
credentials_app = typer.Typer(help="Module credentials: kubeconfigs and webhook secrets.")
certs_app = typer.Typer(help="Certificates: import, list, renew.")
targets_app = typer.Typer(help="Kubernetes targets: one cluster + namespace each.")
groups_app = typer.Typer(help="Target groups: fan out over many targets in batches.")
distributions_app = typer.Typer(help="Attach certificates to targets, groups or webhooks.")
runs_app = typer.Typer(help="Runs of distributions and their per-target results.")
keys_app = typer.Typer(help="Key-encryption keys (KEKs) for the encrypted secrets.")
probe_app = typer.Typer(help="Liveness and readiness probes for the worker (Kubernetes).")
for _sub, _name in (
    (credentials_app, "credentials"),
    (certs_app, "certs"),
    (targets_app, "targets"),
    (groups_app, "groups"),
    (distributions_app, "distributions"),
    (runs_app, "runs"),
    (keys_app, "keys"),
    (probe_app, "probe"),
):
    _sub.info.no_args_is_help = True
    app.add_typer(_sub, name=_name)

# --------------------------------------------------------------------------------- errors

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
    from worker.core.names import TemplateError
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
        InvalidRecordError,
        AlreadyExistsError,
        KubeError,
        UnknownKeyError,
        SettingsError,
        DatabaseUrlError,
    )
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


def _fail(message: str, exit_code: int) -> NoReturn:
    make_console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(exit_code)


def _handled(func: Callable[P, R]) -> Callable[P, R]:
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
            _fail(*classified)

    return wrapper


# ------------------------------------------------------------------------------- runtime


def _settings() -> Settings:
    from worker.platform.settings import load_settings

    settings = load_settings(os.environ)
    if settings.ignored_variables:
        make_console(stderr=True).print(
            "warning: ignoring unknown setting(s) "
            + ", ".join(settings.ignored_variables)
            + " (typo? see the configuration reference in the README)"
        )
    return settings


def ensure_schema(settings: Settings) -> None:
    """Create/upgrade the embedded default's schema; refuse other databases that lag behind."""
    from models import migrate
    from worker.platform.redaction import redact_url

    current, head = migrate.current(settings.database.url), migrate.head()
    if current == head:
        return
    if settings.database.is_default:
        migrate.upgrade(settings.database.url)
        make_console(stderr=True).print(
            f"initialised the embedded database {redact_url(settings.database.url)} (schema {head})"
        )
        return
    raise CliError(
        f"the database {redact_url(settings.database.url)} is at schema "
        f"{current or '(empty)'} but this version needs {head}; run `certautopilot migrate`",
        EXIT_FAILED,
    )


@contextmanager
def _runtime() -> Iterator[Runtime]:
    """The process runtime for one command (schema checked), closed afterwards."""
    from worker.platform.runtime import build_runtime, set_runtime

    settings = _settings()
    ensure_schema(settings)
    rt = build_runtime(settings)
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(None)
        rt.close()


def celery_dispatcher(settings: Settings) -> Dispatcher:
    """The Celery dispatcher, publishing to the broker named by ``settings``."""
    from tasks.distribution import dispatcher
    from worker.platform.celery_app import app as celery_app
    from worker.platform.celery_app import configure

    if celery_app.conf.broker_url != settings.broker.url:
        # The Celery app configured itself from the environment at import time; a caller
        # that built other settings (tests, the demo) must publish where its workers listen.
        configure(celery_app, settings)
    return dispatcher


# ------------------------------------------------------------------------------- helpers

OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="text (tables) or json (for scripts).")
]


def _read_input(path: Path | None, stdin: bool, what: str) -> bytes:
    """Bytes from exactly one of --file PATH and --stdin."""
    from worker.cli.files import read_file

    if (path is None) == (not stdin):
        raise CliError(f"give the {what} with exactly one of --file PATH or --stdin")
    data = sys.stdin.buffer.read() if stdin else read_file(path)  # type: ignore[arg-type]
    if not data.strip():
        raise CliError(f"the {what} is empty")
    return data


def _variables(pairs: list[str] | None) -> dict[str, str]:
    """``--var k=v`` options as a mapping."""
    variables: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--var {pair!r} must look like name=value, e.g. --var tenant=shop")
        variables[key.strip()] = value
    return variables


def _now() -> datetime:
    return datetime.now(UTC)


def _print_table(table: Table) -> None:
    make_console().print(table)


def _list(
    output: OutputFormat,
    fetch: Callable[[Runtime], Sequence[Any]],
    columns: Sequence[str],
    cells: Callable[[Any], Sequence[str]],
) -> None:
    """Fetch rows with a fresh runtime and print them as JSON or as a table."""
    with _runtime() as rt:
        rows = fetch(rt)
    if output is OutputFormat.JSON:
        emit_json(rows)
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*cells(row))
    _print_table(table)


def _say(message: str) -> None:
    make_console().print(message, highlight=False)


# --------------------------------------------------------------------------- credentials


@credentials_app.command("add-kubeconfig")
@_handled
def credentials_add_kubeconfig(
    name: Annotated[str, typer.Argument(help="Credential name, e.g. prod-eu-1.")],
    file: Annotated[Path | None, typer.Option("--file", help="Kubeconfig file.")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the kubeconfig from stdin.")] = False,
) -> None:
    """Store a kubeconfig (encrypted). exec, auth-provider and file paths are refused."""
    from worker.app.service import add_kubeconfig_credential

    kubeconfig = _read_input(file, stdin, "kubeconfig")
    with _runtime() as rt:
        credential_id = add_kubeconfig_credential(rt, name, kubeconfig)
        key_id = rt.keyring.current_key_id
    _say(f"stored kubeconfig credential {name!r} (id {credential_id}), encrypted with KEK {key_id}")


@credentials_app.command("add-webhook-secret")
@_handled
def credentials_add_webhook_secret(
    name: Annotated[str, typer.Argument(help="Credential name.")],
    file: Annotated[Path | None, typer.Option("--file", help="File holding the secret.")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the secret from stdin.")] = False,
) -> None:
    """Store an HMAC secret for signing webhook notifications (trailing newline dropped)."""
    from worker.app.service import add_webhook_secret

    secret = _read_input(file, stdin, "webhook secret").rstrip(b"\r\n")
    with _runtime() as rt:
        credential_id = add_webhook_secret(rt, name, secret)
    _say(f"stored webhook secret {name!r} (id {credential_id})")


@credentials_app.command("list")
@_handled
def credentials_list(output: OutputOption = OutputFormat.TEXT) -> None:
    """List credentials (names and kinds only; contents are never shown)."""
    from worker.app.service import list_credentials

    _list(
        output,
        list_credentials,
        ("name", "kind", "KEK", "created", "id"),
        lambda row: (row.name, row.kind, row.key_id, format_time(row.created_at), row.id),
    )


# ---------------------------------------------------------------------------- certificates


def _read_pem(path: Path | None) -> bytes | None:
    from worker.cli.files import read_file

    return None if path is None else read_file(path)


@certs_app.command("import")
@_handled
def certs_import(
    cert: Annotated[
        Path, typer.Option("--cert", help="Leaf certificate PEM (may hold the chain).")
    ],
    key: Annotated[Path, typer.Option("--key", help="Private key PEM.")],
    chain: Annotated[Path | None, typer.Option("--chain", help="Intermediates PEM.")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="Issuing root CA PEM.")] = None,
    allow_expired: Annotated[
        bool, typer.Option("--allow-expired", help="Accept an expired certificate.")
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Import a certificate with its key (the key is stored encrypted)."""
    from worker.app.service import get_certificate, import_certificate
    from worker.cli.files import read_file

    cert_pem, key_pem = read_file(cert), read_file(key)
    with _runtime() as rt:
        certificate_id = import_certificate(
            rt,
            cert_pem,
            key_pem,
            _read_pem(chain) or b"",
            _read_pem(ca),
            allow_expired=allow_expired,
        )
        view = get_certificate(rt, certificate_id)
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    _say(
        f"imported certificate {view.id}\n"
        f"  CN:        {view.common_name or '(none; SANs only)'}\n"
        f"  SANs:      {', '.join(view.sans) or '(none)'}\n"
        f"  serial:    {view.serial}\n"
        f"  not after: {format_time(view.not_after)} ({view.days_left(_now())} days left)"
    )


def _days_left_text(days: int) -> str:
    if days < 0:
        return f"[bold red]expired {-days} day(s) ago[/]"
    style = "yellow" if days < 30 else "green"
    return f"[{style}]{days}[/]"


@certs_app.command("list")
@_handled
def certs_list(output: OutputOption = OutputFormat.TEXT) -> None:
    """List certificates with their expiry."""
    from worker.app.service import list_certificates

    now = _now()
    _list(
        output,
        list_certificates,
        ("id", "CN", "SANs", "serial", "not after", "days left"),
        lambda row: (
            row.id,
            row.common_name or "-",
            ", ".join(row.sans),
            row.serial,
            format_time(row.not_after),
            _days_left_text(row.days_left(now)),
        ),
    )


@certs_app.command("renew")
@_handled
def certs_renew(
    certificate_id: Annotated[str, typer.Argument(help="Id of the certificate to renew.")],
    cert: Annotated[Path, typer.Option("--cert", help="Renewed leaf certificate PEM.")],
    key: Annotated[Path, typer.Option("--key", help="Its private key PEM.")],
    chain: Annotated[Path | None, typer.Option("--chain", help="Intermediates PEM.")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="Issuing root CA PEM.")] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Replace a certificate with its renewal; its distributions deliver the new one."""
    from worker.app.service import get_certificate, list_distributions, renew_certificate
    from worker.cli.files import read_file

    pems = {"cert": read_file(cert), "key": read_file(key)}
    for name, path in (("chain", chain), ("ca", ca)):
        if path is not None:
            pems[name] = read_file(path)
    with _runtime() as rt:
        before = get_certificate(rt, certificate_id)
        renew_certificate(rt, certificate_id, pems)
        after = get_certificate(rt, certificate_id)
        distributions = list_distributions(rt, certificate_id)
    if output is OutputFormat.JSON:
        emit_json({"before": before, "after": after})
        return
    _say(
        f"renewed certificate {after.id}: serial {before.serial} -> {after.serial}, not after "
        f"{format_time(before.not_after)} -> {format_time(after.not_after)}"
    )
    for distribution in distributions:
        if distribution.kind == "kubernetes":
            _say(
                f"  see the change: certautopilot run {distribution.id} --dry-run "
                f"({distribution.destination})"
            )


# --------------------------------------------------------------------------------- targets


@targets_app.command("add")
@_handled
def targets_add(
    name: Annotated[str, typer.Argument(help="Target name, e.g. prod-eu-1-ingress.")],
    namespace: Annotated[
        str, typer.Option("--namespace", help='Namespace, or a template like "{{ .tenant }}-edge".')
    ],
    kubeconfig_credential: Annotated[
        str | None,
        typer.Option("--kubeconfig-credential", help="Credential holding the kubeconfig."),
    ] = None,
    in_cluster: Annotated[
        bool, typer.Option("--in-cluster", help="Use the pod's ServiceAccount (in Kubernetes).")
    ] = False,
    secret_name: Annotated[
        str | None,
        typer.Option(
            "--secret-name",
            help='Secret name template (default {{ .cn | replaceAll "." "-" }}-tls).',
        ),
    ] = None,
    include_ca: Annotated[
        bool, typer.Option("--include-ca", help="Also write ca.crt (only if consumers read it).")
    ] = False,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="Template variable name=value (repeatable).")
    ] = None,
    adopt_unmanaged: Annotated[
        bool,
        typer.Option("--adopt-unmanaged", help="Allow overwriting a Secret we did not create."),
    ] = False,
    allow_insecure: Annotated[
        bool, typer.Option("--allow-insecure", help="Accept insecure-skip-tls-verify.")
    ] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the health check.")] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Save a Kubernetes target, then run its health check (reads the namespace)."""
    from models.enums import ConnectionMode
    from worker.app.service import TargetSpec, create_target, get_target
    from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE

    if (kubeconfig_credential is None) == (not in_cluster):
        raise CliError(
            "choose the connection: exactly one of --kubeconfig-credential NAME or --in-cluster"
        )
    spec = TargetSpec(
        name=name,
        namespace=namespace,
        connection_mode=ConnectionMode.IN_CLUSTER if in_cluster else ConnectionMode.KUBECONFIG,
        credential=kubeconfig_credential,
        secret_name=secret_name or DEFAULT_SECRET_NAME_TEMPLATE,
        include_ca=include_ca,
        allow_insecure=allow_insecure,
        adopt_unmanaged=adopt_unmanaged,
        variables=_variables(var),
    )
    with _runtime() as rt:
        target_id, _ = create_target(rt, spec, check=not no_check)
        view = get_target(rt, target_id)
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    _say(f"saved target {view.name!r} (id {view.id})")
    if no_check:
        _say(f"  health: not checked (--no-check); run `certautopilot targets check {name}`")
    else:
        _print_health(view.health_status, view.health_message, name)


def _print_health(status: str, message: str | None, name: str) -> None:
    style = "green" if status == "healthy" else "bold red"
    make_console().print(f"  health: [{style}]{status}[/] — {message or ''}", highlight=False)
    if status != "healthy":
        _say(f"  fix the cause above, then run `certautopilot targets check {name}`")


@targets_app.command("list")
@_handled
def targets_list(output: OutputOption = OutputFormat.TEXT) -> None:
    """List targets with their connection and last health check."""
    from worker.app.service import list_targets

    _list(
        output,
        list_targets,
        ("name", "connection", "namespace", "secret name", "health", "groups"),
        lambda row: (
            row.name,
            (row.credential if row.connection_mode == "kubeconfig" else "in-cluster") or "-",
            row.namespace,
            row.secret_name,
            row.health_status,
            ", ".join(row.groups),
        ),
    )


@targets_app.command("show")
@_handled
def targets_show(
    name: Annotated[str, typer.Argument(help="Target name or id.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Show one target."""
    from worker.app.service import get_target

    with _runtime() as rt:
        view = get_target(rt, name)
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    table = Table(show_header=False, box=None)
    for label, value in (
        ("name", view.name),
        ("id", view.id),
        ("connection", view.connection_mode),
        ("credential", view.credential or "-"),
        ("namespace", view.namespace),
        ("secret name", view.secret_name),
        ("include ca.crt", str(view.include_ca)),
        ("adopt unmanaged", str(view.adopt_unmanaged)),
        ("allow insecure", str(view.allow_insecure)),
        ("variables", ", ".join(f"{k}={v}" for k, v in view.variables.items()) or "-"),
        ("groups", ", ".join(view.groups) or "-"),
        ("health", f"{view.health_status} ({format_time(view.health_checked_at)})"),
        ("health message", view.health_message or "-"),
    ):
        table.add_row(label, value)
    _print_table(table)


@targets_app.command("check")
@_handled
def targets_check(
    name: Annotated[str, typer.Argument(help="Target name or id.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Run the health check: namespace readable, get/create/update/patch on secrets allowed."""
    from worker.app.service import check_target_health, get_target

    with _runtime() as rt:
        target = get_target(rt, name)
        result = check_target_health(rt, target.id)
    if output is OutputFormat.JSON:
        emit_json(
            {
                "target": target.name,
                "status": result.status,
                "message": result.message,
                "report": result.report.to_dict() if result.report else None,
            }
        )
    else:
        _say(f"target {target.name!r}:")
        _print_health(result.status, result.message, target.name)
    if result.status != "healthy":
        raise typer.Exit(EXIT_FAILED)


# ---------------------------------------------------------------------------------- groups


def _fanout_values(batch_size: str | None, failure_threshold: str | None) -> tuple[Any, Any]:
    """Validate and normalise --batch-size and --failure-threshold (None = settings default)."""
    from worker.core.fanout import parse_batch_size, parse_failure_threshold

    batch = parse_batch_size(batch_size).as_config() if batch_size is not None else None
    threshold = (
        parse_failure_threshold(failure_threshold).as_config()
        if failure_threshold is not None
        else None
    )
    return batch, threshold


def _print_group(view: Any, output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    _say(
        f"group {view.name!r} (id {view.id})\n"
        f"  batch size:        {view.batch_size}\n"
        f"  failure threshold: {view.failure_threshold} (the run halts when failures exceed it)\n"
        f"  targets:           {', '.join(view.targets) or '(none)'}"
    )
    for index, batch in enumerate(view.batches, start=1):
        _say(f"  batch {index}: {', '.join(batch)}")


@groups_app.command("create")
@_handled
def groups_create(
    name: Annotated[str, typer.Argument(help="Group name.")],
    target: Annotated[
        list[str], typer.Option("--target", help="Member target, in fan-out order (repeatable).")
    ],
    batch_size: Annotated[
        str | None,
        typer.Option("--batch-size", help='Targets per batch: 5, 25% or progressive "1,5,20%".'),
    ] = None,
    failure_threshold: Annotated[
        str | None,
        typer.Option("--failure-threshold", help="Failures tolerated: a count (2) or 10%."),
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="Template variable name=value (repeatable).")
    ] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Create a group of targets with its batch size and failure threshold."""
    from worker.app.service import create_group, get_group

    batch, threshold = _fanout_values(batch_size, failure_threshold)
    with _runtime() as rt:
        group_id = create_group(
            rt,
            name,
            target,
            batch_size=batch,
            failure_threshold=threshold,
            variables=_variables(var),
        )
        view = get_group(rt, group_id)
    _print_group(view, output)


@groups_app.command("add-targets")
@_handled
def groups_add_targets(
    group: Annotated[str, typer.Argument(help="Group name or id.")],
    target: Annotated[list[str], typer.Option("--target", help="Target to append (repeatable).")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Append targets to a group (they run after the current members)."""
    from worker.app.service import add_group_targets

    with _runtime() as rt:
        view = add_group_targets(rt, group, target)
    _print_group(view, output)


@groups_app.command("list")
@_handled
def groups_list(output: OutputOption = OutputFormat.TEXT) -> None:
    """List groups."""
    from worker.app.service import list_groups

    _list(
        output,
        list_groups,
        ("name", "targets", "batch size", "failure threshold", "batches"),
        lambda row: (
            row.name,
            str(len(row.targets)),
            row.batch_size,
            row.failure_threshold,
            " | ".join(",".join(batch) for batch in row.batches),
        ),
    )


@groups_app.command("show")
@_handled
def groups_show(
    name: Annotated[str, typer.Argument(help="Group name or id.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Show a group: members and the batches a run would use."""
    from worker.app.service import get_group

    with _runtime() as rt:
        view = get_group(rt, name)
    _print_group(view, output)


# --------------------------------------------------------------------------- distributions


@distributions_app.command("attach")
@_handled
def distributions_attach(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id.")],
    target: Annotated[str | None, typer.Option("--target", help="Target name or id.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Group name or id.")] = None,
    store_content: Annotated[
        bool,
        typer.Option(
            "--store-content",
            help="Keep the previous Secret so Rollback can restore it (off: no rollback).",
        ),
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Attach a certificate to a target or a group (a Kubernetes distribution)."""
    from worker.app.service import attach, get_distribution

    if (target is None) == (group is None):
        raise CliError("attach to exactly one of --target NAME or --group NAME")
    with _runtime() as rt:
        distribution_id = attach(
            rt, certificate_id, target=target, group=group, store_content=store_content
        )
        view = get_distribution(rt, distribution_id)
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    _say(
        f"attached certificate {certificate_id} to {view.destination}: distribution {view.id}\n"
        f"  store content for rollback: {'ON' if store_content else 'OFF (rollback unavailable)'}\n"
        f"  next: certautopilot run {view.id} --dry-run"
    )


@distributions_app.command("attach-webhook")
@_handled
def distributions_attach_webhook(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id.")],
    url: Annotated[str, typer.Option("--url", help="Where to POST the outcome (https://...).")],
    secret: Annotated[
        str | None, typer.Option("--secret", help="Webhook-secret credential for HMAC signing.")
    ] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Stack a webhook after the certificate's distributions (fires after they succeed)."""
    from worker.app.service import attach_webhook, get_distribution

    with _runtime() as rt:
        distribution_id = attach_webhook(rt, certificate_id, url, secret=secret)
        view = get_distribution(rt, distribution_id)
    if output is OutputFormat.JSON:
        emit_json(view)
        return
    _say(
        f"stacked webhook {url} as distribution {view.id} (position {view.position}); it fires "
        "after the earlier distributions of the certificate succeed"
    )


@distributions_app.command("list")
@_handled
def distributions_list(
    cert: Annotated[str | None, typer.Option("--cert", help="Only this certificate's.")] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """List distributions in stacking order, with the rollback button's state."""
    from worker.app.service import list_distributions

    _list(
        output,
        lambda rt: list_distributions(rt, cert),
        ("id", "certificate", "#", "destination", "targets", "store content", "rollback"),
        lambda row: (
            row.id,
            f"{row.certificate_cn or '-'} ({row.certificate_id[:8]})",
            str(row.position),
            row.destination,
            str(row.target_count),
            "on" if row.store_content else "off",
            "available" if row.rollback_available else "[dim]unavailable[/]",
        ),
    )


# ------------------------------------------------------------------------------------ runs


def _follow_and_report(
    rt: Runtime,
    run_id: str,
    *,
    timeout: float,
    output: OutputFormat,
    total_hint: int,
) -> int:
    """Follow a run (and the stacked runs it starts) to the end; print it; return the exit code."""
    from models.enums import RunState
    from worker.app.service import run_report, stacked_runs

    console = make_console()
    quiet = output is OutputFormat.JSON
    deadline = time.monotonic() + timeout
    report = follow_run(
        functools.partial(run_report, rt, run_id),
        console=make_console(stderr=True) if quiet else console,
        timeout=timeout,
        total_hint=total_hint,
    )
    if report is None:
        _fail(
            f"run {run_id} did not finish within {timeout:.0f}s; it goes on in the workers — "
            f"follow it with `certautopilot runs show {run_id}`",
            EXIT_FAILED,
        )
    reports = [report]
    if report.state == RunState.SUCCEEDED:
        seen: set[str] = set()
        # Stacked distributions (e.g. a webhook after the Kubernetes one) start in turn.
        while True:
            chain = [child for child in stacked_runs(rt, run_id) if child not in seen]
            if not chain:
                break
            child_id = chain[0]
            seen.add(child_id)
            child = follow_run(
                functools.partial(run_report, rt, child_id),
                console=make_console(stderr=True) if quiet else console,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if child is None:
                _fail(f"stacked run {child_id} did not finish in time", EXIT_FAILED)
            reports.append(child)
            if child.state != RunState.SUCCEEDED:
                break
    if quiet:
        emit_json({"run": reports[0], "stacked": reports[1:]})
    else:
        print_report(console, reports[0], diffs=reports[0].action == "dry_run")
        for child in reports[1:]:
            console.print(run_headline(child))
    failed = any(item.state != RunState.SUCCEEDED for item in reports)
    return EXIT_FAILED if failed else 0


def _start_run(
    distribution_id: str,
    action: str,
    *,
    force: bool,
    wait: bool,
    timeout: float,
    output: OutputFormat,
) -> None:
    from worker.app.service import enqueue_run, get_distribution

    with _runtime() as rt:
        distribution = get_distribution(rt, distribution_id)
        run_id = enqueue_run(
            rt, celery_dispatcher(rt.settings), distribution_id, action, force=force
        )
        if not wait:
            if output is OutputFormat.JSON:
                emit_json({"run_id": run_id})
            else:
                _say(f"queued run {run_id}; follow it with `certautopilot runs show {run_id}`")
            return
        if output is OutputFormat.TEXT:
            _say(
                f"queued {action.replace('_', '-')} run {run_id} of distribution "
                f"{distribution.id} ({distribution.destination}, {distribution.target_count} "
                "target(s))"
            )
        code = _follow_and_report(
            rt, run_id, timeout=timeout, output=output, total_hint=distribution.target_count
        )
    if code:
        raise typer.Exit(code)


TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="Seconds to follow the run before giving up.", min=1)
]
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="Queue the run and return its id at once.")
]


@app.command("run")
@_handled
def run(
    distribution_id: Annotated[str, typer.Argument(help="Distribution id.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the diff per target; write nothing.")
    ] = False,
    execute: Annotated[bool, typer.Option("--execute", help="Write the Secrets.")] = False,
    no_wait: NoWaitOption = False,
    timeout: TimeoutOption = 600.0,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Dry-run or execute a distribution and follow it (exit 1 if it fails or halts)."""
    if dry_run == execute:
        raise CliError("choose exactly one of --dry-run (show the diff) or --execute (write)")
    _start_run(
        distribution_id,
        "dry_run" if dry_run else "execute",
        force=False,
        wait=not no_wait,
        timeout=timeout,
        output=output,
    )


@app.command("rollback")
@_handled
def rollback(
    distribution_id: Annotated[str, typer.Argument(help="Distribution id.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Restore even where the Secret changed since our write."),
    ] = False,
    no_wait: NoWaitOption = False,
    timeout: TimeoutOption = 600.0,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Restore the Secrets as they were before the distribution's first write."""
    _start_run(
        distribution_id, "rollback", force=force, wait=not no_wait, timeout=timeout, output=output
    )


@runs_app.command("list")
@_handled
def runs_list(
    distribution: Annotated[
        str | None, typer.Option("--distribution", help="Only this distribution's runs.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="How many runs.", min=1)] = 20,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """List recent runs, newest first."""
    from worker.app.service import list_runs

    _list(
        output,
        lambda rt: list_runs(rt, distribution_id=distribution, limit=limit),
        ("id", "action", "state", "targets", "created", "reason"),
        lambda row: (
            row.id,
            row.action,
            row.state,
            ", ".join(f"{n} {status}" for status, n in sorted(row.counts().items())) or "-",
            format_time(row.created_at),
            row.reason or "",
        ),
    )


@runs_app.command("show")
@_handled
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    diff: Annotated[bool, typer.Option("--diff", help="Print the full diff per target.")] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Show a run: state, timing and the per-target table with a diff summary."""
    from worker.app.service import run_report

    with _runtime() as rt:
        report = run_report(rt, run_id)
    if output is OutputFormat.JSON:
        emit_json(report)
        return
    _say(
        f"run {report.id} ({report.action}) of distribution {report.distribution_id}\n"
        f"  state:    {report.state}\n"
        f"  created:  {format_time(report.created_at)}  started: {format_time(report.started_at)}"
        f"  finished: {format_time(report.finished_at)}\n"
        f"  batches:  {report.batches} (current {min(report.current_batch + 1, report.batches)})"
    )
    print_report(make_console(), report, diffs=diff)


# ------------------------------------------------------------------------------------ keys


@keys_app.command("generate")
@_handled
def keys_generate(
    key_id: Annotated[
        str | None, typer.Option("--id", help="Key id for the new KEK (default kYYYYMMDD).")
    ] = None,
) -> None:
    """Print a fresh KEK line ``id:base64`` for CAP_KEK or CAP_KEK_FILE."""
    from worker.core.crypto import generate_kek, is_valid_key_id

    chosen = key_id or f"k{_now():%Y%m%d}"
    if not is_valid_key_id(chosen):
        raise CliError(f"key id {chosen!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'")
    sys.stdout.write(f"{chosen}:{generate_kek()}\n")
    make_console(stderr=True).print(
        "Add this line to CAP_KEK (comma-separated) or CAP_KEK_FILE on every worker, set "
        f"CAP_KEK_CURRENT={chosen}, restart, then run `certautopilot keys rotate --to {chosen}`. "
        "Keep the old key loaded until the rotation finished."
    )


@keys_app.command("rotate")
@_handled
def keys_rotate(
    to: Annotated[str, typer.Option("--to", help="Key id to re-wrap every stored secret with.")],
) -> None:
    """Re-wrap every stored secret's data key under another KEK (resumable)."""
    from models import queries

    with _runtime() as rt, rt.session() as session:
        count = queries.rotate_keys(session, rt.keyring, to)
        usage = queries.envelope_key_usage(session)
    _say(f"re-wrapped {count} secret(s) under KEK {to!r}")
    _say("envelopes per KEK now: " + (", ".join(f"{k}: {n}" for k, n in usage.items()) or "none"))


# ------------------------------------------------------------------------------ operations


@app.command("migrate")
@_handled
def migrate_command() -> None:
    """Create or upgrade the database schema (run once per release, before the workers)."""
    from models import migrate
    from worker.platform.redaction import redact_url

    settings = _settings()
    before = migrate.current(settings.database.url)
    migrate.upgrade(settings.database.url)
    after = migrate.current(settings.database.url)
    _say(
        f"database {redact_url(settings.database.url)}: schema {before or '(empty)'} -> {after}"
        if before != after
        else f"database {redact_url(settings.database.url)}: already at schema {after}"
    )


class LogLevel(StrEnum):
    """Worker log levels."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


@app.command("worker")
@_handled
def worker_command(
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", help="Worker processes (default CAP_WORKER_CONCURRENCY).", min=1
        ),
    ] = None,
    loglevel: Annotated[
        LogLevel | None, typer.Option("--loglevel", help="Default CAP_LOG_LEVEL.")
    ] = None,
    hostname: Annotated[
        str,
        typer.Option(
            "--hostname",
            help="Node name in Flower and remote control; must be unique per worker "
            "(%h = host name, the pod name on Kubernetes).",
        ),
    ] = "certautopilot@%h",
) -> None:
    """Run a Celery worker consuming the Kubernetes and control queues (with events for Flower)."""
    from worker.platform.celery_app import CONTROL_QUEUE
    from worker.platform.celery_app import app as celery_app

    settings = _settings()
    ensure_schema(settings)
    celery_dispatcher(settings)  # the app must use exactly these settings
    argv = [
        "worker",
        f"--queues={settings.tasks.kube_queue},{CONTROL_QUEUE}",
        "--task-events",
        f"--concurrency={concurrency or settings.tasks.worker_concurrency}",
        f"--loglevel={(loglevel or settings.tasks.log_level)}",
        f"--hostname={hostname}",
        # Nothing here uses worker-to-worker gossip or start-up state sync; without them a
        # worker starts faster and sends fewer broker messages (remote control stays on).
        "--without-mingle",
        "--without-gossip",
    ]
    code = celery_app.start(argv)
    # Warm shutdown has finished every task by now. What is left is billiard's atexit
    # finalizer, which terminates the pool and can block forever on the job queue's lock when
    # a pool child was killed while holding it (celery/billiard#457): a pod would then sit in
    # Terminating until SIGKILL. Flush and leave without running finalizers.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


@app.command("flower")
@_handled
def flower_command(
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option("--address", help="Address to bind.")] = "127.0.0.1",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Start without authentication (trusted host only).")
    ] = False,
) -> None:
    """Start Flower against the workers' broker (basic auth from FLOWER_BASIC_AUTH)."""
    from worker.platform.celery_app import app as celery_app

    if not no_auth and not os.environ.get("FLOWER_BASIC_AUTH"):
        raise CliError(
            "refusing to start Flower without authentication: set FLOWER_BASIC_AUTH=user:password "
            "(Flower reads it from the environment), or pass --no-auth explicitly on a trusted host"
        )
    settings = _settings()
    celery_dispatcher(settings)
    celery_app.start(["flower", f"--port={port}", f"--address={address}"])


@probe_app.command("liveness")
@_handled
def probe_liveness() -> None:
    """Exit 0 when the worker's heartbeat file is fresh (younger than 3 reaper intervals)."""
    settings = _settings()
    path = settings.tasks.heartbeat_file
    limit = 3 * settings.tasks.reaper_interval
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        _fail(f"not alive: no heartbeat file {path} (has the worker started?)", EXIT_FAILED)
    if age > limit:
        _fail(f"not alive: heartbeat {path} is {age:.0f}s old (limit {limit:.0f}s)", EXIT_FAILED)
    _say(f"alive: heartbeat {age:.0f}s old (limit {limit:.0f}s)")


@probe_app.command("readiness")
@_handled
def probe_readiness(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per check.", min=0.1)] = 5.0,
) -> None:
    """Exit 0 when the database answers at the current schema and the broker is reachable."""
    settings = _settings()
    problems = [
        problem
        for problem in (_database_problem(settings), _broker_problem(settings, timeout))
        if problem is not None
    ]
    if problems:
        _fail("not ready: " + "; ".join(problems), EXIT_FAILED)
    _say("ready: database at the current schema, broker reachable")


def _database_problem(settings: Settings) -> str | None:
    """Why the database is not usable by the workers, or None."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from models import migrate
    from worker.platform.db import DatabaseUrlError, make_engine
    from worker.platform.redaction import redact_url

    try:
        engine = make_engine(settings.database.url)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        current, head = migrate.current(settings.database.url), migrate.head()
    except (SQLAlchemyError, DatabaseUrlError, migrate.MigrationError, OSError) as exc:
        return f"database {redact_url(settings.database.url)} unreachable: {exc}"
    if current != head:
        return (
            f"database schema is {current or '(empty)'}, expected {head}: run "
            "`certautopilot migrate`"
        )
    return None


def _broker_problem(settings: Settings, timeout: float) -> str | None:
    """Why the broker cannot be reached, or None."""
    from kombu.connection import Connection
    from kombu.exceptions import KombuError

    from worker.platform.redaction import redact_url

    broker = Connection(  # type: ignore[no-untyped-call]
        settings.broker.url,
        connect_timeout=timeout,
        transport_options={"visibility_timeout": settings.broker.visibility_timeout},
    )
    try:
        broker.ensure_connection(max_retries=1, timeout=timeout)  # type: ignore[no-untyped-call]
    except (KombuError, OSError) as exc:
        return f"broker {redact_url(settings.broker.url)} unreachable: {exc}"
    finally:
        broker.release()  # type: ignore[no-untyped-call]
    return None


@app.command("demo")
@_handled
def demo_command(
    kubeconfig: Annotated[
        list[Path] | None,
        typer.Option(
            "--kubeconfig",
            help="Use your own cluster(s) instead of starting local ones (repeatable; needs "
            "rights to create namespaces; the demo deletes what it created).",
        ),
    ] = None,
) -> None:
    """Show the whole job end to end on throw-away local clusters (or your own)."""
    from worker.cli.demo import run_demo

    code = run_demo(kubeconfigs=list(kubeconfig or []))
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Console-script entry point (``certautopilot``)."""
    app()


if __name__ == "__main__":
    main()
