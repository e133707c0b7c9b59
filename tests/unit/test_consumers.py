"""Who consumes a Secret (pure): Pods by volume, projected volume, env, envFrom and subPath;
Ingresses by tls.secretName; and the dry-run lines that say so."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.cli.output import diff_summary, render_diff_dict
from worker.core.consumers import (
    NO_LIST_PERMISSION,
    Consumers,
    consumers_from_dict,
    find_consumers,
    render_consumers,
)

SECRET = "shop-tls"


def pod(name: str, *, volumes: Any = (), init: Any = (), **container: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", **container}]}
    if volumes:
        spec["volumes"] = list(volumes)
    if init:
        spec["initContainers"] = list(init)
    return {"metadata": {"name": name}, "spec": spec}


def secret_volume(secret: str = SECRET, name: str = "tls") -> dict[str, Any]:
    return {"name": name, "secret": {"secretName": secret}}


def mount(path: str = "/tls", name: str = "tls", **extra: str) -> dict[str, Any]:
    return {"name": name, "mountPath": path, **extra}


def ingress(name: str, *secrets: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"tls": [{"secretName": s} for s in secrets]}}


CASES = [
    # (pod, uses, restart needed)
    (
        pod("volume", volumes=[secret_volume()], volumeMounts=[mount()]),
        ["container app: volume mount /tls"],
        False,
    ),
    (
        pod(
            "projected",
            volumes=[{"name": "all", "projected": {"sources": [{"secret": {"name": SECRET}}]}}],
            volumeMounts=[mount("/etc/all", "all")],
        ),
        ["container app: volume mount /etc/all"],
        False,
    ),
    (
        pod(
            "env",
            env=[
                {"name": "CERT", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "tls.crt"}}}
            ],
        ),
        ["container app: env CERT (key tls.crt)"],
        True,
    ),
    (
        pod("env-from", envFrom=[{"secretRef": {"name": SECRET}}]),
        ["container app: envFrom (every key)"],
        True,
    ),
    (
        pod(
            "sub-path", volumes=[secret_volume()], volumeMounts=[mount("/c.pem", subPath="tls.crt")]
        ),
        ["container app: subPath mount /c.pem (tls.crt)"],
        True,
    ),
    (
        pod(
            "sub-path-expr",
            volumes=[secret_volume()],
            volumeMounts=[mount("/c.pem", subPathExpr="$(POD)")],
        ),
        ["container app: subPath mount /c.pem ($(POD))"],
        True,
    ),
    (
        pod(
            "init-and-app",
            volumes=[secret_volume()],
            init=[{"name": "copy", "volumeMounts": [mount("/in")]}],
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "tls.key"}}}],
        ),
        ["container copy: volume mount /in", "container app: env X (key tls.key)"],
        True,
    ),
    (
        pod("declared-only", volumes=[secret_volume()]),
        ["volume tls (not mounted by any container)"],
        False,
    ),
]


@pytest.mark.parametrize(
    ("spec", "uses", "restart"), CASES, ids=[c[0]["metadata"]["name"] for c in CASES]
)
def test_each_way_a_pod_uses_the_secret_is_found_and_classified(
    spec: dict[str, Any], uses: list[str], restart: bool
) -> None:
    (found,) = find_consumers(SECRET, [spec], []).pods
    assert found.pod == spec["metadata"]["name"]
    assert list(found.uses) == uses
    assert found.restart_needed is restart


@pytest.mark.parametrize(
    "spec",
    [
        pod("other-volume", volumes=[secret_volume("other")], volumeMounts=[mount()]),
        pod("other-env", env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "other"}}}]),
        pod("configmap", envFrom=[{"configMapRef": {"name": SECRET}}]),
        pod("plain", env=[{"name": "X", "value": SECRET}]),
        {"metadata": {"name": "no-spec"}},
        {"metadata": {"name": "odd"}, "spec": {"volumes": "nonsense", "containers": [None]}},
    ],
)
def test_pods_that_do_not_use_the_secret_are_not_listed(spec: dict[str, Any]) -> None:
    assert find_consumers(SECRET, [spec], []).pods == ()


def test_ingresses_are_found_by_tls_secret_name_only() -> None:
    found = find_consumers(
        SECRET,
        [],
        [
            ingress("b-shop", "other", SECRET),
            ingress("a-shop", SECRET),
            ingress("other", "other"),
            {"metadata": {"name": "no-tls"}, "spec": {"rules": []}},
        ],
    )
    assert found.ingresses == ("a-shop", "b-shop")


def test_the_dry_run_lines_say_who_sees_the_change_and_who_needs_a_restart() -> None:
    found = find_consumers(SECRET, [c[0] for c in CASES], [ingress("shop", SECRET)])
    text = "\n".join(render_consumers(found))
    assert "3 pod(s) mount it as a volume: they see the new certificate" in text
    assert "5 pod(s) read it through env or subPath: they will NOT see" in text
    assert "stack a webhook distribution" in text
    assert "1 ingress(es) name it in tls.secretName" in text and "shop" in text
    assert [use.pod for use in found.restart_needed] == [
        "env",
        "env-from",
        "init-and-app",
        "sub-path",
        "sub-path-expr",
    ]


def test_without_list_permission_the_consumers_are_unknown_not_a_failure() -> None:
    assert render_consumers(Consumers.unknown(NO_LIST_PERMISSION)) == [
        "  consumers unknown (no list permission)"
    ]
    partial = find_consumers(SECRET, [], None, ingresses_unknown=NO_LIST_PERMISSION)
    text = "\n".join(render_consumers(partial))
    assert "no pod uses it" in text and "ingresses unknown (no list permission)" in text


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@given(
    st.lists(
        st.tuples(names, st.sampled_from([c[0] for c in CASES]), st.booleans()),
        max_size=8,
        unique_by=lambda item: item[0],
    ),
    st.lists(st.tuples(names, st.booleans()), max_size=5, unique_by=lambda item: item[0]),
)
def test_the_stored_form_round_trips_and_only_users_of_this_secret_are_listed(
    pods: list[tuple[str, dict[str, Any], bool]], ingresses: list[tuple[str, bool]]
) -> None:
    # Each pod is one of the cases, renamed, pointing at this Secret or (flag off) another.
    def rename(spec: dict[str, Any], name: str, ours: bool) -> dict[str, Any]:
        text = json.dumps(spec).replace(f'"{SECRET}"', '"{}"'.format(SECRET if ours else "x"))
        renamed = json.loads(text)
        renamed["metadata"]["name"] = name
        return renamed

    objects = [rename(spec, name, ours) for name, spec, ours in pods]
    found = find_consumers(
        SECRET, objects, [ingress(n, SECRET if ours else "x") for n, ours in ingresses]
    )
    assert {use.pod for use in found.pods} == {name for name, _, ours in pods if ours}
    assert set(found.ingresses) == {name for name, ours in ingresses if ours}
    assert consumers_from_dict(found.to_dict()) == found


def test_the_results_table_line_counts_the_pods_that_need_a_restart() -> None:
    found = find_consumers(SECRET, [c[0] for c in CASES], [])
    diff = {
        "action": "update",
        "namespace": "apps",
        "name": SECRET,
        "new_type": "kubernetes.io/tls",
        "data": [{"key": "tls.crt", "change": "changed", "old": None, "new": None}],
        "consumers": found.to_dict(),
    }
    assert diff_summary(diff).endswith("; 5 pod(s) need a restart to see it")
    assert "they will NOT see" in render_diff_dict(diff)
    quiet = {**diff, "consumers": Consumers.unknown(NO_LIST_PERMISSION).to_dict()}
    assert "restart" not in diff_summary(quiet)
    assert render_diff_dict(quiet).endswith("consumers unknown (no list permission)")
    assert "consumers" not in render_diff_dict({k: v for k, v in diff.items() if k != "consumers"})
