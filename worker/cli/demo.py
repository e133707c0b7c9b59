"""``certautopilot demo``: where to find the demo, which is not part of the installed package.

The demo starts throw-away Kubernetes API servers from the source checkout's test environment
and drives this CLI end to end; it lives in the checkout (``demo/``, run by
``bash scripts/demo``), so installed code never reaches into a repository or imports tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli.errors import CliError, handled

DEMO_HOWTO = (
    "the demo is not part of the installed package: it runs from a clone of the project's "
    "source repository, where it starts two throw-away local Kubernetes API servers and drives "
    "this CLI end to end. In a clone, run `bash scripts/demo` (it installs what it needs; "
    "`bash scripts/demo --kubeconfig FILE` uses your own clusters instead)."
)


@handled
def demo(
    kubeconfig: Annotated[
        list[Path] | None,
        typer.Option(
            "--kubeconfig",
            help="Your own cluster(s) for the demo (repeatable); see `bash scripts/demo`.",
        ),
    ] = None,
) -> None:
    """Say how to run the demo (`bash scripts/demo` in a clone of the source repository)."""
    raise CliError(DEMO_HOWTO)
