"""``certautopilot credentials``: kubeconfigs and webhook secrets, stored encrypted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import OutputOption, list_rows, new_typer, say
from worker.cli.context import runtime
from worker.cli.errors import handled
from worker.cli.inputs import read_input
from worker.cli.output import OutputFormat, format_time
from worker.core.limits import KUBECONFIG, PKCS12_PASSWORD, WEBHOOK_SECRET

app = new_typer("Module credentials: kubeconfigs, webhook secrets and PKCS#12 passwords.")


@app.command("add-kubeconfig")
@handled
def add_kubeconfig(
    name: Annotated[str, typer.Argument(help="Credential name, e.g. prod-eu-1.")],
    file: Annotated[
        Path | None, typer.Option("--file", help="Kubeconfig file; - for stdin.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the kubeconfig from stdin.")] = False,
) -> None:
    """Store a kubeconfig (encrypted). exec, auth-provider and file paths are refused.

    \b
    Examples:
      certautopilot credentials add-kubeconfig prod-eu-1 --file ~/.kube/prod-eu-1.yaml
      kubectl config view --minify --flatten --raw | \\
        certautopilot credentials add-kubeconfig prod-eu-1 --file -
    """
    from worker.app.service import add_kubeconfig_credential

    kubeconfig = read_input(file, stdin, "kubeconfig", KUBECONFIG)
    with runtime() as rt:
        credential_id = add_kubeconfig_credential(rt, name, kubeconfig)
        key_id = rt.keyring.current_key_id
    say(f"stored kubeconfig credential {name!r} (id {credential_id}), encrypted with KEK {key_id}")


@app.command("add-webhook-secret")
@handled
def add_webhook_secret(
    name: Annotated[str, typer.Argument(help="Credential name.")],
    file: Annotated[
        Path | None, typer.Option("--file", help="File holding the secret; - for stdin.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the secret from stdin.")] = False,
) -> None:
    """Store an HMAC secret for signing webhook notifications (trailing newline dropped)."""
    from worker.app.service import add_webhook_secret as store

    secret = read_input(file, stdin, "webhook secret", WEBHOOK_SECRET).rstrip(b"\r\n")
    with runtime() as rt:
        credential_id = store(rt, name, secret)
    say(f"stored webhook secret {name!r} (id {credential_id})")


@app.command("add-pkcs12-password")
@handled
def add_pkcs12_password(
    name: Annotated[str, typer.Argument(help="Credential name, e.g. java-keystore.")],
    file: Annotated[
        Path | None, typer.Option("--file", help="File holding the password; - for stdin.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Store the password of PKCS#12 keystores (keystore.p12) written for Java consumers.

    At least 6 printable ASCII characters (trailing newline dropped). Targets name it with
    `targets add --pkcs12-password-credential NAME`.

    \b
    Examples:
      openssl rand -base64 24 | certautopilot credentials add-pkcs12-password java-ks --stdin
    """
    from worker.app.service import add_pkcs12_password as store

    password = read_input(file, stdin, "PKCS#12 password", PKCS12_PASSWORD).rstrip(b"\r\n")
    with runtime() as rt:
        credential_id = store(rt, name, password)
    say(f"stored PKCS#12 password {name!r} (id {credential_id})")


@app.command("list")
@handled
def list_(output: OutputOption = OutputFormat.TABLE) -> None:
    """List credentials (names and kinds only; contents are never shown)."""
    from worker.app.service import list_credentials

    list_rows(
        output,
        list_credentials,
        ("name", "kind", "KEK", "created", "id"),
        lambda row: (row.name, row.kind, row.key_id, format_time(row.created_at), row.id),
    )
