"""Real Celery worker processes for integration tests (no eager mode, no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """One `celery worker` process group, started with a given environment."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        concurrency: int = 4,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self._log = self.log_path.open("ab")
        # The product's own entry point, exactly as a pod runs it.
        command = [
            str(Path(sys.executable).with_name("certautopilot")),
            "worker",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            f"--hostname={name}@%h",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_text(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the worker says it is ready; fail with its log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early:\n{self.log_text()[-4000:]}")
            if " ready." in self.log_text():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"worker {self.name} not ready after {timeout}s:\n{self.log_text()[-4000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (like a pod's sudden death)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM to the main process only, without waiting (what kubelet sends a pod's PID 1):
        Celery's warm shutdown finishes the tasks in flight; :meth:`stop` reaps it later."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def alive(self) -> bool:
        """True while the main process runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), escalating to SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Pool children of a killed main process may linger in the group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
