"""Baseline (b), the physical floor: a bare kubernetes-client script, GET + write per target.

Run as its own process (``python -m bench.bare < plan.json``), like the pipeline's workers,
so it pays for its own interpreter and client set-up. It does what a careful script would:
one ApiClient per cluster shared by a thread pool as wide as the pipeline's total
concurrency, read the Secret, then create it (404) or replace it with the resourceVersion
that was read; no database, no broker, no retries. Prints one JSON object on stdout.

Plan (JSON on stdin)::

    {"kubeconfigs": {"c1": "/path/kubeconfig", ...},
     "targets": [["c1", "ns", "secret-name"], ...],
     "cert_file": "...", "key_file": "...", "threads": 4}
"""

from __future__ import annotations

import base64
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


def _api(kubeconfig_path: str, threads: int) -> client.CoreV1Api:
    loaded = yaml.safe_load(Path(kubeconfig_path).read_text())
    configuration = client.Configuration()
    # Loads into this Configuration only; the library's process-wide default is untouched.
    config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
        loaded, client_configuration=configuration
    )
    # As many pooled connections as threads, like the pipeline's per-process pool.
    configuration.connection_pool_maxsize = max(threads, 1)
    return client.CoreV1Api(client.ApiClient(configuration))


def _secret(name: str, namespace: str, crt: bytes, key: bytes) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(crt).decode("ascii"),
            "tls.key": base64.b64encode(key).decode("ascii"),
        },
    )


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Write the Secret into every target of ``plan``; return wall time and latencies."""
    started = time.monotonic()
    threads = int(plan["threads"])
    apis = {name: _api(path, threads) for name, path in plan["kubeconfigs"].items()}
    crt = Path(plan["cert_file"]).read_bytes()
    key = Path(plan["key_file"]).read_bytes()

    def one(target: list[str]) -> tuple[float, str]:
        cluster, namespace, name = target
        api = apis[cluster]
        begun = time.monotonic()
        body = _secret(name, namespace, crt, key)
        try:
            live = api.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                return (time.monotonic() - begun) * 1000, f"GET {exc.status}"
            live = None
        try:
            if live is None:
                api.create_namespaced_secret(namespace, body)
            else:
                assert body.metadata is not None and live.metadata is not None
                body.metadata.resource_version = live.metadata.resource_version
                api.replace_namespaced_secret(name, namespace, body)
        except ApiException as exc:
            return (time.monotonic() - begun) * 1000, f"write {exc.status}"
        return (time.monotonic() - begun) * 1000, ""

    with ThreadPoolExecutor(max_workers=threads) as pool:
        outcomes = list(pool.map(one, plan["targets"]))
    wall = time.monotonic() - started
    errors = [error for _, error in outcomes if error]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "latencies_ms": [latency for latency, _ in outcomes],
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> int:
    """Read the plan from stdin, run it, print the result as JSON."""
    result = run(json.load(sys.stdin))
    json.dump(result, sys.stdout)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
