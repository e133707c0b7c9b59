"""CLI conventions end to end, through the installed ``certautopilot`` console script.

kubectl/helm habits: ``--version`` and ``version``, shell completion, ``-`` for stdin, every
listing and show in ``-o table|json|yaml|name``, plain output on a pipe unless
``--color=always``, and read-only commands that work without the KEK. Real PostgreSQL, Redis,
apiservers and worker processes; no part is mocked.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from models import migrate
from tests.certfactory import make_chain
from tests.support.pipeline import Pipeline, build_fleet
from worker.app import service

CLI = str(Path(sys.executable).with_name("certautopilot"))
BOX_DRAWING = set("─│┃━┏┓┗┛┡┩╇┼├┤┬┴╭╮╰╯")


def cli(
    env: Mapping[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script with exactly ``env`` plus PATH/HOME; stdout is a pipe."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CAP_", "PROMETHEUS_"))}
    done = subprocess.run(
        [CLI, *args],
        env={**base, **env},
        input=stdin,
        capture_output=True,
        timeout=180,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def ok(env: Mapping[str, str], *args: str, stdin: bytes | None = None) -> str:
    done = cli(env, *args, stdin=stdin)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_version_and_completion_need_no_configuration(tmp_path: Path) -> None:
    fresh = {"HOME": str(tmp_path), "CAP_DATA_DIR": str(tmp_path / "data")}
    assert ok(fresh, "--version").strip() == "certautopilot 0.1.0"
    text = ok(fresh, "version")
    assert "celery:" in text and "kubernetes client:" in text
    assert "schema revision:   unknown (no database yet" in text
    assert not (tmp_path / "data").exists()  # asking the version created nothing

    unreachable = {**fresh, "CAP_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/none"}
    info = json.loads(ok(unreachable, "version", "-o", "json"))
    assert info["schema_revision"].startswith("unknown (database unreachable")
    assert "pw" not in json.dumps(info)
    assert ok(unreachable, "version", "-o", "name").strip() == "0.1.0"

    for shell, marker in (
        ("bash", "complete -o"),
        ("zsh", "compdef"),
        ("fish", "complete --command certautopilot"),
    ):
        assert marker in ok(fresh, "completion", shell)
    assert cli(fresh, "completion", "tcsh").returncode == 2
    # The bash script completes for real: bash asks the CLI, the CLI answers.
    script = ok(fresh, "completion", "bash")
    ask = (
        'eval "$1"; COMP_WORDS=(certautopilot ru); COMP_CWORD=1; '
        '_certautopilot_completion certautopilot ru certautopilot; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(
        ["bash", "-c", ask, "-", script],
        env={**os.environ, **fresh, "PATH": f"{Path(CLI).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert {"run", "runs"} <= set(completed.stdout.split()), completed


def test_read_only_commands_work_without_the_kek_and_writes_say_how_to_fix(
    postgres_url: str, tmp_path: Path
) -> None:
    from worker.platform.runtime import migration_engine

    with migration_engine(postgres_url) as engine:
        migrate.upgrade(engine)
    no_kek = {"HOME": str(tmp_path), "CAP_DATABASE_URL": postgres_url}
    for command in (
        ("runs", "list"),
        ("targets", "list"),
        ("groups", "list"),
        ("distributions", "list"),
        ("certs", "list"),
        ("credentials", "list"),
    ):
        assert cli(no_kek, *command, "-o", "json").stdout.strip() == "[]", command
    assert json.loads(ok(no_kek, "version", "-o", "json"))["schema_revision"] == migrate.head()
    chain = make_chain(cn="nokek.example.com")
    (tmp_path / "tls.crt").write_bytes(chain.leaf_pem)
    refused = cli(no_kek, "certs", "import", "--cert", str(tmp_path / "tls.crt"), "--key", "-",
                  stdin=chain.key_pem)  # fmt: skip
    assert refused.returncode == 2
    assert "no KEK configured" in refused.stderr and "CAP_KEK=" in refused.stderr
    assert ok(no_kek, "certs", "list", "-o", "name") == ""  # nothing was written
    worker = cli(no_kek, "worker")
    assert worker.returncode == 2 and "no KEK configured" in worker.stderr


def _fields(env: Mapping[str, str], *command: str) -> tuple[Any, Any, list[str]]:
    as_json = json.loads(ok(env, *command, "-o", "json"))
    as_yaml = yaml.safe_load(ok(env, *command, "-o", "yaml"))
    names = ok(env, *command, "-o", "name").splitlines()
    return as_json, as_yaml, names


def test_stdin_outputs_colour_and_words_for_people(
    pipe: Pipeline,
    clusters: list[Any],
    make_service_account: Any,
    testenv_admin_api: Any,
    tmp_path: Path,
) -> None:
    env = {**pipe.env, "HOME": str(tmp_path)}
    pipe.start_worker(concurrency=2)
    namespace = f"conv-{uuid.uuid4().hex[:6]}"
    fleet = build_fleet(
        pipe, clusters[:1], make_service_account, targets=2, namespace=namespace, batch_size=2
    )

    # `-` reads stdin: the kubeconfig, the certificate; two `-` in one command are refused.
    access = make_service_account(clusters[0], namespace)
    ok(env, "credentials", "add-kubeconfig", "from-stdin", "--file", "-",
       stdin=access.kubeconfig.encode())  # fmt: skip
    chain = make_chain(cn="stdin.example.com")
    (tmp_path / "tls.key").write_bytes(chain.key_pem)
    key_file = str(tmp_path / "tls.key")
    pem = chain.leaf_pem + chain.chain_pem
    imported = json.loads(
        ok(env, "certs", "import", "--cert", "-", "--key", key_file, "-o", "json", stdin=pem)
    )
    assert imported["common_name"] == "stdin.example.com"
    before = ok(env, "certs", "list", "-o", "name")
    twice = cli(env, "certs", "import", "--cert", "-", "--key", "-", stdin=chain.leaf_pem)
    assert twice.returncode == 2
    assert "--cert and --key both read stdin ('-')" in twice.stderr
    assert ok(env, "certs", "list", "-o", "name") == before  # nothing written

    # A target that adopts an unmanaged Secret: the dry-run says it will be adopted.
    adopter = f"{namespace}-adopter"
    service.create_target(
        pipe.runtime,
        service.TargetSpec(name=adopter, namespace=namespace, credential="from-stdin",
                           secret_name="legacy-tls", adopt_unmanaged=True),
        check=False,
    )  # fmt: skip
    k8s.CoreV1Api(testenv_admin_api(clusters[0])).create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="legacy-tls"),
            type="kubernetes.io/tls",
            data={"tls.crt": base64.b64encode(chain.leaf_pem).decode(),
                  "tls.key": base64.b64encode(chain.key_pem).decode()},
        ),
    )  # fmt: skip
    distribution = service.attach(pipe.runtime, fleet.certificate_id, target=adopter)
    dry = ok(env, "run", distribution, "--dry-run")
    assert "this target adopts unmanaged Secrets: execute will adopt it" in dry
    assert "execute refuses" not in dry
    assert "would update" in dry and "would_update" not in dry  # words for people
    run_id = ok(env, "run", distribution, "--dry-run", "-o", "name").strip()
    assert json.loads(ok(env, "runs", "show", run_id, "-o", "json"))["results"][0]["status"] == (
        "would_update"
    )  # codes for scripts

    ok(env, "run", fleet.distribution_id, "--execute")
    # Every listing and show: json == yaml, and name prints exactly the ids, one per line.
    for command in (
        ("runs", "list"),
        ("targets", "list"),
        ("groups", "list"),
        ("certs", "list"),
        ("credentials", "list"),
        ("distributions", "list"),
    ):
        as_json, as_yaml, names = _fields(env, *command)
        assert as_json == as_yaml and as_json, command
        assert names == [item["id"] for item in as_json], command
    for command in (
        ("runs", "show", run_id),
        ("targets", "show", adopter),
        ("groups", "show", f"{namespace}-group"),
    ):
        as_json, as_yaml, names = _fields(env, *command)
        assert as_json == as_yaml, command
        assert len(names) == 1 and names[0] in json.dumps(as_json), command

    # Piped output is plain; --color=always brings colour and borders back.
    piped = ok(env, "runs", "show", run_id)
    assert "\x1b[" not in piped and not BOX_DRAWING & set(piped)
    forced = ok(env, "--color=always", "runs", "show", run_id)
    assert "\x1b[" in forced and BOX_DRAWING & set(forced)
    never = ok(env, "--color=never", "runs", "list")
    assert "\x1b[" not in never


@pytest.mark.parametrize("flag", ["--color=auto", "--color=never"])
def test_color_flag_is_accepted_before_any_command(flag: str, tmp_path: Path) -> None:
    assert ok({"HOME": str(tmp_path)}, flag, "--version").startswith("certautopilot ")
