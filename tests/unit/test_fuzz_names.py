"""Fuzzing name templates and the variables they render.

Properties, for every template and variables:

* rendering, validating and merging variables raise only the product's own refusals
  (``TemplateError``, ``InputTooLarge``, and the ``ValueError`` of a bad variable name), each
  within the profile's deadline;
* a rendered name is what the API server accepts: an RFC 1123 label of at most 63 characters
  (namespace) or subdomain of at most 253 (Secret name);
* a template ``validate_template`` refuses for a set of variables never renders with only
  those variables (save-time checks are not weaker than run-time ones).

Settings come from ``tests.fuzz`` (``CAP_FUZZ_PROFILE``; ``python -m tests.fuzz`` runs a
campaign).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from hypothesis import event, example, given
from hypothesis import strategies as st

from tests.fuzz import fuzz_settings, within_budget
from worker.core.bundle import CertificateInfo
from worker.core.limits import InputTooLarge
from worker.core.names import (
    TemplateError,
    render_namespace,
    render_secret_name,
    template_variables,
    validate_template,
)

LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")

VARIABLE_NAMES = ["cn", "tenant", "sans", "env", "n", "x"]
VALUES = st.one_of(
    st.sampled_from(["app.example.com", "acme", "Shop_EU", "", " a ", "-", "x" * 70, "ü"]),
    st.text(max_size=20),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.lists(st.sampled_from(["a.example.com", "b", ""]), max_size=3),
    st.none(),
    st.booleans(),
)
FUNCTIONS = ["lower", "upper", "replaceAll", "replace", "trimPrefix", "trimSuffix", "trunc"]
FUNCTIONS += ["default", "nosuch", "first", "last", "join", "length", "string", "trim", "int"]
ARGS = st.one_of(
    st.sampled_from(['"."', '"-"', '""', "3", "-2", "0", '"x"', "99999999", "`raw`", "'q'"]),
    st.integers(-(10**12), 10**12).map(str),
)


ARITY = {"lower": 0, "upper": 0, "replaceAll": 2, "replace": 2, "trimPrefix": 1}
ARITY |= {"trimSuffix": 1, "trunc": 1, "default": 1}
STRING_ARGS = st.sampled_from(['"."', '"-"', '""', '"x"', "`raw`", '"wildcard."', '"a\\nb"'])


@st.composite
def go_actions(draw: st.DrawFn) -> str:
    """A Go-style action; its functions mostly get the right number and kind of arguments."""
    value = draw(st.sampled_from([f".{v}" for v in VARIABLE_NAMES] + ['"lit"', "1", "nil"]))
    pipeline = value
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FUNCTIONS))
        if name in ARITY and draw(st.integers(0, 4)):
            kind = ARGS if name == "trunc" else STRING_ARGS
            args = [draw(kind) for _ in range(ARITY[name])]
        else:
            args = draw(st.lists(ARGS, max_size=2))
        pipeline += f" | {name} {' '.join(args)}".rstrip()
    trim = draw(st.sampled_from(["", "", "- ", "-"]))
    return "{{" + trim + " " + pipeline + " " + trim[::-1] + "}}"


@st.composite
def jinja_actions(draw: st.DrawFn) -> str:
    expression = draw(
        st.sampled_from(
            [
                *VARIABLE_NAMES,
                'cn | replace(".", "-")',
                "cn.upper()",
                "cn.center(999999)",
                "cn.format(x)",
                "'%s' % cn",
                "sans[0]",
                "sans * 999999",
                "'x' * 99999",
                "9 ** 9 ** 9",
                "cn ~ cn ~ cn",
                "cn.__class__",
                "range(10)",
                "lipsum()",
                "n | int * 10",
                "1 / 0",
                "x if n else cn",
            ]
        )
    )
    return "{{ " + expression + " }}"


PIECES = st.one_of(
    st.sampled_from(["-tls", "app", ".", "-", "", " ", "\n", "UPPER", "{{", "}}", "{%", "%}"]),
    st.sampled_from(["{% if n %}a{% endif %}", "{% for i in sans %}{{ i }}{% endfor %}"]),
    st.sampled_from(["{% set x = 1 %}", "{# c #}", "{{ /* c */ }}", "{{ }}", "{{ .cn.raw }}"]),
    go_actions(),
    jinja_actions(),
    st.text(max_size=6),
)
TEMPLATES = st.one_of(
    st.lists(PIECES, max_size=5).map("".join),
    st.lists(st.one_of(go_actions(), st.sampled_from(["-tls", "app-", "."])), max_size=3).map(
        "".join
    ),
    st.text(max_size=40),
    st.text(min_size=1020, max_size=1030, alphabet="ab{}. "),  # around the template limit
)
USER_NAMES = ["tenant", "env", "n", "x"]
VARIABLES = st.one_of(
    *[st.dictionaries(st.sampled_from(USER_NAMES), VALUES, max_size=4)] * 6,
    # Rarely: names templates cannot use, certificate names, values over the limit.
    st.dictionaries(
        st.one_of(st.sampled_from(["cn", "9x", "", "a-b"]), st.text()),
        st.one_of(VALUES, st.text(min_size=1020, max_size=1030)),
        max_size=2,
    ),
)
DNS_LIKE = st.one_of(
    st.sampled_from(["app.example.com", "*.Example.COM", "WWW.example.com", "a_b.example", "ü.de"]),
    st.text(max_size=30),
)


@st.composite
def certificates(draw: st.DrawFn) -> CertificateInfo:
    """What a certificate contributes: its CN and SANs are the fuzzed part."""
    return CertificateInfo(
        subject="CN=x",
        common_name=draw(st.one_of(st.none(), DNS_LIKE)),
        sans=tuple(draw(st.lists(DNS_LIKE, max_size=3))),
        serial_hex="1a2b",
        issuer="CN=Test CA",
        not_before=dt.datetime(2031, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2031, 4, 1, tzinfo=dt.UTC),
        sha256_fingerprint="ab" * 32,
        public_key_sha256="cd" * 32,
        key_type="EC-P256",
    )


def _timed(call: Callable[[], Any]) -> Any:
    with within_budget():
        return call()


@fuzz_settings(max_examples=200)
@given(
    template=TEMPLATES,
    info=st.one_of(st.none(), certificates()),
    variables=VARIABLES,
    field=st.sampled_from(["namespace", "secret name"]),
)
@example(
    template="{{ .cn | trunc 99999999999999999999 }}", info=None, variables={}, field="namespace"
)
def test_templates_render_valid_names_or_refuse_cleanly(
    template: str, info: CertificateInfo | None, variables: dict[str, Any], field: str
) -> None:
    try:
        merged = _timed(lambda: template_variables(info, target_variables=variables))
    except InputTooLarge:
        return
    except ValueError as refusal:  # a variable name templates cannot use
        assert "variable" in str(refusal)
        return
    render = render_namespace if field == "namespace" else render_secret_name
    try:
        name = _timed(lambda: render(template, merged))
    except (TemplateError, InputTooLarge):
        name = None
    else:
        pattern, limit = (LABEL, 63) if field == "namespace" else (SUBDOMAIN, 253)
        assert pattern.match(name) and len(name) <= limit, name
    try:
        _timed(lambda: validate_template(template, field, list(merged)))
    except (TemplateError, InputTooLarge) as refusal:
        # Save-time checks are never stricter than run time with the same variables.
        assert name is None, f"refused at save time ({refusal}) but renders {name!r}"
        saved = False
    else:
        saved = True
    event(f"renders: {name is not None}, saves: {saved}")
