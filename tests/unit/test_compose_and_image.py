"""Static checks of the container image and the compose stack, before any engine runs.

tests/integration/test_container.py builds and runs them for real; these checks find the
same mistakes in milliseconds: the files parse, each container runs a command the real CLI
accepts, every variable compose reads is documented in .env.example with the same default,
the secret files compose mounts are the ones .env.example's commands create, the environment
compose hands each container is accepted by the real settings loader, and the image's last
stage runs as a non-root user without build tools.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from worker.platform.settings import ENV_VARS, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
OUR_IMAGE_SERVICES = ("migrate", "worker", "flower")
APP_UID = 10001


# --------------------------------------------------------------------------- compose interpolation


@dataclass(frozen=True)
class Reference:
    """One ${...} in a compose file: the variable, its operator and the text after it."""

    name: str
    operator: str  # "", ":-", "-", ":?", "?", ":+", "+"
    argument: str


_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(:-|-|:\?|\?|:\+|\+)?")


def _references(text: str) -> Iterator[tuple[int, int, Reference]]:
    """Yield (start, end, reference) for each top-level ${...} in `text` (nesting allowed)."""
    index = 0
    while index < len(text):
        if text.startswith("$$", index):
            index += 2
            continue
        if not text.startswith("${", index):
            index += 1
            continue
        depth, end = 1, index + 2
        while depth:
            if end >= len(text):
                raise ValueError(f"unclosed ${{ in {text!r}")
            if text.startswith("${", end):
                depth, end = depth + 1, end + 2
                continue
            depth -= text[end] == "}"
            end += 1
        body = text[index + 2 : end - 1]
        match = _REFERENCE.match(body)
        if match is None:
            raise ValueError(f"malformed ${{{body}}}")
        yield index, end, Reference(match.group(1), match.group(2) or "", body[match.end() :])
        index = end


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Resolve compose's ${VAR}, ${VAR:-default}, ${VAR:?error} ... like `docker compose` does."""
    out, last = [], 0
    for start, end, ref in _references(text):
        out.append(text[last:start].replace("$$", "$"))
        value = environ.get(ref.name)
        empty = not value
        unset = ref.name not in environ
        if ref.operator in (":-", "-") and (empty if ref.operator == ":-" else unset):
            value = interpolate(ref.argument, environ)
        elif ref.operator in (":?", "?") and (empty if ref.operator == ":?" else unset):
            raise LookupError(f"{ref.name}: {ref.argument}")
        elif ref.operator in (":+", "+"):
            value = (
                ""
                if (empty if ref.operator == ":+" else unset)
                else interpolate(ref.argument, environ)
            )
        out.append(value or "")
        last = end
    out.append(text[last:].replace("$$", "$"))
    return "".join(out)


def all_references(text: str) -> Iterator[Reference]:
    """Every ${...} in `text`, nested ones (inside defaults) included."""
    for _, _, ref in _references(text):
        yield ref
        yield from all_references(ref.argument)


def interpolate_tree(node: Any, environ: Mapping[str, str]) -> Any:
    """Interpolate every string in a parsed compose document."""
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [interpolate_tree(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, environ) for key, value in node.items()}
    return node


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "${SET}": "x",
        "${UNSET}": "",
        "${UNSET:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET:-${SET}-y}": "x-y",
        "a$${SET}": "a${SET}",
        "${SET:+alt}": "alt",
        "${UNSET:+alt}": "",
    }
    assert {text: interpolate(text, env) for text in cases} == cases
    with pytest.raises(LookupError, match="EMPTY: fill me"):
        interpolate("${EMPTY:?fill me}", env)


# --------------------------------------------------------------------------- .env.example


def documented_variables() -> dict[str, str]:
    """NAME -> value of every `NAME=value` or `#NAME=value` line of .env.example."""
    found: dict[str, str] = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def compose_text() -> str:
    return (REPO / "docker-compose.yml").read_text()


def example_environment() -> dict[str, str]:
    """What a user's .env holds after `cp .env.example .env`."""
    # Only the active (uncommented) lines of .env.example set anything.
    text = (REPO / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))


def documented_secret_commands() -> str:
    """The shell lines between BEGIN SECRETS and END SECRETS in .env.example."""
    text = (REPO / ".env.example").read_text()
    block = text.split("# BEGIN SECRETS\n", 1)[1].split("# END SECRETS", 1)[0]
    return "\n".join(line.removeprefix("#").strip() for line in block.splitlines())


@pytest.fixture(scope="module")
def secrets_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the documented secret commands ran, as a user runs them."""
    folder = tmp_path_factory.mktemp("compose-project")
    subprocess.run(["bash", "-euc", documented_secret_commands()], cwd=folder, check=True)
    return folder / "secrets"


def mounted_environment(service: str, secrets: Path) -> dict[str, str]:
    """The environment compose hands `service`, its /run/secrets files mapped to `secrets`."""
    spec = interpolate_tree(COMPOSE, example_environment())
    files = {
        name: Path(entry["file"]).name for name, entry in spec["secrets"].items()
    }
    environment = {k: str(v) for k, v in spec["services"][service]["environment"].items()}
    mounted = {f"/run/secrets/{name}": str(secrets / files[name])
               for name in spec["services"][service].get("secrets", [])}  # fmt: skip
    for key, value in environment.items():
        if key.endswith("_FILE") and value.startswith("/run/secrets/"):
            assert value in mounted, f"{service}: {key}={value} is not mounted"
            environment[key] = mounted[value]
    return environment


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    used = {ref.name for ref in all_references(compose_text())}
    assert used - set(documented_variables()) == set()


def test_env_example_shows_the_same_defaults_as_compose() -> None:
    documented = documented_variables()
    defaults = {
        ref.name: ref.argument for ref in all_references(compose_text()) if ref.operator == ":-"
    }
    assert defaults, "compose declares no defaults"
    mismatched = {
        name: (default, documented[name])
        for name, default in defaults.items()
        if documented[name] != default
    }
    assert mismatched == {}


def test_documented_commands_create_every_secret_file_compose_mounts(secrets_folder: Path) -> None:
    spec = interpolate_tree(COMPOSE, example_environment())
    declared = {Path(entry["file"]) for entry in spec["secrets"].values()}
    assert {path.parent for path in declared} == {Path("./secrets")}
    assert {path.name for path in declared} == {p.name for p in secrets_folder.iterdir()}
    # Private folder on the host; files readable by the containers' users (uid 10001, postgres).
    assert stat.S_IMODE(secrets_folder.stat().st_mode) == 0o700
    for path in secrets_folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path
    password = (secrets_folder / "postgres_password").read_text()
    assert len(password) >= 24 and password.isalnum()
    assert (secrets_folder / "database_url").read_text() == (
        f"postgresql+psycopg://certautopilot:{password}@postgres:5432/certautopilot"
    )
    user, _, login_password = (secrets_folder / "flower_basic_auth").read_text().partition(":")
    assert user == "admin" and len(login_password) >= 20


def test_no_secret_is_an_environment_variable_of_any_container() -> None:
    spec = interpolate_tree(COMPOSE, example_environment())
    for name, service in spec["services"].items():
        environment = service.get("environment", {})
        for secret in ("CAP_KEK", "CAP_DATABASE_URL", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH"):
            assert secret not in environment, (name, secret)
    assert spec["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password"
    )


def test_each_container_gets_only_the_secrets_it_needs() -> None:
    secrets = {name: set(s.get("secrets", [])) for name, s in COMPOSE["services"].items()}
    assert secrets == {
        "redis": set(),
        "postgres": {"postgres_password"},
        "migrate": {"cap_kek", "cap_database_url"},
        "worker": {"cap_kek", "cap_database_url"},
        "worker-edge": {"cap_kek", "cap_database_url"},
        # Flower reads no stored credential: no KEK, no database.
        "flower": {"flower_basic_auth"},
    }


def test_every_worker_setting_is_documented_in_env_example() -> None:
    assert set(ENV_VARS) - set(documented_variables()) == set()


def test_worker_accepts_the_environment_compose_gives_it(secrets_folder: Path) -> None:
    for service in ("migrate", "worker", "worker-edge"):
        settings = load_settings(mounted_environment(service, secrets_folder))
        assert settings.ignored_variables == (), service
        assert settings.database.backend == "postgresql", service
        assert not settings.database.is_default, service
    # Two pools: the second worker takes only the per-target work of pool "edge".
    assert load_settings(mounted_environment("worker", secrets_folder)).tasks.worker_pool == (
        "default"
    )
    edge = load_settings(mounted_environment("worker-edge", secrets_folder))
    assert edge.tasks.worker_pool == "edge"
    assert COMPOSE["services"]["worker-edge"]["profiles"] == ["pools"]


def test_flower_reads_its_login_from_its_file_and_no_stored_credential(
    secrets_folder: Path, tmp_path: Path
) -> None:
    environment = mounted_environment("flower", secrets_folder)
    environment["CAP_DATA_DIR"] = str(tmp_path)  # the container's tmpfs, here
    settings = load_settings(environment)
    assert settings.ignored_variables == ()
    login = (secrets_folder / "flower_basic_auth").read_text()
    assert settings.flower.basic_auth == login  # type: ignore[attr-defined]
    assert "CAP_KEK_FILE" not in environment and "CAP_DATABASE_URL_FILE" not in environment


def test_the_data_dir_tmpfs_belongs_to_the_image_user() -> None:
    # A plain tmpfs is root-owned with mode 0700: uid 10001 could not write its heartbeat,
    # the liveness probe failed and the worker never became healthy.
    spec = interpolate_tree(COMPOSE, example_environment())
    for service in OUR_IMAGE_SERVICES:
        mounts = dict(entry.partition(":")[::2] for entry in spec["services"][service]["tmpfs"])
        data_dir = spec["services"][service]["environment"]["CAP_DATA_DIR"]
        options = dict(o.partition("=")[::2] for o in mounts[data_dir].split(","))
        assert options["uid"] == options["gid"] == str(APP_UID), service
        assert Path(spec["services"][service]["environment"]["CAP_HEARTBEAT_FILE"]).parent == (
            Path(data_dir)
        )


# --------------------------------------------------------------------------- compose services


class CliUsageError(Exception):
    """The real CLI would refuse these arguments."""


def cli_command_path(args: list[str]) -> list[str]:
    """Parse `args` with the real CLI (nothing runs) and return the subcommand names taken.

    Raises CliUsageError for an unknown command, option or argument, as the CLI would.
    Typer ships its own copy of click, so groups are recognised by what they can do.
    """
    from worker.cli.main import app

    command: Any = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="certautopilot")
    path: list[str] = []
    remaining = list(args)
    while hasattr(command, "get_command"):  # a group: the next word picks a subcommand
        if not remaining:
            raise CliUsageError(f"{' '.join(path) or 'certautopilot'} needs a subcommand")
        name, *remaining = remaining
        sub = command.get_command(ctx, name)
        if sub is None:
            raise CliUsageError(f"no command {name!r} in {args}")
        path.append(name)
        if hasattr(sub, "get_command"):
            ctx = typer.Context(sub, info_name=name, parent=ctx)
        else:
            try:
                sub.make_context(name, remaining, parent=ctx)  # parses options and arguments
            except typer.TyperException as exc:
                raise CliUsageError(f"{args}: {exc}") from exc
        command = sub
    return path


def test_services_form_the_documented_stack() -> None:
    assert set(COMPOSE["services"]) == {
        "redis",
        "postgres",
        "migrate",
        "worker",
        "worker-edge",
        "flower",
    }


def test_redis_persists_and_never_evicts_queued_tasks() -> None:
    command = " ".join(COMPOSE["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_worker_scales_and_waits_for_a_completed_migration() -> None:
    worker = COMPOSE["services"]["worker"]
    # --scale worker=N needs unnamed containers and no fixed host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert COMPOSE["services"]["migrate"]["restart"] == "no"
    grace = interpolate(worker["stop_grace_period"], {})
    time_limit = interpolate(worker["environment"]["CAP_TASK_TIME_LIMIT"], {})
    assert int(grace.removesuffix("s")) > int(time_limit)


def test_flower_requires_a_login_and_is_published_on_loopback_only() -> None:
    flower = COMPOSE["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH_FILE"] == "/run/secrets/flower_basic_auth"
    for port in flower["ports"]:
        assert str(port).startswith("127.0.0.1:"), port
    for name, service in COMPOSE["services"].items():
        if name != "flower":
            assert "ports" not in service, f"{name} must not publish a port"


@pytest.mark.parametrize("service", OUR_IMAGE_SERVICES)
def test_every_container_of_our_image_runs_a_real_cli_command(service: str) -> None:
    spec = interpolate_tree(COMPOSE["services"][service], example_environment())
    assert spec["image"].startswith("certautopilot-k8s-worker")
    assert cli_command_path(spec["command"]) == [spec["command"][0]]
    health = spec.get("healthcheck", {})
    if "certautopilot" in health.get("test", []):
        assert health["test"][:2] == ["CMD", "certautopilot"]
        cli_command_path(health["test"][2:])


def test_cli_parser_check_rejects_what_the_cli_rejects() -> None:
    refused = [
        ["no-such-command"],
        ["worker", "--no-such-option"],
        ["probe", "no-such-probe"],
        ["worker", "unexpected-argument"],
    ]
    for args in refused:
        with pytest.raises(CliUsageError):
            cli_command_path(args)


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    """One FROM ... stage of the Dockerfile: its base, name and instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        """The arguments of every `keyword` instruction of this stage."""
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages() -> list[Stage]:
    """Parse the Dockerfile into stages (continuation lines joined, comments dropped)."""
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            arg, _, default = rest.partition("=")
            args[arg] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, alias, []))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


BUILD_TOOLS = (
    "gcc",
    "g++",
    "build-essential",
    "make ",
    "apt-get install",
    "apk add",
    "pip install",
    "pip wheel",
    "python3-dev",
    "libpq-dev",
)


DIGEST = r"@sha256:[0-9a-f]{64}"


def test_image_builds_a_wheel_first_and_runs_from_a_clean_slim_python_base() -> None:
    first, *middle, final = dockerfile_stages()
    # The official image, pinned by digest (a tag moves; a digest does not).
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?" + DIGEST, final.base), final.base
    assert first.base == final.base
    builders = [first, *middle]
    assert any("pip wheel" in run for stage in builders for run in stage.all("RUN"))
    # Only built artifacts reach the last stage.
    copies = final.all("COPY")
    names = {stage.name for stage in builders}
    assert copies and all(c.split()[0].removeprefix("--from=") in names for c in copies)


def test_last_stage_has_no_build_tools() -> None:
    final = dockerfile_stages()[-1]
    for run in final.all("RUN"):
        for tool in BUILD_TOOLS:
            assert tool not in run, f"{tool!r} in the last stage: {run}"


def test_image_runs_as_a_fixed_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    users = final.all("USER")
    assert users, "the last stage never switches away from root"
    assert users[-1].split(":")[0] == "10001"


def test_image_entry_point_and_health_check_are_real_cli_commands() -> None:
    final = dockerfile_stages()[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert json.loads(entrypoint) == ["certautopilot"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "certautopilot" in scripts
    assert cli_command_path(json.loads(cmd)) == ["worker"]
    (healthcheck,) = final.all("HEALTHCHECK")
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert probe == ["certautopilot", "probe", "liveness"]
    assert cli_command_path(probe[1:])[0] == "probe"


def test_no_syntax_line_so_no_builder_has_to_pull_a_frontend() -> None:
    first = (REPO / "Dockerfile").read_text().splitlines()[0]
    assert not first.lower().startswith("# syntax"), first


def test_image_carries_oci_source_version_and_revision_labels() -> None:
    final = dockerfile_stages()[-1]
    labels = " ".join(final.all("LABEL"))
    for label in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{label}=" in labels, label
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in (REPO / "Dockerfile").read_text()


def test_every_default_image_is_pinned_by_digest_and_the_base_is_the_same_everywhere() -> None:
    base = dockerfile_stages()[0].base
    spec = interpolate_tree(COMPOSE, {})
    assert spec["services"]["worker"]["build"]["args"]["PYTHON_IMAGE"] == base
    for service in ("redis", "postgres"):
        assert re.search(DIGEST + "$", spec["services"][service]["image"]), service


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def assert_locked_with_hashes(lock: str, requirements: list[str]) -> None:
    """Every requirement (PEP 508 strings) is pinned in `lock`, and every pin has hashes."""
    text = (REPO / lock).read_text()
    pins: dict[str, int] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[[^]]*\])?==\S+", block)
        if match:
            pins[_normalized(match.group(1))] = block.count("--hash=sha256:")
    wanted = {_normalized(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}
    assert wanted - set(pins) == set(), f"missing from {lock}"
    assert all(hashes >= 1 for hashes in pins.values()), pins


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert_locked_with_hashes("requirements.lock", project["dependencies"])
    # The image installs exactly the lock: every file checked against its hash, wheels only.
    runs = [run for stage in dockerfile_stages()[:-1] for run in stage.all("RUN")]
    installs = [run for run in runs if "-r requirements.lock" in run]
    assert installs and all("--require-hashes" in r and "--only-binary=:all:" in r
                            for r in installs)  # fmt: skip


def test_build_backend_is_locked_with_hashes_too() -> None:
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert_locked_with_hashes("requirements-build.lock", build_system["requires"])
    runs = [run for stage in dockerfile_stages()[:-1] for run in stage.all("RUN")]
    (install,) = [run for run in runs if "-r requirements-build.lock" in run]
    assert "--require-hashes" in install
    (wheel,) = [run for run in runs if "pip wheel" in run]
    assert "--no-build-isolation" in wheel  # no unlocked download of the backend


def test_build_context_holds_every_package_the_wheel_needs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    needed = {*packages, "pyproject.toml", pyproject["project"]["readme"]}
    builders = dockerfile_stages()[:-1]
    copied = {src.rstrip("/") for b in builders for c in b.all("COPY") for src in c.split()[:-1]}
    assert needed - copied == set()
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Deny everything, then allow exactly what is copied: no secret or .venv in the context.
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed - allowed == set()
