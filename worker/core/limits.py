"""Size limits for every kind of untrusted input, in one place (pure).

Everything an operator or the scheduler hands in is untrusted. Each input is measured
*before* it is parsed, and refused with :class:`InputTooLarge` (a ``ValueError``; the CLI
exits 2 and nothing is stored) naming the input, the limit and the size seen. Parsing cost
is what the limits protect: a kubeconfig is parsed by a pure-Python YAML parser, about
0.3 s per 200 KiB on a busy core, and a stored credential is parsed again by every worker
that uses it. A 20 MB kubeconfig took 21 s and 330 MiB to store before these limits.

Each limit leaves a wide margin over real inputs:

================  ============  ===========================================================
input             limit         why
================  ============  ===========================================================
kubeconfig        256 KiB       a kubeconfig with a few clusters is a few KiB; 256 KiB holds
                                about 45 contexts with inline RSA client certificates. Only
                                the selected context is stored (``kube.connect``), so a big
                                input costs once, at ``credentials add-kubeconfig``.
PEM file          256 KiB       certificate, chain, key or CA: a certificate is 1-2 KiB (8
                                KiB with a hundred SANs), a chain a few KiB, and a chain has
                                at most 32 certificates (``bundle.MAX_CERTIFICATES``).
bundle            512 KiB       certificate + chain + key + CA together. Kubernetes caps a
                                Secret at 1 MiB; a bundle within half of that always fits the
                                Secret it becomes (its PEM is re-encoded, never larger).
template          1024 chars    a namespace or Secret-name template is a one-liner; the
                                names it renders are at most 63 / 253 characters.
variable value    1024 chars    a target or group variable ends up in a name of at most 253
                                characters.
webhook URL       2048 chars    real webhook URLs are under 300 characters; 2048 is what
                                every HTTP server and proxy accepts.
webhook secret    1 KiB         an HMAC key needs 32-64 random bytes.
PKCS#12 password  1 KiB         a keystore password is 6-64 printable characters.
================  ============  ===========================================================

Kubeconfig YAML is further bounded in shape (``kube.connect`` enforces these while parsing):
at most :data:`YAML_MAX_DEPTH` levels of nesting (a kubeconfig needs 7) and
:data:`YAML_MAX_NODES` nodes (100 contexts need about 2,000).
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "BUNDLE",
    "KUBECONFIG",
    "MAX_NAME_LENGTH",
    "PEM_FILE",
    "PKCS12_PASSWORD",
    "TEMPLATE",
    "VARIABLE_VALUE",
    "WEBHOOK_SECRET",
    "WEBHOOK_URL",
    "YAML_MAX_DEPTH",
    "YAML_MAX_NODES",
    "InputTooLarge",
    "InvalidName",
    "Limit",
    "check_name",
    "check_size",
]

KiB: Final = 1024


@dataclass(frozen=True)
class Limit:
    """The largest accepted size of one kind of input, and how an operator gets under it."""

    kind: str  # "kubeconfig", "PEM file", ... (how messages name the kind)
    maximum: int
    unit: Literal["bytes", "characters"]
    fix: str

    def describe(self) -> str:
        """The limit as people read it: ``256 KiB`` or ``1024 characters``."""
        return _amount(self.maximum, self.unit)


KUBECONFIG: Final = Limit(
    "kubeconfig",
    256 * KiB,
    "bytes",
    "export only the context this credential is for: "
    "`kubectl config view --minify --flatten --raw --context <name>`",
)
PEM_FILE: Final = Limit(
    "PEM file",
    256 * KiB,
    "bytes",
    "supply only the PEM blocks this input needs (the leaf, its intermediates, its key)",
)
BUNDLE: Final = Limit(
    "certificate bundle (certificate, chain, key and CA together)",
    512 * KiB,
    "bytes",
    "supply the leaf, its own intermediates, its key and at most its root, nothing else",
)
TEMPLATE: Final = Limit(
    "template",
    1024,
    "characters",
    'a name template is one line, e.g. \'{{ .cn | replaceAll "." "-" }}-tls\'',
)
VARIABLE_VALUE: Final = Limit(
    "variable value",
    1024,
    "characters",
    "a variable is a piece of a name (at most 253 characters); shorten it",
)
WEBHOOK_URL: Final = Limit(
    "webhook URL",
    2048,
    "characters",
    "use a shorter URL; put secrets in the webhook secret credential, not in the URL",
)
WEBHOOK_SECRET: Final = Limit(
    "webhook secret",
    1 * KiB,
    "bytes",
    "use 32-64 random bytes, e.g. `openssl rand -hex 32`",
)
PKCS12_PASSWORD: Final = Limit(
    "PKCS#12 password",
    1 * KiB,
    "bytes",
    "use 16-64 random printable characters, e.g. `openssl rand -base64 24`",
)

YAML_MAX_DEPTH: Final = 20
"""Nesting levels accepted in a kubeconfig (a kubeconfig with an exec env list needs 7)."""

YAML_MAX_NODES: Final = 10_000
"""YAML nodes (scalars, lists, mappings) accepted in a kubeconfig (100 contexts: ~2,000)."""


class InputTooLarge(ValueError):
    """An input is larger than its :class:`Limit`; it was refused before being parsed.

    Attributes: ``input_name`` (what was refused, e.g. "kubeconfig file ./big.yaml"),
    ``limit`` and ``size`` (``None`` when only "more than the limit" is known, e.g. a pipe
    that was read no further than the limit).
    """

    def __init__(self, input_name: str, limit: Limit, size: int | None) -> None:
        self.input_name = input_name
        self.limit = limit
        self.size = size
        seen = (
            f"more than {limit.maximum} {limit.unit}"
            if size is None
            else f"{size} {limit.unit}"
            + (f" ({_amount(size, limit.unit)})" if limit.unit == "bytes" and size >= KiB else "")
        )
        super().__init__(
            f"{input_name} is {seen}; the limit for a {limit.kind} is {limit.describe()}. "
            f"Fix: {limit.fix}"
        )


def check_size(limit: Limit, value: Sized, input_name: str | None = None) -> None:
    """Refuse ``value`` (bytes are counted in bytes, text in characters) when over ``limit``.

    Text measured against a byte limit is counted in characters first (cheap, never more
    than its UTF-8 size) and encoded only when that count is within the limit.
    """
    size = len(value)
    if size <= limit.maximum and limit.unit == "bytes" and isinstance(value, str):
        size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit.maximum:
        raise InputTooLarge(input_name or f"the {limit.kind}", limit, size)


def _amount(size: int, unit: str) -> str:
    if unit != "bytes":
        return f"{size} {unit}"
    if size >= KiB * KiB and size % (KiB * KiB) == 0:
        return f"{size // (KiB * KiB)} MiB"
    if size >= KiB * KiB:
        return f"{size / (KiB * KiB):.1f} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    if size >= KiB:
        return f"{size / KiB:.1f} KiB"
    return f"{size} bytes"


#: Longest name of a credential, target or group: a Kubernetes object name's limit, ample for
#: anything an operator types, and short enough to show in a table.
MAX_NAME_LENGTH: Final = 253


class InvalidName(ValueError):
    """A credential, target or group name an operator could not type back or read."""


def check_name(kind: str, name: str) -> None:
    """Refuse an empty or over-long name, or one with control characters or line breaks.

    Names are how operators address things on the command line; one holding an escape
    sequence or a newline could not be typed back from what the CLI shows.
    """
    if not name.strip():
        raise InvalidName(f"the {kind} name is empty; give it a name such as 'prod-eu'")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"the {kind} name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}"
        )
    if not name.isprintable() or name != name.strip():
        raise InvalidName(
            f"the {kind} name {name!r} has control characters, line breaks or surrounding "
            "spaces; use letters, digits and punctuation that can be typed back"
        )
