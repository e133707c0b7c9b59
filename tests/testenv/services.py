"""Redis and PostgreSQL for the test environment: loopback only, data in a temporary folder.

Packages are installed by ``.ci/run`` (apt-get), never from Python; when a binary is missing
the component fails with a message naming the apt package to install.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import uuid
from pathlib import Path

import psycopg

from tests.testenv.process import ManagedProcess, StartupError, free_port, stream_checked

REDIS_START_TIMEOUT = 30.0
POSTGRES_START_TIMEOUT = 60.0


class RedisServer:
    """A private redis-server; `restart()` keeps the port (and, with appendonly, the data)."""

    def __init__(
        self,
        workdir: Path,
        logs: Path,
        *,
        appendonly: bool = False,
        binary: str | None = None,
        name: str = "redis",
        addresses: tuple[str, ...] = ("127.0.0.1",),
        password: str | None = None,
    ) -> None:
        """`addresses`: where it listens (the first is in `url`); `password`: requirepass, for
        a server reachable beyond loopback (the test node's pods)."""
        found = binary or shutil.which("redis-server")
        if found is None or not Path(found).exists():
            raise StartupError(
                "redis-server is not installed: install the apt package redis-server "
                "(`apt-get install -y redis-server`, which .ci/run does for you)"
            )
        self.port = free_port()
        self.password = password
        credentials = f":{password}@" if password else ""
        self.url = f"redis://{credentials}{addresses[0]}:{self.port}/0"
        self.appendonly = appendonly
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            name,
            [
                found,
                "--bind", *addresses,
                "--port", str(self.port),
                *(["--requirepass", password] if password else []),
                "--dir", str(workdir),
                "--save", "",
                "--appendonly", "yes" if appendonly else "no",
                # fsync on every write: a fault test that kills Redis loses nothing acknowledged.
                "--appendfsync", "always",
                "--daemonize", "no",
                "--logfile", "",
            ],
            logs / f"{name}.log",
            cwd=workdir,
        )

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, appendonly={self.appendonly})"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        self.process.start()
        self.process.wait_until_ready(self.ping, REDIS_START_TIMEOUT, "PONG to PING")

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not while it is still loading data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM; with appendonly the log is flushed first)."""
        self.process.stop()

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self.process.pid is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop(grace=1)

    def restart(self) -> None:
        """Stop and start again on the same port; clients reconnect to the same URL."""
        self.stop()
        self.start()


def find_postgres_bindir() -> Path:
    """Return the folder holding PostgreSQL's initdb and postgres, newest version first."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def major(path: Path) -> int:
        return int(path.parent.name) if path.parent.name.isdigit() else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    raise StartupError(
        "PostgreSQL server binaries (initdb, postgres) were not found on PATH or in "
        "/usr/lib/postgresql/*/bin: install the apt package postgresql "
        "(`apt-get install -y postgresql`, which .ci/run does for you)"
    )


def _require_traversable(folder: Path, uid: int, user: str) -> None:
    """Fail clearly when `user` could not reach `folder` (postgres runs as its own user)."""
    for path in (folder, *folder.parents):
        mode = path.stat()
        if mode.st_uid != uid and not mode.st_mode & stat.S_IXOTH:
            raise StartupError(
                f"postgres runs as user {user!r} and cannot enter {path} (mode "
                f"{stat.filemode(mode.st_mode)}); point TMPDIR at a folder others may "
                "traverse (e.g. /tmp) or run the tests as a non-root user"
            )


_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresServer:
    """A private PostgreSQL cluster (initdb once) that hands out fresh, empty databases."""

    SUPERUSER = "postgres"

    def __init__(
        self,
        workdir: Path,
        logs: Path,
        *,
        bindir: Path | None = None,
        name: str = "postgres",
        address: str = "127.0.0.1",
        allow_from: tuple[str, ...] = (),
    ) -> None:
        """`address`: a second listen address besides loopback (the test node's pods reach
        the host there); `allow_from`: networks that may log in with the password."""
        self._bindir = bindir or find_postgres_bindir()
        self.name = name
        self.address = address
        self._allow_from = allow_from
        self.port = free_port()
        self._password = secrets.token_urlsafe(24)
        # postgres refuses to run as root; as root we run it as the "postgres" user.
        self._run_as = "postgres" if os.geteuid() == 0 else None
        if self._run_as is not None:
            try:
                import pwd

                pwd.getpwnam(self._run_as)
            except KeyError as exc:
                raise StartupError(
                    "postgres refuses to run as root and no 'postgres' user exists: install "
                    "the apt package postgresql (it creates the user) or run tests as non-root"
                ) from exc
        self._workdir = workdir
        self._data = workdir / "data"
        self._sockets = workdir / "sockets"
        self._logs = logs
        self.process: ManagedProcess | None = None

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, data={str(self._data)!r})"

    def url(self, database: str, *, host: str = "127.0.0.1") -> str:
        """SQLAlchemy URL (psycopg 3 driver) for `database` as the superuser."""
        return (
            f"postgresql+psycopg://{self.SUPERUSER}:{self._password}"
            f"@{host}:{self.port}/{database}"
        )

    def _conninfo(self, database: str) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={self.SUPERUSER} "
            f"password={self._password} dbname={database} connect_timeout=3"
        )

    def start(self) -> None:
        """Create the cluster with initdb and start the server; wait until it accepts logins."""
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._sockets.mkdir(exist_ok=True)
        password_file = self._workdir / "pwfile"
        password_file.write_text(self._password + "\n")
        password_file.chmod(0o600)
        if self._run_as is not None:
            import pwd

            entry = pwd.getpwnam(self._run_as)
            _require_traversable(self._workdir.parent, entry.pw_uid, self._run_as)
            for path in (self._workdir, self._sockets, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            stream_checked(
                [
                    str(self._bindir / "initdb"),
                    f"--pgdata={self._data}",
                    f"--username={self.SUPERUSER}",
                    f"--pwfile={password_file}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--no-instructions",
                ],
                "initialise a PostgreSQL cluster with initdb",
                env=os.environ,
                progress=io.StringIO(),  # only shown, as the error's tail, if initdb fails
                user=self._run_as,
                cwd=self._workdir,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if self._allow_from:
            with (self._data / "pg_hba.conf").open("a") as hba:
                for network in self._allow_from:
                    hba.write(f"host all all {network} scram-sha-256\n")
        listen = "127.0.0.1" if self.address == "127.0.0.1" else f"127.0.0.1,{self.address}"
        self.process = ManagedProcess(
            self.name,
            [
                str(self._bindir / "postgres"),
                "-D", str(self._data),
                "-h", listen,
                "-p", str(self.port),
                "-k", str(self._sockets),
                # Disposable data: durability costs time and buys nothing here.
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "max_connections=300",
                *self._statement_stats_options(),
            ],
            self._logs / f"{self.name}.log",
            cwd=self._workdir,
            user=self._run_as,
            stop_signal=signal.SIGINT,  # "fast" shutdown: disconnects clients, then exits
            death_signal=signal.SIGQUIT,  # "immediate" shutdown if the test runner dies
        )
        self.process.start()
        self.process.wait_until_ready(self._accepts_logins, POSTGRES_START_TIMEOUT, "ready")

    @property
    def counts_statements(self) -> bool:
        """Whether pg_stat_statements is loaded (bench/ counts statements per target)."""
        return (self._bindir.parent / "lib" / "pg_stat_statements.so").exists()

    def _statement_stats_options(self) -> list[str]:
        # Debian's server package ships the module; without it the server still starts.
        if not self.counts_statements:
            return []
        return [
            "-c", "shared_preload_libraries=pg_stat_statements",
            # SELECT/INSERT/UPDATE/DELETE only: BEGIN and COMMIT are in the transaction count.
            "-c", "pg_stat_statements.track_utility=off",
        ]  # fmt: skip

    def _accepts_logins(self) -> bool:
        try:
            with psycopg.connect(self._conninfo("postgres")) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def create_database(self, prefix: str = "test") -> str:
        """Create a fresh empty database and return its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME.match(name):
            raise ValueError(f"database prefix {prefix!r} must be lowercase letters, digits, _")
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database named by `url`, disconnecting any client still using it."""
        name = url.rsplit("/", 1)[1]
        if not _DB_NAME.match(name):
            raise ValueError(f"not a database this server created: {name!r}")
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            self.process.stop()

    def restart(self) -> None:
        """Stop the server (fast shutdown: every client is disconnected) and start it again
        on the same port and data; clients reconnect to the same URLs."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        self.process.stop()
        self.process.start()
        self.process.wait_until_ready(self._accepts_logins, POSTGRES_START_TIMEOUT, "ready")
