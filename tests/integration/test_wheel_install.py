"""The built wheel, installed into a clean virtualenv, gives a working `certautopilot`.

Built from a copy of the packaged sources only (pyproject.toml, README.md, worker/, tasks/,
models/), so a module or data file missing from the package shows here and not on a user's
machine. The dependencies are pinned to the versions of the test environment (pip freeze)
and come from pip's cache when it has them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGED = ("pyproject.toml", "README.md", "worker", "tasks", "models")


def _run(command: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_wheel_installs_into_a_clean_venv_and_runs_help_and_migrate(tmp_path: Path) -> None:
    started = time.monotonic()
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGED:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "-q", "-w", dist, source], cwd=tmp_path)
    (wheel,) = dist.glob("certautopilot_k8s-*.whl")
    built = time.monotonic()

    constraints = tmp_path / "constraints.txt"
    frozen = _run([*pip, "freeze", "--exclude-editable"], cwd=tmp_path)
    constraints.write_text(frozen)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    _run([venv / "bin" / "pip", "install", "-q", "-c", constraints, wheel], cwd=tmp_path)
    installed = time.monotonic()

    home = tmp_path / "home"
    home.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CAP_", "PYTHON"))}
    environ.update({"HOME": str(home), "CAP_DATA_DIR": str(tmp_path / "data")})
    certautopilot = venv / "bin" / "certautopilot"
    # cwd is an empty folder: nothing of the repository can be imported by accident.
    helped = _run([certautopilot, "--help"], env=environ, cwd=home)
    assert "migrate" in helped and "worker" in helped
    migrated = _run([certautopilot, "migrate"], env=environ, cwd=home)
    assert "schema (empty) ->" in migrated, migrated
    again = _run([certautopilot, "migrate"], env=environ, cwd=home)
    assert "already at schema" in again, again
    assert (tmp_path / "data" / "kek").is_file()  # the embedded default's bootstrap ran
    assert sorted(p.name for p in home.iterdir()) == []  # CAP_DATA_DIR was used, not HOME
    print(
        f"wheel built in {built - started:.1f}s, installed in {installed - built:.1f}s, "
        f"commands ran in {time.monotonic() - installed:.1f}s"
    )
