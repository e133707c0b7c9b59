"""``certautopilot certs``: import, list and renew certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from worker.cli.common import OutputOption, list_rows, new_typer, now, say
from worker.cli.context import runtime
from worker.cli.errors import handled
from worker.cli.inputs import read_optional
from worker.cli.output import OutputFormat, emit, format_time, plain
from worker.core.limits import PEM_FILE

app = new_typer("Certificates: import, list, renew.")


@app.command("import")
@handled
def import_(
    cert: Annotated[
        Path,
        typer.Option("--cert", help="Leaf certificate PEM (may hold the chain); - for stdin."),
    ],
    key: Annotated[Path, typer.Option("--key", help="Private key PEM; - for stdin.")],
    chain: Annotated[
        Path | None, typer.Option("--chain", help="Intermediates PEM; - for stdin.")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="Issuing root CA PEM; - for stdin.")
    ] = None,
    allow_expired: Annotated[
        bool, typer.Option("--allow-expired", help="Accept an expired certificate.")
    ] = False,
    allow_duplicate: Annotated[
        bool,
        typer.Option("--allow-duplicate", help="Store a second copy of a leaf already stored."),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Import a certificate with its key (the key is stored encrypted).

    A leaf that is already stored is refused (its id is named) unless --allow-duplicate.

    \b
    Examples:
      certautopilot certs import --cert tls.crt --key tls.key --chain chain.pem
      vault read -field=key pki/cert/shop | certautopilot certs import --cert tls.crt --key -
    """
    from worker.app.service import get_certificate, import_certificate
    from worker.cli.files import one_stdin, read_file

    one_stdin({"--cert": cert, "--key": key, "--chain": chain, "--ca": ca})
    cert_pem, key_pem = read_file(cert, PEM_FILE), read_file(key, PEM_FILE)
    with runtime() as rt:
        certificate_id = import_certificate(
            rt,
            cert_pem,
            key_pem,
            read_optional(chain) or b"",
            read_optional(ca),
            allow_expired=allow_expired,
            allow_duplicate=allow_duplicate,
        )
        view = get_certificate(rt, certificate_id)
    if output.machine:
        emit(output, view)
        return
    say(
        f"imported certificate {view.id}\n"
        f"  CN:        {view.common_name or '(none; SANs only)'}\n"
        f"  SANs:      {', '.join(view.sans) or '(none)'}\n"
        f"  serial:    {view.serial}\n"
        f"  not after: {format_time(view.not_after)} ({view.days_left(now())} days left)"
    )


def _days_left_text(days: int) -> Text:
    if days < 0:
        return plain(f"expired {-days} day(s) ago", style="bold red")
    return plain(str(days), style="yellow" if days < 30 else "green")


@app.command("list")
@handled
def list_(output: OutputOption = OutputFormat.TABLE) -> None:
    """List certificates with their expiry."""
    from worker.app.service import list_certificates

    moment = now()
    list_rows(
        output,
        list_certificates,
        ("id", "CN", "SANs", "serial", "not after", "days left"),
        lambda row: (
            row.id,
            row.common_name or "-",
            ", ".join(row.sans),
            row.serial,
            format_time(row.not_after),
            _days_left_text(row.days_left(moment)),
        ),
    )


@app.command("renew")
@handled
def renew(
    certificate_id: Annotated[str, typer.Argument(help="Id of the certificate to renew.")],
    cert: Annotated[
        Path, typer.Option("--cert", help="Renewed leaf certificate PEM; - for stdin.")
    ],
    key: Annotated[Path, typer.Option("--key", help="Its private key PEM; - for stdin.")],
    chain: Annotated[
        Path | None, typer.Option("--chain", help="Intermediates PEM; - for stdin.")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="Issuing root CA PEM; - for stdin.")
    ] = None,
    allow_name_change: Annotated[
        bool,
        typer.Option(
            "--allow-name-change",
            help="Accept a renewal that shares no name (CN/SAN) with the current certificate.",
        ),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Replace a certificate with its renewal; its distributions deliver the new one.

    A renewal whose names (CN and SANs) share none with the current certificate is refused
    unless --allow-name-change; names added or dropped are shown.

    \b
    Examples:
      certautopilot certs renew CERT_ID --cert new.crt --key new.key --chain chain.pem
      certautopilot run DIST --dry-run    # then see what the renewal changes
    """
    from worker.app.service import get_certificate, list_distributions, renew_certificate
    from worker.cli.files import one_stdin, read_file
    from worker.core.bundle import certificate_names, name_change

    one_stdin({"--cert": cert, "--key": key, "--chain": chain, "--ca": ca})
    pems = {"cert": read_file(cert, PEM_FILE), "key": read_file(key, PEM_FILE)}
    for name, path in (("chain", chain), ("ca", ca)):
        if path is not None:
            pems[name] = read_file(path, PEM_FILE)
    with runtime() as rt:
        before = get_certificate(rt, certificate_id)
        renew_certificate(rt, certificate_id, pems, allow_name_change=allow_name_change)
        after = get_certificate(rt, certificate_id)
        distributions = list_distributions(rt, certificate_id)
    if output.machine:
        emit(output, {"before": before, "after": after})
        return
    say(
        f"renewed certificate {after.id}: serial {before.serial} -> {after.serial}, not after "
        f"{format_time(before.not_after)} -> {format_time(after.not_after)}"
    )
    if before.has_ca and ca is None:
        say(
            "  CA: kept (the renewal is issued under the stored CA)"
            if after.has_ca
            else "  CA: dropped: the renewal is not issued under the stored CA; renew with --ca "
            "if targets include ca.crt"
        )
    names = name_change(
        certificate_names(before.common_name, before.sans),
        certificate_names(after.common_name, after.sans),
    )
    if names.changed:
        added = [f"+{name}" for name in names.added]
        say("  names: " + " ".join([*added, *(f"-{name}" for name in names.removed)]))
    for distribution in distributions:
        if distribution.kind == "kubernetes":
            say(
                f"  see the change: certautopilot run {distribution.id} --dry-run "
                f"({distribution.destination})"
            )
