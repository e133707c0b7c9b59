"""Namespace and Secret-name templates: both dialects, the functions, validation, the sandbox."""

from __future__ import annotations

import datetime as dt
import json
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.certfactory import make_chain
from worker.core.bundle import CertificateInfo, describe_certificate
from worker.core.limits import TEMPLATE, VARIABLE_VALUE, InputTooLarge
from worker.core.names import (
    CERTIFICATE_VARIABLES,
    DEFAULT_SECRET_NAME_TEMPLATE,
    MAX_RENDERED_LENGTH,
    TemplateError,
    certificate_variables,
    check_variables,
    render_if_decided,
    render_namespace,
    render_secret_name,
    template_variables,
    translate_go_template,
    validate_template,
    variables_left_for_the_run,
)

LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")

VARS: dict[str, object] = {
    "cn": "app.example.com",
    "tenant": "acme",
    "Team": "Platform",
    "empty": "",
    "sans": ["app.example.com", "www.example.com"],
}


def info(
    common_name: str | None = "app.example.com", sans: tuple[str, ...] = ()
) -> CertificateInfo:
    return CertificateInfo(
        subject=f"CN={common_name}" if common_name else "O=Acme",
        common_name=common_name,
        sans=sans,
        serial_hex="1a2b3c",
        issuer="CN=Test CA",
        not_before=dt.datetime(2031, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2031, 4, 1, 23, 59, tzinfo=dt.UTC),
        sha256_fingerprint="ab" * 32,
        public_key_sha256="cd" * 32,
        key_type="EC-P256",
    )


def namespace_error(template: str, variables: dict[str, object] | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        render_namespace(template, VARS if variables is None else variables)
    return caught.value


def secret_name_error(template: str, variables: dict[str, object] | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        render_secret_name(template, VARS if variables is None else variables)
    return caught.value


# --- the spec's examples ------------------------------------------------------------------------


def test_the_default_secret_name_template_is_the_specs() -> None:
    assert DEFAULT_SECRET_NAME_TEMPLATE == '{{ .cn | replaceAll "." "-" }}-tls'


def test_the_default_template_turns_the_cn_into_a_secret_name() -> None:
    assert render_secret_name(DEFAULT_SECRET_NAME_TEMPLATE, VARS) == "app-example-com-tls"


def test_the_specs_tenant_namespace_example_renders() -> None:
    assert render_namespace("{{ .tenant }}-edge", VARS) == "acme-edge"


def test_a_fixed_name_renders_as_itself() -> None:
    assert render_secret_name("ingress-nginx-tls", VARS) == "ingress-nginx-tls"
    assert render_namespace("ingress", VARS) == "ingress"


# --- certificate variables ----------------------------------------------------------------------


def test_a_wildcard_cn_gives_a_valid_name_with_the_default_template() -> None:
    chain = make_chain(cn="*.example.com", sans=["*.example.com", "example.com"])
    variables = certificate_variables(describe_certificate(chain.leaf_pem))
    assert variables["cn"] == "wildcard.example.com"
    assert variables["cn_raw"] == "*.example.com"
    assert variables["sans"] == ["wildcard.example.com", "example.com"]
    assert variables["sans_raw"] == ["*.example.com", "example.com"]
    assert render_secret_name(DEFAULT_SECRET_NAME_TEMPLATE, variables) == (
        "wildcard-example-com-tls"
    )


def test_the_cn_is_lower_cased_because_dns_names_are_case_insensitive() -> None:
    variables = certificate_variables(info("App.Example.COM"))
    assert variables["cn"] == "app.example.com"
    assert variables["cn_raw"] == "App.Example.COM"


def test_without_a_cn_the_first_san_stands_in() -> None:
    variables = certificate_variables(info(None, sans=("api.example.com", "10.0.0.1")))
    assert variables["cn"] == "api.example.com"


def test_without_cn_or_san_a_template_using_cn_fails_naming_cn() -> None:
    variables = certificate_variables(info(None))
    assert "cn" not in variables
    error = secret_name_error(DEFAULT_SECRET_NAME_TEMPLATE, variables)
    assert "variable 'cn' is not defined" in error.problem


def test_certificate_variables_cover_the_documented_names() -> None:
    variables = certificate_variables(info("app.example.com", sans=("app.example.com",)))
    assert set(variables) == set(CERTIFICATE_VARIABLES)
    assert variables["serial"] == "1a2b3c"
    assert variables["not_after"] == "2031-04-01"
    assert variables["fingerprint"] == "ab" * 32
    assert render_secret_name("cert-{{ .serial }}-{{ .not_after }}", variables) == (
        "cert-1a2b3c-2031-04-01"
    )


def test_template_variables_merge_group_then_target_then_certificate() -> None:
    merged = template_variables(
        info(),
        group_variables={"tenant": "group", "region": "eu"},
        target_variables={"tenant": "target"},
    )
    assert merged["tenant"] == "target"
    assert merged["region"] == "eu"
    assert merged["cn"] == "app.example.com"


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("cn", "would hide the certificate variable"),
        ("my-var", "not a valid name"),
        ("1st", "not a valid name"),
        ("", "not a valid name"),
    ],
)
def test_user_variables_must_be_identifiers_that_hide_nothing(name: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        template_variables(info(), target_variables={name: "x"})


# --- both dialects and every function -----------------------------------------------------------

# (Go-style template, equivalent plain Jinja2 template, expected namespace)
DIALECTS = [
    ('{{ .cn | replaceAll "." "-" }}', '{{ cn | replace(".", "-") }}', "app-example-com"),
    ('{{ .cn | replace "." "-" }}', '{{ cn | replaceAll(".", "-") }}', "app-example-com"),
    ("{{ .Team | lower }}", "{{ Team | lower }}", "platform"),
    ("{{ .tenant | upper | lower }}", "{{ tenant | upper | lower }}", "acme"),
    ('{{ .cn | trimSuffix ".example.com" }}', '{{ cn | trimSuffix(".example.com") }}', "app"),
    (
        '{{ .cn | trimPrefix "app." | replace "." "-" }}',
        '{{ cn | trimPrefix("app.") | replace(".", "-") }}',
        "example-com",
    ),
    ("{{ .tenant | trunc 2 }}", "{{ tenant | trunc(2) }}", "ac"),
    ("{{ .tenant | trunc -2 }}", "{{ tenant | trunc(-2) }}", "me"),
    ('{{ .missing | default "fallback" }}', '{{ missing | default("fallback") }}', "fallback"),
    ('{{ .empty | default "fallback" }}', '{{ empty | default("fallback") }}', "fallback"),
    ('{{ .tenant | default "fallback" }}', '{{ tenant | default("fallback") }}', "acme"),
    ("{{ lower .Team }}", "{{ Team | lower }}", "platform"),
    ('{{ replaceAll "." "-" .cn }}', '{{ cn | replace(".", "-") }}', "app-example-com"),
    ("{{ trunc 3 .tenant }}", "{{ tenant[:3] }}", "acm"),
    ('{{ default "x" .missing }}-ns', '{{ missing | d("x") }}-ns', "x-ns"),
    ("{{ (.Team | lower) }}-{{ .tenant }}", "{{ Team.lower() }}-{{ tenant }}", "platform-acme"),
    ("{{- .tenant -}}", "{{- tenant -}}", "acme"),
    ("{{/* a Go comment */}}{{ .tenant }}", "{# a Jinja comment #}{{ tenant }}", "acme"),
    ("{{ `raw` }}-{{ .tenant }}", "{{ 'raw' }}-{{ tenant }}", "raw-acme"),
    ('{{ .cn | replaceAll "\\x2e" "-" }}', "{{ cn | replace('.', '-') }}", "app-example-com"),
    (
        '{{ .cn | replaceAll "}}" "" | replaceAll "." "" }}',
        "{{ cn | replace('.', '') }}",
        "appexamplecom",
    ),
]


@pytest.mark.parametrize(("go", "jinja", "expected"), DIALECTS)
def test_go_style_and_jinja_templates_render_the_same(go: str, jinja: str, expected: str) -> None:
    assert render_namespace(go, VARS) == expected
    assert render_namespace(jinja, VARS) == expected


@pytest.mark.parametrize(
    ("go", "jinja"),
    [
        ('{{ .cn | replaceAll "." "-" }}-tls', "{{ (cn)|replaceAll('.', '-') }}-tls"),
        ("{{ .tenant }}-edge", "{{ tenant }}-edge"),
        ("{{ lower .cn }}", "{{ (cn)|lower }}"),
        ('{{ cn | replace(".", "-") }}', '{{ cn | replace(".", "-") }}'),  # Jinja: untouched
        ("{{ cn.upper() }}", "{{ cn.upper() }}"),
        ('{{ "a" if cn else "b" }}', '{{ "a" if cn else "b" }}'),
    ],
)
def test_go_actions_are_translated_and_jinja_actions_left_alone(go: str, jinja: str) -> None:
    assert translate_go_template(go) == jinja


def test_translation_quotes_string_literals_instead_of_pasting_them() -> None:
    # Were the literal pasted into the Jinja source, it would concatenate y ("zz").
    template = """{{ .x | replaceAll "q" "' ~ y ~ '" }}"""
    error = namespace_error(template, {"x": "q", "y": "zz"})
    assert error.value == "' ~ y ~ '"


# --- name validation ----------------------------------------------------------------------------

NAMESPACE_REFUSALS = [
    ("{{ .empty }}", "renders to an empty string"),
    ("   ", "renders to an empty string"),
    ("{{ .Team }}", "upper-case letter 'P'"),
    ("{{ .tenant }}_edge", "character '_'"),
    ("{{ .tenant }}.edge", "contains '.'"),
    ("café", "non-ASCII character 'é' (U+00E9)"),
    ("{{ .cn_raw }}", "use the 'cn' variable"),
    ("-{{ .tenant }}", "must start and end"),
    ("{{ .tenant }}-", "must start and end"),
    ("a" * 64, "64 characters, but a namespace is at most 63"),
    ("{{ .tenant }} edge", "character ' '"),
]


@pytest.mark.parametrize(("template", "problem"), NAMESPACE_REFUSALS)
def test_invalid_namespaces_are_refused_with_the_rule_and_value(
    template: str, problem: str
) -> None:
    error = namespace_error(template, {**VARS, "cn_raw": "*.example.com"})
    assert problem in error.problem
    assert error.field == "namespace"
    assert error.template == template
    assert template in str(error)
    assert error.value is not None and repr(error.value) in str(error)


SECRET_NAME_REFUSALS = [
    ("a" * 254, "254 characters, but a secret name is at most 253"),
    ("a..b", "each dot-separated part must start and end"),
    ("a.-b", "each dot-separated part must start and end"),
    (".a", "each dot-separated part must start and end"),
    ("{{ .Team }}-tls", "upper-case letter 'P'"),
    ("tls/{{ .tenant }}", "character '/'"),
]


@pytest.mark.parametrize(("template", "problem"), SECRET_NAME_REFUSALS)
def test_invalid_secret_names_are_refused_with_the_rule(template: str, problem: str) -> None:
    error = secret_name_error(template)
    assert problem in error.problem
    assert error.field == "secret name"


@pytest.mark.parametrize(
    ("template", "expected"),
    [("a" * 63, "a" * 63), ("x9", "x9"), ("9", "9"), ("  {{ .tenant }}\n", "acme")],
)
def test_valid_namespaces_up_to_63_characters_render(template: str, expected: str) -> None:
    assert render_namespace(template, VARS) == expected


@pytest.mark.parametrize(
    "name", ["a" * 253, "app.example.com", "a-b.c-d", "x", "wildcard-example-com-tls"]
)
def test_valid_secret_names_up_to_253_characters_render(name: str) -> None:
    assert render_secret_name(name, VARS) == name


def test_the_error_names_the_variable_that_brought_the_bad_character() -> None:
    error = namespace_error("team-{{ .Team }}")
    assert "it comes from Team='Platform'" in error.problem


# --- template errors ----------------------------------------------------------------------------

TEMPLATE_REFUSALS = [
    ("{{ .cn ", "syntax error"),
    ("{{ }}", "syntax error"),
    ("{{ .cn | }}", "missing function or value"),
    ("{{ .cn .tenant }}", "is not a function"),
    ('{{ .cn | nosuch "x" }}', "'nosuch' is not a function; available functions: default"),
    ("{{ cn | nosuch }}", "No filter named 'nosuch'"),
    ('{{ .cn | replaceAll "." }}', "replaceAll takes 2 arguments besides the piped value, got 1"),
    ("{{ .cn | trunc }}", "trunc takes 1 argument besides the piped value, got 0"),
    ("{{ lower }}", "lower needs a value"),
    ("{{ if .cn }}x{{ end }}", "Go 'if' actions are not supported"),
    ("{{ range .sans }}x{{ end }}", "Go 'range' actions are not supported"),
    ("{{ .cn.raw }}", "unexpected"),
    ("{{ .cn | .tenant }}", "cannot pipe a value into"),
    ('{{ .cn | trunc "x" }}', "trunc needs a whole number"),
    ("{{ .nosuch }}", "variable 'nosuch' is not defined"),
    ("{{ nosuch }}", "variable 'nosuch' is not defined"),
    ("{{ 1 / 0 }}", "rendering failed: ZeroDivisionError"),
]


@pytest.mark.parametrize(("template", "problem"), TEMPLATE_REFUSALS)
def test_broken_templates_are_refused_with_a_clear_problem(template: str, problem: str) -> None:
    error = secret_name_error(template)
    assert problem in error.problem
    assert error.template == template


@pytest.mark.parametrize(
    "template",
    ["x" * (TEMPLATE.maximum + 1), "{{ .cn }}" + "-" * TEMPLATE.maximum, "a\n" * 10_000_000],
    ids=["plain name", "with an action", "20 MB"],
)
@pytest.mark.parametrize("field", ["namespace", "secret name"])
def test_an_oversized_template_is_refused_before_parsing(template: str, field: str) -> None:
    render = render_namespace if field == "namespace" else render_secret_name
    for call in (
        lambda: render(template, VARS),
        lambda: validate_template(template, field, ["cn"]),
    ):
        with pytest.raises(InputTooLarge) as caught:
            call()
        assert caught.value.limit is TEMPLATE and caught.value.size == len(template)
        message = str(caught.value)
        assert message.startswith(f"the {field} template is {len(template)} characters")
        assert f"{TEMPLATE.maximum} characters" in message


def test_a_template_at_the_limit_is_accepted() -> None:
    template = "{{ .cn | trunc 5 }}" + " " * (TEMPLATE.maximum - 19)
    assert len(template) == TEMPLATE.maximum
    assert render_namespace(template, {"cn": "abcdefgh"}) == "abcde"


def test_an_oversized_variable_value_is_refused_naming_the_variable() -> None:
    big = "a" * (VARIABLE_VALUE.maximum + 1)
    for call in (
        lambda: check_variables({"tenant": big}),
        lambda: template_variables(info(), group_variables={"tenant": big}),
        lambda: template_variables(info(), target_variables={"tenant": ["x"] * 1000}),
    ):
        with pytest.raises(InputTooLarge) as caught:
            call()
        assert caught.value.limit is VARIABLE_VALUE
        assert "variable 'tenant' is" in str(caught.value)
    check_variables({"tenant": "a" * VARIABLE_VALUE.maximum, "n": 3})  # at the limit: fine


def test_an_undefined_variable_error_lists_the_known_ones() -> None:
    error = namespace_error("{{ .tenat }}-edge", {"tenant": "acme", "cn": "x"})
    assert "variable 'tenat' is not defined" in error.problem
    assert "known variables: cn, tenant" in error.problem
    assert error.value is None


SANDBOX_ESCAPES = [
    '{{ "x" * 100000 }}',
    "{{ sans * 100000 }}",
    '{{ "x".center(100000) }}',
    '{{ "x".ljust(100000) }}',
    '{{ "{:>100000}".format(1) }}',
    '{{ "%100000d" % 1 }}',
    "{{ 2 ** 100000 }}",
    "{{ cn.__class__.__mro__ }}",
    "{{ cn.__class__ }}",
    "{% for a in sans %}{% for b in sans %}x{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% include 'x' %}",
    "{{ range(10) }}",
    "{{ lipsum(100000) }}",
    "{{ cn | center(100000) }}",
    "{{ cn | format(1) }}",
    "{{ (10 ** 60) ** 60 }}",
    "{{ 2 ** 100000 }}",
    '{{ cn | replace("a", "aaaaaaaa") | replace("a", "aaaaaaaa") | replace("a", "aaaaaaaa") }}',
    '{{ cn.replace("a", "aaaaaaaa") }}',
    "{% set x = cn ~ cn %}{% set x = x ~ x %}{{ x }}",
    "{% with x = cn %}{{ x }}{% endwith %}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_the_sandbox_refuses_expensive_or_unsafe_constructs(template: str) -> None:
    error = secret_name_error(template, {**VARS, "cn": "a" * 100})
    assert re.search(r"sandbox|not allowed|not defined|No filter named", error.problem)


def test_output_longer_than_the_limit_is_cut_off_with_an_error() -> None:
    error = secret_name_error("{{ big }}{{ big }}", {"big": "a" * MAX_RENDERED_LENGTH})
    assert f"more than {MAX_RENDERED_LENGTH} characters" in error.problem


def test_jinja_if_blocks_are_allowed() -> None:
    template = "{% if tenant %}{{ tenant }}{% else %}default{% endif %}-edge"
    assert render_namespace(template, VARS) == "acme-edge"
    assert render_namespace(template, {"tenant": ""}) == "default-edge"


# --- validation at save time --------------------------------------------------------------------

KNOWN = [*CERTIFICATE_VARIABLES, "tenant"]


@pytest.mark.parametrize(
    ("template", "field"),
    [
        (DEFAULT_SECRET_NAME_TEMPLATE, "secret name"),
        ("{{ .tenant }}-edge", "namespace"),
        ("ingress-nginx-tls", "secret name"),
        ("ingress", "namespace"),
        ('{{ .region | default "eu" }}-{{ .tenant }}', "namespace"),
        ('{{ cn | replace(".", "-") }}-tls', "secret name"),
    ],
)
def test_good_templates_pass_validation(template: str, field: str) -> None:
    validate_template(template, field, KNOWN)


@pytest.mark.parametrize(
    ("template", "field", "problem"),
    [
        ("{{ .tenat }}-edge", "namespace", "unknown variable 'tenat'; known variables: cn,"),
        ("{{ .a }}{{ .b }}", "namespace", "unknown variables 'a', 'b'"),
        ('{{ .region | default "eu" }}-{{ .region }}', "namespace", "unknown variable"),
        ("Ingress_TLS", "secret name", "upper-case letter 'I'"),
        ("{{ .tenant }}_edge", "namespace", "fixed text '_edge' contains the character '_'"),
        ("{{ .tenant }}.edge", "namespace", "contains '.'"),
        ("{{ .tenant }}-EDGE", "secret name", "upper-case letter 'E'"),
        ("x" * 64, "namespace", "at most 63"),
        ("{{ .cn ", "secret name", "syntax error"),
        ('{{ .cn | nosuch "x" }}', "secret name", "'nosuch' is not a function"),
    ],
)
def test_bad_templates_fail_validation_with_the_reason(
    template: str, field: str, problem: str
) -> None:
    with pytest.raises(TemplateError) as caught:
        validate_template(template, field, KNOWN)
    assert problem in caught.value.problem
    assert caught.value.field == field


def test_validation_refuses_an_unknown_field_name() -> None:
    with pytest.raises(ValueError, match="'namespace' or 'secret name'"):
        validate_template("x", "secret_name", KNOWN)


# --- properties ---------------------------------------------------------------------------------

TEMPLATE_ALPHABET = string.ascii_letters + string.digits + "-._ {}|().\"'`%*~/$é\n"
NAME_ALPHABET = string.ascii_lowercase + string.digits + "-"
VARIABLE_NAMES = ["cn", "tenant", "Team", "empty", "sans", "x"]
names = st.sampled_from(VARIABLE_NAMES)
values = st.one_of(
    st.text(alphabet=NAME_ALPHABET, min_size=1, max_size=20),  # mostly name-like, so some pass
    st.text(alphabet=NAME_ALPHABET + ".*", max_size=300),
    st.text(max_size=80),
    st.lists(st.text(max_size=10), max_size=3),
    st.integers(),
    st.none(),
)
variable_sets = st.one_of(
    st.fixed_dictionaries({name: values for name in VARIABLE_NAMES}),
    st.dictionaries(names, values, max_size=6),
)
PROPERTY = settings(max_examples=300, deadline=None)


def _template_pieces() -> st.SearchStrategy[str]:
    go_action = st.builds(
        lambda name, fn: f"{{{{ .{name}{fn} }}}}",
        names,
        st.sampled_from(
            [
                "",
                " | lower",
                " | upper",
                ' | replaceAll "." "-"',
                " | trunc 5",
                " | trunc -70",
                ' | default "d"',
                ' | trimPrefix "a"',
                ' | trimSuffix ".com"',
                " | nosuch",
            ]
        ),
    )
    jinja_action = st.builds(lambda name: f"{{{{ {name} }}}}", names)
    return st.lists(
        st.one_of(
            go_action,
            jinja_action,
            st.text(alphabet=NAME_ALPHABET, max_size=12),
            st.text(alphabet=TEMPLATE_ALPHABET, max_size=12),
        ),
        max_size=5,
    ).map("".join)


@PROPERTY
@given(
    template=_template_pieces(),
    variables=variable_sets,
    field=st.sampled_from(["namespace", "secret name"]),
)
def test_any_rendered_name_is_valid_for_its_field(
    template: str, variables: dict[str, object], field: str
) -> None:
    render, pattern, limit = {
        "namespace": (render_namespace, LABEL, 63),
        "secret name": (render_secret_name, SUBDOMAIN, 253),
    }[field]
    try:
        result = render(template, variables)
    except TemplateError as error:
        assert error.field == field
        assert error.problem
    else:
        assert pattern.match(result)
        assert len(result) <= limit


@PROPERTY
@given(
    template=st.one_of(st.text(max_size=200), _template_pieces()),
    field=st.sampled_from(["namespace", "secret name"]),
    known=st.lists(names, max_size=6),
)
def test_validation_never_crashes(template: str, field: str, known: list[str]) -> None:
    try:
        validate_template(template, field, known)
    except TemplateError as error:
        assert error.field == field


_ALNUM = string.ascii_letters + string.digits
# A DNS label: alphanumeric at both ends, hyphens allowed inside.
dns_label = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "-", max_size=20),
    st.sampled_from(["", *_ALNUM]),
).filter(lambda label: not label.endswith("-"))


@PROPERTY
@given(
    labels=st.lists(dns_label, min_size=1, max_size=12),
    wildcard=st.booleans(),
)
def test_the_default_template_names_any_dns_cn_validly_or_says_it_is_too_long(
    labels: list[str], wildcard: bool
) -> None:
    cn = ".".join((["*"] if wildcard else []) + labels)
    variables = certificate_variables(info(cn))
    try:
        name = render_secret_name(DEFAULT_SECRET_NAME_TEMPLATE, variables)
    except TemplateError as error:
        assert "but a secret name is at most 253" in error.problem
    else:
        assert SUBDOMAIN.match(name)
        assert name.endswith("-tls")


@PROPERTY
@given(value=st.text(max_size=40), old=st.text(min_size=1, max_size=3), n=st.integers(-50, 50))
def test_go_and_jinja_spellings_of_a_function_agree(value: str, old: str, n: int) -> None:
    quoted = json.dumps(old)  # a valid string literal in both Go and Jinja
    pairs = [
        (f'{{{{ .v | replaceAll {quoted} "-" }}}}', f"{{{{ v | replace({quoted}, '-') }}}}"),
        (f"{{{{ .v | trunc {n} }}}}", f"{{{{ v | trunc({n}) }}}}"),
    ]
    for go, jinja in pairs:
        outcomes = []
        for template in (go, jinja):
            try:
                outcomes.append(("ok", render_secret_name(template, {"v": value})))
            except TemplateError as error:
                outcomes.append(("error", error.value or ""))
        assert outcomes[0] == outcomes[1]


def _outcome(render: object, template: str) -> tuple[str, str, str | None]:
    try:
        return ("ok", render(template, {}), None)  # type: ignore[operator]
    except TemplateError as error:
        return ("error", error.problem, error.value)


@PROPERTY
@given(
    template=st.text(
        alphabet=st.sampled_from(string.ascii_letters + string.digits + " -._*/é\t"), max_size=70
    )
)
def test_a_fixed_name_renders_and_fails_exactly_as_through_jinja(template: str) -> None:
    # Plain names skip Jinja (a fleet has one literal namespace per target); the shortcut
    # must not change a result or an error message. "{{ '' }}" forces the Jinja path.
    for render in (render_namespace, render_secret_name):
        assert _outcome(render, template) == _outcome(render, template + "{{ '' }}")


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", "kube-node-lease"])
def test_a_system_namespace_is_refused_unless_allowed(namespace: str) -> None:
    from worker.core.names import SystemNamespaceRefused, refuse_system_namespace

    with pytest.raises(SystemNamespaceRefused, match="--allow-system-namespace"):
        refuse_system_namespace(namespace, allowed=False, target="edge")
    refuse_system_namespace(namespace, allowed=True, target="edge")


@pytest.mark.parametrize("namespace", ["ingress", "kube-systems", "my-kube-system", "default"])
def test_other_namespaces_are_not_system_namespaces(namespace: str) -> None:
    from worker.core.names import refuse_system_namespace

    refuse_system_namespace(namespace, allowed=False, target="edge")


@pytest.mark.parametrize(
    ("template", "own", "later"),
    [
        ("ingress", {}, set()),
        ("{{ .tenant }}-edge", {"tenant": "acme"}, set()),
        ("{{ .tenant }}-edge", {}, {"tenant"}),
        ('{{ .cn | trimSuffix ".example.com" }}', {"tenant": "acme"}, {"cn"}),
        ('{{ .tenant }}-{{ .cn | default "x" }}', {"tenant": "acme"}, {"cn"}),
    ],
)
def test_variables_left_for_the_run_are_those_the_target_does_not_give(
    template: str, own: dict[str, object], later: set[str]
) -> None:
    assert variables_left_for_the_run(template, "namespace", own) == later
    decided = render_if_decided(template, "namespace", own)
    assert (decided is None) == bool(later)


def test_a_name_the_targets_own_variables_decide_is_validated_at_save() -> None:
    assert render_if_decided("{{ .tenant }}-edge", "namespace", {"tenant": "acme"}) == "acme-edge"
    with pytest.raises(TemplateError, match="ACME_corp-edge"):
        render_if_decided("{{ .tenant }}-edge", "namespace", {"tenant": "ACME_corp"})
    with pytest.raises(TemplateError, match="secret name"):
        render_if_decided("{{ .x }}" + "a" * 300, "secret name", {"x": "y"})
    # Only a run knows the certificate: nothing to judge yet, whatever the target gives.
    assert render_if_decided("{{ .cn }}-{{ .tenant }}", "namespace", {"tenant": "ACME_"}) is None
