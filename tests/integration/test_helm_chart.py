"""The Helm chart: lint, render, schema, and what a real API server makes of the manifests.

helm is the real binary (built once from the Go module proxy, see tests/testenv/helm.py);
the API server is the test environment's kube-apiserver with RBAC and Pod Security admission.
No part of Kubernetes is mocked: manifests are applied server-side, the chart's Role is bound
to a ServiceAccount whose TokenRequest token then makes real requests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.certfactory import make_chain, utcnow
from tests.support.phases import uncaptured
from tests.testenv import SPEC_MINIMUM_RULES, Cluster, InClusterEnv, request_token
from tests.testenv.helm import HELM_VERSION, HelmError, find_helm, helm_cache_path
from worker.core.bundle import build_bundle
from worker.core.secret import desired_secret
from worker.kube.client import KubeClient, RetryPolicy
from worker.kube.connect import build_api_client, in_cluster_spec
from worker.kube.deploy import deploy_secret, health_check
from worker.platform.settings import load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "certautopilot-k8s-worker"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KEDA_VALUES = CHART / "ci" / "keda-values.yaml"
SECRETS_DIR = "/etc/certautopilot/secrets"
KEK = "k1:" + base64.b64encode(bytes(range(32))).decode()
FIELD_MANAGER = "certautopilot-chart-test"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
Manifest = dict[str, Any]


# --------------------------------------------------------------------------- helm


@dataclass(frozen=True)
class Helm:
    """The helm binary with a private home (no user config, cache or repositories)."""

    binary: Path
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run helm with `args`; never raises on exit status."""
        env = {
            **os.environ,
            **{
                f"HELM_{kind}_HOME": str(self.home / kind.lower())
                for kind in ("CACHE", "CONFIG", "DATA")
            },
        }
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
            env=env,
        )

    def render(
        self, *args: str, release: str = "cap", namespace: str = "cap-system"
    ) -> list[Manifest]:
        """Return the manifests `helm template` renders (hooks included); fail on any error."""
        result = self.run("template", release, str(CHART), "--namespace", namespace, *args)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def helm(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm; a first run builds it, with its progress shown through pytest's capture."""
    with uncaptured(pytestconfig):
        binary = find_helm(os.environ)
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    """Return the manifests of one kind."""
    return [m for m in manifests if m["kind"] == kind]


def pod_templates(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Return every pod template (Deployments, Jobs and the `helm test` Pod) by resource name."""
    templates = {
        m["metadata"]["name"]: m["spec"]["template"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
    }
    templates |= {m["metadata"]["name"]: {"spec": m["spec"]} for m in of_kind(manifests, "Pod")}
    return templates


def secret_files(template: dict[str, Any]) -> dict[str, str]:
    """{*_FILE variable: Secret key behind that file} of the first container of a pod template."""
    spec = template["spec"]
    (container, *_) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, str] = {}
    for env in container["env"]:
        if env["name"].endswith("_FILE") and env["value"].startswith(SECRETS_DIR + "/"):
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SECRETS_DIR]
            items = volumes[mount["name"]]["secret"]["items"]
            (key,) = [i["key"] for i in items if f"{SECRETS_DIR}/{i['path']}" == env["value"]]
            files[env["name"]] = key
    return files


def worker_deployment(manifests: list[Manifest]) -> Manifest:
    """Return the worker Deployment."""
    (found,) = [
        m
        for m in of_kind(manifests, "Deployment")
        if m["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]
    return found


def test_helm_is_the_pinned_release(helm: Helm) -> None:
    result = helm.run("version", "--short")
    assert result.stdout.startswith(f"v{HELM_VERSION}"), result.stdout + result.stderr


def test_helm_locator_honours_helm_bin_and_says_how_to_fix_a_bad_one(
    helm: Helm, tmp_path: Path
) -> None:
    assert find_helm({"HELM_BIN": str(helm.binary)}) == helm.binary
    not_executable = tmp_path / "helm"
    not_executable.write_text("")
    with pytest.raises(HelmError, match="is not an executable file; point it at a helm v3"):
        find_helm({"HELM_BIN": str(not_executable)})
    with pytest.raises(HelmError, match=r"run `python -m tests.testenv.helm` to build it"):
        find_helm({"XDG_CACHE_HOME": str(tmp_path / "empty-cache")}, build=False)
    cached = tmp_path / "cache" / "certautopilot" / "tools" / f"helm-{HELM_VERSION}" / "helm"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(helm.binary)
    assert find_helm({"XDG_CACHE_HOME": str(tmp_path / "cache")}, build=False) == cached


def test_helm_locator_builds_once_when_two_runs_ask_at_the_same_time(tmp_path: Path) -> None:
    gocache = subprocess.run(
        ["go", "env", "GOCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # A fresh tool cache, but Go's own build cache kept: the build is a relink, not a rebuild.
    environ = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "GOCACHE": gocache}
    environ.pop("HELM_BIN", None)
    outputs = [io.StringIO(), io.StringIO()]
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda out: find_helm(environ, progress=out), outputs))
    assert found[0] == found[1] == helm_cache_path(environ)
    logs = [out.getvalue() for out in outputs]
    assert sum("[helm] building helm" in log for log in logs) == 1, logs
    version = subprocess.run(
        [str(found[0]), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith(f"v{HELM_VERSION}")


# --------------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize(
    "values", [None, FULL_VALUES, KEDA_VALUES], ids=["default-values", "full-values", "keda-values"]
)
def test_helm_lint_is_clean(helm: Helm, values: Path | None, strict: bool) -> None:
    args = ["lint", str(CHART)]
    args += ["--values", str(values)] if values else []
    args += ["--strict"] if strict else []
    result = helm.run(*args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output


def test_default_values_render_the_worker_with_its_minimum_rbac(helm: Helm) -> None:
    manifests = helm.render()
    assert sorted(m["kind"] for m in manifests) == [
        "ConfigMap",
        "Deployment",
        "Pod",  # the `helm test` hook
        "PodDisruptionBudget",
        "ServiceAccount",
    ]
    # Without rbac.targetNamespaces the worker may write Secrets nowhere in its cluster: never
    # in its own namespace by default, since that one holds the KEK's Secret. With the embedded
    # default there is no secret value at all (the worker makes its own KEK in its emptyDir),
    # so no Secret either.
    assert of_kind(manifests, "Role") == of_kind(manifests, "RoleBinding") == []
    (pdb,) = of_kind(manifests, "PodDisruptionBudget")
    # Unready workers (a database outage makes them all unready) never block a node drain.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_full_values_render_every_optional_part(helm: Helm) -> None:
    manifests = helm.render("--values", str(FULL_VALUES))
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Secret",
            "Secret",  # the migration's pre-install copy
            "ServiceAccount",
            "Deployment",
            "Deployment",
            "Service",
            "Job",
            "Pod",  # the `helm test` hook
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "NetworkPolicy",
        ]
        + ["Role", "RoleBinding"] * 3
    )
    # With an autoscaler the Deployment leaves the replica count to it.
    assert "replicas" not in worker_deployment(manifests)["spec"]
    (job,) = of_kind(manifests, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_migration_runs_before_install_and_upgrade_with_what_exists_by_then(helm: Helm) -> None:
    manifests = helm.render("--values", str(FULL_VALUES))
    (job,) = of_kind(manifests, "Job")
    secrets = {m["metadata"]["name"]: m for m in of_kind(manifests, "Secret")}
    secret = secrets.pop("cap-certautopilot-k8s-worker-migrate")
    # The migration's copy holds what it needs, no more: the database and the KEK.
    assert sorted(secret["data"]) == ["CAP_DATABASE_URL", "CAP_KEK"]
    assert secret_files(job["spec"]["template"]) == {
        "CAP_DATABASE_URL_FILE": "CAP_DATABASE_URL",
        "CAP_KEK_FILE": "CAP_KEK",
    }
    # The chart-managed Secret itself is a normal resource, kept on uninstall, never a hook.
    (managed,) = secrets.values()
    assert managed["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    hooks = {m["kind"]: m["metadata"]["annotations"] for m in (job, secret)}
    # The worker refuses a lagging schema: migrate before any new pod starts.
    assert (
        hooks["Job"]["helm.sh/hook"]
        == hooks["Secret"]["helm.sh/hook"]
        == ("pre-install,pre-upgrade")
    )
    # Helm runs hooks by ascending weight: the Secret the Job reads comes first.
    assert int(hooks["Secret"]["helm.sh/hook-weight"]) < int(hooks["Job"]["helm.sh/hook-weight"])
    spec = job["spec"]["template"]["spec"]
    # Neither the chart's ServiceAccount nor its ConfigMap exists before the first install.
    assert "serviceAccountName" not in spec and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert all(source["configMapRef"]["optional"] for source in container["envFrom"])


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default-values", "full-values"])
def test_every_rendered_role_holds_exactly_the_spec_rules_bound_to_the_worker(
    helm: Helm, values: Path | None
) -> None:
    # The default values name no target namespace (and so render no Role): name one.
    args = ["--values", str(values)] if values else ["--set", "rbac.targetNamespaces={ingress}"]
    manifests = helm.render(*args)
    service_account = of_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    assert (
        worker_deployment(manifests)["spec"]["template"]["spec"]["serviceAccountName"]
        == service_account
    )
    roles = of_kind(manifests, "Role")
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["name"]): b
        for b in of_kind(manifests, "RoleBinding")
    }
    assert roles
    for role in roles:
        assert role["rules"] == SPEC_MINIMUM_RULES
        binding = bindings[(role["metadata"]["namespace"], role["metadata"]["name"])]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": service_account, "namespace": "cap-system"}
        ]


@pytest.mark.parametrize(
    "values", [None, FULL_VALUES, KEDA_VALUES], ids=["default-values", "full-values", "keda-values"]
)
def test_every_pod_runs_locked_down_with_writable_emptydirs_only(
    helm: Helm, values: Path | None
) -> None:
    manifests = helm.render(*(["--values", str(values)] if values else []))
    for name, template in pod_templates(manifests).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in security["capabilities"], name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            assert "emptyDir" in volumes[mounts["/var/lib/certautopilot"]], name
            # Secret values arrive as files only, never as environment variables.
            for env in container["env"]:
                assert "valueFrom" not in env, (name, env)
                assert env["name"] not in (
                    "CAP_KEK", "CAP_DATABASE_URL", "CAP_BROKER_URL", "CAP_RESULT_BACKEND",
                    "FLOWER_BASIC_AUTH",
                ), (name, env["name"])  # fmt: skip


def test_worker_probes_run_the_cli_and_shutdown_outlasts_the_task_time_limit(helm: Helm) -> None:
    manifests = helm.render()
    (config,) = of_kind(manifests, "ConfigMap")
    spec = worker_deployment(manifests)["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    assert worker["args"] == ["worker"]
    assert worker["livenessProbe"]["exec"]["command"] == ["certautopilot", "probe", "liveness"]
    assert worker["readinessProbe"]["exec"]["command"] == ["certautopilot", "probe", "readiness"]
    assert worker["startupProbe"]["exec"]["command"] == ["certautopilot", "probe", "liveness"]
    assert spec["terminationGracePeriodSeconds"] > int(config["data"]["CAP_TASK_TIME_LIMIT"])
    # The heartbeat the liveness probe reads must sit on the writable emptyDir.
    env = {e["name"]: e.get("value") for e in worker["env"]}
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    heartbeat_dir = str(Path(env["CAP_HEARTBEAT_FILE"]).parent)
    assert "emptyDir" in volumes[mounts[heartbeat_dir]]


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default-values", "full-values"])
def test_worker_accepts_the_environment_the_chart_gives_it(
    helm: Helm, values: Path | None, tmp_path: Path
) -> None:
    manifests = helm.render(*(["--values", str(values)] if values else []))
    (config,) = of_kind(manifests, "ConfigMap")
    managed = [s for s in of_kind(manifests, "Secret") if "helm.sh/hook" not in
               s["metadata"].get("annotations", {})]  # fmt: skip
    data = {k: base64.b64decode(v).decode() for s in managed for k, v in s["data"].items()}
    template = worker_deployment(manifests)["spec"]["template"]
    (worker,) = template["spec"]["containers"]
    environment = dict(config["data"])
    environment |= {env["name"]: env["value"] for env in worker["env"] if "value" in env}
    # The mounted secret files, written where the pod would see them (under tmp_path here).
    for variable, key in secret_files(template).items():
        path = tmp_path / "secrets" / Path(environment[variable]).name
        path.parent.mkdir(exist_ok=True)
        path.write_text(data[key])
        environment[variable] = str(path)
    # The pod's emptyDir path does not exist on this machine; the loader may create the folder.
    environment["CAP_DATA_DIR"] = str(tmp_path)
    settings = load_settings(environment)
    assert settings.ignored_variables == ()
    assert (
        settings.tasks.time_limit
        < worker_deployment(manifests)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_existing_secret_replaces_the_chart_managed_one(helm: Helm) -> None:
    manifests = helm.render(
        "--set",
        "secret.existingSecret=my-connections",
        "--set",
        "flower.enabled=true",
        "--set",
        "worker.replicaCount=3",
    )
    assert of_kind(manifests, "Secret") == []
    referenced = {
        volume["secret"]["secretName"]
        for template in pod_templates(manifests).values()
        for volume in template["spec"]["volumes"]
        if "secret" in volume
    }
    assert referenced == {"my-connections"}


def test_existing_secret_keys_map_each_value_and_each_pod_gets_only_what_it_needs(
    helm: Helm,
) -> None:
    manifests = helm.render("--values", str(KEDA_VALUES))
    templates = pod_templates(manifests)
    worker = worker_deployment(manifests)["spec"]["template"]
    assert secret_files(worker) == {
        "CAP_KEK_FILE": "kek",
        "CAP_DATABASE_URL_FILE": "database-url",
        "CAP_BROKER_URL_FILE": "broker-url",
    }  # resultBackend mapped to "": not in that Secret, so not mounted
    (flower,) = [t for name, t in templates.items() if name.endswith("-flower")]
    # Flower reads no stored credential: no KEK, no database.
    assert secret_files(flower) == {
        "CAP_BROKER_URL_FILE": "broker-url",
        "FLOWER_BASIC_AUTH_FILE": "flower-login",
    }
    (job,) = of_kind(manifests, "Job")
    assert secret_files(job["spec"]["template"]) == {
        "CAP_KEK_FILE": "kek",
        "CAP_DATABASE_URL_FILE": "database-url",
    }


def test_no_secret_value_is_ever_generated_so_every_render_is_the_same(helm: Helm) -> None:
    # Argo CD renders with `helm template` on every sync: a KEK made at render time would
    # re-key the installation each time and make every stored credential unreadable.
    def render(*args: str) -> str:
        result = helm.run("template", "cap", str(CHART), "--namespace", "cap-system", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    for args in ([], ["--values", str(FULL_VALUES)], ["--values", str(KEDA_VALUES)]):
        assert render(*args) == render(*args)
    # With the embedded default the chart holds no secret value at all.
    assert "CAP_KEK" not in render()
    # Given values are stored as given.
    manifests = helm.render("--set", f"secret.kek={KEK}", "--set", "flower.enabled=true",
                            "--set", "flower.basicAuth=ops:long-password")  # fmt: skip
    (secret,) = of_kind(manifests, "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "CAP_KEK": KEK,
        "FLOWER_BASIC_AUTH": "ops:long-password",
    }


def test_names_stay_within_63_characters_for_the_longest_release_name(helm: Helm) -> None:
    release = "r" * 53  # helm's own limit for release names
    manifests = helm.render("--values", str(FULL_VALUES), release=release)
    for manifest in manifests:
        name = manifest["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.match(name), name
        for value in manifest["metadata"]["labels"].values():
            assert len(value) <= 63, (name, value)


@pytest.mark.parametrize(
    "setting",
    [
        "bogus=1",
        "worker.bogus=1",
        "image.bogus=x",
        "secret.bogus=x",
        "config.bogus=1",
        "flower.service.bogus=1",
        "podSecurityContext.bogus=1",
        "containerSecurityContext.capabilities.bogus=1",
        "networkPolicy.egress[0].bogus=1",
        "worker.resources.requests.bogus=1",
    ],
)
def test_unknown_values_key_is_rejected_by_the_schema(helm: Helm, setting: str) -> None:
    result = helm.run("template", "cap", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert "additional properties 'bogus' not allowed" in result.stderr, result.stderr


def test_the_pool_value_is_the_workers_pool_and_the_queue_keda_reads(helm: Helm) -> None:
    manifests = helm.render("--values", str(KEDA_VALUES), "--set", "pool=eu-prod-1")
    (config,) = of_kind(manifests, "ConfigMap")
    assert config["data"]["CAP_WORKER_POOL"] == "eu-prod-1"
    (scaled,) = of_kind(manifests, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["listName"] == "kubernetes.eu-prod-1"
    refused = helm.run("template", "cap", str(CHART), "--set", "pool=EU_prod")
    assert refused.returncode != 0 and "pool" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["worker.terminationGracePeriodSeconds=660"],
            "worker.terminationGracePeriodSeconds (660) must exceed config.taskTimeLimit (660)",
        ),
        (
            ["config.brokerVisibilityTimeout=200"],
            "config.brokerVisibilityTimeout (200) must exceed config.taskTimeLimit (660)",
        ),
        (["worker.replicaCount=2"], "several worker pods need a shared database and broker"),
        (["autoscaling.enabled=true"], "several worker pods need a shared database and broker"),
        (
            [
                "secret.existingSecret=s",
                "autoscaling.enabled=true",
                "autoscaling.minReplicas=5",
                "autoscaling.maxReplicas=2",
            ],
            "autoscaling.minReplicas (5) exceeds",
        ),
        (["secret.kek=not a key"], "/secret/kek"),
        (["rbac.targetNamespaces={Bad_Namespace}"], "/rbac/targetNamespaces/0"),
        (
            ["secret.databaseUrl=postgresql+psycopg://u:p@db:5432/cap"],
            "an external database needs a key-encryption key, and the chart never generates one",
        ),
        (
            ["secret.existingSecret=s", "secret.existingSecretKeys.kek="],
            "an external database needs a key-encryption key",
        ),
        (["flower.enabled=true"], "flower.enabled needs a login"),
        (
            ["rbac.targetNamespaces={ingress,cap-system}"],
            'rbac.targetNamespaces holds the release namespace "cap-system"',
        ),
        (
            [
                "secret.existingSecret=s",
                "autoscaling.enabled=true",
                "autoscaling.keda.enabled=true",
            ],
            "autoscaling.keda.enabled needs autoscaling.keda.redisAddress",
        ),
        (["podDisruptionBudget.unhealthyPodEvictionPolicy=Never"], "unhealthyPodEvictionPolicy"),
    ],
)
def test_values_that_cannot_work_fail_with_the_fix_in_the_message(
    helm: Helm, settings: list[str], message: str
) -> None:
    args = [arg for setting in settings for arg in ("--set", setting)]
    result = helm.run("template", "cap", str(CHART), "--namespace", "cap-system", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def _values_keys_without_example(lines: list[str]) -> list[str]:
    """Return the values.yaml keys whose comment lacks an example (sections excepted)."""
    missing: list[str] = []
    parents: list[tuple[int, str]] = []
    comment: list[str] = []
    skip_deeper_than: int | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        key = re.match(r"^([A-Za-z][\w.-]*):(.*)$", stripped)
        if not stripped or not key or stripped.startswith("-"):
            comment = [] if not stripped else comment
            continue
        if skip_deeper_than is not None and indent > skip_deeper_than:
            comment = []
            continue  # inside a value documented as a whole (e.g. resources)
        skip_deeper_than = None
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([p for _, p in parents] + [key.group(1)])
        has_example = any("Example:" in c for c in comment)
        inline_value = key.group(2).strip()
        if has_example:
            skip_deeper_than = indent
        elif inline_value:
            missing.append(path)
        parents.append((indent, key.group(1)))
        comment = []
    return missing


def test_every_value_is_documented_with_an_example() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert _values_keys_without_example(lines) == []
    # The check itself notices an undocumented key.
    assert _values_keys_without_example(["a:", "  # -- no example", "  b: 1"]) == ["a.b"]


def test_values_and_schema_list_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def compare(node: Any, schema_node: dict[str, Any], path: str) -> None:
        if "properties" not in schema_node or not isinstance(node, dict):
            return
        declared = set(schema_node["properties"]) - {"global"}
        assert set(node) == declared, path or "(top level)"
        assert schema_node.get("additionalProperties") is False, path
        for key, child in node.items():
            compare(child, schema_node["properties"][key], f"{path}.{key}")

    compare(values, schema, "")


def _documented_shell_commands() -> list[list[str]]:
    """Every command of the ```sh blocks of docs/deployment.md, continuation lines joined."""
    text = (REPO / "docs" / "deployment.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_helm_commands_in_the_deployment_docs_render(helm: Helm) -> None:
    installs = [
        c
        for c in _documented_shell_commands()
        if c[:2] in (["helm", "install"], ["helm", "upgrade"])
    ]
    assert len(installs) >= 3
    for command in installs:
        settings = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
        assert settings, command
        helm.render(*[arg for setting in settings for arg in ("--set", setting)])


def test_resource_names_in_the_deployment_docs_exist_for_release_cap(helm: Helm) -> None:
    manifests = helm.render(
        "--set", "flower.enabled=true", "--set", "flower.basicAuth=ops:long-password",
        release="cap", namespace="certautopilot",
    )  # fmt: skip
    rendered = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    # ... or created by a documented command (the user's own Secret for existingSecret).
    rendered |= {
        ("Secret", command[command.index("generic") + 1])
        for command in _documented_shell_commands()
        if command[0] == "kubectl" and "create" in command and "generic" in command
    }
    kinds = {"secret": "Secret", "deployment": "Deployment", "svc": "Service"}
    referenced = set()
    for command in _documented_shell_commands():
        if command[0] != "kubectl":
            continue
        for i, word in enumerate(command):
            kind, _, name = word.partition("/")
            if name and kind in kinds:
                referenced.add((kinds[kind], name))
            elif word == "secret" and command[i - 1] == "get":
                referenced.add(("Secret", command[i + 1]))
    assert len(referenced) >= 3
    assert referenced - rendered == set()


# --------------------------------------------------------------------------- real API server


@pytest.fixture
def admin(
    cluster: Cluster, testenv_admin_api: Callable[[Cluster], client.ApiClient]
) -> client.ApiClient:
    """An admin ApiClient of the first test cluster."""
    return testenv_admin_api(cluster)


@pytest.fixture
def fresh_namespaces(admin: client.ApiClient) -> Iterator[Callable[..., list[str]]]:
    """Factory: create uniquely named namespaces (optionally labelled); deleted afterwards."""
    core = client.CoreV1Api(admin)
    created: list[str] = []

    def make(*prefixes: str, labels: dict[str, str] | None = None) -> list[str]:
        names = [f"{prefix}-{uuid.uuid4().hex[:6]}" for prefix in prefixes]
        for name in names:
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
            )
            created.append(name)
        return names

    yield make
    for name in created:
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)


def server_side_apply(admin: client.ApiClient, manifests: list[Manifest]) -> None:
    """Apply every manifest server-side (a real write) and read each one back."""
    dynamic = DynamicClient(admin)  # type: ignore[no-untyped-call]
    for manifest in manifests:
        resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        meta = manifest["metadata"]
        try:
            resource.server_side_apply(
                body=manifest,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:  # the server's reason is the useful part of the failure
            pytest.fail(f"{manifest['kind']}/{meta['name']} rejected: {exc.status} {exc.body}")
        stored = resource.get(name=meta["name"], namespace=meta.get("namespace"))
        assert stored.metadata.name == meta["name"]


def ensure_keda_crd_stand_in(admin: client.ApiClient) -> None:
    """KEDA's ScaledObject kind, without KEDA: lets the server store (not validate) its spec.

    The test cluster has no KEDA; this CustomResourceDefinition only makes the kind exist, so
    the apply below proves the object's apiVersion, kind and metadata, not KEDA's own schema.
    """
    extensions = client.ApiextensionsV1Api(admin)
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "scaledobjects.keda.sh"},
        "spec": {
            "group": "keda.sh",
            "scope": "Namespaced",
            "names": {"kind": "ScaledObject", "plural": "scaledobjects",
                      "singular": "scaledobject", "listKind": "ScaledObjectList"},
            "versions": [{
                "name": "v1alpha1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                }},
            }],
        },
    }  # fmt: skip
    try:
        extensions.create_custom_resource_definition(cast(Any, body))
    except ApiException as exc:
        if exc.status != 409:
            raise
    deadline = time.monotonic() + 30
    while True:
        crd = extensions.read_custom_resource_definition("scaledobjects.keda.sh")
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True":
            return
        assert time.monotonic() < deadline, conditions
        time.sleep(0.2)


@pytest.mark.parametrize(
    "values", [None, FULL_VALUES, KEDA_VALUES], ids=["default-values", "full-values", "keda-values"]
)
def test_rendered_manifests_are_accepted_by_a_real_api_server(
    helm: Helm,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
    values: Path | None,
) -> None:
    release_ns, *targets = fresh_namespaces("cap-system", "ingress", "team-a", "team-b")
    args = ["--values", str(values)] if values else []
    args += ["--set", "rbac.targetNamespaces={" + ",".join(targets) + "}"]
    manifests = helm.render(*args, namespace=release_ns)
    if values == KEDA_VALUES:
        (scaled,) = of_kind(manifests, "ScaledObject")
        assert of_kind(manifests, "HorizontalPodAutoscaler") == []  # KEDA makes its own
        (trigger,) = scaled["spec"]["triggers"]
        assert (trigger["type"], trigger["metadata"]["listName"]) == (
            "redis",
            "kubernetes.default",  # the queue of the release's pool
        )
        ensure_keda_crd_stand_in(admin)
    server_side_apply(admin, manifests)
    rbac = client.RbacAuthorizationV1Api(admin)
    for namespace in targets:
        (role,) = rbac.list_namespaced_role(namespace).items
        assert [(r.api_groups, r.resources, r.verbs) for r in role.rules or []] == [
            (r["apiGroups"], r["resources"], r["verbs"]) for r in SPEC_MINIMUM_RULES
        ]


@pytest.mark.parametrize(
    "values", [None, FULL_VALUES, KEDA_VALUES], ids=["default-values", "full-values", "keda-values"]
)
def test_every_pod_template_passes_the_restricted_pod_security_standard(
    helm: Helm,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
    values: Path | None,
) -> None:
    (namespace,) = fresh_namespaces(
        "cap-restricted", labels={"pod-security.kubernetes.io/enforce": "restricted"}
    )
    manifests = helm.render(*(["--values", str(values)] if values else []), namespace=namespace)
    core = client.CoreV1Api(admin)
    for name, template in pod_templates(manifests).items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-check"[:63].rstrip("-"), "namespace": namespace},
            "spec": template["spec"],
        }
        try:
            # Pod Security admission judges Pods (workloads only get warnings): a dry-run Pod
            # built from each template is refused if the template breaks the standard.
            core.create_namespaced_pod(namespace, cast(Any, pod), dry_run="All")
        except ApiException as exc:
            pytest.fail(f"pod template of {name} refused: {exc.status} {exc.body}")


def _token_client(cluster: Cluster, token: str) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ca_cert_data = cluster.ca_pem
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def _tls_secret(name: str) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(b"cert").decode(),
            "tls.key": base64.b64encode(b"key").decode(),
        },
    )


def read_name(obj: Any) -> str:
    """The metadata.name of a client model."""
    return str(obj.metadata.name)


def resource_version(obj: Any) -> str:
    """The metadata.resourceVersion of a client model."""
    return str(obj.metadata.resource_version)


def _status(call: Callable[[], object]) -> int:
    """Return the HTTP status a request gets (200 when it succeeds)."""
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


def test_chart_role_is_exactly_enough_for_a_distribution_and_nothing_more(
    helm: Helm,
    cluster: Cluster,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
) -> None:
    release_ns, target, other = fresh_namespaces("cap-system", "ingress", "untargeted")
    manifests = helm.render("--set", f"rbac.targetNamespaces={{{target}}}", namespace=release_ns)
    server_side_apply(admin, manifests)
    service_account = of_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    admin_core = client.CoreV1Api(admin)
    admin_core.create_namespaced_secret(other, _tls_secret("someone-elses"))
    token = request_token(admin, cluster, release_ns, service_account)
    core = client.CoreV1Api(_token_client(cluster, token))

    # Everything a distribution does, in the order it does it.
    assert read_name(core.read_namespace(target)) == target  # the target health check
    core.create_namespaced_secret(target, _tls_secret("app-tls"), dry_run="All")
    created = core.create_namespaced_secret(target, _tls_secret("app-tls"))
    live = core.read_namespaced_secret("app-tls", target)
    assert live.data is not None
    live.data["tls.crt"] = base64.b64encode(b"renewed").decode()
    core.replace_namespaced_secret("app-tls", target, live, dry_run="All")
    replaced = core.replace_namespaced_secret("app-tls", target, live)  # PUT with resourceVersion
    assert resource_version(replaced) != resource_version(created)
    core.patch_namespaced_secret("app-tls", target, {"metadata": {"labels": {"rolled": "back"}}})

    # And nothing more: each of these is refused by RBAC.
    refused: dict[str, Callable[[], object]] = {
        "delete a secret": lambda: core.delete_namespaced_secret("app-tls", target),
        "delete all secrets": lambda: core.delete_collection_namespaced_secret(target),
        "list secrets": lambda: core.list_namespaced_secret(target),
        "watch secrets": lambda: core.list_namespaced_secret(target, watch=True, timeout_seconds=1),
        "read a configmap": lambda: core.read_namespaced_config_map("any", target),
        "read a secret in another namespace": lambda: core.read_namespaced_secret(
            "someone-elses", other
        ),
        "create a secret in another namespace": lambda: core.create_namespaced_secret(
            other, _tls_secret("app-tls")
        ),
        "create a secret in the release namespace": lambda: core.create_namespaced_secret(
            release_ns, _tls_secret("app-tls")
        ),
        "read another namespace": lambda: core.read_namespace(other),
        "list namespaces": lambda: core.list_namespace(),
        "create a namespace": lambda: core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=f"x-{uuid.uuid4().hex[:6]}"))
        ),
        "delete the namespace": lambda: core.delete_namespace(target),
    }
    statuses = {what: _status(call) for what, call in refused.items()}
    assert statuses == dict.fromkeys(refused, 403)

    # The server's own summary of the account's rights in each namespace agrees.
    authorization = client.AuthorizationV1Api(_token_client(cluster, token))

    def core_rights(namespace: str) -> set[tuple[str, str]]:
        review = authorization.create_self_subject_rules_review(
            cast(Any, {"spec": {"namespace": namespace}})
        )
        assert review.status is not None
        return {
            (resource, verb)
            for rule in review.status.resource_rules
            if "" in (rule.api_groups or [])
            for resource in rule.resources or []
            for verb in rule.verbs
        }

    assert core_rights(target) == {
        ("secrets", "get"),
        ("secrets", "create"),
        ("secrets", "update"),
        ("secrets", "patch"),
        ("namespaces", "get"),
    }
    assert core_rights(other) == set()
    assert core_rights(release_ns) == set()


def test_kek_secret_is_deterministic_and_outlives_upgrade_uninstall_and_reinstall(
    helm: Helm,
    cluster: Cluster,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
    tmp_path: Path,
) -> None:
    (namespace,) = fresh_namespaces("cap-lifecycle")
    kubeconfig = tmp_path / "admin.kubeconfig"
    kubeconfig.write_text(cluster.admin_kubeconfig)
    kubeconfig.chmod(0o600)
    core = client.CoreV1Api(admin)

    def helm_release(*args: str) -> None:
        # Embedded default: no migration Job, whose completion no controller here would report.
        result = helm.run(*args, "--namespace", namespace, "--kubeconfig", str(kubeconfig))
        assert result.returncode == 0, result.stderr

    def stored() -> dict[str, str]:
        secret = core.read_namespaced_secret("cap-certautopilot-k8s-worker", namespace)
        assert "helm.sh/hook" not in (secret.metadata.annotations or {})
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    given = {"CAP_KEK": KEK, "FLOWER_BASIC_AUTH": "ops:long-password"}
    install = (
        "install", "cap", str(CHART), "--set", f"secret.kek={KEK}",
        "--set", "flower.enabled=true", "--set", "flower.basicAuth=ops:long-password",
    )  # fmt: skip
    helm_release(*install)
    assert stored() == given

    helm_release("upgrade", "cap", str(CHART), "--reuse-values", "--set", "config.logLevel=DEBUG")
    assert stored() == given  # an upgrade renders the same Secret

    helm_release("uninstall", "cap")
    assert stored() == given  # helm.sh/resource-policy: keep: the KEK outlives the release

    helm_release(*install)
    assert stored() == given  # a re-install adopts it
    rotated = "k9:" + "A" * 43 + "=," + KEK
    escaped = rotated.replace(",", "\\,")  # --set splits on unescaped commas
    helm_release("upgrade", "cap", str(CHART), "--reuse-values", "--set", f"secret.kek={escaped}")
    # A rotation is an explicit change of the value; the file holds one key per line.
    assert stored()["CAP_KEK"] == rotated.replace(",", "\n")


def test_worker_in_cluster_code_distributes_with_the_chart_service_account(
    helm: Helm,
    cluster: Cluster,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
    in_cluster_env: Callable[[Cluster, str, str], InClusterEnv],
) -> None:
    release_ns, target, other = fresh_namespaces("cap-system", "ingress", "untargeted")
    manifests = helm.render("--set", f"rbac.targetNamespaces={{{target}}}", namespace=release_ns)
    server_side_apply(admin, manifests)
    service_account = of_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    # What the pod would have mounted at CAP_SERVICEACCOUNT_DIR, and its service env.
    pod = in_cluster_env(
        cluster, release_ns, request_token(admin, cluster, release_ns, service_account)
    )
    spec = in_cluster_spec(pod.sa_dir, pod.environ)
    kube = KubeClient(
        build_api_client(spec, connect_timeout=5, read_timeout=15),
        retry=RetryPolicy(attempts=2, max_seconds=5, initial_backoff=0.05, jitter=0),
    )

    def desired(cn_sans: list[str]) -> dict[str, Any]:
        chain = make_chain("app.example.com", sans=cn_sans)
        bundle = build_bundle(
            chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem, now=utcnow()
        )
        return desired_secret(
            name="app-example-com-tls",
            namespace=target,
            tls_crt=bundle.tls_crt(),
            tls_key=bundle.tls_key(),
            ca_crt=None,
            leaf=bundle.leaf,
            distribution_id=str(uuid.uuid4()),
        )

    def deploy(manifest: dict[str, Any], *, dry_run: bool) -> str:
        return deploy_secret(
            kube,
            manifest,
            dry_run=dry_run,
            server_dry_run=True,
            adopt_unmanaged=False,
            snapshot_store=None,
        ).action

    assert health_check(kube, target).healthy
    first = desired(["app.example.com"])
    assert deploy(first, dry_run=True) == "would_create"
    assert deploy(first, dry_run=False) == "created"
    renewed = desired(["app.example.com", "www.example.com"])
    assert deploy(renewed, dry_run=True) == "would_update"
    assert deploy(renewed, dry_run=False) == "updated"
    # An untargeted namespace: the health check names the missing rights.
    outside = health_check(kube, other)
    assert not outside.healthy and outside.reason == "forbidden", outside.message


CONSUMER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["list"]},
]


def test_the_consumers_role_is_opt_in_separate_and_lets_a_dry_run_list_consumers(
    helm: Helm,
    cluster: Cluster,
    admin: client.ApiClient,
    fresh_namespaces: Callable[..., list[str]],
) -> None:
    from worker.core.consumers import NO_LIST_PERMISSION
    from worker.kube.consumers import list_consumers

    release_ns, target = fresh_namespaces("cap-system", "ingress")
    targets = f"rbac.targetNamespaces={{{target}}}"
    # Off by default: the minimum Role alone.
    plain = helm.render("--set", targets, namespace=release_ns)
    assert [r["rules"] for r in of_kind(plain, "Role")] == [SPEC_MINIMUM_RULES]
    manifests = helm.render(
        "--set", targets, "--set", "rbac.consumers.enabled=true", namespace=release_ns
    )
    roles = {r["metadata"]["name"]: r for r in of_kind(manifests, "Role")}
    (minimum,) = [r for name, r in roles.items() if name.endswith("-distributor")]
    (consumers,) = [r for name, r in roles.items() if name.endswith("-consumers-reader")]
    assert minimum["rules"] == SPEC_MINIMUM_RULES  # the spec's Role never changes
    assert consumers["rules"] == CONSUMER_RULES
    assert consumers["metadata"]["namespace"] == target
    service_account = of_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    bindings = {b["roleRef"]["name"]: b for b in of_kind(manifests, "RoleBinding")}
    assert bindings[consumers["metadata"]["name"]]["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account, "namespace": release_ns}
    ]

    # Applied to a real API server: the worker's account lists pods and ingresses there (and
    # still nothing more on secrets); without the Role the same listing says it may not.
    server_side_apply(admin, plain)
    token = request_token(admin, cluster, release_ns, service_account)
    kube = KubeClient(_token_client(cluster, token), retry=RetryPolicy(attempts=1))
    unknown = list_consumers(kube, target, "app-tls")
    assert (unknown.pods_unknown, unknown.ingresses_unknown) == (NO_LIST_PERMISSION,) * 2
    server_side_apply(admin, manifests)
    known = list_consumers(kube, target, "app-tls")
    assert (known.pods_unknown, known.ingresses_unknown) == (None, None)
    core = client.CoreV1Api(_token_client(cluster, token))
    assert _status(lambda: core.list_namespaced_secret(target)) == 403
    assert _status(lambda: core.list_namespaced_pod(release_ns)) == 403
