"""Hostile input through the real CLI: huge, explosive and over-reaching files are refused.

Each case runs the installed ``certautopilot`` console script as a subprocess against a real,
migrated PostgreSQL database, exactly as an operator's shell would. A refusal must exit 2
with a message naming the input, the limit and the size seen (or the refused feature), leave
every table's row count unchanged, and, for the 20 MB files, cost no more than a second and a
few tens of MiB over a trivial refusal (time and peak RSS of the process, from ``wait4``).

No API server is needed: every refusal happens before a cluster is contacted.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, func, select

import models.entities  # noqa: F401 - registers the tables on Base.metadata
from models import queries
from models.base import Base
from tests.certfactory import make_chain
from worker.cli.files import read_limited
from worker.core.limits import KUBECONFIG, InputTooLarge
from worker.kube.connect import minimal_kubeconfig, vet_kubeconfig
from worker.platform.runtime import build_runtime
from worker.platform.settings import load_settings

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("certautopilot"))
MiB = 1024 * 1024
HUGE = 20 * MiB
CHAIN = make_chain("hostile.example.com")
TOKEN = "hostile-token-0123456789"


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mib: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(env: dict[str, str], *args: str, stdin: Path | None = None) -> Outcome:
    """Run the console script; measure its wall time and peak RSS (``wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        source = stdin.open("rb") if stdin is not None else subprocess.DEVNULL
        try:
            started = time.perf_counter()
            process = subprocess.Popen([CLI, *args], env=env, stdin=source, stdout=out, stderr=err)
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - started
        finally:
            if stdin is not None:
                source.close()  # type: ignore[union-attr]
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Outcome(
            process.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            usage.ru_maxrss / 1024,  # KiB on Linux
        )


def kubeconfig_doc(**extra_users: dict[str, Any]) -> dict[str, Any]:
    """A valid token kubeconfig; ``extra_users`` adds unused contexts with those users."""
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "main",
        "contexts": [{"name": "main", "context": {"cluster": "prod", "user": "deployer"}}],
        "clusters": [
            {
                "name": "prod",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": base64.b64encode(CHAIN.root_pem).decode(),
                },
            }
        ],
        "users": [{"name": "deployer", "user": {"token": TOKEN}}],
    }
    for name, user in extra_users.items():
        doc["contexts"].append({"name": name, "context": {"cluster": "prod", "user": name}})
        doc["users"].append({"name": name, "user": user})
    return doc


def padded(data: bytes, size: int = HUGE) -> bytes:
    """``data`` followed by comment lines up to ``size`` bytes (YAML and PEM ignore them)."""
    line = b"# padding padding padding padding padding padding padding padding\n"
    return data + line * ((size - len(data)) // len(line) + 1)


BILLION_LAUGHS = b"""\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
current-context: main
"""


@dataclass
class Env:
    vars: dict[str, str]
    database_url: str
    tmp: Path

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def row_counts(self) -> dict[str, int]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return {
                    table.name: connection.execute(
                        select(func.count()).select_from(table)
                    ).scalar_one()
                    for table in Base.metadata.sorted_tables
                }
        finally:
            engine.dispose()


@pytest.fixture
def env(tmp_path: Path, postgres_url: str) -> Iterator[Env]:
    """A migrated PostgreSQL database and a shell environment pointing the CLI at it."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
    variables.update(
        CAP_DATA_DIR=str(tmp_path / "data"),
        CAP_DATABASE_URL=postgres_url,
        CAP_KEK="k1:" + base64.b64encode(os.urandom(32)).decode(),
        COLUMNS="10000",  # one line per message: the assertions read whole messages
    )
    migrated = run_cli(variables, "migrate")
    assert migrated.code == 0, migrated.output
    yield Env(variables, postgres_url, tmp_path)


# (case id, CLI arguments built from the environment, stdin file or None, expected texts)
Case = tuple[str, Callable[[Env], list[str]], Callable[[Env], Path] | None, tuple[str, ...]]


def _big_kubeconfig(e: Env) -> Path:
    return e.file("big-kubeconfig.yaml", padded(yaml.safe_dump(kubeconfig_doc()).encode()))


def _exec_user(e: Env) -> Path:
    doc = kubeconfig_doc(**{"gke-user": {"exec": {"command": "gke-gcloud-auth-plugin"}}})
    return e.file("exec.yaml", yaml.safe_dump(doc).encode())


CASES: list[Case] = [
    (
        "20 MB kubeconfig file",
        lambda e: ["credentials", "add-kubeconfig", "big", "--file", str(_big_kubeconfig(e))],
        None,
        (
            "the file ",
            "big-kubeconfig.yaml is ",
            "(20.0 MiB)",
            "limit for a kubeconfig is 256 KiB",
            "--minify",
        ),
    ),
    (
        "20 MB kubeconfig on stdin",
        lambda e: ["credentials", "add-kubeconfig", "big", "--stdin"],
        _big_kubeconfig,
        ("the kubeconfig on stdin is ", "(20.0 MiB)", "limit for a kubeconfig is 256 KiB"),
    ),
    (
        "billion laughs",
        lambda e: [
            "credentials",
            "add-kubeconfig",
            "laughs",
            "--file",
            str(e.file("laughs.yaml", BILLION_LAUGHS)),
        ],
        None,
        ("line 1 defines an anchor (&a)", "no anchors, aliases, tags"),
    ),
    (
        "unused user with exec",
        lambda e: ["credentials", "add-kubeconfig", "exec", "--file", str(_exec_user(e))],
        None,
        ("users[gke-user].user.exec", "runs a local program", "--minify --flatten --raw"),
    ),
    (
        "20 MB certificate PEM",
        lambda e: [
            "certs",
            "import",
            "--cert",
            str(e.file("big.pem", padded(CHAIN.leaf_pem))),
            "--key",
            str(e.file("key.pem", CHAIN.key_pem)),
        ],
        None,
        ("the file ", "big.pem is ", "(20.0 MiB)", "limit for a PEM file is 256 KiB"),
    ),
    (
        "20 MB private key PEM",
        lambda e: [
            "certs",
            "import",
            "--cert",
            str(e.file("leaf.pem", CHAIN.leaf_pem)),
            "--key",
            str(e.file("big-key.pem", padded(CHAIN.key_pem))),
        ],
        None,
        ("big-key.pem is ", "limit for a PEM file is 256 KiB"),
    ),
    (
        "huge namespace template",
        lambda e: [
            "targets",
            "add",
            "t1",
            "--namespace",
            "{{ .tenant }}" + "-x" * 50_000,
            "--kubeconfig-credential",
            "any",
            "--no-check",
        ],
        None,
        ("the namespace template is 100013 characters", "1024 characters"),
    ),
    (
        "huge secret-name template",
        lambda e: [
            "targets",
            "add",
            "t2",
            "--namespace",
            "edge",
            "--secret-name",
            "{{ .cn }}" + "-" * 100_000,
            "--kubeconfig-credential",
            "any",
            "--no-check",
        ],
        None,
        ("the secret name template is 100009 characters", "1024 characters"),
    ),
    (
        "huge variable value",
        lambda e: [
            "targets",
            "add",
            "t3",
            "--namespace",
            "{{ .tenant }}",
            "--var",
            "tenant=" + "a" * 100_000,
            "--kubeconfig-credential",
            "any",
            "--no-check",
        ],
        None,
        ("target variable 'tenant' is 100000 characters", "variable value is 1024 characters"),
    ),
    (
        "huge webhook URL",
        lambda e: [
            "distributions",
            "attach-webhook",
            str(uuid.uuid4()),
            "--url",
            "https://hooks.example.com/" + "a" * 100_000,
        ],
        None,
        ("the webhook URL is 100026 characters", "2048 characters"),
    ),
    (
        "20 MB webhook secret",
        lambda e: [
            "credentials",
            "add-webhook-secret",
            "hook",
            "--file",
            str(e.file("secret.bin", padded(b"s" * 64))),
        ],
        None,
        ("secret.bin is ", "limit for a webhook secret is 1 KiB"),
    ),
]


@pytest.mark.parametrize(
    ("args", "stdin", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input_is_refused_with_exit_2_and_nothing_stored(
    env: Env,
    args: Callable[[Env], list[str]],
    stdin: Callable[[Env], Path] | None,
    expected: tuple[str, ...],
) -> None:
    arguments = args(env)
    stdin_file = stdin(env) if stdin is not None else None
    before = env.row_counts()
    outcome = run_cli(env.vars, *arguments, stdin=stdin_file)
    assert outcome.code == 2, outcome.output[-3000:]
    message = " ".join(outcome.stderr.split())  # the console wraps long lines
    for text in expected:
        assert text in message, outcome.output[-3000:]
    assert "Traceback" not in outcome.output
    assert TOKEN not in outcome.output and "PRIVATE KEY" not in outcome.output
    assert env.row_counts() == before


def test_a_20_mb_kubeconfig_costs_no_more_than_a_trivial_refusal(env: Env) -> None:
    tiny = env.file("tiny.yaml", b"- not\n- a kubeconfig\n")
    big = _big_kubeconfig(env)
    baseline = run_cli(env.vars, "credentials", "add-kubeconfig", "t", "--file", str(tiny))
    assert baseline.code == 2 and "not a kubeconfig" in baseline.stderr, baseline.output
    for source in ("--file", "--stdin"):
        if source == "--file":
            outcome = run_cli(env.vars, "credentials", "add-kubeconfig", "b", "--file", str(big))
        else:
            outcome = run_cli(env.vars, "credentials", "add-kubeconfig", "b", "--stdin", stdin=big)
        assert outcome.code == 2, outcome.output
        extra_seconds = outcome.seconds - baseline.seconds
        extra_mib = outcome.peak_rss_mib - baseline.peak_rss_mib
        print(
            f"20 MB kubeconfig {source}: {outcome.seconds:.2f}s, peak RSS "
            f"{outcome.peak_rss_mib:.0f} MiB; trivial refusal {baseline.seconds:.2f}s, "
            f"{baseline.peak_rss_mib:.0f} MiB; extra {extra_seconds:+.2f}s, {extra_mib:+.1f} MiB"
        )
        # Memory is the measure that holds on a loaded machine: the size check reads at most
        # the limit (plus one byte) instead of the 20 MB. Time is printed, not asserted (a
        # shared 2-core host measured +2.8 s of pure scheduling noise).
        assert extra_mib < 20


def test_an_unused_clean_context_is_dropped_and_the_minimal_form_stored(env: Env) -> None:
    doc = kubeconfig_doc(**{"ci-bot": {"token": "another-token-abcdef"}})
    doc["preferences"] = {}
    doc["contexts"][0]["context"]["namespace"] = "ingress"
    text = yaml.safe_dump(doc).encode()
    before = env.row_counts()
    outcome = run_cli(
        env.vars,
        "credentials",
        "add-kubeconfig",
        "prod",
        "--file",
        str(env.file("two-contexts.yaml", text)),
    )
    assert outcome.code == 0, outcome.output
    assert env.row_counts() == {**before, "credentials": before["credentials"] + 1}
    credential_id = re.search(r"\(id ([0-9a-f-]+)\)", outcome.stdout)
    assert credential_id is not None, outcome.stdout
    runtime = build_runtime(load_settings(env.vars))
    try:
        with runtime.session() as session:
            stored = queries.reveal_credential(session, runtime.sealer, credential_id.group(1))
    finally:
        runtime.close()
    assert stored == minimal_kubeconfig(text)
    assert b"another-token" not in stored and b"ci-bot" not in stored
    assert [len(yaml.safe_load(stored)[s]) for s in ("contexts", "clusters", "users")] == [1, 1, 1]
    assert vet_kubeconfig(stored) == vet_kubeconfig(text)


def test_reading_a_pipe_stops_one_byte_past_the_limit() -> None:
    # `--stdin` from a pipe: the size is unknown, so reading stops at limit + 1 bytes.
    reader, writer = os.pipe()
    chunks: list[int] = []

    def feed() -> None:
        try:
            with os.fdopen(writer, "wb") as sink:
                for _ in range(HUGE // 65536):
                    sink.write(b"x" * 65536)
                    chunks.append(1)
        except BrokenPipeError:
            pass  # the reader stopped and closed its end

    thread = threading.Thread(target=feed)
    thread.start()
    with os.fdopen(reader, "rb") as source, pytest.raises(InputTooLarge) as caught:
        read_limited(source, KUBECONFIG, "the kubeconfig on stdin")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert caught.value.size is None
    assert str(caught.value).startswith("the kubeconfig on stdin is more than 262144 bytes")
    assert len(chunks) < 16  # about 256 KiB of the 20 MiB were ever written
