"""A real single-node Kubernetes cluster for the test environment: pods run on this host.

``TestEnvironment(..., node=True).node()`` (or ``python -m tests.testenv up --node``) adds to
the environment's etcd one more kube-apiserver, ``node``, and runs beside it containerd,
kubelet, kube-controller-manager, kube-scheduler and kube-proxy. Everything lives in the
run's temporary folder and is stopped by PID:

* **API server**: bound to the host's interface address (pods cannot reach loopback), with
  the ``kubernetes`` Service's endpoints maintained, the ServiceAccount admission plugin on
  (projected service-account tokens) and the Node authorizer for the kubelet.
* **containerd** (Debian's, 1.6) with a private root, state, socket and CNI folders; its CRI
  plugin sets ``restrict_oom_score_adj`` (the root here lacks CAP_SYS_RESOURCE, without which
  runc cannot create a sandbox). The sandbox ("pause") image is a tiny static C program
  built here with gcc and imported as an image tarball: no registry is reachable.
* **CNI**: the reference ``bridge`` + ``host-local`` plugins (apt ``containernetworking-
  plugins``) on bridge ``capnode0`` without IP masquerade (pods only talk to this host), IPAM
  data in the work folder.
* **kubelet**: cgroupfs driver on cgroup v1 (``failCgroupV1: false``), its cgroups below a
  private root ``/cap-node-<id>`` in every hierarchy, ``--root-dir`` and pod logs in the
  work folder, its ``syncFrequency`` a parameter (Secret volumes follow it).
* **kube-proxy** in nftables mode (its own ``kube-proxy`` nft tables; the host's iptables
  rules are never touched), conntrack sysctls left alone.

Host state: kubelet, kube-proxy and the bridge plugin change kernel settings (``sysctl``).
``HostState`` records every setting they are known to touch before the start and restores it
at the end, and checks that no link, nft table, iptables chain, cgroup, mount, network
namespace or folder outside the work folder is left behind. ``.ci/run`` uses the same
snapshot (``python -m tests.testenv.node snapshot`` / ``check``) around the whole test run.

Binaries: kubelet, kube-controller-manager, kube-scheduler, kube-proxy and crictl are built
once from the Go module proxy by ``build-binaries.sh`` into
``$XDG_CACHE_HOME/certautopilot/testenv/k8s-VERSION-node`` under a file lock, like the
apiserver's. ``node_problems()`` says what this host lacks, with the fix.

    python -m tests.testenv.node binaries        # build (or find) the node binaries
    python -m tests.testenv.node check-host      # what stops this host from running a node
    python -m tests.testenv.node snapshot FILE   # record the host settings a node may touch
    python -m tests.testenv.node check FILE      # compare with FILE; exit 1 on a difference
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from tests.testenv.binaries import BUILD_SCRIPT, K8S_VERSION, cache_dir
from tests.testenv.cluster import ApiServer, Cluster, admin_kubeconfig
from tests.testenv.pki import CertificateAuthority
from tests.testenv.process import (
    ManagedProcess,
    StartupError,
    exclusive_lock,
    free_port,
    log_tail,
    stream_checked,
)
from tests.testenv.services import PostgresServer, RedisServer

NODE_COMPONENTS = ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "crictl")
NODE_NAME = "cap-node"
SERVICE_IP = "10.96.0.1"
POD_SUBNET = "10.244.0.0/24"
BRIDGE = "capnode0"
PAUSE_IMAGE = "certautopilot.local/pause:1"
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CNI_PLUGINS = ("bridge", "host-local", "loopback")
APT_PACKAGES = "containerd runc containernetworking-plugins nftables gcc"
NODE_READY_TIMEOUT = 180.0
NODE_CPU_WEIGHT = 4
# Every kernel setting kubelet (kernel.*, vm.*), kube-proxy (route_localnet, conntrack, only
# in some modes) and the bridge CNI plugin (forwarding) are known to write. HostState records
# and restores them all, whichever mode runs.
SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
    "net/netfilter/nf_conntrack_udp_timeout",
    "net/netfilter/nf_conntrack_udp_timeout_stream",
)
# Folders outside the work folder that kubelet, containerd or libcni create by default.
HOST_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/etc/cni",
    "/opt/containerd",
    "/var/lib/containerd-cap-node",
)
CGROUP_PREFIX = "cap-node-"
# Chains and tables the node's components name; anything else belongs to someone else.
OWNED_CHAIN_PREFIXES = ("KUBE-", "CNI-")
OWNED_NFT_TABLES = ("kube-proxy", "kubelet")


class NodeError(StartupError):
    """This host cannot run the test node, or one of its components failed."""


# --------------------------------------------------------------------------- host checks


def host_address() -> str:
    """The address of the interface holding the default route (pods reach the host there)."""
    with contextlib.suppress(OSError, ValueError):
        routes = subprocess.run(
            ["ip", "-4", "-j", "route", "get", "192.0.2.254"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        for route in json.loads(routes):
            source = route.get("prefsrc")
            if source and not ipaddress.ip_address(source).is_loopback:
                return str(source)
    addresses = subprocess.run(
        ["ip", "-4", "-j", "addr", "show", "scope", "global"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout  # fmt: skip
    for link in json.loads(addresses or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                return str(info["local"])
    raise NodeError(
        "the test node needs a non-loopback IPv4 address on this host (kubelet refuses a "
        "loopback --node-ip and pods cannot reach loopback); none was found with `ip -4 addr`"
    )


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup v1 hierarchies (and the v2 one in hybrid mode)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            found.append(Path(fields[1]))
    return found


def node_problems() -> list[str]:
    """What keeps this host from running the test node, each with the fix; empty when ready."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root: containerd, runc and kubelet run as root")
    for binary in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "nft", "gcc", "ip"):
        if shutil.which(binary) is None:
            problems.append(f"{binary}: install the apt packages {APT_PACKAGES}")
    if not any(all((d / p).exists() for p in CNI_PLUGINS) for d in CNI_DIRS):
        problems.append(
            "CNI plugins bridge, host-local and loopback: install the apt package "
            "containernetworking-plugins (it puts them in /usr/lib/cni)"
        )
    if not cgroup_hierarchies():
        problems.append("no cgroup filesystem is mounted (kubelet needs cgroups)")
    if not Path("/proc/sys/net/bridge").exists():
        problems.append(
            "the br_netfilter kernel module is not loaded (Services from pods on the bridge "
            "need it): `modprobe br_netfilter`"
        )
    return problems


def cni_bin_dir() -> Path:
    """The folder holding the bridge, host-local and loopback plugins."""
    for folder in CNI_DIRS:
        if all((folder / plugin).exists() for plugin in CNI_PLUGINS):
            return folder
    raise NodeError("CNI plugins not found: apt-get install -y containernetworking-plugins")


# --------------------------------------------------------------------------- host state


def _run(argv: Sequence[str], *, check: bool = False) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return ""
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _read_sysctls() -> dict[str, str]:
    values = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            values[key] = (Path("/proc/sys") / key).read_text().strip()
    return values


def _owned_chains() -> dict[str, list[str]]:
    """KUBE-* and CNI-* chains per `iptables[-6]:table` (other chains are not ours to judge)."""
    found: dict[str, list[str]] = {}
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            chains = [
                line[1:].split()[0]
                for line in _run([f"{tool}-save", "-t", table]).splitlines()
                if line.startswith(":") and line[1:].startswith(OWNED_CHAIN_PREFIXES)
            ]
            if chains:
                found[f"{tool}:{table}"] = sorted(chains)
    return found


def _nft_tables() -> list[str]:
    tables = []
    for line in _run(["nft", "list", "tables"]).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in OWNED_NFT_TABLES:
            tables.append(f"{parts[1]} {parts[2]}")
    return sorted(tables)


def _links() -> list[str]:
    """The node's bridge and the veths on it (other engines' links are theirs to judge)."""
    names = []
    for line in _run(["ip", "-o", "link", "show"]).splitlines():
        if line.count(":") >= 2:
            name = line.split(":")[1].strip().split("@")[0]
            if name == BRIDGE or f" master {BRIDGE} " in line:
                names.append(name)
    return sorted(names)


def _cgroups() -> list[str]:
    return sorted(
        str(child)
        for hierarchy in cgroup_hierarchies()
        for child in (hierarchy.glob(f"{CGROUP_PREFIX}*") if hierarchy.is_dir() else [])
    )


def _netns() -> list[str]:
    folder = Path("/var/run/netns")
    return sorted(p.name for p in folder.glob("cni-*")) if folder.is_dir() else []


@dataclass
class HostState:
    """What a node may change on this host: kernel settings, links, nft tables, KUBE-/CNI-
    iptables chains, cgroups, network namespaces and default folders."""

    sysctls: dict[str, str]
    chains: dict[str, list[str]]
    nft_tables: list[str]
    links: list[str]
    cgroups: list[str]
    netns: list[str]
    paths: dict[str, bool]

    @classmethod
    def capture(cls) -> HostState:
        """Read the current state."""
        return cls(
            sysctls=_read_sysctls(),
            chains=_owned_chains(),
            nft_tables=_nft_tables(),
            links=_links(),
            cgroups=_cgroups(),
            netns=_netns(),
            paths={path: os.path.lexists(path) for path in HOST_PATHS},
        )

    def to_json(self) -> str:
        """The state as JSON (what `snapshot` writes)."""
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        """Read a state `to_json` wrote."""
        return cls(**json.loads(text))

    def differences(self, other: HostState) -> list[str]:
        """Human-readable differences from `self` (before) to `other` (after)."""
        found = []
        for key, value in self.sysctls.items():
            after = other.sysctls.get(key)
            if after is not None and after != value:
                found.append(f"sysctl {key.replace('/', '.')} is {after}, was {value}")
        for name in ("chains", "nft_tables", "links", "cgroups", "netns"):
            before, after = getattr(self, name), getattr(other, name)
            if before != after:
                found.append(f"{name}: was {before}, now {after}")
        for path, existed in self.paths.items():
            if other.paths.get(path) != existed:
                found.append(f"{path} {'appeared' if not existed else 'disappeared'}")
        return found

    def restore_sysctls(self) -> list[str]:
        """Write back every recorded kernel setting that changed; return what was restored."""
        restored = []
        for key, value in self.sysctls.items():
            path = Path("/proc/sys") / key
            try:
                current = path.read_text().strip()
                if current != value:
                    path.write_text(value + "\n")
                    restored.append(f"{key.replace('/', '.')}: {current} -> {value}")
            except OSError:
                continue
        return restored


def cleanup_host(before: HostState, progress: TextIO) -> list[str]:
    """Remove what the node added since `before` (its own names only); return what it did."""
    done: list[str] = []
    after = HostState.capture()
    for netns in sorted(set(after.netns) - set(before.netns)):
        path = f"/var/run/netns/{netns}"
        _run(["umount", path])
        with contextlib.suppress(OSError):
            os.unlink(path)
        done.append(f"removed network namespace {netns}")
    for link in sorted(set(after.links) - set(before.links)):
        _run(["ip", "link", "delete", link])
        done.append(f"deleted link {link}")
    for table in sorted(set(after.nft_tables) - set(before.nft_tables)):
        _run(["nft", "delete", "table", *table.split()])
        done.append(f"deleted nft table {table}")
    for where, chains in after.chains.items():
        new = sorted(set(chains) - set(before.chains.get(where, [])))
        if not new:
            continue
        tool, table = where.split(":")
        # Rules that jump to a new chain first (from any chain), then the chains themselves.
        for rule in _run([tool, "-t", table, "-S"]).splitlines():
            words = rule.split()
            if words[:1] == ["-A"] and any(f"-j {chain}" in rule for chain in new):
                _run([tool, "-t", table, "-D", *words[1:]])
        for chain in new:
            _run([tool, "-t", table, "-F", chain])
        for chain in new:
            _run([tool, "-t", table, "-X", chain])
        done.append(f"deleted {tool} {table} chains {' '.join(new)}")
    for cgroup in sorted(set(after.cgroups) - set(before.cgroups)):
        remove_cgroup_tree(Path(cgroup))
        done.append(f"removed cgroup {cgroup}")
    for path, existed in before.paths.items():
        if not existed and os.path.lexists(path):
            for mount in mounts_under(Path(path)):
                _run(["umount", "-l", str(mount)])
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}")
    done += [f"restored sysctl {line}" for line in before.restore_sysctls()]
    for line in done:
        progress.write(f"[node] cleanup: {line}\n")
    return done


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    points = [
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/self/mounts").read_text().splitlines()
    ]
    inside = {p for p in points if p == str(root) or p.startswith(prefix)}
    return [Path(p) for p in sorted(inside, key=lambda p: (p.count("/"), p), reverse=True)]


def unmount_all(root: Path) -> None:
    """Unmount everything mounted below `root` (kubelet's volumes, containerd's rootfs)."""
    for _ in range(3):
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            _run(["umount", str(point)]) or _run(["umount", "-l", str(point)])


def remove_cgroup_tree(root: Path) -> None:
    """rmdir a cgroup and its children, deepest first (processes in it must be gone)."""
    if not root.is_dir():
        return
    folders = sorted(
        (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    )
    for folder in [*folders, root]:
        with contextlib.suppress(OSError):
            folder.rmdir()


def kill_cgroup_tree(root: Path) -> None:
    """SIGKILL every process still in a cgroup below `root` (containers a crash left)."""
    if not root.is_dir():
        return
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class NodeBinaries:
    """The node's executables (built from the Go module proxy; the rest come from apt)."""

    folder: Path

    def path(self, name: str) -> Path:
        """The path of one executable."""
        return self.folder / name


def node_cache_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/certautopilot/testenv/k8s-VERSION-node``."""
    return cache_dir(environ).parent / f"k8s-{K8S_VERSION}-node"


def _complete(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in NODE_COMPONENTS)


def find_node_binaries(
    environ: Mapping[str, str], *, build: bool = True, progress: TextIO | None = None
) -> NodeBinaries:
    """Return the node binaries, building the missing ones into the cache under a lock."""
    progress = progress or sys.stderr
    folder = node_cache_dir(environ)
    if _complete(folder):
        return NodeBinaries(folder)
    if not build:
        raise NodeError(
            f"the node binaries are not in {folder}: run `python -m tests.testenv.node binaries`"
        )
    lock = folder.parent / f".{folder.name}.lock"
    with exclusive_lock(lock, progress, f"[node] another process is building {folder}; waiting"):
        if _complete(folder):
            return NodeBinaries(folder)
        started = time.monotonic()
        progress.write(
            f"[node] building {', '.join(NODE_COMPONENTS)} v{K8S_VERSION} into {folder} "
            "(once; ~8 minutes on 2 cores with a cold Go build cache)\n"
        )
        progress.flush()
        stream_checked(
            ["bash", str(BUILD_SCRIPT), str(folder), *NODE_COMPONENTS],
            "build the node binaries with Go (install Go: they come from the Go module proxy)",
            env={**environ, "CAP_K8S_VERSION": K8S_VERSION},
            progress=progress,
            error=NodeError,
        )  # fmt: skip
        progress.write(f"[node] node binaries built in {time.monotonic() - started:.0f}s\n")
        if not _complete(folder):
            raise NodeError(f"the build succeeded but {folder} is still incomplete")
    return NodeBinaries(folder)


# --------------------------------------------------------------------------- images

PAUSE_SOURCE = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build_pause_image(workdir: Path) -> Path:
    """Compile the pause program statically and write it as a docker-archive image tarball."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "pause.c"
    source.write_text(PAUSE_SOURCE)
    binary = workdir / "pause"
    done = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise NodeError(
            f"gcc -static could not build the pause program (apt-get install -y gcc "
            f"libc6-dev): {done.stderr.strip()}"
        )
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        _tar_member(tar, "pause", binary.read_bytes(), 0o755)
    layer_bytes = layer.getvalue()
    layer_id = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
    }).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": [f"{layer_id}/layer.tar"]}]
    ).encode()
    archive = workdir / "pause-image.tar"
    with tarfile.open(archive, mode="w") as tar:
        _tar_member(tar, f"{layer_id}/layer.tar", layer_bytes)
        _tar_member(tar, config_name, config)
        _tar_member(tar, "manifest.json", manifest)
    return archive


def export_worker_image(
    repo: Path, tag: str, environ: Mapping[str, str], progress: TextIO | None = None
) -> Path:
    """The project's image as a `docker save` tarball (`Node.import_image` reads it).

    Built from `repo`'s tracked files with a private dockerd (the container tests' engine and
    base images, tests/testenv/docker.py) and kept in ``$XDG_CACHE_HOME/certautopilot/images``
    under a hash of those files, the commit and `tag`: an unchanged checkout reuses it.
    """
    from tests.testenv.docker import DockerEngine, cache_root, ensure_base_images

    images = cache_root(environ) / "images"
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.decode()
    files = [r for r in filter(None, listed.split("\0")) if (repo / r).is_file()]
    revision = _run(["git", "-C", str(repo), "rev-parse", "HEAD"]).strip() or "unknown"
    digest = hashlib.sha256(f"{tag}\0{revision}".encode())
    for relative in files:
        digest.update(relative.encode() + b"\0" + (repo / relative).read_bytes() + b"\0")
    archive = images / f"worker-node-{digest.hexdigest()[:16]}.tar"
    with exclusive_lock(images / ".worker-node.lock", progress or sys.stderr,
                        "[node] another run is building the worker image; waiting"):  # fmt: skip
        if archive.exists():
            return archive
        work = Path(tempfile.mkdtemp(prefix="cap-node-image-"))
        try:
            tree = work / "source"
            for relative in files:
                (tree / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / relative, tree / relative)
            with DockerEngine(
                work / "docker", data_root=cache_root(environ) / "docker", progress=progress
            ) as engine:
                base = ensure_base_images(engine, environ)
                engine.docker(
                    "build", "--network", "host",
                    "--build-arg", f"PYTHON_IMAGE={base['PYTHON_IMAGE']}",
                    "--build-arg", f"REVISION={revision}",
                    "--build-arg", f"SOURCE=file://{repo}",
                    "--tag", tag, str(tree),
                    timeout=1500,
                )  # fmt: skip
                engine.docker("save", "--output", str(work / "image.tar"), tag, timeout=600)
            if engine.host_changes:
                raise NodeError(f"building the image changed the host: {engine.host_changes}")
            for old in images.glob("worker-node-*.tar"):
                old.unlink()  # one checkout's image at a time: they are ~400 MB each
            shutil.move(work / "image.tar", archive)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return archive


# --------------------------------------------------------------------------- the node


def _kubeconfig(
    cluster_name: str,
    server: str,
    ca_pem: bytes,
    ca: CertificateAuthority,
    user: str,
    groups: Sequence[str] = (),
) -> str:
    issued = ca.issue_client(user, organizations=groups)
    return admin_kubeconfig(cluster_name, server, ca_pem, issued.cert_pem, issued.key_pem)


def _private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)
    return path


class Node:
    """The node cluster: its API server on the shared etcd, and the node components."""

    def __init__(
        self,
        binaries: NodeBinaries,
        apiserver_binary: Path,
        etcd_url: str,
        workdir: Path,
        logs: Path,
        *,
        sync_frequency: int = 60,
        progress: TextIO | None = None,
    ) -> None:
        problems = node_problems()
        if problems:
            raise NodeError(
                "this host cannot run the test node (tests/testenv/node.py):\n  "
                + "\n  ".join(problems)
            )
        self.binaries = binaries
        self.workdir = workdir
        self.logs = logs
        self.sync_frequency = sync_frequency
        self.address = host_address()
        self._progress = progress or sys.stderr
        self.id = uuid.uuid4().hex[:10]
        self.cgroup_root = f"/{CGROUP_PREFIX}{self.id}"
        # Unix socket paths are limited to 108 bytes: containerd's sockets go to a short folder.
        self.run_dir = Path(tempfile.mkdtemp(prefix="cap-node-", dir="/tmp"))
        self.containerd_socket = self.run_dir / "containerd.sock"
        self.apiserver = ApiServer(
            "node", apiserver_binary, etcd_url, workdir / "apiserver", logs,
            address=self.address, service_ip=SERVICE_IP,
            extra_args=self._apiserver_kubelet_client_args(workdir / "apiserver"),
        )  # fmt: skip
        # The chart's pods need a database and a broker they can reach: on this host's
        # interface (pods cannot reach loopback), Redis with a password, PostgreSQL with
        # password logins from the pod network only.
        self.redis = RedisServer(
            workdir / "redis", logs, name="node-redis", addresses=(self.address, "127.0.0.1"),
            password=secrets.token_urlsafe(18),
        )  # fmt: skip
        self.postgres = PostgresServer(
            workdir / "postgres", logs, address=self.address, allow_from=(POD_SUBNET,)
        )
        self.before: HostState | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self.cluster: Cluster | None = None
        self.host_changes: list[str] = []
        self.cleanup_actions: list[str] = []
        self.timings: dict[str, float] = {}

    def _apiserver_kubelet_client_args(self, folder: Path) -> list[str]:
        # The API server's client certificate towards the kubelet (logs, exec): issued after
        # the API server made its client CA, so written in start(); the paths are fixed here.
        return [
            f"--kubelet-client-certificate={folder / 'kubelet-client.crt'}",
            f"--kubelet-client-key={folder / 'kubelet-client.key'}",
        ]

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig file of the node cluster (for helm and kubectl)."""
        return self.workdir / "admin.kubeconfig"

    def ctr(self, *args: str) -> list[str]:
        """argv of `ctr` against the node's containerd, in the kubelet's namespace."""
        return ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args]

    def crictl(self, *args: str) -> list[str]:
        """argv of `crictl` against the node's containerd."""
        return [
            str(self.binaries.path("crictl")),
            "--runtime-endpoint", f"unix://{self.containerd_socket}",
            "--image-endpoint", f"unix://{self.containerd_socket}",
            "--timeout", "30s",
            *args,
        ]  # fmt: skip

    # ------------------------------------------------------------------ start

    def start(self) -> Cluster:
        """Start every component; return the node cluster once the node is Ready."""
        self.before = HostState.capture()
        try:
            self._timed("redis and postgres", self._start_services)
            self._timed("apiserver", self._start_apiserver)
            self._timed("containerd", self._start_containerd)
            self._timed("pause image", self._import_pause_image)
            self._timed("control plane", self._start_control_plane)
            self._timed("kubelet", self._start_kubelet)
            self._timed("kube-proxy", self._start_kube_proxy)
            self._timed("node ready", self._wait_node_ready)
        except BaseException:
            self.stop()
            raise
        assert self.cluster is not None
        return self.cluster

    def _timed(self, what: str, step: Callable[[], None]) -> None:
        started = time.monotonic()
        step()
        self.timings[what] = time.monotonic() - started

    def _start_apiserver(self) -> None:
        server = self.apiserver
        kubelet_client = server.client_ca.issue_client(
            "kube-apiserver-kubelet-client", organizations=["system:masters"]
        )
        (server.workdir / "kubelet-client.crt").write_bytes(kubelet_client.cert_pem)
        _private(server.workdir / "kubelet-client.key", kubelet_client.key_pem.decode())
        server.start()
        server.wait_ready()
        self.cluster = server.cluster()
        _private(self.kubeconfig_path, self.cluster.admin_kubeconfig)

    def _start_services(self) -> None:
        self.redis.start()
        self.postgres.start()

    def _component_kubeconfig(self, name: str, user: str, groups: Sequence[str] = ()) -> Path:
        server = self.apiserver
        text = _kubeconfig("node", server.server, server.ca_pem, server.client_ca, user, groups)
        return _private(self.workdir / "kubeconfigs" / f"{name}.yaml", text)

    def _process(self, name: str, argv: Sequence[str], cwd: Path) -> ManagedProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess(name, argv, self.logs / f"node-{name}.log", cwd=cwd)
        self.processes[name] = process
        process.start()
        return process

    def _start_containerd(self) -> None:
        folder = self.workdir / "containerd"
        net_d = folder / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        (net_d / "10-capnode.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": "capnode",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                # Pods talk to this host only (API server, PostgreSQL, Redis): no NAT rule.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(folder / "ipam"),
                },
            }],
        }, indent=1))  # fmt: skip
        config = folder / "config.toml"
        config.write_text(
            f"""version = 2
root = "{folder / "root"}"
state = "{self.run_dir / "state"}"
plugin_dir = ""
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.run_dir / "containerd.sock.ttrpc"}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Without CAP_SYS_RESOURCE runc cannot lower a child's oom_score_adj: keep it as is.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin_dir()}"
    conf_dir = "{net_d}"
"""
        )
        process = self._process(
            "containerd", ["containerd", "--config", str(config), "--log-level", "warn"], folder
        )

        def answers() -> bool:
            done = subprocess.run(self.ctr("version"), capture_output=True, timeout=10, check=False)
            return done.returncode == 0

        process.wait_until_ready(answers, 60, "its API on the socket")

    def import_image(self, archive: Path) -> None:
        """Import an image tarball (docker save format) into the node's containerd."""
        done = subprocess.run(
            self.ctr("images", "import", str(archive)),
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise NodeError(f"ctr images import {archive} failed: {done.stderr.strip()}")

    def _import_pause_image(self) -> None:
        self.import_image(build_pause_image(self.workdir / "pause"))

    def _start_control_plane(self) -> None:
        server = self.apiserver
        kcm = self._component_kubeconfig("controller-manager", "system:kube-controller-manager")
        self._process(
            "kube-controller-manager",
            [
                str(self.binaries.path("kube-controller-manager")),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                # The kube-root-ca.crt ConfigMap every projected token volume mounts as ca.crt.
                f"--root-ca-file={server.ca_file}",
                # Each controller with its own ServiceAccount and bootstrap role (as kubeadm does).
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--v=1",
            ],
            self.workdir / "controller-manager",
        )
        scheduler = self._component_kubeconfig("scheduler", "system:kube-scheduler")
        self._process(
            "kube-scheduler",
            [
                str(self.binaries.path("kube-scheduler")),
                f"--kubeconfig={scheduler}",
                f"--authentication-kubeconfig={scheduler}",
                f"--authorization-kubeconfig={scheduler}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
            self.workdir / "scheduler",
        )

    def _create_cgroup_root(self) -> None:
        # kubelet refuses a --cgroup-root that does not exist; cpuset children need cpus/mems.
        for hierarchy in cgroup_hierarchies():
            folder = hierarchy / self.cgroup_root.lstrip("/")
            folder.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                parent = hierarchy / name
                if parent.exists():
                    (folder / name).write_text(parent.read_text())
            # On a shared machine the whole node would weigh as much as one busy process of the
            # host (cpu.shares 1024), and a pod's exec probes time out while they wait for CPU.
            # A real node's pods have its CPUs: weigh the node as NODE_CPU_WEIGHT processes.
            shares = folder / "cpu.shares"
            if shares.exists():
                shares.write_text(str(1024 * NODE_CPU_WEIGHT))

    def _start_kubelet(self) -> None:
        folder = self.workdir / "kubelet"
        folder.mkdir(parents=True, exist_ok=True)
        self._create_cgroup_root()
        kubeconfig = self._component_kubeconfig(
            "kubelet", f"system:node:{NODE_NAME}", ["system:nodes"]
        )
        client_ca = _private(folder / "client-ca.crt", self.apiserver.client_ca.cert_pem.decode())
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # cgroup v1 hosts: kubelet >= 1.35 refuses them unless told otherwise.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": self.address,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(client_ca)},
            },
            "authorization": {"mode": "Webhook"},
            # How often kubelet resyncs every pod: Secret and ConfigMap volumes follow it.
            "syncFrequency": f"{self.sync_frequency}s",
            "podLogsDir": str(folder / "pod-logs"),
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            # A shared machine's disk and memory are not this node's to police.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "registerNode": True,
            "maxPods": 30,
        }
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._process(
            "kubelet",
            [
                str(self.binaries.path("kubelet")),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={folder / 'root'}",
                f"--cert-dir={folder / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.address}",
                "--v=1",
            ],
            folder,
        )

    def _start_kube_proxy(self) -> None:
        folder = self.workdir / "kube-proxy"
        folder.mkdir(parents=True, exist_ok=True)
        kubeconfig = self._component_kubeconfig("kube-proxy", "system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            # nftables: kube-proxy keeps its rules in its own tables, never in the host's
            # iptables chains; deleting the tables removes every trace.
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_SUBNET,
            "bindAddress": self.address,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{self.address}/32"],
            # Zero: leave the host's conntrack sysctls as they are.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
                "udpTimeout": "0s",
                "udpStreamTimeout": "0s",
            },
        }
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._process(
            "kube-proxy",
            [str(self.binaries.path("kube-proxy")), f"--config={config_path}", "--v=1"],
            folder,
        )

    def _wait_node_ready(self) -> None:
        from kubernetes import client

        from tests.testenv.access import admin_api_client

        assert self.cluster is not None
        api = admin_api_client(self.cluster)
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + NODE_READY_TIMEOUT
        try:
            while True:
                for name, process in self.processes.items():
                    if not process.running():
                        process.fail(f"({name}) exited with status {process.returncode}")
                try:
                    node = core.read_node(NODE_NAME)
                    conditions = (node.status.conditions if node.status else None) or []
                    ready = [c for c in conditions if c.type == "Ready"]
                    taints = (node.spec.taints if node.spec else None) or []
                    # The controller-manager lifts the not-ready taint: pods can then schedule.
                    if ready and ready[0].status == "True" and not taints:
                        sa = core.list_namespaced_service_account("default")
                        if sa.items:
                            return
                except client.ApiException:
                    pass
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"node {NODE_NAME} did not become Ready and untainted (with the "
                        f"default ServiceAccount) within {NODE_READY_TIMEOUT:.0f}s.\nkubelet log:\n"
                        + log_tail(self.logs / "node-kubelet.log")
                    )
                time.sleep(1)
        finally:
            api.close()  # type: ignore[no-untyped-call]

    def dead_components(self) -> list[str]:
        """Names of node components whose process has exited."""
        return [name for name, p in self.processes.items() if p.pid and not p.running()]

    # ------------------------------------------------------------------ stop

    def _remove_pods(self) -> None:
        """Stop and remove every pod sandbox through CRI: CNI DEL runs for each (the bridge
        plugin releases its veth and address, containerd removes the netns)."""
        containerd = self.processes.get("containerd")
        if containerd is None or not containerd.running():
            return
        crictl = self.binaries.path("crictl")
        if not crictl.exists():
            return
        pods = _run(self.crictl("pods", "-q")).split()
        for pod in pods:
            _run(self.crictl("stopp", pod))
            _run(self.crictl("rmp", "-f", pod))

    def stop(self) -> None:
        """Stop every component, remove pods, mounts and cgroups, restore the host."""
        progress = self._progress
        order = ("kube-proxy", "kube-scheduler", "kube-controller-manager", "kubelet")
        for name in order:
            process = self.processes.get(name)
            if process is not None:
                process.stop(grace=15)
        with contextlib.suppress(Exception):
            self._remove_pods()
        containerd = self.processes.get("containerd")
        if containerd is not None:
            containerd.stop(grace=20)
        # Shims and containers outlive containerd: end them through their cgroups, by PID.
        for hierarchy in cgroup_hierarchies():
            kill_cgroup_tree(hierarchy / self.cgroup_root.lstrip("/"))
        time.sleep(0.5)
        unmount_all(self.run_dir)
        unmount_all(self.workdir)
        for hierarchy in cgroup_hierarchies():
            remove_cgroup_tree(hierarchy / self.cgroup_root.lstrip("/"))
        for server in (self.apiserver, self.redis, self.postgres):
            with contextlib.suppress(Exception):
                server.stop()
        if self.before is not None:
            self.cleanup_actions = cleanup_host(self.before, progress)
            self.host_changes = self.before.differences(HostState.capture())
            if self.host_changes:
                progress.write(f"[node] host NOT as found: {self.host_changes}\n")
        shutil.rmtree(self.run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def _main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else ""
    if command == "binaries":
        try:
            print(find_node_binaries(os.environ).folder)
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if command == "check-host":
        problems = node_problems()
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    if command == "snapshot" and len(argv) == 2:
        Path(argv[1]).write_text(HostState.capture().to_json())
        return 0
    if command == "check" and len(argv) == 2:
        before = HostState.from_json(Path(argv[1]).read_text())
        differences = before.differences(HostState.capture())
        for line in differences:
            print(f"host changed: {line}", file=sys.stderr)
        if not differences:
            print(
                "host as found: sysctls, links, nft tables, KUBE-/CNI- chains, cgroups, "
                "network namespaces and kubelet/CNI folders"
            )
        return 1 if differences else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
