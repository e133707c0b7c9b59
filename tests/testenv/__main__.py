"""Command line for the test environment.

    python -m tests.testenv up [--clusters N] [--node]
                                                start everything, print how to reach it, stay up
                                                until Ctrl-C / SIGTERM, then clean up everything;
                                                --node adds a real node (tests/testenv/node.py)
    python -m tests.testenv binaries            find or build kube-apiserver and etcd; print folder
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from tests.testenv.binaries import BinariesError, find_binaries
from tests.testenv.environment import TestEnvironment, cluster_count_from
from tests.testenv.process import StartupError


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def up(cluster_count: int, node: bool = False) -> int:
    """Start clusters, Redis and PostgreSQL; print paths and URLs; wait for a signal; clean up."""
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    environment = TestEnvironment(cluster_count=cluster_count, environ=os.environ, node=node)
    try:
        clusters = environment.clusters()
        redis_server = environment.redis()
        postgres = environment.postgres()
        database_url = postgres.create_database("dev")
        kubeconfig_dir = environment.workdir / "kubeconfigs"
        print(f"Test environment up in {time.monotonic() - started:.1f}s "
              f"(folder {environment.workdir}):\n")
        for cluster in clusters:
            path = kubeconfig_dir / f"{cluster.name}.yaml"
            _write_private(path, cluster.admin_kubeconfig)
            print(f"  {cluster.name}: {cluster.server}")
            print(f"    admin kubeconfig: {path}")
            print(f"    try: kubectl --kubeconfig {path} get namespaces")
        if node:
            running = environment.node()
            print(f"  node: {running.apiserver.server} (pods run on this host)")
            print(f"    admin kubeconfig: {running.kubeconfig_path}")
            print(f"    try: kubectl --kubeconfig {running.kubeconfig_path} get nodes")
            print(f"    containerd: {' '.join(running.ctr())}")
            print(f"    pod-reachable Redis port {running.redis.port}, PostgreSQL port "
                  f"{running.postgres.port} on {running.address}")
        print(f"\n  Redis:      {redis_server.url}")
        print(f"  PostgreSQL: {database_url}")
        print(f"  Logs:       {environment.logs}")
        print("\nPress Ctrl-C (or send SIGTERM) to stop and remove everything.", flush=True)
        while True:
            dead = environment.dead_components()
            if dead:
                print(f"stopping: {', '.join(dead)} exited unexpectedly; see {environment.logs}",
                      file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (StartupError, BinariesError) as exc:  # NodeError is a StartupError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        environment.close()
        print(f"stopped every process and removed {environment.workdir}", flush=True)


def binaries() -> int:
    """Find or build the Kubernetes test binaries and print their folder."""
    try:
        found = find_binaries(os.environ)
    except BinariesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(found.folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="python -m tests.testenv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start the environment until interrupted")
    up_parser.add_argument("--clusters", type=int, default=None,
                           help="number of clusters (default: CAP_TEST_CLUSTERS or 3)")
    up_parser.add_argument("--node", action="store_true",
                           help="also run a node: containerd, kubelet, controller-manager, "
                                "scheduler, kube-proxy (root; see tests/testenv/node.py)")
    commands.add_parser("binaries", help="find or build kube-apiserver and etcd")
    args = parser.parse_args(argv)
    if args.command == "binaries":
        return binaries()
    count = args.clusters if args.clusters is not None else cluster_count_from(os.environ)
    if count < 1:
        parser.error("--clusters must be at least 1")
    return up(count, node=args.node)


if __name__ == "__main__":
    sys.exit(main())
