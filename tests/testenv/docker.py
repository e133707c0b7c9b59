"""A private Docker engine, local base images and Compose v2 for the container tests.

Docker Hub is not reachable from these machines, so nothing here pulls an image:

* **Engine**: Debian's ``docker.io`` (dockerd 20.10 with its own containerd and runc), started
  by PID like every other test server. It listens on a unix socket only (no TCP), keeps its
  exec-root, pidfile and socket in the run's temporary folder, and runs with
  ``--bridge=none --iptables=false --ip-forward=false``: it creates no bridge, no veth and no
  iptables rule at all. Containers use the host's network (``--network host``), so they reach
  the test apiservers, Redis and PostgreSQL on 127.0.0.1 and every server they start binds to
  loopback as the test environment's rules require. Its image store (``--data-root``) is a
  cache kept between runs in ``$XDG_CACHE_HOME/certautopilot/docker`` (``~/.cache`` by
  default): warm runs reuse the base images and the build cache. A file lock keeps two runs
  from sharing it at once. ``stop()`` removes every container, stops dockerd and checks that
  the host's links and iptables rules are as they were before ``start()`` and that nothing is
  left mounted under its data- or exec-root.
* **Base images**: ``build-base-image.sh`` makes a Debian bookworm root with
  ``debootstrap --variant=minbase`` plus the packages of one image (python, redis, postgres);
  ``docker import`` turns it into ``certautopilot-base/NAME:HASH``, where HASH covers the
  recipe (script and image config). The root tarballs are cached in
  ``$XDG_CACHE_HOME/certautopilot/images`` so an emptied image store re-imports in seconds.
* **Compose**: v2, built once from the Go module proxy by ``build-compose.sh`` into
  ``$XDG_CACHE_HOME/certautopilot/tools/compose-VERSION`` (Debian bookworm only has v1).

Packages come from apt, never from Python: ``missing_prerequisites()`` names what to install.

    python -m tests.testenv.docker check     # say what is missing (exit 1 if anything)
    python -m tests.testenv.docker prepare   # build compose and the base images ahead of pytest
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TextIO

from tests.testenv.process import ManagedProcess, StartupError, exclusive_lock, stream_checked

COMPOSE_VERSION = "2.29.7"
APT_PACKAGES = ("docker.io", "debootstrap")
APT_INSTALL = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
DOCKERD_START_TIMEOUT = 60.0
HERE = Path(__file__).resolve().parent
BASE_IMAGE_SCRIPT = HERE / "build-base-image.sh"
COMPOSE_SCRIPT = HERE / "build-compose.sh"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# `docker import --change` lines per base image: what the official image's config provides.
BASE_IMAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "python": (f"ENV PATH={_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]'),
    "redis": (
        f"ENV PATH={_PATH}",
        "USER redis",
        "WORKDIR /data",
        'CMD ["redis-server"]',
    ),
    "postgres": (
        f"ENV PATH=/usr/lib/postgresql/15/bin:{_PATH}",
        "ENV PGDATA=/var/lib/postgresql/data",
        "ENV LANG=C.UTF-8",
        "USER postgres",
        'ENTRYPOINT ["docker-entrypoint.sh"]',
        'CMD ["postgres"]',
    ),
}
# The environment variable the Dockerfile / docker-compose.yml read for each base image.
BASE_IMAGE_VARIABLE = {
    "python": "PYTHON_IMAGE",
    "redis": "REDIS_IMAGE",
    "postgres": "POSTGRES_IMAGE",
}


class DockerError(StartupError):
    """The container engine or one of its prerequisites is missing or failed."""


def cache_root(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/certautopilot`` (``~/.cache/certautopilot`` when unset)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(base).expanduser() / "certautopilot"


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the container tests, each with the fix; empty when ready."""
    missing = []
    for binary, package in (
        ("dockerd", "docker.io"),
        ("containerd", "docker.io (brings containerd)"),
        ("runc", "docker.io (brings runc)"),
        ("docker", "docker.io"),
        ("debootstrap", "debootstrap"),
    ):
        if shutil.which(binary) is None:
            missing.append(f"{binary}: install the apt package {package} ({APT_INSTALL})")
    if shutil.which("go") is None:
        missing.append("go: needed once to build Docker Compose v2 from the Go module proxy")
    if os.geteuid() != 0:
        missing.append("root: dockerd and debootstrap run as root")
    return missing


def debian_mirror(environ: Mapping[str, str]) -> str:
    """The Debian mirror apt uses on this machine (CAP_DEBIAN_MIRROR overrides it)."""
    override = environ.get("CAP_DEBIAN_MIRROR")
    if override:
        return override
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"^\s*(?:URIs:|deb)\s+(\S+)", text, re.MULTILINE):
            uri = match.group(1).rstrip("/")
            if uri.startswith("http") and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def host_network_state(roots: Sequence[Path]) -> dict[str, str]:
    """Links, iptables rules (filter and nat) and the mounts under `roots` (an engine's data-
    and exec-root): what an engine could leave behind. Mounts elsewhere are not this engine's
    (another engine, on its own roots, may come and go meanwhile)."""

    def run(argv: Sequence[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:
            return f"({argv[0]} not installed)"
        return done.stdout if done.returncode == 0 else f"(exit {done.returncode}) {done.stderr}"

    links = run(["ip", "-o", "link", "show"])
    state = {
        # Link names only: counters and flags of eth0 change on their own.
        "links": "\n".join(sorted(line.split(":")[1].strip() for line in links.splitlines()
                                  if line.count(":") >= 2)),
        "iptables": run(["iptables", "-S"]),
        "iptables-nat": run(["iptables", "-t", "nat", "-S"]),
    }
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    state["mounts"] = "\n".join(
        sorted(m for m in points for r in map(str, roots) if m == r or m.startswith(r + "/"))
    )
    return state


class DockerEngine:
    """dockerd on a private unix socket; images cached in `data_root` between runs."""

    def __init__(self, workdir: Path, *, data_root: Path, progress: TextIO | None = None) -> None:
        problems = missing_prerequisites()
        if problems:
            raise DockerError("the container tests cannot start:\n  " + "\n  ".join(problems))
        self.workdir = workdir
        self.data_root = data_root
        self._progress = progress or sys.stderr
        # Unix socket paths are limited to 108 bytes; containerd's sockets live under exec-root.
        self.exec_root = Path(tempfile.mkdtemp(prefix="cap-dx-", dir="/tmp"))
        self.socket = workdir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.before: dict[str, str] = {}
        self.host_changes: dict[str, tuple[str, str]] = {}
        self._lock: IO[str] | None = None
        self.process = ManagedProcess(
            "dockerd",
            [
                "dockerd",
                "--host", self.host,
                "--data-root", str(data_root),
                "--exec-root", str(self.exec_root),
                "--pidfile", str(workdir / "dockerd.pid"),
                # No bridge, no NAT, no iptables rule, no forwarding: containers use the host's
                # network and the host is left exactly as found.
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--storage-driver=overlay2",
                "--log-level=warn",
            ],
            workdir / "dockerd.log",
            cwd=workdir,
            # On the test runner's death dockerd stops its containers itself (SIGKILL could not).
            death_signal=15,
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment for docker / compose commands against this engine (classic builder)."""
        return {
            **os.environ,
            "DOCKER_HOST": self.host,
            "DOCKER_BUILDKIT": "0",
            "DOCKER_CONFIG": str(self.workdir / "docker-config"),
        }

    def start(self) -> None:
        """Take the image-store lock, record the host's state, start dockerd, wait for its API."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        lock_path = self.data_root.parent / f".{self.data_root.name}.lock"
        self._lock = lock_path.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._progress.write(f"[docker] another run uses {self.data_root}; waiting\n")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.before = host_network_state((self.data_root, self.exec_root))
        started = time.monotonic()
        self.process.start()
        self.process.wait_until_ready(self._answers, DOCKERD_START_TIMEOUT, "its API on the socket")
        self._progress.write(f"[docker] dockerd up in {time.monotonic() - started:.1f}s\n")
        # Containers a killed earlier run left in the cached store: nothing may carry over.
        self.remove_all_containers()

    def _answers(self) -> bool:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=self.env, capture_output=True, timeout=10, check=False,
        )
        return done.returncode == 0

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one docker CLI command against this engine and return its output."""
        done = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, input=input,
        )
        if check and done.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def has_image(self, ref: str) -> bool:
        """True when the engine has the image `ref` locally."""
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def remove_all_containers(self) -> None:
        """Kill and remove every container (and anonymous volume) of this engine."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, timeout=120)

    def stop(self) -> None:
        """Remove all containers, stop dockerd, compare the host's state with the one at start."""
        try:
            if self.process.running():
                with contextlib.suppress(DockerError, subprocess.TimeoutExpired):
                    self.remove_all_containers()
                    self.docker("network", "prune", "-f", check=False)
            self.process.stop(grace=30)
            self._unmount_leftovers()
            after = host_network_state((self.data_root, self.exec_root))
            self.host_changes = {
                key: (self.before[key], after[key])
                for key in self.before
                if self.before[key] != after[key]
            }
        finally:
            shutil.rmtree(self.exec_root, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _unmount_leftovers(self) -> None:
        """Unmount what dockerd leaves mounted after it stopped (its default network namespace
        bind mount under exec-root survives even a clean shutdown), deepest first."""
        roots = (str(self.exec_root) + "/", str(self.data_root) + "/")
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(roots)), reverse=True):
            done = subprocess.run(["umount", mount], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                self._progress.write(f"[docker] could not unmount {mount}: {done.stderr}\n")

    def __enter__(self) -> DockerEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- base images


LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def recipe_hash(name: str) -> str:
    """Hash of everything that makes base image `name`: the build script, the image config and
    (python) the host's local CAs the script copies in."""
    digest = hashlib.sha256()
    digest.update(BASE_IMAGE_SCRIPT.read_bytes())
    digest.update(json.dumps([name, BASE_IMAGE_CONFIG[name]]).encode())
    if name == "python":
        for ca in sorted(LOCAL_CAS.glob("*.crt")):
            digest.update(ca.name.encode() + ca.read_bytes())
    return digest.hexdigest()[:16]


def base_image_tag(name: str) -> str:
    """The local tag of base image `name` for the current recipe."""
    return f"certautopilot-base/{name}:{recipe_hash(name)}"


def ensure_base_image(
    engine: DockerEngine, name: str, environ: Mapping[str, str], progress: TextIO | None = None
) -> str:
    """Return the tag of base image `name`, importing (and first building) it when missing."""
    out = progress or sys.stderr
    tag = base_image_tag(name)
    if engine.has_image(tag):
        return tag
    images = cache_root(environ) / "images"
    tarball = images / f"{name}-{recipe_hash(name)}.tar"
    with exclusive_lock(images / f".{name}.lock", out, f"[docker] waiting for {tarball}"):
        if not tarball.exists():
            started = time.monotonic()
            stream_checked(
                [
                    "bash", str(BASE_IMAGE_SCRIPT), name, str(tarball),
                    debian_mirror(environ), str(images / "debs"),
                ],
                f"build the {name} base image root with debootstrap",
                env=dict(environ), progress=out, error=DockerError,
            )
            out.write(f"[docker] {name} root built in {time.monotonic() - started:.0f}s\n")
            # Older recipes of the same image are dead weight.
            for stale in images.glob(f"{name}-*.tar"):
                if stale != tarball:
                    stale.unlink(missing_ok=True)
    changes = [arg for line in BASE_IMAGE_CONFIG[name] for arg in ("--change", line)]
    engine.docker("import", *changes, str(tarball), tag, timeout=600)
    # Images of older recipes in the cached store are dead weight.
    listed = engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}", tag.split(":")[0])
    for old_tag in listed.stdout.split():
        if old_tag != tag:
            engine.docker("rmi", old_tag, check=False)
    return tag


def ensure_base_images(
    engine: DockerEngine, environ: Mapping[str, str], progress: TextIO | None = None
) -> dict[str, str]:
    """All base images, as the variables the Dockerfile and compose read: {PYTHON_IMAGE: tag}."""
    return {
        BASE_IMAGE_VARIABLE[name]: ensure_base_image(engine, name, environ, progress)
        for name in BASE_IMAGE_CONFIG
    }


# --------------------------------------------------------------------------- compose


def compose_path(environ: Mapping[str, str]) -> Path:
    """Where the cached Compose v2 binary lives (it may not exist yet)."""
    return cache_root(environ) / "tools" / f"compose-{COMPOSE_VERSION}" / "docker-compose"


def find_compose(environ: Mapping[str, str], progress: TextIO | None = None) -> Path:
    """Return Compose v2 (DOCKER_COMPOSE_BIN, else the cache, else build it there once)."""
    override = environ.get("DOCKER_COMPOSE_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise DockerError(f"DOCKER_COMPOSE_BIN={override} is not an executable file")
        return Path(override)
    target = compose_path(environ)
    if os.access(target, os.X_OK):
        return target
    out = progress or sys.stderr
    folder = target.parent
    with exclusive_lock(folder.parent / f".{folder.name}.lock", out, "[compose] waiting for build"):
        if not os.access(target, os.X_OK):
            started = time.monotonic()
            stream_checked(
                ["bash", str(COMPOSE_SCRIPT), str(folder)],
                "build Docker Compose v2 with Go (install Go or set DOCKER_COMPOSE_BIN)",
                env={**environ, "CAP_COMPOSE_VERSION": COMPOSE_VERSION},
                progress=out, error=DockerError,
            )
            out.write(f"[compose] built in {time.monotonic() - started:.0f}s\n")
    if not os.access(target, os.X_OK):
        raise DockerError(f"{COMPOSE_SCRIPT.name} finished but {target} is missing")
    return target


def _main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "check"
    problems = missing_prerequisites()
    if problems:
        print("missing for the container tests:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if command == "check":
        print("container test prerequisites present")
        return 0
    if command != "prepare":
        print(__doc__, file=sys.stderr)
        return 2
    timings: dict[str, float] = {}
    started = time.monotonic()
    find_compose(os.environ)
    timings["compose"] = time.monotonic() - started
    workdir = Path(tempfile.mkdtemp(prefix="cap-docker-prepare-"))
    try:
        with DockerEngine(workdir, data_root=cache_root(os.environ) / "docker") as engine:
            for name in BASE_IMAGE_CONFIG:
                step = time.monotonic()
                print(f"{BASE_IMAGE_VARIABLE[name]}={ensure_base_image(engine, name, os.environ)}")
                timings[f"base image {name}"] = time.monotonic() - step
        if engine.host_changes:
            print(f"the engine left the host changed: {engine.host_changes}", file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for what, seconds in timings.items():
        print(f"[docker prepare] {what}: {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
