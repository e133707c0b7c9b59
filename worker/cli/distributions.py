"""``certautopilot distributions``: attach certificates to targets, groups or webhooks."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.common import OutputOption, list_rows, new_typer, say
from worker.cli.context import runtime
from worker.cli.errors import CliError, handled
from worker.cli.output import OutputFormat, emit, plain

app = new_typer("Attach certificates to targets, groups or webhooks.")


@app.command("attach")
@handled
def attach(
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
    allow_duplicate: Annotated[
        bool,
        typer.Option(
            "--allow-duplicate",
            help="Attach even if the certificate is already attached to this target or group.",
        ),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Attach a certificate to a target or a group (a Kubernetes distribution).

    Attaching it a second time to the same target or group is refused (the existing
    distribution is named) unless --allow-duplicate.

    \b
    Examples:
      certautopilot distributions attach CERT_ID --group fleet --store-content
      certautopilot distributions attach CERT_ID --target edge-eu -o name
    """
    from worker.app.service import attach as attach_certificate
    from worker.app.service import get_distribution

    if (target is None) == (group is None):
        raise CliError("attach to exactly one of --target NAME or --group NAME")
    with runtime() as rt:
        distribution_id = attach_certificate(
            rt,
            certificate_id,
            target=target,
            group=group,
            store_content=store_content,
            allow_duplicate=allow_duplicate,
        )
        view = get_distribution(rt, distribution_id)
    if output.machine:
        emit(output, view)
        return
    say(
        f"attached certificate {certificate_id} to {view.destination}: distribution {view.id}\n"
        f"  store content for rollback: {'ON' if store_content else 'OFF (rollback unavailable)'}\n"
        f"  next: certautopilot run {view.id} --dry-run"
    )


@app.command("attach-webhook")
@handled
def attach_webhook(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id.")],
    url: Annotated[str, typer.Option("--url", help="Where to POST the outcome (https://...).")],
    secret: Annotated[
        str | None, typer.Option("--secret", help="Webhook-secret credential for HMAC signing.")
    ] = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Stack a webhook after the certificate's distributions (fires after they succeed)."""
    from worker.app.service import attach_webhook as stack_webhook
    from worker.app.service import get_distribution

    with runtime() as rt:
        distribution_id = stack_webhook(rt, certificate_id, url, secret=secret)
        view = get_distribution(rt, distribution_id)
    if output.machine:
        emit(output, view)
        return
    say(
        f"stacked webhook {url} as distribution {view.id} (position {view.position}); it fires "
        "after the earlier distributions of the certificate succeed"
    )


@app.command("list")
@handled
def list_(
    cert: Annotated[str | None, typer.Option("--cert", help="Only this certificate's.")] = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """List distributions in stacking order, with the rollback button's state.

    \b
    Examples:
      certautopilot distributions list --cert CERT_ID
    """
    from worker.app.service import list_distributions

    list_rows(
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
            "available" if row.rollback_available else plain("unavailable", style="dim"),
        ),
    )
