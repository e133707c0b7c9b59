"""Render and validate namespace and Secret-name templates (pure).

Two dialects are accepted, even mixed in one template:

* Go-template style, as the spec writes it: ``{{ .cn | replaceAll "." "-" }}-tls``,
  ``{{ .tenant }}-edge``, ``{{ lower .cn }}``, ``{{ .tenant | default "acme" }}``. Arguments are
  space-separated and, as in Go/sprig, the piped value is the *last* argument. Each ``{{ ... }}``
  action is tokenised and translated into a Jinja2 expression (``.cn`` becomes ``cn``, string
  literals are re-quoted); nothing is evaluated during translation.
* Plain Jinja2: ``{{ cn | replace(".", "-") }}-tls``.

Templates render in a sandboxed Jinja2 environment with strict undefined variables, a small
allowlist of filters (``replace``/``replaceAll``, ``lower``, ``upper``, ``trimPrefix``,
``trimSuffix``, ``trunc``, ``default`` and a few harmless Jinja built-ins), no globals, no
loops, macros or assignments (``{% if %}`` is fine), limits on template, value and output length
and on integer sizes, and no string methods or formatting that allocate arbitrarily
(``center``, ``format``, ``%``...): a name template cannot hang or exhaust the worker. Templates
and variable values are measured against :mod:`worker.core.limits` (``TEMPLATE``,
``VARIABLE_VALUE``) before anything else, and refused with ``InputTooLarge``.

``default`` follows sprig: an undefined, None or empty value takes the fallback. A variable used
only through ``default`` is optional at save time.

Results are stripped of surrounding whitespace and validated the way the Kubernetes API server
validates them: a namespace is an RFC 1123 label (``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63
characters), a Secret name an RFC 1123 subdomain (labels as above joined by dots, at most 253).

Certificate variables (see :func:`certificate_variables`):

* ``cn`` is the DNS-name form of the certificate's common name (or its first SAN when it has no
  CN): lower-cased (DNS is case-insensitive) and with every ``*`` label replaced by
  ``wildcard``, so ``*.Example.com`` gives ``cn = "wildcard.example.com"`` and the default
  Secret-name template yields ``wildcard-example-com-tls``. ``cn_raw`` keeps the original.
* ``sans`` / ``sans_raw`` the same for the subject alternative names (lists).
* ``serial``, ``issuer``, ``subject``, ``fingerprint``, ``key_type`` as in CertificateInfo;
  ``not_before`` / ``not_after`` as ``YYYY-MM-DD`` dates (usable in names).

Target and group variables are merged in by :func:`template_variables`; they may not reuse a
certificate variable's name.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.core.bundle import CertificateInfo
from worker.core.limits import TEMPLATE, VARIABLE_VALUE, check_size

DEFAULT_SECRET_NAME_TEMPLATE: Final = '{{ .cn | replaceAll "." "-" }}-tls'  # noqa: S105 - a name

MAX_RENDERED_LENGTH: Final = 4096
"""Rendering stops with an error past this many characters (any valid name is <= 253)."""

CERTIFICATE_VARIABLES: Final = (
    "cn",
    "cn_raw",
    "sans",
    "sans_raw",
    "serial",
    "issuer",
    "subject",
    "not_before",
    "not_after",
    "fingerprint",
    "key_type",
)
"""Names certificate_variables() provides; target/group variables may not reuse them."""

Field = Literal["namespace", "secret name"]
_LIMITS: Final[dict[str, int]] = {"namespace": 63, "secret name": 253}

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_RE: Final = re.compile(rf"{_LABEL}\Z")
_SUBDOMAIN_RE: Final = re.compile(rf"{_LABEL}(\.{_LABEL})*\Z")
_IDENTIFIER_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(ValueError):
    """A namespace or Secret-name template is invalid or renders to an invalid name.

    Attributes: ``template`` (the template text), ``field`` ("namespace" or "secret name"),
    ``problem`` (which variable or rule broke, and how to fix it) and ``value`` (the rendered
    value, or None when rendering did not get that far).
    """

    def __init__(self, template: str, field: str, problem: str, value: str | None = None) -> None:
        self.template = template
        self.field = field
        self.problem = problem
        self.value = value
        message = f"{field} template {template!r}: {problem}"
        if value is not None:
            message += f" (rendered value: {value!r})"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Variables
# ---------------------------------------------------------------------------------------------


def dns_name_form(name: str) -> str:
    """Lower-case a DNS name and replace every ``*`` label with ``wildcard``."""
    return ".".join("wildcard" if label == "*" else label for label in name.lower().split("."))


def certificate_variables(info: CertificateInfo) -> dict[str, object]:
    """Template variables describing a certificate (see the module docstring for each name)."""
    raw_cn = info.common_name or next(iter(info.sans), None)
    variables: dict[str, object] = {
        "sans": [dns_name_form(san) for san in info.sans],
        "sans_raw": list(info.sans),
        "serial": info.serial_hex,
        "issuer": info.issuer,
        "subject": info.subject,
        "not_before": info.not_before.date().isoformat(),
        "not_after": info.not_after.date().isoformat(),
        "fingerprint": info.sha256_fingerprint,
        "key_type": info.key_type,
    }
    # Without a CN or SAN, cn stays undefined so a template using it fails with a clear
    # "variable 'cn' is not defined" instead of producing a name from an empty string.
    if raw_cn is not None:
        variables["cn"] = dns_name_form(raw_cn)
        variables["cn_raw"] = raw_cn
    return variables


def template_variables(
    info: CertificateInfo | None,
    *,
    group_variables: Mapping[str, object] | None = None,
    target_variables: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Merge certificate, group and target variables (target wins over group).

    Raises ValueError when a user variable is not an identifier or reuses a certificate
    variable's name: silently shadowing ``cn`` would deploy under a surprising name.
    """
    merged: dict[str, object] = {}
    for origin, user_variables in (("group", group_variables), ("target", target_variables)):
        for name, value in (user_variables or {}).items():
            check_variable(name, value, origin=origin)
            merged[name] = value
    if info is not None:
        merged.update(certificate_variables(info))
    return merged


def check_variables(variables: Mapping[str, object], *, origin: str = "target") -> None:
    """Refuse user variables with unusable names or values over the size limit."""
    for name, value in variables.items():
        check_variable(name, value, origin=origin)


def check_variable(name: str, value: object, *, origin: str = "target") -> None:
    """Refuse one user variable: its name as :func:`check_variable_name`, its value's size."""
    check_variable_name(name, origin=origin)
    # Values are text from the CLI, JSON scalars or lists from the scheduler: measure them as
    # the text a template would render.
    check_size(VARIABLE_VALUE, _as_text(value), f"{origin} variable {name!r}")


def check_variable_name(name: str, *, origin: str = "target") -> None:
    """Refuse a user variable name templates cannot use or that hides a certificate variable."""
    if not _IDENTIFIER_RE.match(name):
        raise ValueError(
            f"{origin} variable {name!r} is not a valid name: use letters, digits and '_', "
            "not starting with a digit"
        )
    if name in CERTIFICATE_VARIABLES:
        raise ValueError(
            f"{origin} variable {name!r} would hide the certificate variable of the same name; "
            "rename it"
        )


# ---------------------------------------------------------------------------------------------
# Public rendering and validation
# ---------------------------------------------------------------------------------------------


#: Namespaces that hold the cluster's own components. A target writes there only when it says
#: so explicitly: a template whose variables could steer a Secret into kube-system is exactly
#: what least privilege is meant to stop, and a broad credential would otherwise allow it.
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})


class SystemNamespaceRefused(ValueError):
    """A target would write into a system namespace without allowing it."""

    reason = "system_namespace"


def refuse_system_namespace(namespace: str, *, allowed: bool, target: str) -> None:
    """Raise :class:`SystemNamespaceRefused` for a system namespace the target does not allow."""
    if namespace in SYSTEM_NAMESPACES and not allowed:
        raise SystemNamespaceRefused(
            f"target {target!r} would write into the system namespace {namespace!r} "
            f"({', '.join(sorted(SYSTEM_NAMESPACES))} are refused by default); use an "
            "application namespace, or save the target with --allow-system-namespace if a "
            "Secret really belongs there"
        )


def render_namespace(template: str, variables: Mapping[str, object]) -> str:
    """Render a namespace template and validate the result as an RFC 1123 label (<= 63)."""
    return _render_and_validate(template, "namespace", variables)


def render_secret_name(template: str, variables: Mapping[str, object]) -> str:
    """Render a Secret-name template and validate the result as an RFC 1123 subdomain (<= 253)."""
    return _render_and_validate(template, "secret name", variables)


def variables_left_for_the_run(
    template: str, field: str, variables: Mapping[str, object]
) -> frozenset[str]:
    """The variables ``template`` reads that ``variables`` do not give (certificate or group
    variables, which only a run supplies); empty when these decide the name on their own."""
    field = _check_field(field)
    _check_template_size(template, field)
    if _is_plain_name(template):
        return frozenset()
    return _compile_for(template, field).all_variables - set(variables)


def render_if_decided(template: str, field: str, variables: Mapping[str, object]) -> str | None:
    """The name when ``variables`` (a target's own) are all the template reads, validated —
    TemplateError if it is invalid, so a target is refused at save rather than at every run;
    None when it also needs variables a run supplies."""
    if variables_left_for_the_run(template, field, variables):
        return None
    return _render_and_validate(template, _check_field(field), variables)


def validate_template(template: str, field: str, known_variables: Iterable[str]) -> None:
    """Check a template at save time: syntax, functions, unknown variables and literal text.

    A template without variables (a fixed name such as ``ingress-nginx-tls``) is rendered and
    its result validated right away.
    """
    field = _check_field(field)
    _check_template_size(template, field)
    compiled = _compile_for(template, field)
    known = set(known_variables)
    unknown = sorted(compiled.required_variables - known)
    if unknown:
        raise TemplateError(
            template,
            field,
            f"unknown variable{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known variables: {', '.join(sorted(known)) or '(none)'}",
        )
    for literal in compiled.literals:
        problem = _literal_problem(literal, field)
        if problem:
            raise TemplateError(template, field, problem)
    if not compiled.all_variables:
        _render_and_validate(template, field, {})


def _render_and_validate(template: str, field: str, variables: Mapping[str, object]) -> str:
    _check_template_size(template, field)
    if _is_plain_name(template):
        # A fixed name renders to itself: no Jinja, and no place taken in the compile cache
        # (a fleet has a literal namespace per target; bench/ measured 4% of a worker's CPU
        # per target compiling them once the 512-entry cache overflowed).
        rendered = template.strip()
        problem = _name_problem(rendered, field)
        if problem:
            raise TemplateError(template, field, problem, rendered)
        return rendered
    compiled = _compile_for(template, field)
    rendered = _render(compiled, template, field, variables).strip()
    problem = _name_problem(rendered, field)
    if problem:
        culprits = {k: v for k, v in variables.items() if k in compiled.all_variables}
        raise TemplateError(template, field, problem + _blame(rendered, field, culprits), rendered)
    return rendered


def _is_plain_name(template: object) -> bool:
    """True for text Jinja would render unchanged: no delimiters, no line breaks."""
    return isinstance(template, str) and not any(char in template for char in "{}%#\r\n")


def _check_template_size(template: object, field: str) -> None:
    if isinstance(template, str):  # anything else is refused as "must be text" by the caller
        check_size(TEMPLATE, template, f"the {field} template")


def _check_field(field: str) -> Field:
    if field == "namespace":
        return "namespace"
    if field == "secret name":
        return "secret name"
    raise ValueError(f"field must be 'namespace' or 'secret name', not {field!r}")


# ---------------------------------------------------------------------------------------------
# Name validation
# ---------------------------------------------------------------------------------------------


def _name_problem(value: str, field: str) -> str | None:
    """Why value is not a valid namespace / Secret name, or None when it is valid."""
    limit = _LIMITS[field]
    rule = "an RFC 1123 label" if field == "namespace" else "an RFC 1123 subdomain"
    if not value:
        return f"renders to an empty string; a {field} must be {rule}"
    bad = _first_bad_character(value, field)
    if bad:
        return bad
    if len(value) > limit:
        return (
            f"renders to {len(value)} characters, but a {field} is at most {limit}; "
            "shorten it, e.g. with '| trunc N'"
        )
    pattern = _LABEL_RE if field == "namespace" else _SUBDOMAIN_RE
    if not pattern.match(value):
        part = "it" if field == "namespace" else "it and each dot-separated part"
        return f"{part} must start and end with a lower-case letter or digit ({rule})"
    return None


def _first_bad_character(text: str, field: str) -> str | None:
    allowed = "-" if field == "namespace" else "-."
    for char in text:
        if char.isascii() and (char.islower() or char.isdigit() or char in allowed):
            continue
        if not char.isascii():
            return (
                f"contains the non-ASCII character {char!r} (U+{ord(char):04X}); Kubernetes "
                "names are ASCII: lower-case letters, digits and '-'"
            )
        if char.isupper():
            return (
                f"contains the upper-case letter {char!r}; Kubernetes names are lower-case "
                "(add '| lower')"
            )
        if char == "*":
            return "contains '*'; use the 'cn' variable, which spells a wildcard as 'wildcard'"
        if char == "." and field == "namespace":
            return "contains '.', which a namespace (an RFC 1123 label) cannot hold; use '-'"
        return (
            f"contains the character {char!r}; a {field} may hold only lower-case letters, "
            f"digits and {' and '.join(repr(c) for c in allowed)}"
        )
    return None


def _literal_problem(literal: str, field: str) -> str | None:
    """A character in the template's fixed text that can never be part of a valid name."""
    problem = _first_bad_character(literal.strip(), field)
    if problem is None:
        return None
    return f"its fixed text {literal.strip()!r} {problem}"


def _blame(rendered: str, field: str, variables: Mapping[str, object]) -> str:
    """Name the used variables whose values carry an offending character (the likely culprit)."""
    bad = {c for c in rendered if _first_bad_character(c, field)}
    if not bad:
        return ""
    culprits = sorted(
        f"{name}={value!r}"
        for name, value in variables.items()
        if isinstance(value, str) and bad & set(value)
    )
    return f"; it comes from {', '.join(culprits)}" if culprits else ""


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------


def _as_text(value: object) -> str:
    return "" if value is None else str(value)


def _replace(value: object, old: object, new: object) -> str:
    text, old_text, new_text = _as_text(value), _as_text(old), _as_text(new)
    # Checked before replacing: chained replaces could otherwise grow a value exponentially.
    grown = len(text) + text.count(old_text) * (len(new_text) - len(old_text))
    if grown > MAX_RENDERED_LENGTH:
        raise SecurityError(f"replace would produce {grown} characters")
    return text.replace(old_text, new_text)


def _trim_prefix(value: object, prefix: object) -> str:
    return _as_text(value).removeprefix(_as_text(prefix))


def _trim_suffix(value: object, suffix: object) -> str:
    return _as_text(value).removesuffix(_as_text(suffix))


def _trunc(value: object, length: object) -> str:
    # sprig semantics: a negative length keeps the last characters.
    if not isinstance(length, int) or isinstance(length, bool):
        raise SecurityError(f"trunc needs a whole number, not {length!r}")
    text = _as_text(value)
    return text[:length] if length >= 0 else text[length:]


def _default(value: object, fallback: object = "") -> object:
    # sprig semantics: undefined, None and "" all count as unset.
    if isinstance(value, jinja2.Undefined) or value is None or value == "":
        return fallback
    return value


_FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "replace": _replace,
    "replaceAll": _replace,
    "lower": lambda value: _as_text(value).lower(),
    "upper": lambda value: _as_text(value).upper(),
    "trimPrefix": _trim_prefix,
    "trimSuffix": _trim_suffix,
    "trunc": _trunc,
    "default": _default,
    "d": _default,
}
# Harmless Jinja built-ins kept for plain-Jinja users; everything else is removed.
_JINJA_BUILTINS_KEPT: Final = ("first", "last", "join", "length", "string", "trim", "int")

# Methods callable on str values: each returns at most a bounded amount of text.
_SAFE_STR_METHODS: Final = frozenset(
    {
        "lower",
        "upper",
        "strip",
        "lstrip",
        "rstrip",
        "split",
        "rsplit",
        "startswith",
        "endswith",
        "removeprefix",
        "removesuffix",
        "isdigit",
        "isalpha",
    }
)
# Jinja tags that loop, recurse or re-assign (a value doubled in a chain of `set`s grows
# exponentially); without them every value is bounded by the template's size, and rendering
# time is linear in it.
_FORBIDDEN_TAGS: Final[dict[type[nodes.Node], str]] = {
    nodes.For: "for",
    nodes.Macro: "macro",
    nodes.CallBlock: "call",
    nodes.FilterBlock: "filter",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from",
    nodes.Extends: "extends",
    nodes.Block: "block",
    nodes.Assign: "set",
    nodes.AssignBlock: "set",
    nodes.With: "with",
}
_MAX_INT_BITS: Final = 4096


class _NameSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, tightened against memory and CPU exhaustion."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "%" and isinstance(left, str):
            raise SecurityError("'%' string formatting is not allowed; use filters")
        if _is_int(left) and _is_int(right):
            # Python integers are unbounded: cap the size of products and powers.
            bits = abs(left).bit_length()
            if operator == "**" and bits > 1 and bits * abs(right) > _MAX_INT_BITS:
                raise SecurityError("that power is too large")
            if operator == "*" and bits + abs(right).bit_length() > _MAX_INT_BITS:
                raise SecurityError("that product is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_RENDERED_LENGTH
                ):
                    raise SecurityError(f"repetition longer than {MAX_RENDERED_LENGTH} refused")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> None:
        # Jinja would hand out a sandboxed str.format/format_map here, before asking
        # is_safe_attribute; padding specs ("{:>99999999}") still allocate freely. Refuse them.
        return None

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and callable(value) and attr not in _SAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _make_environment() -> _NameSandbox:
    env = _NameSandbox(undefined=jinja2.StrictUndefined, autoescape=False)
    kept = {name: env.filters[name] for name in _JINJA_BUILTINS_KEPT}
    env.filters.clear()
    env.filters.update(kept)
    env.filters.update(_FILTERS)
    env.globals.clear()
    return env


_ENV: Final = _make_environment()


@dataclass(frozen=True)
class _Compiled:
    template: jinja2.Template
    all_variables: frozenset[str]  # every free variable the template reads
    required_variables: frozenset[str]  # ... minus those only read through `default`
    literals: tuple[str, ...]  # fixed text outside {{ }} / {% %}


class _Problem(Exception):
    """A field-independent template problem, turned into TemplateError by the caller."""


def _compile_for(template: str, field: str) -> _Compiled:
    if not isinstance(template, str):
        raise TemplateError(repr(template), field, "the template must be text")
    try:
        return _compile(template)
    except _Problem as exc:
        raise TemplateError(template, field, str(exc)) from None


@functools.lru_cache(maxsize=512)
def _compile(template: str) -> _Compiled:
    source = translate_go_template(template)
    try:
        tree = _ENV.parse(source)
        for node_type, tag in _FORBIDDEN_TAGS.items():
            if tree.find(node_type) is not None:
                raise _Problem(
                    f"'{{% {tag} %}}' is not allowed in name templates (no loops, macros, "
                    "assignments or includes); use expressions and {% if %}"
                )
        compiled = _ENV.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise _Problem(f"syntax error: {exc.message}") from None
    except jinja2.TemplateError as exc:  # e.g. "No filter named 'x'" at compile time
        raise _Problem(f"{exc.message}; available functions: {_function_list()}") from None
    all_variables = frozenset(meta.find_undeclared_variables(tree))
    return _Compiled(
        template=compiled,
        all_variables=all_variables,
        required_variables=all_variables - _only_defaulted(tree, all_variables),
        literals=tuple(n.data for n in tree.find_all(nodes.TemplateData) if n.data.strip()),
    )


def _only_defaulted(tree: nodes.Template, names: Iterable[str]) -> frozenset[str]:
    """Variables whose every use is `x | default(...)`: they may be left undefined."""
    guarded = {
        id(f.node)
        for f in tree.find_all(nodes.Filter)
        if f.name in ("default", "d") and isinstance(f.node, nodes.Name)
    }
    result = set()
    for name in names:
        uses = [n for n in tree.find_all(nodes.Name) if n.name == name and n.ctx == "load"]
        if uses and all(id(n) in guarded for n in uses):
            result.add(name)
    return frozenset(result)


def _function_list() -> str:
    return ", ".join(sorted(_FILTERS.keys() - {"d"}))


def _render(compiled: _Compiled, template: str, field: str, variables: Mapping[str, object]) -> str:
    chunks: list[str] = []
    size = 0
    try:
        for chunk in compiled.template.generate(dict(variables)):
            size += len(chunk)
            if size > MAX_RENDERED_LENGTH:
                break
            chunks.append(chunk)
    except jinja2.UndefinedError as exc:
        raise TemplateError(template, field, _undefined_problem(exc, variables)) from None
    except SecurityError as exc:
        raise TemplateError(template, field, f"refused by the sandbox: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user template can raise anything; report it
        raise TemplateError(
            template, field, f"rendering failed: {type(exc).__name__}: {exc}"
        ) from None
    if size > MAX_RENDERED_LENGTH:
        raise TemplateError(
            template, field, f"renders to more than {MAX_RENDERED_LENGTH} characters"
        )
    return "".join(chunks)


def _undefined_problem(exc: jinja2.UndefinedError, variables: Mapping[str, object]) -> str:
    known = ", ".join(sorted(variables)) or "(none)"
    match = re.match(r"'([^']+)' is undefined", exc.message or "")
    if match:
        name = match.group(1)
        return (
            f"variable {name!r} is not defined; define it on the target or group, or use "
            f"'| default \"...\"' (known variables: {known})"
        )
    return f"{exc.message} (known variables: {known})"


# ---------------------------------------------------------------------------------------------
# Go-template translation
# ---------------------------------------------------------------------------------------------

# name -> number of arguments before the piped value (sprig order: value comes last).
_GO_ARITY: Final = {
    "replace": 2,
    "replaceAll": 2,
    "lower": 0,
    "upper": 0,
    "trimPrefix": 1,
    "trimSuffix": 1,
    "trunc": 1,
    "default": 1,
}
_GO_CONTROL: Final = frozenset(
    {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}
)
_GO_CONSTANTS: Final = {"true": "true", "false": "false", "nil": "none"}
_NUMBER_RE: Final = re.compile(r"-?\d+(\.\d+)?")


@dataclass(frozen=True)
class _Token:
    kind: Literal["field", "ident", "string", "number", "pipe", "open", "close", "other"]
    text: str


def translate_go_template(template: str) -> str:
    """Translate every Go-style ``{{ ... }}`` action into Jinja2; other text is left as is."""
    out: list[str] = []
    pos = 0
    while True:
        start = template.find("{{", pos)
        if start < 0:
            out.append(template[pos:])
            return "".join(out)
        end = _action_end(template, start + 2)
        if end < 0:  # unterminated: leave it for Jinja to report
            out.append(template[pos:])
            return "".join(out)
        out.append(template[pos:start])
        out.append(_translate_action(template[start + 2 : end]))
        pos = end + 2


def _action_end(text: str, pos: int) -> int:
    """Index of the `}}` closing the action that starts at pos, skipping quoted strings."""
    quote: str | None = None
    while pos < len(text):
        char = text[pos]
        if quote:
            if char == "\\" and quote != "`":
                pos += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif text.startswith("}}", pos):
            return pos
        pos += 1
    return -1


def _translate_action(content: str) -> str:
    """One action's inner text -> `{{ jinja }}`; Jinja actions come back unchanged."""
    lead = trail = ""
    inner = content
    if re.match(r"-\s", inner):
        lead, inner = "-", inner[1:]
    if re.search(r"\s-\Z", inner):
        trail, inner = "-", inner[:-1]
    stripped = inner.strip()
    if stripped.startswith("/*") and stripped.endswith("*/"):
        return ""  # a Go comment
    tokens = _tokenize(stripped)
    # Fields (`.cn`) and raw strings (`...`) exist only in Go: they settle the dialect.
    is_go = any(t.kind == "field" or t.text.startswith("`") for t in tokens)
    try:
        expression, uses_go_calls = _GoParser(tokens).parse()
    except _Problem:
        # An action opening with one of our function names was meant as Go (`{{ lower }}`).
        if is_go or (tokens and tokens[0].kind == "ident" and tokens[0].text in _GO_ARITY):
            raise
        return "{{" + content + "}}"  # not Go: let Jinja read it
    if not (is_go or uses_go_calls):
        return "{{" + content + "}}"
    return "{{" + lead + " " + expression + " " + trail + "}}"


_FIELD_RE: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCTUATION: Final[dict[str, Literal["pipe", "open", "close"]]] = {
    "|": "pipe",
    "(": "open",
    ")": "close",
}


def _tokenize(text: str) -> list[_Token]:
    """Split an action into Go tokens; anything Go does not know becomes an "other" token."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        # `.x` right after a value is Jinja attribute access (`cn.upper`), not a Go field.
        follows_value = pos > 0 and (text[pos - 1].isalnum() or text[pos - 1] in "_)]\"'`")
        if char in "\"'`":
            end = _string_end(text, pos)
            if end < 0:
                tokens.append(_Token("other", text[pos:]))
                break
            tokens.append(_Token("string", text[pos:end]))
            pos = end
        elif not follows_value and (field := _FIELD_RE.match(text, pos)):
            pos = field.end()
            # `.a.b` (nested fields) has no equivalent here: mark it unparseable.
            nested = pos < len(text) and text[pos] == "."
            tokens.append(_Token("other" if nested else "field", field.group(1)))
        elif ident := _IDENT_RE.match(text, pos):
            tokens.append(_Token("ident", ident.group()))
            pos = ident.end()
        elif not follows_value and (number := _NUMBER_RE.match(text, pos)):
            tokens.append(_Token("number", number.group()))
            pos = number.end()
        elif char in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[char], char))
            pos += 1
        else:
            tokens.append(_Token("other", char))
            pos += 1
    return tokens


def _string_end(text: str, start: int) -> int:
    """End index (exclusive) of the string literal starting at start, or -1 if unterminated."""
    quote = text[start]
    pos = start + 1
    while pos < len(text):
        if text[pos] == "\\" and quote != "`":
            pos += 2
            continue
        if text[pos] == quote:
            return pos + 1
        pos += 1
    return -1


def _string_value(token: str) -> str:
    """The value of a quoted literal; Go raw strings are verbatim, others use Python escapes."""
    if token.startswith("`"):
        return token[1:-1]
    try:
        value = ast.literal_eval(token)  # safe: a single quoted literal, bounds checked above
    except (ValueError, SyntaxError):
        raise _Problem(f"cannot read the string {token}") from None
    if not isinstance(value, str):
        raise _Problem(f"cannot read the string {token}")
    return value


class _GoParser:
    """Recursive-descent parser for Go pipelines: command ('|' command)*; emits Jinja text."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.uses_calls = False

    def parse(self) -> tuple[str, bool]:
        if not self.tokens:
            raise _Problem("empty action '{{ }}'")
        expression = self._pipeline()
        if self.pos != len(self.tokens):
            raise _Problem(f"unexpected {self.tokens[self.pos].text!r} in a Go-style action")
        return expression, self.uses_calls

    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _pipeline(self) -> str:
        expression = self._command(None)
        while (token := self._peek()) is not None and token.kind == "pipe":
            self.pos += 1
            expression = self._command(expression)
        return expression

    def _command(self, piped: str | None) -> str:
        operands: list[_Token | str] = []
        while (token := self._peek()) is not None and token.kind not in ("pipe", "close"):
            if token.kind == "open":
                self.pos += 1
                inner = self._pipeline()
                closing = self._peek()
                if closing is None or closing.kind != "close":
                    raise _Problem("unbalanced '(' in a Go-style action")
                self.pos += 1
                operands.append(f"({inner})")
            else:
                operands.append(token)
                self.pos += 1
        if not operands:
            raise _Problem("missing function or value around '|'")
        head = operands[0]
        if isinstance(head, _Token) and head.kind == "ident" and head.text in _GO_CONTROL:
            raise _Problem(
                f"Go '{head.text}' actions are not supported; use plain variables and functions "
                f"({_function_list()}), or Jinja's {{% if %}}"
            )
        if isinstance(head, _Token) and head.kind == "ident" and head.text in _GO_ARITY:
            return self._call(head.text, [self._operand(o) for o in operands[1:]], piped)
        if len(operands) > 1:
            name = head.text if isinstance(head, _Token) else head
            raise _Problem(f"{name!r} is not a function; available functions: {_function_list()}")
        if piped is not None:
            raise _Problem(f"cannot pipe a value into {self._operand(head)!r}, not a function")
        return self._operand(head)

    def _call(self, name: str, args: list[str], piped: str | None) -> str:
        if args:
            self.uses_calls = True
        if piped is None:
            if not args:
                raise _Problem(f"{name} needs a value, e.g. '{{{{ .cn | {name} ... }}}}'")
            piped, args = args[-1], args[:-1]
        arity = _GO_ARITY[name]
        if len(args) != arity:
            raise _Problem(
                f"{name} takes {arity} argument{'s' if arity != 1 else ''} besides the piped "
                f"value, got {len(args)}"
            )
        call = f"{name}({', '.join(args)})" if args else name
        return f"({piped})|{call}"

    def _operand(self, operand: _Token | str) -> str:
        if isinstance(operand, str):
            return operand  # an already-translated parenthesised pipeline
        if operand.kind == "field":
            return operand.text
        if operand.kind == "string":
            return repr(_string_value(operand.text))
        if operand.kind == "number":
            return operand.text
        if operand.kind == "ident":
            if operand.text in _GO_ARITY:
                raise _Problem(f"function {operand.text!r} used as a value")
            # Lenient: a bare name is read as a variable (Go would call it a function).
            return _GO_CONSTANTS.get(operand.text, operand.text)
        raise _Problem(f"unexpected {operand.text!r} in a Go-style action")
