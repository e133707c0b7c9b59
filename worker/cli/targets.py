"""``certautopilot targets``: one cluster + namespace each, with their health check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from worker.cli.common import OutputOption, list_rows, new_typer, print_table, say
from worker.cli.context import runtime
from worker.cli.errors import EXIT_FAILED, CliError, handled
from worker.cli.inputs import variables
from worker.cli.output import OutputFormat, emit, format_time, plain

if TYPE_CHECKING:
    from worker.app.pools import HealthSender
    from worker.platform.runtime import Runtime

app = new_typer("Kubernetes targets: one cluster + namespace each.")


CheckTimeoutOption = Annotated[
    float,
    typer.Option(
        "--check-timeout",
        min=0.1,
        help="Seconds to wait for a worker of the target's pool to run the health check, when "
        "the pool is not this process's.",
    ),
]


@app.command("add")
@handled
def add(
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
    allow_system_namespace: Annotated[
        bool,
        typer.Option(
            "--allow-system-namespace",
            help="Allow kube-system, kube-public or kube-node-lease as the namespace.",
        ),
    ] = False,
    pool: Annotated[
        str,
        typer.Option(
            "--pool",
            help="Worker pool that processes the target (CAP_WORKER_POOL of workers that reach "
            "its cluster; for --in-cluster, a pool running in that cluster).",
        ),
    ] = "default",
    combined_pem: Annotated[
        bool,
        typer.Option(
            "--combined-pem",
            help="Also write tls-combined.pem (key + leaf + chain, for HAProxy and similar).",
        ),
    ] = False,
    pkcs12_password_credential: Annotated[
        str | None,
        typer.Option(
            "--pkcs12-password-credential",
            help="Also write keystore.p12 (PKCS#12 for Java, alias 'tls') encrypted with the "
            "password in this credential (see `credentials add-pkcs12-password`).",
        ),
    ] = None,
    verify_serving: Annotated[
        list[str] | None,
        typer.Option(
            "--verify-serving",
            help="After an execute, probe HOST:PORT[,sni=NAME] with a TLS handshake until it "
            "presents the new certificate (repeatable; default SNI: the certificate's CN or "
            "first DNS SAN).",
        ),
    ] = None,
    serving_deadline: Annotated[
        str | None,
        typer.Option(
            "--serving-deadline",
            help="How long to wait per endpoint for the new certificate: 120, 90s, 2m "
            "(default 120s, covering kubelet's ~60s sync).",
        ),
    ] = None,
    serving_ca: Annotated[
        str | None,
        typer.Option(
            "--serving-ca",
            help="Also check the served chain: a PEM file of CA certificates (- for stdin), or "
            "'own-chain' for the certificate's own chain and CA.",
        ),
    ] = None,
    serving_public_only: Annotated[
        bool,
        typer.Option(
            "--serving-public-only",
            help="Refuse endpoints that are, or resolve to, loopback, private or link-local "
            "addresses.",
        ),
    ] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the health check.")] = False,
    check_timeout: CheckTimeoutOption = 30.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Save a Kubernetes target, then run its health check (reads the namespace) on a worker
    of its pool (here, when the pool is this process's CAP_WORKER_POOL).

    \b
    Examples:
      certautopilot targets add edge-eu --namespace ingress --kubeconfig-credential prod-eu
      certautopilot targets add tenant --namespace '{{ .tenant }}-edge' --var tenant=acme \\
        --kubeconfig-credential prod-eu --adopt-unmanaged
      certautopilot targets add java-app --namespace apps --kubeconfig-credential prod-eu \\
        --combined-pem --pkcs12-password-credential java-ks
      certautopilot targets add edge-eu --namespace ingress --kubeconfig-credential prod-eu \\
        --verify-serving lb.eu.example.net:443,sni=shop.example.com --serving-deadline 2m
    """
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
        allow_system_namespace=allow_system_namespace,
        variables=variables(var),
        pool=pool,
        combined_pem=combined_pem,
        pkcs12_password_credential=pkcs12_password_credential,
        verify_serving=tuple(verify_serving or ()),
        serving_deadline=serving_deadline,
        serving_ca=_serving_ca(serving_ca),
        serving_public_only=serving_public_only,
    )
    with runtime() as rt:
        target_id, result = create_target(
            rt,
            spec,
            check=not no_check,
            sender=_health_sender(rt),
            check_timeout=check_timeout,
        )
        view = get_target(rt, target_id)
    if output.machine:
        emit(output, view)
    else:
        say(f"saved target {view.name!r} (id {view.id}, pool {view.pool!r})")
        if no_check:
            say(f"  health: not checked (--no-check); run `certautopilot targets check {name}`")
        elif result is not None and result.status == "unknown":
            _print_health(result.status, result.message, name)
        else:
            _print_health(view.health_status, view.health_message, name)
    # Saved either way (the operator may fix RBAC afterwards), but a script must notice a
    # check that failed, as with `targets check`. "unknown" (no worker of the pool answered
    # yet) is not a finding: adding targets before their pool's workers run is normal.
    if result is not None and result.status == "unhealthy":
        raise typer.Exit(EXIT_FAILED)


def _serving_ca(option: str | None) -> str | None:
    """``--serving-ca``: 'own-chain' as is, else the PEM file's text (size-limited read)."""
    from worker.cli.files import read_file
    from worker.core.limits import PEM_FILE
    from worker.core.serving import OWN_CHAIN

    if option is None or option == OWN_CHAIN:
        return option
    data = read_file(Path(option), PEM_FILE)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(
            f"--serving-ca {option}: not PEM text; give a file of PEM CA certificates"
        ) from None


def _yes_no(value: bool) -> str:
    """Tables show words (like kubectl describe), not Python's True/False."""
    return "yes" if value else "no"


def _health_sender(rt: Runtime) -> HealthSender:
    """Health checks of another pool's targets are sent as tasks through the broker."""
    from tasks.distribution import CeleryDispatcher
    from worker.cli.context import celery_dispatcher

    sender = celery_dispatcher(rt.settings)
    assert isinstance(sender, CeleryDispatcher)
    return sender


def _print_health(status: str, message: str | None, name: str) -> None:
    style = "green" if status == "healthy" else "bold red"
    say(Text.assemble("  health: ", plain(status, style=style), " — ", plain(message or "")))
    if status != "healthy":
        say(f"  fix the cause above, then run `certautopilot targets check {name}`")


@app.command("list")
@handled
def list_(output: OutputOption = OutputFormat.TABLE) -> None:
    """List targets with their connection and last health check.

    \b
    Examples:
      certautopilot targets list
      certautopilot targets list -o name
    """
    from worker.app.service import list_targets

    list_rows(
        output,
        list_targets,
        ("name", "connection", "pool", "namespace", "secret name", "health", "groups"),
        lambda row: (
            row.name,
            (row.credential if row.connection_mode == "kubeconfig" else "in-cluster") or "-",
            row.pool,
            row.namespace,
            row.secret_name,
            row.health_status,
            ", ".join(row.groups),
        ),
    )


@app.command("show")
@handled
def show(
    name: Annotated[str, typer.Argument(help="Target name or id.")],
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Show one target.

    \b
    Examples:
      certautopilot targets show edge-eu -o yaml
    """
    from worker.app.service import get_target
    from worker.core.serving import describe_deadline

    with runtime() as rt:
        view = get_target(rt, name)
    if output.machine:
        emit(output, view)
        return
    table = Table(show_header=False, box=None)
    for label, value in (
        ("name", view.name),
        ("id", view.id),
        ("connection", view.connection_mode),
        ("credential", view.credential or "-"),
        ("namespace", view.namespace),
        ("secret name", view.secret_name),
        ("include ca.crt", _yes_no(view.include_ca)),
        ("tls-combined.pem", _yes_no(view.combined_pem)),
        (
            "keystore.p12",
            f"password from credential {view.pkcs12_password_credential!r}"
            if view.pkcs12_password_credential
            else "no",
        ),
        ("adopt unmanaged", _yes_no(view.adopt_unmanaged)),
        ("allow system namespace", _yes_no(view.allow_system_namespace)),
        ("allow insecure", _yes_no(view.allow_insecure)),
        ("variables", ", ".join(f"{k}={v}" for k, v in view.variables.items()) or "-"),
        ("groups", ", ".join(view.groups) or "-"),
        ("pool", view.pool),
        ("verify serving", ", ".join(view.verify_serving) or "-"),
        *(
            (
                ("serving deadline", describe_deadline(view.serving_deadline_seconds)),
                ("serving CA", view.serving_ca or "- (fingerprint only)"),
                ("serving public only", _yes_no(view.serving_public_only)),
            )
            if view.verify_serving
            else ()
        ),
        ("cluster", _cluster(view.connection_mode, view.cluster_identity)),
        ("health", f"{view.health_status} ({format_time(view.health_checked_at)})"),
        ("health message", view.health_message or "-"),
    ):
        table.add_row(label, plain(value))
    print_table(table)


def _cluster(connection_mode: str, identity: str | None) -> str:
    if connection_mode != "in_cluster":
        return "from the kubeconfig"
    return identity or "not recorded yet (the first health check or run in its pool records it)"


@app.command("check")
@handled
def check(
    name: Annotated[str, typer.Argument(help="Target name or id.")],
    record_cluster: Annotated[
        bool,
        typer.Option(
            "--record-cluster",
            help="In-cluster: record the cluster the pool's worker runs in as the target's "
            "(after the cluster's CA was rotated); otherwise a different one is refused.",
        ),
    ] = False,
    check_timeout: CheckTimeoutOption = 30.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Run the health check: namespace readable, get/create/update/patch on secrets allowed
    (on a worker of the target's pool when that is not this process's pool)."""
    from worker.app.commands import check_target_health_in_pool
    from worker.app.service import get_target

    with runtime() as rt:
        target = get_target(rt, name)
        if record_cluster and target.connection_mode != "in_cluster":
            raise CliError(
                f"--record-cluster applies to in-cluster targets; {target.name!r} connects with "
                "a kubeconfig, whose server names its cluster (run the check without it)"
            )
        result = check_target_health_in_pool(
            rt,
            target.id,
            sender=_health_sender(rt),
            timeout=check_timeout,
            record_cluster=record_cluster,
        )
    if output.machine:
        emit(
            output,
            {
                "target": target.name,
                "status": result.status,
                "message": result.message,
                "report": result.report.to_dict() if result.report else None,
            },
        )
    else:
        say(f"target {target.name!r}:")
        _print_health(result.status, result.message, target.name)
    if result.status != "healthy":
        raise typer.Exit(EXIT_FAILED)
