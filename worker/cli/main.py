"""The operator CLI, ``certautopilot``: the spec's UI flows on the command line.

This module composes the root typer app from the command groups (one module each under
:mod:`worker.cli`); errors, exit codes and the per-command runtime live in
:mod:`worker.cli.errors` and :mod:`worker.cli.context`, rendering in :mod:`worker.cli.output`.
Secret material (kubeconfigs, keys, tokens) is never printed.
"""

from __future__ import annotations

from worker.cli import (
    audit,
    certs,
    credentials,
    demo,
    distributions,
    groups,
    keys,
    meta,
    operations,
    probes,
    runs,
    targets,
)
from worker.cli.common import new_typer

__all__ = ["app", "main"]

app = new_typer(
    "CertAutoPilot Kubernetes distribution worker: deploy TLS certificates as "
    "kubernetes.io/tls Secrets into one or many clusters.\n\n"
    "\b\nExamples:\n"
    "  certautopilot certs import --cert tls.crt --key tls.key --chain chain.pem\n"
    "  certautopilot targets add edge --namespace ingress --kubeconfig-credential prod\n"
    "  certautopilot distributions attach CERT_ID --target edge --store-content\n"
    "  certautopilot run DIST --dry-run\n"
    "  certautopilot audit --all\n"
    "  certautopilot runs list -o name | head -1 | xargs certautopilot runs show",
    name="certautopilot",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback()(meta.root_options)
for _name, _group in (
    ("credentials", credentials.app),
    ("certs", certs.app),
    ("targets", targets.app),
    ("groups", groups.app),
    ("distributions", distributions.app),
    ("runs", runs.app),
    ("keys", keys.app),
    ("probe", probes.app),
):
    app.add_typer(_group, name=_name)
app.command("run")(runs.run)
app.command("rollback")(runs.rollback)
app.command("audit")(audit.audit)
app.command("migrate")(operations.migrate)
app.command("worker")(operations.worker)
app.command("flower")(operations.flower)
app.command("demo")(demo.demo)
app.command("version")(meta.version)
app.command("completion")(meta.completion)


def main() -> None:
    """Console-script entry point (``certautopilot``)."""
    import os

    if os.environ.get(meta.COMPLETE_VAR):
        # A completion script is asking (see `certautopilot completion`): typer answers it
        # once its shell classes are registered, which add_completion=False leaves undone.
        from typer._completion_classes import completion_init

        completion_init()
    app()


if __name__ == "__main__":
    main()
