"""``python -m demo --pools``: two worker pools, each running "in" its own cluster.

In-cluster targets mean "the cluster this worker runs in", so a deployment over several
clusters runs one pool of workers per cluster against one database and one broker (the Helm
chart installed once per cluster with its own ``pool`` value). The demo shows it with real
commands on two throw-away local API servers:

1. a data folder (the embedded default) and two local clusters; in each a namespace and a
   ServiceAccount bound to the spec's minimum Role, mounted for a worker exactly as a pod sees
   it (token, ca.crt, namespace, KUBERNETES_SERVICE_HOST/PORT);
2. a worker of pool ``east`` in the first cluster, one of pool ``west`` in the second;
3. one in-cluster target per pool (``targets add --in-cluster --pool ...``): saving sends its
   health check to its pool, which records the cluster it runs in;
4. a group over both, executed: each Secret lands in its own cluster only;
5. pool ``west`` stopped, the renewal executed: ``east`` finishes, ``runs show`` names pool
   ``west`` as having pending targets and no live worker, and the reaper re-sends nothing;
6. pool ``west`` started again: the run completes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from worker.cli.output import make_console, plain

POOLS = ("east", "west")
NAMESPACE = "edge"
COMMON_NAME = "www.example.test"
RUN_TIMEOUT = 300
WORKER_START_TIMEOUT = 90.0
#: Short windows so a silent pool is noticed within seconds (production: 60 s and 15 s).
FAST = {"CAP_STALE_AFTER": "6", "CAP_REAPER_INTERVAL": "2"}


class PoolsDemoFailed(RuntimeError):
    """A step did not produce what it should; the message says which."""


@dataclass
class _Place:
    pool: str
    cluster: Any  # tests.testenv.Cluster
    admin: Any  # kubernetes.client.ApiClient
    mount: Any  # tests.testenv.InClusterEnv
    target: str = ""
    worker: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0


class PoolsDemo:
    """One run of the pools demo; :meth:`close` stops and removes everything it made."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.steps = 8
        self.step_no = 0
        self.data_dir = Path(tempfile.mkdtemp(prefix="certautopilot-pools-demo-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
        self.env |= {"CAP_DATA_DIR": str(self.data_dir), **FAST}
        self.testenv: Any = None
        self.places: list[_Place] = []
        beside = Path(sys.executable).with_name("certautopilot")
        self.cli_path = str(beside)

    # ------------------------------------------------------------------------ narration

    def step(self, title: str) -> None:
        self.step_no += 1
        self.console.print()
        self.console.print(Rule(f"Step {self.step_no}/{self.steps} · {title}", align="left"))

    def say(self, *parts: str | Text | tuple[str, str]) -> None:
        self.console.print(
            Text.assemble(*(plain(*part) if isinstance(part, tuple) else part for part in parts))
        )

    def cli(self, *args: str, ok: Sequence[int] = (0,)) -> None:
        self.say(("  $ certautopilot " + shlex.join(args), "dim"))
        sys.stdout.flush()
        code = subprocess.run(
            [self.cli_path, *args], env=self.env, stdin=subprocess.DEVNULL, check=False
        ).returncode
        if code not in ok:
            raise PoolsDemoFailed(f"`certautopilot {shlex.join(args)}` exited with {code}")

    def cli_json(self, *args: str, show: bool = True) -> Any:
        args = (*args, "--output", "json")
        if show:
            self.say(("  $ certautopilot " + shlex.join(args), "dim"))
        done = subprocess.run(
            [self.cli_path, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise PoolsDemoFailed(
                f"`certautopilot {shlex.join(args)}` exited with {done.returncode}: "
                f"{done.stderr.strip()}"
            )
        return json.loads(done.stdout)

    # ---------------------------------------------------------------------------- steps

    def run(self) -> None:
        self.say(
            ("CertAutoPilot pools demo", "bold"),
            ": two clusters, one worker pool in each, one database and one broker. In-cluster "
            "targets are written by the pool that runs in their cluster, and a pool with no "
            "worker is named instead of waited on silently.",
        )
        self.start()
        for place in self.places:
            self.start_worker(place)
        self.create_targets()
        distribution = self.attach()
        self.execute_everywhere(distribution)
        run_id = self.execute_without_west(distribution)
        self.west_returns(run_id)

    def start(self) -> None:
        import tests.testenv as testenv  # the checkout's test environment (not shipped)

        self.step("A data folder, two local clusters, a ServiceAccount mount in each")
        self.cli("migrate")
        self.testenv = testenv.TestEnvironment(
            cluster_count=2, environ=os.environ, progress=lambda: sys.stderr
        )
        for pool, cluster in zip(POOLS, self.testenv.clusters(), strict=True):
            admin = testenv.admin_api_client(cluster)
            access = testenv.create_service_account(
                admin, cluster, NAMESPACE, testenv.SPEC_MINIMUM_RULES, "certautopilot"
            )
            mount = testenv.write_in_cluster_env(
                self.data_dir / f"serviceaccount-{pool}", cluster, NAMESPACE, access.token
            )
            self.places.append(_Place(pool, cluster, admin, mount))
            self.say(
                f"  {cluster.name} ({cluster.server}): namespace {NAMESPACE}, ServiceAccount "
                f"certautopilot with the minimum Role, mounted at {mount.sa_dir}"
            )

    def start_worker(self, place: _Place) -> None:
        if place.starts == 0:
            self.step(f"A worker of pool {place.pool!r}, running in {place.cluster.name}")
        place.starts += 1
        env = {**self.env, "CAP_WORKER_POOL": place.pool, **place.mount.environ}
        shown = f"CAP_WORKER_POOL={place.pool} KUBERNETES_SERVICE_HOST={place.cluster.host} "
        self.say(("  $ " + shown + "certautopilot worker --concurrency 2", "dim"))
        log = self.data_dir / f"worker-{place.pool}-{place.starts}.log"
        with log.open("wb") as out:
            place.worker = subprocess.Popen(
                [
                    self.cli_path,
                    "worker",
                    "--concurrency",
                    "2",
                    "--hostname",
                    f"{place.pool}-{place.starts}@%h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while " ready." not in log.read_text(errors="replace"):
            if place.worker.poll() is not None or time.monotonic() > deadline:
                raise PoolsDemoFailed(f"the {place.pool} worker did not start; see {log}")
            time.sleep(0.2)
        self.say(f"  consuming queues kubernetes.{place.pool} and control (log: {log})")

    def stop_worker(self, place: _Place) -> None:
        if place.worker is not None and place.worker.poll() is None:
            os.killpg(place.worker.pid, signal.SIGTERM)
            try:
                place.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(place.worker.pid, signal.SIGKILL)
                place.worker.wait()
        place.worker = None

    def create_targets(self) -> None:
        self.step("In-cluster targets, one per pool (the health check runs on the pool)")
        for place in self.places:
            place.target = f"{place.pool}-edge"
            view = self.cli_json(
                "targets", "add", place.target, "--in-cluster", "--pool", place.pool,
                "--namespace", NAMESPACE, "--secret-name", f"{place.pool}-tls",
                "--check-timeout", "60",
            )  # fmt: skip
            if view["health_status"] != "healthy":
                raise PoolsDemoFailed(f"{place.target}: {view['health_message']}")
            self.say(
                "    health: ",
                ("healthy", "green"),
                f" — checked by a worker of pool {place.pool!r}; cluster recorded: "
                f"{view['cluster_identity'][:26]}…",
            )
        self.cli("targets", "show", self.places[0].target)

    def attach(self) -> str:
        from demo.__main__ import _DemoAuthority

        self.step("A certificate, a group over both pools, attached")
        self.authority = _DemoAuthority()
        cert_id = self.import_certificate(days=30)
        members = [arg for place in self.places for arg in ("--target", place.target)]
        self.cli("groups", "create", "both", *members, "--batch-size", "100%")
        distribution = self.cli_json("distributions", "attach", cert_id, "--group", "both")
        self.cert_id = cert_id
        return str(distribution["id"])

    def import_certificate(self, *, days: int, renew: bool = False) -> str:
        now = datetime.now(UTC)
        issued = self.authority.issue(
            COMMON_NAME, valid_from=now - timedelta(minutes=5), valid_until=now + timedelta(days)
        )
        self.serial = issued.serial
        pki = self.data_dir / "pki"
        pki.mkdir(mode=0o700, exist_ok=True)
        cert, key = pki / f"cert-{days}.pem", pki / f"cert-{days}.key"
        cert.write_bytes(issued.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(issued.key_pem)
        if renew:
            self.cli("certs", "renew", self.cert_id, "--cert", str(cert), "--key", str(key))
            return self.cert_id
        view = self.cli_json("certs", "import", "--cert", str(cert), "--key", str(key))
        return str(view["id"])

    def check_placement(self, *, serial: str) -> None:
        from demo.__main__ import _live_serial

        for place in self.places:
            for other in self.places:
                name = f"{place.pool}-tls"
                if other is place:
                    found = _live_serial(other.admin, NAMESPACE, name)
                    if found != serial:
                        raise PoolsDemoFailed(f"{other.cluster.name}: {name} holds {found}")
                elif _exists(other.admin, name):
                    raise PoolsDemoFailed(f"{name} was written into {other.cluster.name}")
        self.say(
            "  ",
            ("checked", "green"),
            " as the cluster admins: east-tls is in the east cluster only, west-tls in the west "
            f"cluster only, both with serial {serial}.",
        )

    def execute_everywhere(self, distribution: str) -> None:
        self.step("Execute: each pool writes its target's Secret into its own cluster")
        self.cli("run", distribution, "--execute", "--timeout", str(RUN_TIMEOUT))
        self.check_placement(serial=self.serial)

    def execute_without_west(self, distribution: str) -> str:
        west = self.places[1]
        self.step("Pool 'west' goes away; the renewal runs: east finishes, west is named")
        self.stop_worker(west)
        self.say("  stopped the west worker (SIGTERM, a warm shutdown)")
        self.import_certificate(days=90, renew=True)
        run_id = str(self.cli_json("run", distribution, "--execute", "--no-wait")["run_id"])
        # The stopped worker removed its heartbeat row, so `runs show` names pool west as soon
        # as east's targets are done (a killed worker's row would take the stale window).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            shown = self.cli_json("runs", "show", run_id, show=False)
            if shown["waiting_pools"]:
                break
            time.sleep(1)
        else:
            raise PoolsDemoFailed("the run never named the pool it waits for")
        self.cli("runs", "show", run_id)
        self.say(
            "  The reaper re-sends nothing into pool west's queue while it has no worker; the "
            "messages already there wait for one."
        )
        return run_id

    def west_returns(self, run_id: str) -> None:
        self.step("Pool 'west' is back: the run completes")
        self.start_worker(self.places[1])
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            shown = self.cli_json("runs", "show", run_id, show=False)
            if shown["state"] != "running":
                break
            time.sleep(0.5)
        self.cli("runs", "show", run_id)
        if shown["state"] != "succeeded":
            raise PoolsDemoFailed(f"run {run_id} ended {shown['state']}: {shown['reason']}")
        self.check_placement(serial=self.serial)

    def close(self) -> None:
        import shutil

        self.console.print()
        self.console.print(Rule("Cleaning up", align="left"))
        for place in self.places:
            self.stop_worker(place)
            place.admin.close()
        self.say("  stopped the workers")
        if self.testenv is not None:
            self.testenv.close()
            self.say("  stopped the local clusters")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.say(f"  removed {self.data_dir}")


def _exists(admin: Any, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    from demo.__main__ import _core

    try:
        _core(admin).read_namespaced_secret(name, NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def run_pools_demo(*, console: Console | None = None) -> int:
    """Run the pools demo; 0 done, 1 a step failed, 130 interrupted."""
    console = console or make_console()
    demo = PoolsDemo(console)
    code = 0
    try:
        demo.run()
    except KeyboardInterrupt:
        console.print(Text.assemble(("\ninterrupted", "bold yellow"), ": cleaning up"))
        code = 130
    except PoolsDemoFailed as exc:
        console.print(Text.assemble(("demo failed:", "bold red"), " ", plain(exc)))
        code = 1
    finally:
        demo.close()
    if code == 0:
        console.print(Text.assemble(("\nPools demo finished.", "bold green")))
    return code
