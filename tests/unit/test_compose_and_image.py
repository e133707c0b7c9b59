"""Static checks of the container image and the compose stack (no Docker engine runs here).

What a Docker engine would find out late is checked early: the files parse, each container
runs a command the real CLI accepts, every variable compose reads is documented in
.env.example with the same default, the environment compose hands the worker is accepted by
the real settings loader, and the image's last stage runs as a non-root user without build
tools.
"""

from __future__ import annotations

import base64
import json
import re
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
REQUIRED_SECRETS = ("CAP_KEK", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")


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
    """What a user's .env holds after filling the required secrets as .env.example says."""
    # Only the active (uncommented) lines of .env.example set anything.
    text = (REPO / ".env.example").read_text()
    env = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    env["CAP_KEK"] = "k1:" + base64.b64encode(bytes(range(32))).decode()
    env["POSTGRES_PASSWORD"] = "example-password"
    env["FLOWER_BASIC_AUTH"] = "admin:example-password"
    return env


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


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_compose_refuses_to_start_without_each_required_secret(secret: str) -> None:
    assert documented_variables()[secret] == "", f"{secret} must not ship with a value"
    environment = example_environment()
    interpolate_tree(COMPOSE, environment)  # complete: resolves
    environment[secret] = ""  # as left by `cp .env.example .env`
    with pytest.raises(LookupError, match=f"^{secret}: set {secret}"):
        interpolate_tree(COMPOSE, environment)


def test_every_worker_setting_is_documented_in_env_example() -> None:
    assert set(ENV_VARS) - set(documented_variables()) == set()


def test_worker_accepts_the_environment_compose_gives_it() -> None:
    resolved = interpolate_tree(COMPOSE, example_environment())
    for service in OUR_IMAGE_SERVICES:
        environment = {
            key: str(value) for key, value in resolved["services"][service]["environment"].items()
        }
        settings = load_settings(environment)
        assert settings.ignored_variables == (), service
        assert settings.database.backend == "postgresql", service
        assert not settings.database.is_default, service


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
    assert set(COMPOSE["services"]) == {"redis", "postgres", "migrate", "worker", "flower"}


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
    assert "${FLOWER_BASIC_AUTH:?" in flower["environment"]["FLOWER_BASIC_AUTH"]
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


def test_image_builds_a_wheel_first_and_runs_from_a_clean_slim_python_base() -> None:
    build, *_, final = dockerfile_stages()
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base), final.base
    assert build.base == final.base
    assert any("pip wheel" in run for run in build.all("RUN"))
    # Only built artifacts reach the last stage.
    copies = final.all("COPY")
    assert copies and all(c.startswith(f"--from={build.name} ") for c in copies)


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


def test_build_context_holds_every_package_the_wheel_needs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    needed = {*packages, "pyproject.toml", pyproject["project"]["readme"]}
    build = dockerfile_stages()[0]
    copied = {src.rstrip("/") for c in build.all("COPY") for src in c.split()[:-1]}
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
