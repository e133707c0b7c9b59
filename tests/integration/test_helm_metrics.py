"""The chart's metrics objects: lint, render, and a real API server storing them unchanged.

The test cluster has no Prometheus Operator. The two CustomResourceDefinitions below are
minimal, structural subsets of the operator's (``monitoring.coreos.com/v1``): they declare
exactly the fields the chart renders, with the operator's types, and no
``x-kubernetes-preserve-unknown-fields``. An API server prunes what a structural schema does
not declare, so reading the objects back unchanged proves every rendered field is declared
with a fitting type (a misspelt field or a number where a string belongs would not survive).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.integration.test_helm_chart import (  # the fixtures are shared with the chart tests
    CHART,
    Helm,
    Manifest,
    admin,
    fresh_namespaces,
    helm,
    of_kind,
    server_side_apply,
    worker_deployment,
)
from worker.platform.settings import load_settings

__all__ = ["admin", "fresh_namespaces", "helm"]

METRICS_VALUES = CHART / "ci" / "metrics-values.yaml"

_STRING = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STRING}
_SERVICE_MONITOR_SPEC = {
    "type": "object",
    "properties": {
        "selector": {
            "type": "object",
            "properties": {"matchLabels": _LABELS},
        },
        "namespaceSelector": {
            "type": "object",
            "properties": {"matchNames": {"type": "array", "items": _STRING}},
        },
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"port": _STRING, "path": _STRING, "interval": _STRING},
            },
        },
    },
    "required": ["selector", "endpoints"],
}
_PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "properties": {
                    "name": _STRING,
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "properties": {
                                "alert": _STRING,
                                "expr": {"x-kubernetes-int-or-string": True},
                                "for": _STRING,
                                "labels": _LABELS,
                                "annotations": _LABELS,
                            },
                        },
                    },
                },
            },
        }
    },
}


def _install_crd(admin: client.ApiClient, plural: str, kind: str, spec: dict[str, Any]) -> None:
    extensions = client.ApiextensionsV1Api(admin)
    name = f"{plural}.monitoring.coreos.com"
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                      "listKind": f"{kind}List"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": spec},
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
        crd = extensions.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True":
            return
        assert time.monotonic() < deadline, conditions
        time.sleep(0.2)


def _configmap_env(manifests: list[Manifest]) -> dict[str, str]:
    (configmap,) = of_kind(manifests, "ConfigMap")
    return dict(configmap["data"])


@pytest.mark.parametrize("values", [None, METRICS_VALUES], ids=["default", "metrics-values"])
def test_helm_lint_strict_is_clean_with_metrics_objects(helm: Helm, values: Path | None) -> None:
    result = helm.run(
        "lint", "--strict", str(CHART), *(["--values", str(values)] if values else [])
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output


def test_metrics_are_on_by_default_in_the_chart_without_operator_objects(helm: Helm) -> None:
    manifests = helm.render()
    assert _configmap_env(manifests)["CAP_METRICS_PORT"] == "9808"
    assert _configmap_env(manifests)["CAP_METRICS_ADDRESS"] == "0.0.0.0"  # noqa: S104 - a pod
    (container,) = worker_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9808, "protocol": "TCP"}]
    assert of_kind(manifests, "ServiceMonitor") == of_kind(manifests, "PrometheusRule") == []
    # The worker accepts what the chart configures.
    settings = load_settings({"HOME": "/nonexistent", **_configmap_env(manifests)})
    assert settings.observability.metrics_port == 9808

    off = helm.render("--set", "metrics.enabled=false")
    assert "CAP_METRICS_PORT" not in _configmap_env(off)
    (container,) = worker_deployment(off)["spec"]["template"]["spec"]["containers"]
    assert "ports" not in container


def test_metrics_values_render_the_service_monitor_rule_and_network_policy(helm: Helm) -> None:
    manifests = helm.render("--values", str(METRICS_VALUES))
    (monitor,) = of_kind(manifests, "ServiceMonitor")
    (rule,) = of_kind(manifests, "PrometheusRule")
    services = {s["metadata"]["name"]: s for s in of_kind(manifests, "Service")}
    service = services["cap-certautopilot-k8s-worker-metrics"]
    # The ServiceMonitor selects the metrics Service, which selects the worker pods' port.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {
        "CertAutoPilotTargetFailures",
        "CertAutoPilotRunHalted",
        "CertAutoPilotCertificateExpiringSoon",
        "CertAutoPilotQueueBacklogGrowing",
    }
    assert "< 1814400" in alerts["CertAutoPilotCertificateExpiringSoon"]["expr"]  # 21 days
    assert "> 500" in alerts["CertAutoPilotQueueBacklogGrowing"]["expr"]
    assert all(r["labels"]["team"] == "pki" for r in alerts.values())
    # Every metric an alert uses is one the worker serves.
    served = (
        "certautopilot_targets_processed_total",
        "certautopilot_runs_finished_total",
        "certautopilot_certificate_expiration_timestamp_seconds",
        "certautopilot_queue_length",
    )
    assert [any(name in r["expr"] for name in served) for r in alerts.values()] == [True] * 4
    workers = [
        p for p in of_kind(manifests, "NetworkPolicy") if "worker" in str(p["spec"]["podSelector"])
    ]
    (ingress,) = workers[0]["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"]


def test_rendered_metrics_objects_are_stored_unchanged_by_a_real_api_server(
    helm: Helm, admin: client.ApiClient, fresh_namespaces: Any
) -> None:
    _install_crd(admin, "servicemonitors", "ServiceMonitor", _SERVICE_MONITOR_SPEC)
    _install_crd(admin, "prometheusrules", "PrometheusRule", _PROMETHEUS_RULE_SPEC)
    release_ns, target = fresh_namespaces("cap-metrics", "ingress")
    manifests = helm.render(
        "--values",
        str(METRICS_VALUES),
        "--set",
        "rbac.targetNamespaces={" + target + "}",
        namespace=release_ns,
    )
    server_side_apply(admin, manifests)
    dynamic = DynamicClient(admin)  # type: ignore[no-untyped-call]
    for kind in ("ServiceMonitor", "PrometheusRule"):
        (rendered,) = of_kind(manifests, kind)
        resource = dynamic.resources.get(api_version="monitoring.coreos.com/v1", kind=kind)
        stored = resource.get(name=rendered["metadata"]["name"], namespace=release_ns).to_dict()
        assert stored["spec"] == rendered["spec"], f"{kind}: the server pruned or changed fields"
