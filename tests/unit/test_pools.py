"""Worker pools, the pure parts: pool names, queue names, splitting work by pool, the cluster
identity of an in-cluster worker and its refusal, and the Celery queues a worker consumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.certfactory import make_chain
from worker.core.pools import (
    DEFAULT_POOL,
    PoolNameError,
    check_pool_name,
    pool_queue,
    split_by_pool,
)
from worker.kube.errors import InClusterUnavailable, KubeError
from worker.kube.identity import (
    WrongCluster,
    identity_of_ca,
    in_cluster_identity,
    refuse_other_cluster,
    short,
)
from worker.platform.celery_app import celery_config, worker_queues
from worker.platform.settings import load_settings

# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["default", "eu-prod", "a", "0", "a" * 63, "pool-1-b"])
def test_a_pool_name_is_an_rfc_1123_label(name: str) -> None:
    assert check_pool_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "EU", "-a", "a-", "a_b", "a.b", "a" * 64, "a b", "pool\n", "pööl", "a\x1b[31m"],
)
def test_other_pool_names_are_refused_naming_the_rule(name: str) -> None:
    with pytest.raises(PoolNameError, match="not a valid pool name: use 1 to 63 lower-case"):
        check_pool_name(name, what="target 'x': pool")


def test_a_refused_pool_name_is_quoted_inertly() -> None:
    with pytest.raises(PoolNameError) as raised:
        check_pool_name("a\x1b[31mred")
    assert "\x1b" not in str(raised.value) and "\\x1b" in str(raised.value)


_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@given(_labels)
def test_every_valid_pool_makes_a_queue_name_the_settings_accept(pool: str) -> None:
    queue = pool_queue("kubernetes", pool)
    assert queue == f"kubernetes.{pool}"
    settings = load_settings({"HOME": "/nonexistent", "CAP_KUBE_QUEUE": queue})
    assert settings.tasks.kube_queue == queue


# ------------------------------------------------------------------------------ split


@given(
    st.lists(st.uuids().map(str), unique=True, max_size=60),
    st.dictionaries(st.integers(0, 59), st.sampled_from(["default", "a", "b", "c"])),
)
def test_splitting_by_pool_keeps_each_target_once_in_order(
    target_ids: list[str], assignment: dict[int, str]
) -> None:
    pools = {tid: assignment[i] for i, tid in enumerate(target_ids) if i in assignment}
    split = split_by_pool(target_ids, pools)
    assert sorted(tid for ids in split.values() for tid in ids) == sorted(target_ids)
    for pool, ids in split.items():
        assert ids == [tid for tid in target_ids if pools.get(tid, DEFAULT_POOL) == pool]
        assert ids  # no empty pool entry


def test_a_target_without_a_known_pool_goes_to_the_default_pool() -> None:
    assert split_by_pool(["t1", "t2"], {"t1": "edge"}) == {"edge": ["t1"], "default": ["t2"]}


# --------------------------------------------------------------------------- identity


def test_the_cluster_identity_is_the_service_account_ca_in_any_order(tmp_path: Path) -> None:
    first, second = make_chain(cn="a.example").root_pem, make_chain(cn="b.example").root_pem
    assert identity_of_ca(first + second) == identity_of_ca(second + first)
    assert identity_of_ca(first) != identity_of_ca(second)
    assert identity_of_ca(first).startswith("ca-sha256:") and len(identity_of_ca(first)) == 74
    (tmp_path / "ca.crt").write_bytes(first)
    assert in_cluster_identity(tmp_path) == identity_of_ca(first)


def test_no_readable_ca_is_in_cluster_unavailable(tmp_path: Path) -> None:
    with pytest.raises(InClusterUnavailable, match=r"ca\.crt cannot be read"):
        in_cluster_identity(tmp_path)
    (tmp_path / "ca.crt").write_text("not a certificate")
    with pytest.raises(InClusterUnavailable, match="not PEM"):
        in_cluster_identity(tmp_path)


def test_another_cluster_is_refused_naming_both_identities_and_the_fix() -> None:
    expected = identity_of_ca(make_chain(cn="a.example").root_pem)
    seen = identity_of_ca(make_chain(cn="b.example").root_pem)
    refuse_other_cluster(target="t", pool="eu", expected=expected, seen=expected)  # no error
    with pytest.raises(WrongCluster) as raised:
        refuse_other_cluster(target="edge-1", pool="eu", expected=expected, seen=seen)
    error = raised.value
    assert isinstance(error, KubeError) and error.reason == "wrong_cluster"
    text = str(error)
    assert short(expected) in text and short(seen) in text
    assert "nothing was written" in text
    assert "CAP_WORKER_POOL" in text and "'eu'" in text
    assert "targets check edge-1 --record-cluster" in text


# ----------------------------------------------------------------------------- celery


def _settings(**environ: str):  # type: ignore[no-untyped-def]
    return load_settings({"HOME": "/nonexistent", **environ})


def test_a_worker_consumes_its_pools_queue_and_the_control_queue() -> None:
    assert worker_queues(_settings(CAP_WORKER_POOL="edge")) == ["kubernetes.edge", "control"]
    # The default pool also drains the queue that releases before pools sent work to.
    assert worker_queues(_settings()) == ["kubernetes.default", "control", "kubernetes"]
    assert worker_queues(_settings(CAP_KUBE_QUEUE="k8s", CAP_WORKER_POOL="b")) == [
        "k8s.b",
        "control",
    ]


def test_per_target_work_is_routed_to_the_own_pool_by_default() -> None:
    config = celery_config(_settings(CAP_WORKER_POOL="edge"))
    assert config["task_routes"]["cap.kube.*"] == {
        "queue": "kubernetes.edge",
        "routing_key": "kubernetes.edge",
    }
    # Flower lists these when no worker reports its queues.
    assert "kubernetes.edge" in {queue.name for queue in config["task_queues"]}
