"""``certautopilot keys``: key-encryption keys (KEKs) for the encrypted secrets."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from worker.cli.common import new_typer, now, say
from worker.cli.context import runtime
from worker.cli.errors import CliError, handled
from worker.cli.output import make_console

app = new_typer("Key-encryption keys (KEKs) for the encrypted secrets.")


@app.command("generate")
@handled
def generate(
    key_id: Annotated[
        str | None, typer.Option("--id", help="Key id for the new KEK (default kYYYYMMDD).")
    ] = None,
) -> None:
    """Print a fresh KEK line 'id:base64' for CAP_KEK or CAP_KEK_FILE."""
    from worker.core.crypto import generate_kek, is_valid_key_id

    chosen = key_id or f"k{now():%Y%m%d}"
    if not is_valid_key_id(chosen):
        raise CliError(f"key id {chosen!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'")
    sys.stdout.write(f"{chosen}:{generate_kek()}\n")
    make_console(stderr=True).print(
        "Add this line to CAP_KEK (comma-separated) or CAP_KEK_FILE on every worker, set "
        f"CAP_KEK_CURRENT={chosen}, restart, then run `certautopilot keys rotate --to {chosen}`. "
        "Keep the old key loaded until the rotation finished."
    )


@app.command("rotate")
@handled
def rotate(
    to: Annotated[str, typer.Option("--to", help="Key id to re-wrap every stored secret with.")],
) -> None:
    """Re-wrap every stored secret's data key under another KEK (resumable)."""
    from worker.app.service import rotate_keys

    with runtime() as rt:
        count, usage = rotate_keys(rt, to)
    say(f"re-wrapped {count} secret(s) under KEK {to!r}")
    say("envelopes per KEK now: " + (", ".join(f"{k}: {n}" for k, n in usage.items()) or "none"))
