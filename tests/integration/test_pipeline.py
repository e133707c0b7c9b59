"""The worker pipeline end to end: real Celery workers, Redis, PostgreSQL, several apiservers."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import Pipeline, build_fleet, pipeline, read_secret


@pytest.fixture
def pipe(
    postgres_url: str, redis_url: str, redis_server: Any, tmp_path: Path
) -> Iterator[Pipeline]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    with pipeline(postgres_url, redis_url, tmp_path) as made:
        yield made


def _namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_group_of_30_targets_over_3_clusters_is_written_then_unchanged(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    pipe.start_worker(concurrency=4)
    namespace = _namespace("fleet")
    fleet = build_fleet(
        pipe,
        clusters[:3],
        make_service_account,
        targets=30,
        namespace=namespace,
        batch_size=[1, 5, "50%"],
        failure_threshold="10%",
    )

    report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))

    assert report.state == "succeeded", report.reason
    assert report.batches == 4  # 1, 5, 15, 9
    assert report.counts() == {"created": 30}
    versions: dict[str, str] = {}
    for name, (cluster, ns, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, ns, secret_name)
        assert secret is not None, name
        assert secret.type == "kubernetes.io/tls"
        assert base64.b64decode(secret.data["tls.key"]) == fleet.chain.key_pem
        assert base64.b64decode(secret.data["tls.crt"]).startswith(fleet.chain.leaf_pem)
        versions[name] = secret.metadata.resource_version

    again = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))

    assert again.state == "succeeded", again.reason
    assert again.counts() == {"unchanged": 30}
    for name, (cluster, ns, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, ns, secret_name)
        assert secret.metadata.resource_version == versions[name], f"{name} was rewritten"
