"""Child processes of the test environment: own process group, output in a log file, sure stop.

Every server the test environment starts (etcd, kube-apiserver, redis-server, postgres) is a
`ManagedProcess`. Three layers make sure none outlives the run:

1. the owner stops it explicitly (SIGTERM to its process group, SIGKILL after a grace period);
2. an ``atexit`` guard stops whatever is still registered when the interpreter exits;
3. the kernel sends it a signal when the thread that started it dies (``PR_SET_PDEATHSIG``),
   which also covers ``kill -9`` of the test runner. Start processes from a long-lived thread
   (the main thread): the death signal fires when the *starting thread* ends.

Each server runs with its working directory inside the environment's temporary folder, so
``.ci/run`` can find survivors of a run by their ``/proc/PID/cwd`` (servers such as Redis and
PostgreSQL overwrite their environment block and command line, so those cannot identify them).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

_PR_SET_PDEATHSIG = 1

# Ports handed out by this process; the OS may offer the same free port twice before a
# server binds it, so we never hand one out again.
_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class StartupError(RuntimeError):
    """A component of the test environment could not be started; the message carries its output."""


def free_port() -> int:
    """Return a loopback TCP port that is free now and was not handed out before by this process."""
    return free_port_on("127.0.0.1")


def free_port_on(address: str) -> int:
    """Return a TCP port free on `address` now and not handed out before by this process."""
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise StartupError(f"no free port on {address} found after 100 attempts")


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last `lines` lines of a log file (or a note that it is missing)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except FileNotFoundError:
        return f"(no log file at {path})"


def _death_signal_setter(sig: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def set_death_signal() -> None:
        # Runs in the child between fork and exec, after any uid change (which would clear it).
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_death_signal


class ManagedProcess:
    """One server process with a name, a log file and a reliable stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        death_signal: int = signal.SIGKILL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self._user = user
        self._stop_signal = stop_signal
        self._death_signal = death_signal
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ManagedProcess(name={self.name!r}, pid={self.pid}, log={str(self.log_path)!r})"

    @property
    def pid(self) -> int | None:
        """Process id while started, else None."""
        return None if self._popen is None else self._popen.pid

    def start(self) -> None:
        """Start the process in its own session, appending its stdout and stderr to the log file."""
        if self._popen is not None and self._popen.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self._popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if self._user is not None:
                # The log is written by the child after its uid change.
                os.chown(self.log_path, *_uid_gid(self._user))
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                    cwd=self._cwd,
                    user=self._user,
                    group=None if self._user is None else _uid_gid(self._user)[1],
                    start_new_session=True,
                    preexec_fn=_death_signal_setter(self._death_signal),
                )
            except OSError as exc:
                raise StartupError(
                    f"could not execute {self.name} ({self.argv[0]}): {exc}"
                ) from exc
        with _live_lock:
            _live.add(self)

    def running(self) -> bool:
        """True while the process has been started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has exited, else None."""
        return None if self._popen is None else self._popen.poll()

    def fail(self, why: str) -> NoReturn:
        """Stop the process and raise StartupError with `why` and the tail of its log."""
        self.stop()
        raise StartupError(
            f"{self.name} {why}.\nCommand: {' '.join(self.argv)}\n"
            f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def wait_until_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `probe` until it returns True; fail with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if not self.running():
                self.fail(f"exited with status {self.returncode} before {what}")
            if probe():
                return
            if time.monotonic() > deadline:
                self.fail(f"did not report {what} within {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def request_stop(self) -> None:
        """Send the stop signal without waiting (to stop several servers in parallel)."""
        if self._popen is not None and self._popen.poll() is None:
            _signal_group(self._popen.pid, self._stop_signal)

    def stop(self, grace: float = 10.0) -> None:
        """Signal the whole process group, wait up to `grace` seconds, then SIGKILL it."""
        popen = self._popen
        if popen is None:
            return
        try:
            if popen.poll() is None:
                _signal_group(popen.pid, self._stop_signal)
                try:
                    popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_group(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=10)
            # Helpers the server forked (postgres backends) share its group; make sure they go.
            _signal_group(popen.pid, signal.SIGKILL)
        finally:
            with _live_lock:
                _live.discard(self)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def stop_all(grace: float = 5.0) -> None:
    """Stop every process still registered (the atexit guard; also safe to call directly)."""
    with _live_lock:
        remaining = list(_live)
    for process in remaining:
        with contextlib.suppress(Exception):
            process.stop(grace=grace)


def stream_checked(
    argv: Sequence[str],
    what: str,
    *,
    env: Mapping[str, str],
    progress: TextIO,
    error: type[Exception] = StartupError,
    cwd: Path | None = None,
    user: str | None = None,
) -> None:
    """Run a command, echoing its output to `progress`; on failure raise `error` with its tail."""
    tail: deque[str] = deque(maxlen=60)
    try:
        with subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            text=True,
            cwd=cwd,
            user=user,
            group=None if user is None else _uid_gid(user)[1],
        ) as command:
            assert command.stdout is not None
            for line in command.stdout:
                tail.append(line)
                progress.write(line)
                progress.flush()
    except OSError as exc:
        raise error(f"could not {what}: {argv[0]}: {exc}") from exc
    if command.returncode != 0:
        raise error(
            f"could not {what} (exit {command.returncode}).\nCommand: {' '.join(argv)}\n"
            f"Last lines:\n{''.join(tail).rstrip()}"
        )


@contextlib.contextmanager
def exclusive_lock(path: Path, progress: TextIO, waiting_note: str) -> Iterator[None]:
    """Hold an exclusive file lock on `path`; say `waiting_note` if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.write(waiting_note + "\n")
            progress.flush()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


atexit.register(stop_all)
