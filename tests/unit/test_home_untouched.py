"""Importing the worker and loading its settings writes nothing; only the bootstrap does.

Each check runs in a fresh interpreter whose HOME is an empty folder, so what the imports do
at module level is seen (this test process imported everything long ago).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, home: Path) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CAP_", "FLOWER_"))}
    environ.update({"HOME": str(home), "PYTHONPATH": str(REPO)})
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=home,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_importing_the_tasks_and_loading_settings_leaves_an_empty_home_empty(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = _python(
        "import json\n"
        "import tasks.distribution\n"
        "from worker.platform.celery_app import app\n"
        "from worker.platform.settings import load_settings\n"
        "settings = load_settings()\n"
        "print(json.dumps([app.configured, str(settings.data_dir)]))\n",
        home,
    )
    configured, data_dir = json.loads(out)
    assert configured is False  # nothing read the Celery configuration either
    assert data_dir == str(home / ".local" / "share" / "certautopilot")
    assert _tree(home) == []


def test_the_bare_celery_command_line_configures_the_app_from_the_environment(
    tmp_path: Path,
) -> None:
    # `celery -A worker.platform.celery_app:app worker` has no composition root of ours: the
    # first read of the configuration loads and bootstraps the settings, as the CLI would.
    home = tmp_path / "home"
    home.mkdir()
    out = _python(
        "from worker.platform.celery_app import app\nprint(app.conf.broker_url)\n",
        home,
    )
    data_dir = home / ".local" / "share" / "certautopilot"
    # (cap-sqla: the embedded default's tuned SQLAlchemy transport, worker.platform.embedded_broker)
    assert out.strip() == f"cap-sqla+sqlite:///{data_dir}/broker.db"
    assert (data_dir / "kek").is_file()


def test_the_unit_suite_runs_with_a_temporary_home() -> None:
    # tests/conftest.py points HOME and CAP_DATA_DIR of every test at temporary folders.
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert Path(os.environ["HOME"]) != real_home
    assert Path(os.environ["CAP_DATA_DIR"]).parent == Path(os.environ["HOME"])
