"""Settings: defaults, every variable parsed, bad values named clearly, KEKs never echoed."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest

from worker.core.crypto import Keyring
from worker.platform.bootstrap import bootstrap
from worker.platform.runtime import build_runtime
from worker.platform.settings import (
    ENV_VARS,
    FILE_VARIANTS,
    GENERATED_KEK_ID,
    Settings,
    SettingsError,
    load_settings,
    require_kek,
)

KEK_A = base64.b64encode(bytes(range(32))).decode()
KEK_B = base64.b64encode(bytes(range(50, 82))).decode()
PG_URL = "postgresql+psycopg://worker:hunter2@db.example:5432/cap"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A minimal environment: only HOME and the data folder, both in tmp_path."""
    return {"HOME": str(tmp_path / "home"), "CAP_DATA_DIR": str(tmp_path / "data")}


def test_nothing_set_gives_the_embedded_default(tmp_path: Path) -> None:
    settings = load_settings({"HOME": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []  # loading settings writes nothing
    assert settings.uses_data_dir
    data_dir = tmp_path / ".local" / "share" / "certautopilot"
    assert settings.data_dir == data_dir
    assert settings.embedded_default
    assert settings.database.url == f"sqlite:///{data_dir}/certautopilot.db"
    assert settings.broker.url == f"sqla+sqlite:///{data_dir}/broker.db"
    assert settings.broker.result_backend == f"db+sqlite:///{data_dir}/results.db"
    assert settings.broker.visibility_timeout == 3600
    assert settings.kube.serviceaccount_dir == Path("/var/run/secrets/kubernetes.io/serviceaccount")
    assert (settings.kube.connect_timeout, settings.kube.read_timeout) == (5, 15)
    assert (settings.kube.retry_attempts, settings.kube.retry_max_seconds) == (5, 30)
    assert settings.kube.server_dry_run is True
    assert settings.fanout.default_batch_size == "100%"
    assert settings.fanout.default_failure_threshold == 0
    assert (settings.tasks.soft_time_limit, settings.tasks.time_limit) == (600, 660)
    assert (settings.tasks.stale_after, settings.tasks.resend_after) == (60, 300)
    assert (settings.tasks.reaper_interval, settings.tasks.stale_after) == (15, 60)
    assert settings.tasks.worker_concurrency == 4
    assert settings.tasks.kube_queue == "kubernetes"
    assert settings.tasks.heartbeat_file == data_dir / "worker-heartbeat"
    assert settings.tasks.log_level == "INFO"
    assert settings.crypto.current_key_id == GENERATED_KEK_ID


def test_embedded_default_generates_a_private_kek_file_once(env: dict[str, str]) -> None:
    loaded = load_settings(env)
    assert not loaded.data_dir.exists() and dict(loaded.crypto.keys) == {}
    first = bootstrap(loaded)
    kek_file = first.data_dir / "kek"
    assert first.crypto.generated_file == kek_file
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.data_dir.stat().st_mode) == 0o700
    second = bootstrap(load_settings(env))
    assert first.crypto.keys == second.crypto.keys
    assert len(first.crypto.keys[GENERATED_KEK_ID]) == 32
    assert "generated file" in first.crypto.source


def test_concurrent_first_starts_agree_on_one_generated_kek(env: dict[str, str]) -> None:
    results: list[Settings] = []
    threads = [
        threading.Thread(target=lambda: results.append(bootstrap(load_settings(env))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(threads)
    assert len({bytes(s.crypto.keys[GENERATED_KEK_ID]) for s in results}) == 1
    assert [p.name for p in Path(env["CAP_DATA_DIR"]).iterdir() if p.name.startswith(".kek")] == []


def test_every_variable_is_read(env: dict[str, str], tmp_path: Path) -> None:
    kek_file = tmp_path / "keks"
    kek_file.write_text(f"# rotated 2024\nk2:{KEK_B}\n\n")
    env.update(
        {
            "CAP_DATABASE_URL": PG_URL,
            "CAP_BROKER_URL": "redis://127.0.0.1:6379/0",
            "CAP_RESULT_BACKEND": "redis://127.0.0.1:6379/1",
            "CAP_KEK": f"k1:{KEK_A}",
            "CAP_KEK_FILE": str(kek_file),
            "CAP_KEK_CURRENT": "k2",
            "CAP_SERVICEACCOUNT_DIR": str(tmp_path / "sa"),
            "CAP_KUBE_CONNECT_TIMEOUT": "2.5",
            "CAP_KUBE_READ_TIMEOUT": "7",
            "CAP_KUBE_RETRY_ATTEMPTS": "3",
            "CAP_KUBE_RETRY_MAX_SECONDS": "12",
            "CAP_SERVER_DRY_RUN": "false",
            "CAP_DEFAULT_BATCH_SIZE": "1,5,20%",
            "CAP_DEFAULT_FAILURE_THRESHOLD": "10%",
            # The least these retries allow: 8 calls x 21.5 s + 7 database steps x 15 s.
            "CAP_TASK_SOFT_TIME_LIMIT": "277",
            "CAP_TASK_TIME_LIMIT": "300",
            "CAP_BROKER_VISIBILITY_TIMEOUT": "400",
            "CAP_REAPER_INTERVAL": "5",
            "CAP_STALE_AFTER": "30",
            "CAP_RESEND_AFTER": "90",
            "CAP_WORKER_CONCURRENCY": "8",
            "CAP_KUBE_QUEUE": "k8s.deploy",
            "CAP_WORKER_POOL": "eu-prod",
            "CAP_HEARTBEAT_FILE": str(tmp_path / "hb"),
            "CAP_LOG_LEVEL": "debug",
            "CAP_METRICS_PORT": "9808",
            "CAP_METRICS_ADDRESS": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
            "CAP_LOG_FORMAT": "JSON",
            "FLOWER_BASIC_AUTH": "ops:long-password,viewer:other-password",
        }
    )
    settings = load_settings(env)
    assert set(env) - {"HOME", "CAP_DATA_DIR"} == set(ENV_VARS) - {"CAP_DATA_DIR"}
    assert "CAP_DATA_DIR" in ENV_VARS
    assert not settings.uses_data_dir  # nothing under CAP_DATA_DIR in use: no folder needed
    assert bootstrap(settings) is settings and not Path(env["CAP_DATA_DIR"]).exists()
    assert not settings.embedded_default
    assert settings.database.url == PG_URL
    assert settings.database.backend == "postgresql"
    assert settings.broker.url == "redis://127.0.0.1:6379/0"
    assert settings.broker.result_backend == "redis://127.0.0.1:6379/1"
    assert list(settings.crypto.keys) == ["k1", "k2"]
    assert settings.crypto.current_key_id == "k2"
    assert settings.kube.serviceaccount_dir == tmp_path / "sa"
    assert (settings.kube.connect_timeout, settings.kube.read_timeout) == (2.5, 7)
    assert (settings.kube.retry_attempts, settings.kube.retry_max_seconds) == (3, 12)
    assert settings.kube.server_dry_run is False
    assert settings.fanout.default_batch_size == (1, 5, "20%")
    assert settings.fanout.default_failure_threshold == "10%"
    assert (settings.tasks.soft_time_limit, settings.tasks.time_limit) == (277, 300)
    assert settings.broker.visibility_timeout == 400
    assert (settings.tasks.reaper_interval, settings.tasks.stale_after) == (5, 30)
    assert settings.tasks.resend_after == 90
    assert (settings.tasks.lease_seconds, settings.tasks.database_retry_seconds) == (30, 15)
    assert settings.tasks.worker_concurrency == 8
    assert settings.tasks.kube_queue == "k8s.deploy"
    assert settings.tasks.worker_pool == "eu-prod"
    assert settings.tasks.heartbeat_file == tmp_path / "hb"
    assert settings.tasks.log_level == "DEBUG"
    assert settings.flower.basic_auth == "ops:long-password,viewer:other-password"
    assert settings.observability.metrics_port == 9808
    assert settings.observability.metrics_address == "127.0.0.1"
    assert settings.observability.metrics_dir == tmp_path / "metrics"
    assert settings.observability.log_format == "json"
    assert Keyring.from_settings(settings).key_ids == ("k1", "k2")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5", 5),
        ("25%", "25%"),
        ("100%", "100%"),
        ("1, 5, 20%", (1, 5, "20%")),
        ('[1, 5, "20%"]', (1, 5, "20%")),
        ("[3]", 3),
    ],
)
def test_batch_size_forms(env: dict[str, str], raw: str, expected: object) -> None:
    env["CAP_DEFAULT_BATCH_SIZE"] = raw
    assert load_settings(env).fanout.default_batch_size == expected


@pytest.mark.parametrize(("raw", "expected"), [("0", 0), ("3", 3), ("0%", "0%"), ("10%", "10%")])
def test_failure_threshold_forms(env: dict[str, str], raw: str, expected: object) -> None:
    env["CAP_DEFAULT_FAILURE_THRESHOLD"] = raw
    assert load_settings(env).fanout.default_failure_threshold == expected


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CAP_KUBE_CONNECT_TIMEOUT", "soon", "a number of seconds > 0"),
        ("CAP_KUBE_READ_TIMEOUT", "0", "a number of seconds > 0"),
        ("CAP_KUBE_READ_TIMEOUT", "-3", "a number of seconds > 0"),
        ("CAP_KUBE_READ_TIMEOUT", "inf", "a number of seconds > 0"),
        ("CAP_KUBE_RETRY_ATTEMPTS", "0", "a whole number >= 1"),
        ("CAP_KUBE_RETRY_ATTEMPTS", "2.5", "a whole number >= 1"),
        ("CAP_KUBE_RETRY_MAX_SECONDS", "x", "a number of seconds > 0"),
        ("CAP_SERVER_DRY_RUN", "maybe", "true or false"),
        ("CAP_DEFAULT_BATCH_SIZE", "0", "a count >= 1"),
        ("CAP_DEFAULT_BATCH_SIZE", "0%", "a count >= 1"),
        ("CAP_DEFAULT_BATCH_SIZE", "150%", "a count >= 1"),
        ("CAP_DEFAULT_BATCH_SIZE", "1,,2", "a count >= 1"),
        ("CAP_DEFAULT_BATCH_SIZE", "[1, 2.5]", "a count >= 1"),
        ("CAP_DEFAULT_BATCH_SIZE", "[1,", "a count >= 1"),
        ("CAP_DEFAULT_FAILURE_THRESHOLD", "-1", "a count >= 0"),
        ("CAP_DEFAULT_FAILURE_THRESHOLD", "101%", "a count >= 0"),
        ("CAP_DEFAULT_FAILURE_THRESHOLD", "few", "a count >= 0"),
        ("CAP_DEFAULT_FAILURE_THRESHOLD", "12.5%", "a count >= 0"),
        ("CAP_DEFAULT_BATCH_SIZE", "[true]", "a count >= 1"),
        ("CAP_TASK_SOFT_TIME_LIMIT", "0", "a number of seconds > 0"),
        ("CAP_TASK_SOFT_TIME_LIMIT", "660", "must be lower than CAP_TASK_TIME_LIMIT=660"),
        ("CAP_TASK_TIME_LIMIT", "3600", "CAP_BROKER_VISIBILITY_TIMEOUT=3600 must exceed"),
        ("CAP_BROKER_VISIBILITY_TIMEOUT", "660", "must exceed CAP_TASK_TIME_LIMIT=660"),
        ("CAP_REAPER_INTERVAL", "never", "a number of seconds > 0"),
        ("CAP_STALE_AFTER", "0", "a number of seconds > 0"),
        ("CAP_RESEND_AFTER", "0", "a number of seconds > 0"),
        ("CAP_WORKER_CONCURRENCY", "many", "a whole number >= 1"),
        ("CAP_KUBE_QUEUE", "bad queue", "a queue name"),
        ("CAP_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("CAP_DATABASE_URL", "mysql://u@h/db", "unsupported database 'mysql'"),
        ("CAP_DATABASE_URL", "not a url", "expected a SQLAlchemy URL"),
        ("CAP_DATABASE_URL", "postgresql+psycopg://u:pw@h:notaport/db", "a SQLAlchemy URL"),
        ("CAP_BROKER_URL", "redis:/localhost", "a URL like redis://"),
        ("CAP_BROKER_URL", "carrier-pigeon://coop", "a URL like redis://"),
        ("CAP_RESULT_BACKEND", "nowhere", "a URL like redis://"),
    ],
)
def test_bad_values_name_the_variable_value_and_expected_form(
    env: dict[str, str], variable: str, value: str, expected: str
) -> None:
    env[variable] = value
    if variable == "CAP_DATABASE_URL":
        env["CAP_KEK"] = f"k1:{KEK_A}"
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert variable in message
    assert expected in message
    if "must" not in expected:  # cross-field errors show the numbers instead of the raw text
        # A value that does not parse is not echoed: it may be a password in the wrong place.
        assert repr(value) in message or "'<unparseable URL>'" in message
        assert ("pw" not in value) or ("pw" not in message)


def test_non_default_database_without_a_kek_is_refused_where_a_key_is_needed(
    env: dict[str, str],
) -> None:
    env["CAP_DATABASE_URL"] = PG_URL
    settings = load_settings(env)  # reading runs and targets needs no key
    with pytest.raises(SettingsError, match="no KEK configured") as caught:
        require_kek(settings)
    assert "CAP_KEK" in str(caught.value) and "CAP_KEK_FILE" in str(caught.value)
    assert not (Path(env["CAP_DATA_DIR"]) / "kek").exists()
    runtime = build_runtime(settings)
    try:
        with pytest.raises(SettingsError, match="no KEK configured"):
            runtime.sealer.seal(b"x", table="t", row_id="r", purpose="p")
    finally:
        runtime.close()
    env["CAP_KEK_CURRENT"] = "k1"
    with pytest.raises(SettingsError, match="CAP_KEK_CURRENT is set but no KEK"):
        load_settings(env)


def test_sqlite_database_elsewhere_counts_as_non_default(
    env: dict[str, str], tmp_path: Path
) -> None:
    env["CAP_DATABASE_URL"] = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(SettingsError, match="no KEK configured"):
        require_kek(load_settings(env))
    env["CAP_KEK"] = f"k1:{KEK_A}"
    settings = load_settings(env)
    assert not settings.embedded_default
    assert settings.database.backend == "sqlite"


@pytest.mark.parametrize(
    "raw", ["postgresql://u:p@h/db", "postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"]
)
def test_postgres_urls_use_psycopg3(env: dict[str, str], raw: str) -> None:
    env.update({"CAP_DATABASE_URL": raw, "CAP_KEK": f"k1:{KEK_A}"})
    assert load_settings(env).database.url == "postgresql+psycopg://u:p@h/db"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (KEK_A, "an entry has no key id"),
        ("k1:not base64!!", "not valid base64"),
        (f"k1:{base64.b64encode(bytes(16)).decode()}", "decodes to 16 bytes"),
        (f"bad id:{KEK_A}", "key id 'bad id' is invalid"),
        (f"k1:{KEK_A},k1:{KEK_B}", "defined twice with different keys"),
        (",", "holds no KEK"),
    ],
    ids=["bare key", "not base64", "short key", "bad id", "duplicate id", "empty list"],
)
def test_bad_kek_values_are_explained_without_echoing_key_material(
    env: dict[str, str], value: str, expected: str
) -> None:
    env["CAP_KEK"] = value
    with pytest.raises(SettingsError, match=expected) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "CAP_KEK" in message
    assert KEK_A not in message and KEK_B not in message
    assert "not base64!!" not in message
    assert caught.value.__cause__ is None  # no chained exception carrying the raw value


def test_kek_file_errors_name_the_file_and_line(env: dict[str, str], tmp_path: Path) -> None:
    kek_file = tmp_path / "keks"
    kek_file.write_text(f"k1:{KEK_A}\nk2:short\n")
    env["CAP_KEK_FILE"] = str(kek_file)
    with pytest.raises(SettingsError, match=f"CAP_KEK_FILE {kek_file} line 2") as caught:
        load_settings(env)
    assert KEK_A not in str(caught.value)


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"])
def test_empty_kek_file_is_refused(env: dict[str, str], tmp_path: Path, content: str) -> None:
    kek_file = tmp_path / "keks"
    kek_file.write_text(content)
    env["CAP_KEK_FILE"] = str(kek_file)
    with pytest.raises(SettingsError, match="holds no KEK"):
        load_settings(env)


def test_missing_kek_file_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    env["CAP_KEK_FILE"] = str(tmp_path / "absent")
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(env)


def test_kek_current_must_be_loaded(env: dict[str, str]) -> None:
    env.update({"CAP_KEK": f"k1:{KEK_A}", "CAP_KEK_CURRENT": "k7"})
    with pytest.raises(SettingsError, match="CAP_KEK_CURRENT='k7' is not a loaded key id"):
        load_settings(env)


def test_first_listed_kek_is_current_by_default(env: dict[str, str]) -> None:
    env["CAP_KEK"] = f"old:{KEK_A}, new:{KEK_B}"
    settings = load_settings(env)
    assert settings.crypto.current_key_id == "old"
    assert list(settings.crypto.keys) == ["old", "new"]


def test_reprs_hide_keks_and_url_passwords(env: dict[str, str]) -> None:
    env.update(
        {
            "CAP_DATABASE_URL": PG_URL,
            "CAP_BROKER_URL": "redis://:brokerpass@redis:6379/0",
            "CAP_RESULT_BACKEND": "db+postgresql+psycopg://worker:hunter2@db/cap",
            "CAP_KEK": f"k1:{KEK_A}",
        }
    )
    text = repr(load_settings(env))
    assert "hunter2" not in text and "brokerpass" not in text
    assert KEK_A not in text and repr(bytes(range(32))) not in text
    assert "worker:***@db.example:5432" in text
    assert "'k1'" in text


def test_url_passwords_are_masked_in_errors(env: dict[str, str]) -> None:
    env["CAP_BROKER_URL"] = "nope://user:topsecret@host/0"
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert "topsecret" not in str(caught.value)
    assert "user:***@host" in str(caught.value)


def test_blank_values_mean_default(env: dict[str, str]) -> None:
    env.update({"CAP_KUBE_READ_TIMEOUT": "  ", "CAP_LOG_LEVEL": ""})
    settings = load_settings(env)
    assert settings.kube.read_timeout == 15
    assert settings.tasks.log_level == "INFO"


def test_tilde_paths_expand_against_the_given_home(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "CAP_DATA_DIR": "~/cap", "CAP_HEARTBEAT_FILE": "~/hb"}
    settings = load_settings(environ)
    assert settings.data_dir == tmp_path / "cap"
    assert settings.tasks.heartbeat_file == tmp_path / "hb"


def test_unknown_cap_variables_are_reported_not_fatal(env: dict[str, str]) -> None:
    env["CAP_KUBE_READ_TIMOUT"] = "3"
    assert load_settings(env).ignored_variables == ("CAP_KUBE_READ_TIMOUT",)


def test_load_settings_does_not_touch_os_environ(env: dict[str, str]) -> None:
    before = dict(os.environ)
    load_settings(env)
    assert dict(os.environ) == before


def test_unwritable_data_dir_is_a_settings_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = load_settings({"HOME": str(tmp_path), "CAP_DATA_DIR": str(blocker / "sub")})
    with pytest.raises(SettingsError, match=r"CAP_DATA_DIR=.* cannot be created"):
        bootstrap(settings)


# ----------------------------------------------------------------------- NAME_FILE variants

SECRET_FILES = {
    "CAP_DATABASE_URL": PG_URL,
    "CAP_BROKER_URL": "redis://:brokerpass@redis:6379/0",
    "CAP_RESULT_BACKEND": "redis://:brokerpass@redis:6379/1",
    "FLOWER_BASIC_AUTH": "ops:long-password",
}


def test_every_secret_setting_has_a_file_variant() -> None:
    assert set(FILE_VARIANTS) == {f"{name}_FILE" for name in SECRET_FILES}


def test_secret_settings_can_be_read_from_files(env: dict[str, str], tmp_path: Path) -> None:
    for name, value in SECRET_FILES.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")  # as `echo` or a Kubernetes Secret leaves it
        env[f"{name}_FILE"] = str(path)
    env["CAP_KEK"] = f"k1:{KEK_A}"
    settings = load_settings(env)
    assert settings.database.url == PG_URL
    assert settings.broker.url == SECRET_FILES["CAP_BROKER_URL"]
    assert settings.broker.result_backend == SECRET_FILES["CAP_RESULT_BACKEND"]
    assert settings.flower.basic_auth == "ops:long-password"
    assert settings.ignored_variables == ()


@pytest.mark.parametrize("name", sorted(SECRET_FILES))
def test_a_variable_and_its_file_together_are_refused(
    env: dict[str, str], tmp_path: Path, name: str
) -> None:
    path = tmp_path / "value"
    path.write_text(SECRET_FILES[name])
    env.update({name: SECRET_FILES[name], f"{name}_FILE": str(path), "CAP_KEK": f"k1:{KEK_A}"})
    with pytest.raises(SettingsError, match=f"both {name} and {name}_FILE are set") as caught:
        load_settings(env)
    assert "brokerpass" not in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.parametrize(("content", "expected"), [(None, "cannot be read"), ("\n", "is empty")])
def test_an_unusable_secret_file_is_named(
    env: dict[str, str], tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "db-url"
    if content is not None:
        path.write_text(content)
    env["CAP_DATABASE_URL_FILE"] = str(path)
    with pytest.raises(SettingsError, match=f"CAP_DATABASE_URL_FILE='{path}' {expected}"):
        load_settings(env)


def test_a_bad_value_from_a_file_names_the_file_and_masks_the_password(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "db-url"
    path.write_text("mysql://worker:hunter2@db/cap")
    env["CAP_DATABASE_URL_FILE"] = str(path)
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert f"CAP_DATABASE_URL (from CAP_DATABASE_URL_FILE='{path}')" in message
    assert "unsupported database 'mysql'" in message
    assert "hunter2" not in message and "worker:***@db" in message


@pytest.mark.parametrize("value", ["ops", "ops:", ":pw", "ops:pw,viewer"])
def test_a_malformed_flower_login_is_refused_without_echoing_it(
    env: dict[str, str], value: str
) -> None:
    env["FLOWER_BASIC_AUTH"] = value
    with pytest.raises(SettingsError, match="FLOWER_BASIC_AUTH is invalid") as caught:
        load_settings(env)
    assert repr(value) not in str(caught.value)
    assert "'user:password' pairs" in str(caught.value)


def test_the_flower_login_is_never_shown(env: dict[str, str]) -> None:
    env["FLOWER_BASIC_AUTH"] = "ops:long-password"
    text = repr(load_settings(env))
    assert "long-password" not in text and "ops" not in text
    assert "FlowerSettings(basic_auth='***')" in text
