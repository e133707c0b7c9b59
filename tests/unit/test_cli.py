"""The operator CLI: help everywhere, bad input refused with exit 2 and nothing written,
secrets never printed, JSON output parses, probes and keys work on the embedded default.

Every test runs the real typer app in-process (typer's CliRunner) against its own data
folder; settings come from the environment of the invocation, as in production.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from models import migrate
from models.rollback import STORE_CONTENT_OFF
from tests.certfactory import make_chain
from worker.cli.main import app
from worker.cli.output import diff_from_dict, diff_summary, render_diff_dict, safe_text
from worker.core.crypto import generate_kek
from worker.core.secret import (
    CertificateSummary,
    DataEntry,
    KeySummary,
    MetaChange,
    OpaqueSummary,
    SecretDiff,
    render_diff,
)
from worker.platform.settings import load_settings

TOKEN = "tok-CLI-TEST-do-not-print-0123456789"
KEK_1 = base64.b64encode(bytes(range(32))).decode()
KEK_2 = base64.b64encode(bytes(range(32, 64))).decode()


# ------------------------------------------------------------------------------ fixtures


def kubeconfig(token: str = TOKEN, server: str = "https://127.0.0.1:1", **user: Any) -> str:
    """A token kubeconfig the vetting accepts (nothing listens on port 1)."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": base64.b64encode(
                            make_chain(intermediates=0).root_pem
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": "u", "user": {"token": token, **user}}],
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "ctx",
        }
    )


class Cli:
    """Runs `certautopilot ...` in-process with an environment of its own."""

    def __init__(self, env: dict[str, str | None], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None) -> Any:
        return self.runner.invoke(app, list(args), env=self.env, input=stdin)

    def ok(self, *args: str, stdin: str | None = None) -> Any:
        result = self(*args, stdin=stdin)
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--output", "json").stdout)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI on a fresh embedded default in tmp_path, with no other CAP_* variable set."""
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("CAP_")}
    env.update(
        {
            "CAP_DATA_DIR": str(tmp_path / "data"),
            # Somewhere without a token: this machine is "not in Kubernetes".
            "CAP_SERVICEACCOUNT_DIR": str(tmp_path / "no-serviceaccount"),
            "KUBERNETES_SERVICE_HOST": None,
            "KUBERNETES_SERVICE_PORT": None,
            "CAP_KUBE_RETRY_ATTEMPTS": "1",
            "CAP_KUBE_CONNECT_TIMEOUT": "1",
            "FLOWER_BASIC_AUTH": None,
        }
    )
    return Cli(env, tmp_path)


@pytest.fixture
def cert_files(cli: Cli) -> dict[str, str]:
    """A leaf, its intermediate, key and root as files."""
    chain = make_chain(cn="app.example.com", intermediates=1)
    return {
        "cert": cli.write("leaf.pem", chain.leaf_pem),
        "chain": cli.write("chain.pem", chain.chain_pem),
        "key": cli.write("key.pem", chain.key_pem),
        "ca": cli.write("root.pem", chain.root_pem),
    }


@pytest.fixture
def setup(cli: Cli, cert_files: dict[str, str]) -> Iterator[dict[str, str]]:
    """A credential, a certificate, two unchecked targets, a group and a distribution."""
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    cert = cli.json("certs", "import", "--cert", cert_files["cert"], "--key", cert_files["key"])
    for name in ("t1", "t2"):
        cli.ok(
            "targets", "add", name, "--namespace", "ingress",
            "--kubeconfig-credential", "kc", "--no-check",
        )  # fmt: skip
    cli.ok("groups", "create", "g", "--target", "t1", "--target", "t2", "--batch-size", "1")
    distribution = cli.json("distributions", "attach", cert["id"], "--group", "g")
    yield {"cert": cert["id"], "distribution": distribution["id"]}


def all_command_paths() -> list[list[str]]:
    """Every command and sub-command of the app, as argument lists."""
    paths: list[list[str]] = [[]]

    def walk(command: Any, prefix: list[str]) -> None:
        # Typer ships its own click; a group is whatever has sub-commands.
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


# ---------------------------------------------------------------------------------- help

COMMANDS = all_command_paths()


def test_the_cli_offers_every_command_of_the_brief() -> None:
    names = {" ".join(path) for path in COMMANDS}
    expected = {
        "credentials add-kubeconfig", "credentials add-webhook-secret", "credentials list",
        "certs import", "certs list", "certs renew",
        "targets add", "targets list", "targets show", "targets check",
        "groups create", "groups add-targets", "groups list", "groups show",
        "distributions attach", "distributions attach-webhook", "distributions list",
        "run", "rollback", "runs list", "runs show", "keys rotate", "keys generate",
        "migrate", "worker", "flower", "probe liveness", "probe readiness", "demo",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "(root)")
def test_every_command_has_help(cli: Cli, path: list[str]) -> None:
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    # Asking for help must not create anything (no database, no KEK file).
    assert not (cli.folder / "data").exists()


# ------------------------------------------------------------------------ bad input: exit 2


def assert_refused(result: Any, *fragments: str) -> None:
    """Exit 2 with ``error: ...`` as the last line on stderr, naming the problem."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.splitlines()[-1].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_garbage_certificate_is_refused_and_nothing_is_stored(
    cli: Cli, cert_files: dict[str, str]
) -> None:
    garbage = cli.write("garbage.pem", "this is not a certificate\n")
    assert_refused(cli("certs", "import", "--cert", garbage, "--key", cert_files["key"]), "PEM")
    assert cli.json("certs", "list") == []


def test_certificate_whose_key_does_not_match_is_refused(
    cli: Cli, cert_files: dict[str, str]
) -> None:
    other_key = cli.write("other.pem", make_chain(fresh_leaf_key=True).key_pem)
    result = cli("certs", "import", "--cert", cert_files["cert"], "--key", other_key)
    assert_refused(result)
    assert cli.json("certs", "list") == []


def test_a_second_import_of_the_same_leaf_is_refused_unless_allowed(
    cli: Cli, cert_files: dict[str, str]
) -> None:
    args = ("certs", "import", "--cert", cert_files["cert"], "--key", cert_files["key"])
    first = cli.json(*args)
    assert_refused(cli(*args), f"already stored as {first['id']}", "--allow-duplicate")
    assert [row["id"] for row in cli.json("certs", "list")] == [first["id"]]
    second = cli.json(*args, "--allow-duplicate")
    assert second["id"] != first["id"]
    assert second["sha256_fingerprint"] == first["sha256_fingerprint"]


def test_bundle_errors_name_the_command_line_options_not_the_api_parameters(
    cli: Cli, cert_files: dict[str, str]
) -> None:
    # The key given as the certificate: the message points at --cert and --key.
    result = cli("certs", "import", "--cert", cert_files["key"], "--key", cert_files["key"])
    assert_refused(result, "--cert", "--key")
    assert "_pem" not in result.stderr


def test_missing_file_is_named(cli: Cli, cert_files: dict[str, str]) -> None:
    missing = str(cli.folder / "nope.pem")
    assert_refused(cli("certs", "import", "--cert", missing, "--key", cert_files["key"]), missing)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--file", "x", "--stdin"], "exactly one of --file PATH or --stdin"),
        ([], "exactly one of --file PATH or --stdin"),
    ],
)
def test_kubeconfig_source_must_be_exactly_one(cli: Cli, args: list[str], fragment: str) -> None:
    assert_refused(cli("credentials", "add-kubeconfig", "kc", *args), fragment)


def test_kubeconfig_that_runs_a_program_is_refused_without_echoing_it(cli: Cli) -> None:
    text = kubeconfig(exec={"command": "/bin/steal-tokens", "apiVersion": "v1"})
    result = cli("credentials", "add-kubeconfig", "kc", "--stdin", stdin=text)
    assert_refused(result, "exec")
    assert TOKEN not in result.output
    assert cli.json("credentials", "list") == []


def test_unknown_credential_is_refused_and_no_target_saved(cli: Cli) -> None:
    result = cli(
        "targets", "add", "t", "--namespace", "ingress", "--kubeconfig-credential", "nope"
    )  # fmt: skip
    assert_refused(result, "credential", "'nope'", "credentials list")
    assert cli.json("targets", "list") == []


def test_in_cluster_outside_kubernetes_is_refused(cli: Cli) -> None:
    assert_refused(
        cli("targets", "add", "t", "--namespace", "ingress", "--in-cluster"), "in-cluster"
    )
    assert cli.json("targets", "list") == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kubeconfig-credential", "kc", "--in-cluster"], "exactly one of"),
        ([], "exactly one of"),
        (["--kubeconfig-credential", "kc", "--var", "novalue"], "name=value"),
        (["--kubeconfig-credential", "kc", "--secret-name", "{{ .nope }}-tls"], "nope"),
    ],
)
def test_invalid_target_options_are_refused(cli: Cli, args: list[str], fragment: str) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    assert_refused(cli("targets", "add", "t", "--namespace", "ingress", *args), fragment)
    assert cli.json("targets", "list") == []


@pytest.mark.parametrize(
    ("namespace", "variables"),
    [
        ("kube-system", []),
        ("kube-public", []),
        ("kube-node-lease", []),
        ("kube-{{ .tier }}", ["--var", "tier=system"]),
    ],
)
def test_a_system_namespace_is_refused_unless_the_target_allows_it(
    cli: Cli, namespace: str, variables: list[str]
) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    common = ["--namespace", namespace, "--kubeconfig-credential", "kc", "--no-check", *variables]
    assert_refused(
        cli("targets", "add", "t", *common), "system namespace", "--allow-system-namespace"
    )
    assert cli.json("targets", "list") == []
    cli.ok("targets", "add", "t", *common, "--allow-system-namespace")
    assert cli.json("targets", "show", "t")["allow_system_namespace"] is True
    assert "allow system namespace" in cli.ok("targets", "show", "t").stdout


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--batch-size", "0", "at least 1"),
        ("--batch-size", "150%", "more than 100%"),
        ("--batch-size", "1,x", "neither"),
        ("--failure-threshold", "-1", "failure threshold"),
        ("--failure-threshold", "ten", "neither"),
    ],
)
def test_bad_fanout_settings_are_refused_and_no_group_saved(
    cli: Cli, setup: dict[str, str], option: str, value: str, fragment: str
) -> None:
    assert_refused(cli("groups", "create", "bad", "--target", "t1", option, value), fragment)
    assert [group["name"] for group in cli.json("groups", "list")] == ["g"]


def test_unknown_target_in_a_group_is_refused(cli: Cli, setup: dict[str, str]) -> None:
    assert_refused(cli("groups", "create", "g2", "--target", "ghost"), "'ghost'", "targets list")
    assert [group["name"] for group in cli.json("groups", "list")] == ["g"]


def test_adding_a_member_twice_is_refused(cli: Cli, setup: dict[str, str]) -> None:
    assert_refused(cli("groups", "add-targets", "g", "--target", "t1"), "already contains")


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "t1", "--group", "g"],
        [],
    ],
)
def test_attach_needs_exactly_one_destination(
    cli: Cli, setup: dict[str, str], args: list[str]
) -> None:
    assert_refused(cli("distributions", "attach", setup["cert"], *args), "exactly one of")


def test_attach_to_an_unknown_certificate_is_refused(cli: Cli, setup: dict[str, str]) -> None:
    result = cli("distributions", "attach", "no-such-cert", "--target", "t1")
    assert_refused(result, "certificate", "certs list")
    assert len(cli.json("distributions", "list")) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "DIST"], "exactly one of --dry-run"),
        (["run", "DIST", "--dry-run", "--execute"], "exactly one of --dry-run"),
        (["run", "no-such-distribution", "--dry-run"], "distributions list"),
        (["rollback", "no-such-distribution"], "distributions list"),
        (["runs", "show", "no-such-run"], "runs list"),
        (["keys", "rotate", "--to", "k9"], "k9"),
    ],
)
def test_runs_with_bad_input_are_refused_before_anything_is_queued(
    cli: Cli, setup: dict[str, str], args: list[str], fragment: str
) -> None:
    args = [setup["distribution"] if arg == "DIST" else arg for arg in args]
    assert_refused(cli(*args), fragment)
    assert cli.json("runs", "list") == []


def test_rollback_with_store_content_off_explains_the_greyed_out_button(
    cli: Cli, setup: dict[str, str]
) -> None:
    assert_refused(cli("rollback", setup["distribution"]), STORE_CONTENT_OFF)
    listed = cli.json("distributions", "list")
    assert listed[0]["rollback_available"] is False
    assert listed[0]["rollback_reason"] == STORE_CONTENT_OFF
    assert cli.json("runs", "list") == []


def test_webhook_is_stacked_after_the_kubernetes_distribution(
    cli: Cli, setup: dict[str, str]
) -> None:
    cli.ok("credentials", "add-webhook-secret", "hook", "--stdin", stdin="x" * 32 + "\n")
    assert_refused(
        cli("distributions", "attach-webhook", setup["cert"], "--url", "ftp://example.test"),
        "https://",
    )
    webhook = cli.json(
        "distributions", "attach-webhook", setup["cert"],
        "--url", "https://hooks.example.test/rollout", "--secret", "hook",
    )  # fmt: skip
    assert (webhook["kind"], webhook["position"]) == ("webhook", 1)
    listed = cli.json("distributions", "list", "--cert", setup["cert"])
    assert [d["kind"] for d in listed] == ["kubernetes", "webhook"]
    assert_refused(cli("run", webhook["id"], "--dry-run"), "can only be executed")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://[::1", "not a valid URL"),
        ("https://", "names no host"),
        ("https://exa mple.com/", "white space"),
        ("https://example.com/\x1b[31mred", "control characters"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://example.com:99999/", "not a valid URL"),
    ],
)
def test_a_malformed_webhook_url_is_refused_and_nothing_stacked(
    cli: Cli, setup: dict[str, str], url: str, fragment: str
) -> None:
    result = cli("distributions", "attach-webhook", setup["cert"], "--url", url)
    assert_refused(result, fragment)
    assert "pw" not in result.stderr
    assert [d["kind"] for d in cli.json("distributions", "list")] == ["kubernetes"]


def test_a_kubeconfig_credential_is_not_accepted_as_a_webhook_secret(
    cli: Cli, setup: dict[str, str]
) -> None:
    result = cli(
        "distributions", "attach-webhook", setup["cert"],
        "--url", "https://hooks.example.test/x", "--secret", "kc",
    )  # fmt: skip
    assert_refused(result, "not a webhook secret", "add-webhook-secret")
    assert [d["kind"] for d in cli.json("distributions", "list")] == ["kubernetes"]


@pytest.mark.parametrize(
    "name", ["line1\nline2", "x\x1b[31mred", "n" * 254, " padded", ""]
)
def test_names_an_operator_could_not_type_back_are_refused(cli: Cli, name: str) -> None:
    result = cli("credentials", "add-kubeconfig", name, "--stdin", stdin=kubeconfig())
    assert_refused(result, "name")
    assert cli.json("credentials", "list") == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--batch-size", "99999999999999999999999999999999"),
        ("--batch-size", "9223372036854775808"),
        ("--failure-threshold", "1000000000000000000000000000"),
        ("--batch-size", "\uff11"),
    ],
)
def test_an_absurd_fanout_number_is_refused_and_the_groups_stay_listable(
    cli: Cli, setup: dict[str, str], option: str, value: str
) -> None:
    assert_refused(cli("groups", "create", "huge", "--target", "t1", option, value))
    assert [group["name"] for group in cli.json("groups", "list")] == ["g"]


def test_short_webhook_secret_is_refused(cli: Cli) -> None:
    result = cli("credentials", "add-webhook-secret", "hook", "--stdin", stdin="short\n")
    assert_refused(result, "at least 16")
    assert TOKEN not in result.output


def test_flower_refuses_to_start_without_authentication(cli: Cli) -> None:
    assert_refused(cli("flower"), "FLOWER_BASIC_AUTH", "--no-auth")


# ---------------------------------------------------------------------- secrets stay secret


def test_credentials_are_listed_by_name_and_never_by_content(cli: Cli) -> None:
    added = cli.ok("credentials", "add-kubeconfig", "prod-eu", "--stdin", stdin=kubeconfig())
    hook = cli.write("hook.key", "0123456789abcdef0123456789abcdef\n")
    cli.ok("credentials", "add-webhook-secret", "hook", "--file", hook)
    text = cli.ok("credentials", "list")
    listed = cli.json("credentials", "list")
    assert [(c["name"], c["kind"]) for c in listed] == [
        ("hook", "webhook_hmac"),
        ("prod-eu", "kubeconfig"),
    ]
    for output in (added.output, text.output, json.dumps(listed)):
        assert TOKEN not in output
        assert "0123456789abcdef" not in output
        assert "certificate-authority-data" not in output
    assert "prod-eu" in text.stdout


def test_certificate_output_never_shows_the_private_key(
    cli: Cli, cert_files: dict[str, str]
) -> None:
    imported = cli.ok("certs", "import", "--cert", cert_files["cert"], "--key", cert_files["key"])
    listed = cli.ok("certs", "list", "--output", "json")
    for output in (imported.output, listed.output):
        assert "PRIVATE KEY" not in output


# ------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize(
    "args",
    [
        ["credentials", "list"],
        ["certs", "list"],
        ["targets", "list"],
        ["targets", "show", "t1"],
        ["groups", "list"],
        ["groups", "show", "g"],
        ["distributions", "list"],
    ],
    ids=" ".join,
)
def test_json_output_parses(cli: Cli, setup: dict[str, str], args: list[str]) -> None:
    parsed = cli.json(*args)
    assert parsed, f"{args} printed nothing"


def test_group_shows_its_batches_and_settings(cli: Cli, setup: dict[str, str]) -> None:
    group = cli.json("groups", "show", "g")
    assert group["targets"] == ["t1", "t2"]
    assert group["batches"] == [["t1"], ["t2"]]
    assert group["batch_size"] == "1"
    assert group["failure_threshold"] == "0 (default)"
    cli.ok(
        "targets", "add", "t3", "--namespace", "x", "--kubeconfig-credential", "kc", "--no-check"
    )  # fmt: skip
    grown = cli.json("groups", "add-targets", "g", "--target", "t3")
    assert grown["batches"] == [["t1"], ["t2"], ["t3"]]


def test_target_show_names_its_credential_and_groups(cli: Cli, setup: dict[str, str]) -> None:
    target = cli.json("targets", "show", "t1")
    assert (target["credential"], target["groups"], target["health_status"]) == (
        "kc",
        ["g"],
        "unknown",
    )
    assert target["secret_name"] == '{{ .cn | replaceAll "." "-" }}-tls'


def test_certs_list_shows_expiry_and_days_left(cli: Cli, cert_files: dict[str, str]) -> None:
    cli.ok("certs", "import", "--cert", cert_files["cert"], "--key", cert_files["key"])
    text = cli.ok("certs", "list").stdout
    assert "app.example.com" in text
    assert "days left" in text
    (cert,) = cli.json("certs", "list")
    assert cert["not_after"].endswith("+00:00")


def test_renewal_keeps_the_id_and_changes_the_serial(
    cli: Cli, cert_files: dict[str, str], setup: dict[str, str]
) -> None:
    renewed = make_chain(cn="app.example.com", intermediates=0, fresh_leaf_key=True)
    cert = cli.write("renewed.pem", renewed.leaf_pem)
    key = cli.write("renewed.key", renewed.key_pem)
    result = cli.json("certs", "renew", setup["cert"], "--cert", cert, "--key", key)
    assert result["before"]["id"] == result["after"]["id"] == setup["cert"]
    assert result["before"]["serial"] != result["after"]["serial"]
    text = cli.ok("certs", "renew", setup["cert"], "--cert", cert, "--key", key).stdout
    assert f"run {setup['distribution']} --dry-run" in text


def test_renewal_with_a_mismatched_key_is_refused_and_keeps_the_old_certificate(
    cli: Cli, setup: dict[str, str]
) -> None:
    renewed = make_chain(cn="app.example.com", intermediates=0, fresh_leaf_key=True)
    other = make_chain(cn="app.example.com", intermediates=0, fresh_leaf_key=True)
    before = cli.json("certs", "list")
    result = cli(
        "certs", "renew", setup["cert"],
        "--cert", cli.write("r.pem", renewed.leaf_pem), "--key", cli.write("o.key", other.key_pem),
    )  # fmt: skip
    assert_refused(result)
    assert cli.json("certs", "list") == before


def test_a_renewal_without_ca_keeps_the_stored_ca_when_it_issues_the_renewal(cli: Cli) -> None:
    from tests.certfactory import cert_to_pem, key_to_pem

    chain = make_chain(cn="app.example.com", intermediates=1)
    chain_file = cli.write("chain.pem", chain.chain_pem)
    imported = cli.json(
        "certs", "import", "--cert", cli.write("leaf.pem", chain.leaf_pem),
        "--key", cli.write("key.pem", chain.key_pem), "--chain", chain_file,
        "--ca", cli.write("root.pem", chain.root_pem),
    )  # fmt: skip
    assert imported["has_ca"] is True
    leaf, key = chain.issue_leaf("app.example.com")
    renew = ("certs", "renew", imported["id"], "--chain", chain_file)
    leaf_file, key_file = cli.write("r.pem", cert_to_pem(leaf)), cli.write("r.key", key_to_pem(key))
    text = cli.ok(*renew, "--cert", leaf_file, "--key", key_file).stdout
    assert "CA: kept" in text
    assert cli.json("certs", "list")[0]["has_ca"] is True
    # A renewal from another CA: stored without one, and the output says so.
    other = make_chain(cn="app.example.com", intermediates=1)
    text = cli.ok(
        "certs", "renew", imported["id"], "--cert", cli.write("o.pem", other.leaf_pem),
        "--key", cli.write("o.key", other.key_pem), "--chain", cli.write("oc.pem", other.chain_pem),
    ).stdout  # fmt: skip
    assert "CA: dropped" in text and "--ca" in text
    assert cli.json("certs", "list")[0]["has_ca"] is False


def test_a_renewal_for_other_names_is_refused_unless_allowed_and_changes_are_shown(
    cli: Cli, setup: dict[str, str]
) -> None:
    other = make_chain(cn="billing.example.org", intermediates=0, fresh_leaf_key=True)
    cert, key = cli.write("other.pem", other.leaf_pem), cli.write("other.key", other.key_pem)
    before = cli.json("certs", "list")
    assert_refused(
        cli("certs", "renew", setup["cert"], "--cert", cert, "--key", key),
        "billing.example.org", "app.example.com", "no name in common", "--allow-name-change",
    )  # fmt: skip
    assert cli.json("certs", "list") == before
    widened = make_chain(
        cn="app.example.com", sans=["app.example.com", "APP2.example.com"], intermediates=0,
        fresh_leaf_key=True,
    )  # fmt: skip
    cert, key = cli.write("w.pem", widened.leaf_pem), cli.write("w.key", widened.key_pem)
    text = cli.ok("certs", "renew", setup["cert"], "--cert", cert, "--key", key).stdout
    assert "names: +app2.example.com" in text
    cert, key = cli.write("other.pem", other.leaf_pem), cli.write("other.key", other.key_pem)
    allowed = cli.json(
        "certs", "renew", setup["cert"], "--cert", cert, "--key", key, "--allow-name-change"
    )
    assert allowed["after"]["common_name"] == "billing.example.org"


# ----------------------------------------------------------------------- schema and health


def test_the_embedded_default_creates_its_schema_on_first_use(cli: Cli) -> None:
    result = cli.ok("credentials", "list")
    assert "initialised the embedded database" in result.stderr
    assert "initialised" not in cli.ok("credentials", "list").stderr


def test_another_database_without_schema_asks_for_migrate(cli: Cli, tmp_path: Path) -> None:
    cli.env["CAP_DATABASE_URL"] = f"sqlite:///{tmp_path / 'other.db'}"
    cli.env["CAP_KEK"] = f"k1:{KEK_1}"
    result = cli("credentials", "list")
    assert result.exit_code == 1
    assert "run `certautopilot migrate`" in result.stderr
    assert f"-> {migrate.head()}" in cli.ok("migrate").stdout
    assert "already at schema" in cli.ok("migrate").stdout
    assert cli.json("credentials", "list") == []


def test_names_the_targets_own_variables_decide_are_refused_at_save(cli: Cli) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    common = ["--kubeconfig-credential", "kc", "--no-check"]
    assert_refused(
        cli("targets", "add", "t1", "--namespace", "{{ .tenant }}-edge", "--var",
            "tenant=ACME_corp", *common),
        "ACME_corp-edge",
    )  # fmt: skip
    assert_refused(
        cli("targets", "add", "t2", "--namespace", "ingress", "--secret-name",
            "{{ .x }}" + "a" * 300, "--var", "x=y", *common),
        "secret name",
    )  # fmt: skip
    assert cli.json("targets", "list") == []


def test_a_namespace_that_needs_certificate_variables_is_saved_with_health_unknown(
    cli: Cli,
) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    added = cli.ok(
        "targets", "add", "t", "--namespace", '{{ .cn | trimSuffix ".example.com" }}',
        "--kubeconfig-credential", "kc",
    )  # fmt: skip
    assert "health: unknown" in added.stdout
    assert "reads cn, which a run supplies" in added.stdout
    assert "define it on the target" not in added.stdout


def test_record_cluster_is_refused_for_a_kubeconfig_target(cli: Cli, setup: dict[str, str]) -> None:
    assert_refused(cli("targets", "check", "t1", "--record-cluster"), "in-cluster targets")


def test_a_target_listed_twice_in_a_group_is_named_as_given(
    cli: Cli, setup: dict[str, str]
) -> None:
    result = cli("groups", "create", "g2", "--target", "t1", "--target", "t1")
    assert_refused(result, "'t1' listed more than once")
    assert [g["name"] for g in cli.json("groups", "list")] == ["g"]


def test_a_second_attach_to_the_same_group_is_refused_unless_allowed(
    cli: Cli, setup: dict[str, str]
) -> None:
    attach = ("distributions", "attach", setup["cert"], "--group", "g")
    assert_refused(cli(*attach), f"distribution {setup['distribution']}", "--allow-duplicate")
    assert len(cli.json("distributions", "list")) == 1
    second = cli.json(*attach, "--allow-duplicate")
    assert second["id"] != setup["distribution"]
    cli.json("distributions", "attach", setup["cert"], "--target", "t1")  # another destination


def test_a_run_that_cannot_progress_is_cancelled_and_frees_its_distribution(
    cli: Cli, setup: dict[str, str]
) -> None:
    # No worker runs here: the execute stays queued, like one waiting for a pool with none.
    queued = cli.json("run", setup["distribution"], "--execute", "--no-wait")["run_id"]
    assert_refused(cli("run", setup["distribution"], "--execute", "--no-wait"), queued)
    cancelled = cli.json("runs", "cancel", queued)
    assert cancelled == {"run_id": queued, "state": "halted", "skipped": 0}
    shown = cli.json("runs", "show", queued)
    assert shown["state"] == "halted" and "cancelled by the operator" in shown["reason"]
    assert_refused(cli("runs", "cancel", queued), "already halted")
    assert_refused(cli("runs", "cancel", "no-such-run"), "runs list")
    cli.json("run", setup["distribution"], "--execute", "--no-wait")  # the distribution is free


def test_unhealthy_target_is_saved_and_add_and_check_exit_1(cli: Cli) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    added = cli("targets", "add", "t", "--namespace", "ingress", "--kubeconfig-credential", "kc")
    assert added.exit_code == 1, added.stdout
    assert "health: unhealthy" in added.stdout
    assert "targets check t" in added.stdout
    checked = cli("targets", "check", "t", "--output", "json")
    assert checked.exit_code == 1
    assert json.loads(checked.stdout)["status"] == "unhealthy"
    assert cli.json("targets", "show", "t")["health_status"] == "unhealthy"


def test_liveness_follows_the_heartbeat_file(cli: Cli) -> None:
    assert "no heartbeat file" in cli("probe", "liveness").stderr
    heartbeat = cli.folder / "data" / "worker-heartbeat"
    heartbeat.touch()
    assert cli("probe", "liveness").exit_code == 0
    stale = time.time() - 3 * 15 - 5
    os.utime(heartbeat, (stale, stale))
    result = cli("probe", "liveness")
    assert result.exit_code == 1
    assert "limit 45s" in result.stderr


def test_readiness_needs_the_schema_and_the_broker(cli: Cli) -> None:
    cli.env["CAP_DATABASE_URL"] = f"sqlite:///{cli.folder / 'other.db'}"
    cli.env["CAP_KEK"] = f"k1:{KEK_1}"
    unmigrated = cli("probe", "readiness")
    assert unmigrated.exit_code == 1
    assert "certautopilot migrate" in unmigrated.stderr
    cli.ok("migrate")
    assert "ready" in cli.ok("probe", "readiness").stdout
    cli.env["CAP_BROKER_URL"] = "redis://127.0.0.1:1/0"
    no_broker = cli("probe", "readiness", "--timeout", "1")
    assert no_broker.exit_code == 1
    assert "broker redis://127.0.0.1:1/0 unreachable" in no_broker.stderr


# ---------------------------------------------------------------------------------- keys


def test_generated_kek_line_is_accepted_by_the_settings(cli: Cli, tmp_path: Path) -> None:
    line = cli.ok("keys", "generate", "--id", "k7").stdout.strip()
    settings = load_settings({"HOME": str(tmp_path), "CAP_KEK": line})
    assert settings.crypto.current_key_id == "k7"
    assert_refused(cli("keys", "generate", "--id", "bad id!"), "invalid")


def test_rotation_rewraps_every_credential_under_the_new_key(cli: Cli) -> None:
    cli.env["CAP_KEK"] = f"k1:{KEK_1},k2:{KEK_2}"
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    assert [c["key_id"] for c in cli.json("credentials", "list")] == ["k1"]
    assert "re-wrapped 1 secret(s)" in cli.ok("keys", "rotate", "--to", "k2").stdout
    assert [c["key_id"] for c in cli.json("credentials", "list")] == ["k2"]
    assert "re-wrapped 0 secret(s)" in cli.ok("keys", "rotate", "--to", "k2").stdout
    cli.env["CAP_KEK"] = f"k2:{KEK_2}"
    assert [c["name"] for c in cli.json("credentials", "list")] == ["kc"]
    assert generate_kek() != generate_kek()


# ---------------------------------------------------------------------- diffs from storage

_hex = st.text("0123456789abcdef", min_size=1, max_size=40)
_cert_summary = st.builds(
    CertificateSummary,
    subject=st.one_of(st.none(), st.text(max_size=30)),
    sans=st.lists(st.text(max_size=20), max_size=3).map(tuple),
    issuer=st.one_of(st.none(), st.text(max_size=30)),
    serial=st.one_of(st.none(), _hex),
    not_after=st.one_of(st.none(), st.just("2030-01-01T00:00:00Z")),
    sha256_fingerprint=st.one_of(st.none(), _hex),
    chain_length=st.integers(0, 4),
    error=st.one_of(st.none(), st.text(max_size=20)),
)
_summary = st.one_of(
    _cert_summary,
    st.builds(KeySummary, st.one_of(st.none(), _hex), st.one_of(st.none(), st.text(max_size=9))),
    st.builds(OpaqueSummary, st.integers(0, 10_000)),
)
_meta = st.builds(
    MetaChange, st.text(min_size=1, max_size=20), st.none() | st.text(), st.none() | st.text()
)
_diffs = st.builds(
    SecretDiff,
    action=st.sampled_from(["create", "update", "unchanged"]),
    namespace=st.text(max_size=20),
    name=st.text(max_size=20),
    unmanaged=st.booleans(),
    immutable=st.booleans(),
    old_type=st.one_of(st.none(), st.sampled_from(["Opaque", "kubernetes.io/tls"])),
    new_type=st.just("kubernetes.io/tls"),
    data=st.lists(
        st.builds(
            DataEntry,
            st.sampled_from(["tls.crt", "tls.key", "ca.crt", "other"]),
            st.sampled_from(["added", "removed", "changed", "unchanged"]),
            st.none() | _summary,
            st.none() | _summary,
        ),
        max_size=4,
    ).map(tuple),
    labels=st.lists(_meta, max_size=3).map(tuple),
    annotations=st.lists(_meta, max_size=3).map(tuple),
    live_resource_version=st.none() | st.text("0123456789", min_size=1, max_size=6),
)


@given(_diffs)
def test_a_stored_diff_renders_exactly_like_the_original(diff: SecretDiff) -> None:
    stored = json.loads(json.dumps(diff.to_dict()))
    assert diff_from_dict(stored) == diff
    assert render_diff_dict(stored) == render_diff(diff)


def _entry(key: str, change: str, old: Any, new: Any) -> dict[str, Any]:
    return {"key": key, "change": change, "old": old, "new": new}


@pytest.mark.parametrize(
    ("diff", "expected"),
    [
        (None, ""),
        (
            {"action": "unchanged", "data": []},
            "unchanged: the Secret already holds this certificate",
        ),
        (
            {
                "action": "update",
                "unmanaged": True,
                "data": [
                    _entry("tls.crt", "changed", {"serial": "0a"}, {"serial": "0b"}),
                    _entry("tls.key", "unchanged", {}, {}),
                ],
            },
            "update: tls.crt (serial 0a -> 0b); the Secret was not created by CertAutoPilot",
        ),
        (
            {"action": "create", "data": [_entry("tls.crt", "added", None, {"serial": "1" * 40})]},
            "create: tls.crt (serial 11111111111111…)",
        ),
    ],
)
def test_diff_summary_names_the_changed_keys_and_serials(
    diff: dict[str, Any] | None, expected: str
) -> None:
    assert diff_summary(diff) == expected


# --------------------------------------------------------------------------- output safety

HOSTILE_NAMES = [
    "[/]",
    "[bold red]x",
    "[link=https://evil.example]x[/link]",
    ":warning: [dim]",
]
TERMINAL_CONTROLS = ["\x1b", "\r", "\x07", "\x9b", "\x9d", "\u202e"]


def assert_no_terminal_controls(text: str) -> None:
    for control in TERMINAL_CONTROLS:
        assert control not in text, (control, text)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_markup_in_a_name_is_shown_literally(cli: Cli, name: str) -> None:
    added = cli.ok("credentials", "add-webhook-secret", name, "--stdin", stdin="x" * 32)
    assert f"stored webhook secret {name!r}" in added.stdout
    assert name in cli.ok("credentials", "list").stdout
    assert [c["name"] for c in cli.json("credentials", "list")] == [name]


def test_markup_in_a_namespace_or_context_is_a_clear_error_not_a_crash(cli: Cli) -> None:
    # Before: rich.errors.MarkupError (exit 1). Now the value is quoted literally (exit 2).
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    refused = cli("targets", "add", "t", "--namespace", "[/]", "--kubeconfig-credential", "kc")
    assert_refused(refused, "'[/]'")
    no_context = yaml.safe_load(kubeconfig())
    no_context["current-context"] = "[bold red]x[/]"
    text = yaml.safe_dump(no_context)
    refused = cli("credentials", "add-kubeconfig", "kc2", "--stdin", stdin=text)
    assert_refused(refused, "[bold red]x[/]")
    assert [c["name"] for c in cli.json("credentials", "list")] == ["kc"]


def test_terminal_control_sequences_never_reach_the_terminal(cli: Cli) -> None:
    link = "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"
    name = f"{link}\x1b[31mred\x1b[0m\rover\x07\x9b2J\u202eevil"
    # Such a name could not be typed back: it is refused, and the refusal quoting it shows
    # none of its controls.
    refused = cli("credentials", "add-webhook-secret", name, "--stdin", stdin="x" * 32)
    assert_refused(refused, "control characters")
    assert_no_terminal_controls(refused.stderr)
    assert "\\x1b]8;;" in refused.stderr  # quoted inert (escaped), never interpreted
    assert cli.json("credentials", "list") == []
    missing = cli("targets", "add", "t", "--namespace", "ns", "--kubeconfig-credential", name)
    assert_refused(missing)
    assert_no_terminal_controls(missing.stderr)


def test_variables_with_control_sequences_are_shown_clean_and_kept_exact(cli: Cli) -> None:
    cli.ok("credentials", "add-kubeconfig", "kc", "--stdin", stdin=kubeconfig())
    value = "\x1b]8;;http://evil.example\x1b\\shop\x1b]8;;\x1b\\\r[bold]"
    cli.ok(
        "targets", "add", "t", "--namespace", "ingress", "--kubeconfig-credential", "kc",
        "--var", f"tenant={value}", "--no-check",
    )  # fmt: skip
    shown = cli.ok("targets", "show", "t").stdout
    assert_no_terminal_controls(shown)
    assert "tenant=shop[bold]" in shown
    assert cli.json("targets", "show", "t")["variables"] == {"tenant": value}


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("two\nlines\tand a tab", "two\nlines\tand a tab"),
        ("\x1b[1;31mred\x1b[0m", "red"),
        ("\x1b]0;window title\x07after", "after"),
        ("\x1b]8;;https://evil.example\x1b\\text\x1b]8;;\x1b\\", "text"),
        ("\x1bP1$r\x1b\\dcs", "dcs"),
        ("carriage\rreturn\r\n", "carriagereturn\n"),
        ("c1\x9b31m\x85\x9d", "c131m"),
        ("bidi \u202eevil\u202c ok", "bidi evil ok"),
        ("lone escape \x1b", "lone escape "),
    ],
)
def test_safe_text_removes_terminal_controls_and_keeps_newlines_and_tabs(
    raw: str, shown: str
) -> None:
    assert safe_text(raw) == shown


def test_the_installed_demo_command_says_how_to_get_the_demo(cli: Cli) -> None:
    result = cli("demo")
    assert_refused(result, "not part of the installed package", "bash scripts/demo")
    assert not (cli.folder / "data").exists()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "(root)")
def test_help_shows_flags_without_a_value_type(cli: Cli, path: list[str]) -> None:
    # Typer's rich help printed `--dry-run <bool>` and even `--help <bool>`.
    assert "<bool>" not in cli.ok(*path, "--help").stdout


# ------------------------------------------------------------------------ a large run's pages


def _start_queued_run(cli: Cli, run_id: str) -> None:
    """What a worker does first with a queued run: plan it (a result row per target)."""
    from worker.app.runs import start_run
    from worker.platform.bootstrap import bootstrap
    from worker.platform.runtime import build_runtime

    class Unsent:
        def start(self, run_id: str) -> None: ...
        def process_targets(self, run_id: str, target_ids: Any) -> None: ...
        def advance(self, run_id: str, batch_index: int) -> None: ...

    env = {name: value for name, value in cli.env.items() if value is not None}
    rt = build_runtime(bootstrap(load_settings({"HOME": str(cli.folder), **env})))
    try:
        start_run(rt, Unsent(), run_id)
    finally:
        rt.close()


def test_runs_show_pages_the_rows_streams_them_all_as_json_and_runs_list_counts_them(
    cli: Cli, setup: dict[str, str]
) -> None:
    run_id = cli.json("run", setup["distribution"], "--execute", "--no-wait")["run_id"]
    _start_queued_run(cli, run_id)

    whole = cli.json("runs", "show", run_id)
    page = cli.json("runs", "show", run_id, "--offset", "1", "--limit", "1")
    streamed = cli.json("runs", "show", run_id, "--all")
    table = cli.ok("runs", "show", run_id, "--limit", "1").stdout
    (listed,) = cli.json("runs", "list")

    assert [r["target_name"] for r in whole["results"]] == ["t1", "t2"]
    assert whole["totals"] == {"pending": 2} and whole["results_offset"] == 0
    assert [r["target_name"] for r in page["results"]] == ["t2"]
    assert page["totals"] == {"pending": 2} and page["results_offset"] == 1
    # Written row by row as read, and the same document as the one built whole.
    assert streamed == whole
    assert "rows 1-1 of 2 target(s); next page: --offset 1, every row: --all" in table
    assert listed["id"] == run_id and listed["totals"] == {"pending": 2}
    assert listed["results"] == []  # counts, not rows: a run may have 10,000
    refused = cli("runs", "show", run_id, "--limit", "-1")
    assert refused.exit_code == 2 and "--limit" in refused.stderr
