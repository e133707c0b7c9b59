"""The webhook distribution: tell another system that a Kubernetes distribution landed.

A webhook run is one delivery, not batches: :func:`run_webhook` posts the payload and
finishes the run (and queues the next stacked distribution on success). Delivery is
at-least-once: if the delivering worker dies (or the database or broker fails) between the
POST and the run's end, the reaper finds the run silent and sends an advance, which claims the
next delivery attempt (:func:`redeliver_webhook`); after :data:`MAX_DELIVERY_ATTEMPTS`
interrupted attempts the run ends ``failed``. Every attempt carries the same delivery id (the
webhook run's id) so a receiver can de-duplicate.

Stacked after a Kubernetes distribution (spec section 04), it fires the rollout
that pods reading the certificate from environment variables need. The body
describes the outcome (certificate fingerprint, not-after, targets and Secret
names) and never carries key material. It is signed with HMAC-SHA256 over
``"<timestamp>.<body>"`` so a receiver can reject forgeries and replays:

    X-CertAutoPilot-Delivery: <webhook run id, the same on every retry and redelivery>
    X-CertAutoPilot-Timestamp: 1764480000
    X-CertAutoPilot-Signature: sha256=<hex>
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import urllib3
from sqlalchemy.orm import Session
from tenacity import (
    RetryError,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from models import queries
from models.base import utcnow
from models.entities import Distribution, Run
from models.enums import DistributionKind, RunState
from worker.app.dispatch import Dispatcher, queue_next_stacked
from worker.app.metrics import observe_run_finished
from worker.core.crypto import CryptoError
from worker.platform.runtime import Runtime

SIGNATURE_HEADER = "X-CertAutoPilot-Signature"
TIMESTAMP_HEADER = "X-CertAutoPilot-Timestamp"
DELIVERY_HEADER = "X-CertAutoPilot-Delivery"

#: Delivery attempts a webhook run gets when its deliveries keep being interrupted (worker
#: killed, database or broker lost) before it ends failed; each attempt retries 5xx and
#: timeouts on its own.
MAX_DELIVERY_ATTEMPTS = 5

log = logging.getLogger(__name__)


class WebhookError(Exception):
    """The webhook could not be delivered; the message says why and what to check."""


class _Transient(WebhookError):
    """A 5xx answer, a timeout or a connection error: worth another try."""


def check_webhook_url(url: str) -> None:
    """Refuse a webhook URL that is not a plain absolute http(s) URL to a host.

    No credentials in it (they would be stored and shown in clear: the HMAC secret is the
    credential), no white space or control characters, a host and a valid port. Messages
    never quote a user name or password the URL carried.
    """
    shown = _USERINFO.sub("//***@", url)
    if any(not char.isprintable() or char.isspace() for char in url):
        raise WebhookError(
            f"webhook URL {shown!r} contains white space or control characters; percent-encode "
            "them (%20) or fix the URL"
        )
    if _USERINFO.search(url):
        raise WebhookError(
            f"webhook URL {shown!r} carries a user name or password, which would be stored and "
            "shown in clear; sign the requests with a webhook secret instead "
            "(`certautopilot credentials add-webhook-secret`)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise WebhookError(f"webhook URL {shown!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookError(f"webhook URL {shown!r} must start with https:// (or http://)")
    if not parts.hostname:
        raise WebhookError(f"webhook URL {shown!r} names no host; e.g. https://hooks.example.com/x")


#: The user-info part of a URL's authority ("//user:password@").
_USERINFO = re.compile(r"//[^/?#@]*@")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def webhook_payload(session: Session, run: Run, distribution: Distribution) -> dict[str, Any]:
    """The JSON body describing the distribution that triggered this webhook (no key material)."""
    # The revision the run was pinned to: what was deployed, even if renewed since.
    certificate = (
        queries.get_revision(session, run.certificate_revision_id)
        if run.certificate_revision_id is not None
        else queries.current_revision(session, distribution.certificate_id)
    )
    targets: list[dict[str, Any]] = []
    parent: Run | None = None
    if run.parent_run_id is not None:
        parent = queries.get_run(session, run.parent_run_id)
        rows = queries.results_with_target_names(session, parent.id)
        targets = [
            {
                "target": name,
                "namespace": result.namespace,
                "secret_name": result.secret_name,
                "status": result.status.value,
                "resource_version": result.resource_version,
                "serving": result.serving_status,
                "serving_endpoints": [
                    {key: item.get(key) for key in ("endpoint", "state", "seconds", "line")}
                    for item in result.serving or ()
                ],
            }
            for result, name in rows
        ]
    return {
        "event": "certificate.distributed",
        "run_id": run.id,
        "trigger_run_id": parent.id if parent is not None else None,
        "trigger_state": parent.state.value if parent is not None else None,
        "certificate": {
            "id": certificate.certificate_id,
            "revision": certificate.number,
            "common_name": certificate.common_name,
            "sans": list(certificate.sans),
            "serial": certificate.serial_hex,
            "sha256_fingerprint": certificate.sha256_fingerprint,
            "not_after": certificate.not_after.isoformat(),
        },
        "targets": targets,
    }


def deliver_webhook(
    url: str,
    payload: Mapping[str, Any],
    *,
    secret: bytes | None,
    timeout: float,
    delivery_id: str,
    attempts: int = 4,
    max_seconds: float = 30.0,
) -> int:
    """POST ``payload`` to ``url``, retrying 5xx and timeouts; returns the HTTP status."""
    check_webhook_url(url)  # stored URLs passed it at attach; one rule for both places
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False
    )

    @retry(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(attempts) | stop_after_delay(max_seconds),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        reraise=False,
    )
    def post() -> int:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            DELIVERY_HEADER: delivery_id,
        }
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        try:
            response = http.request("POST", url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise _Transient(f"webhook {url} unreachable: {type(exc).__name__}") from None
        if response.status >= 500:
            raise _Transient(f"webhook {url} answered HTTP {response.status}")
        if response.status >= 400:
            raise WebhookError(
                f"webhook {url} refused the notification with HTTP {response.status}; "
                "check the receiver's URL and its HMAC secret"
            )
        return int(response.status)

    try:
        return post()
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise WebhookError(
            f"{last} (gave up after {exc.last_attempt.attempt_number} attempts)"
        ) from None
    finally:
        http.clear()


def run_webhook(rt: Runtime, dispatch: Dispatcher, run_id: str) -> None:
    """Deliver a started webhook run's notification and finish the run with the outcome."""
    try:
        with rt.session() as session:
            run = queries.get_run(session, run_id)
            distribution = queries.get_distribution(session, run.distribution_id)
            payload = webhook_payload(session, run, distribution)
            url = distribution.webhook_url or ""
            secret: bytes | None = None
            if distribution.webhook_credential_id is not None:
                secret = queries.reveal_credential(
                    session, rt.sealer, distribution.webhook_credential_id
                )
            # A fresh heartbeat (on the database's clock, which the reaper compares with): the
            # reaper leaves a delivery in progress alone.
            now = queries.database_now(session)
            queries.heartbeat(session, run_id, now=now, unless_since=now)
    except (CryptoError, queries.NotFoundError) as exc:
        # Not transient: no redelivery can fix it, so the run ends now with the reason.
        _finish(rt, dispatch, run_id, RunState.FAILED, f"failed: cannot prepare the webhook: {exc}")
        return
    state, reason = RunState.SUCCEEDED, ""
    try:
        status = deliver_webhook(
            url,
            payload,
            secret=secret,
            timeout=rt.settings.kube.read_timeout,
            delivery_id=run_id,
            # Inside the reaper's patience, so a live delivery is never taken for a lost one.
            max_seconds=min(30.0, rt.settings.tasks.stale_after / 2),
        )
        reason = f"succeeded: webhook answered HTTP {status}"
    except WebhookError as exc:
        state, reason = RunState.FAILED, f"failed: {exc}"
    _finish(rt, dispatch, run_id, state, reason)


def redeliver_webhook(rt: Runtime, dispatch: Dispatcher, run_id: str, *, attempt: int) -> None:
    """Deliver again after attempt ``attempt`` was interrupted, or give up past the budget."""
    if attempt >= MAX_DELIVERY_ATTEMPTS:
        _finish(
            rt,
            dispatch,
            run_id,
            RunState.FAILED,
            f"failed: the webhook delivery was interrupted {attempt} time(s) (worker, database "
            "or broker lost mid-delivery); the receiver may have it already, with the same "
            f"{DELIVERY_HEADER}",
        )
        return
    log.warning("webhook run %s: delivery %d was interrupted; delivering again", run_id, attempt)
    run_webhook(rt, dispatch, run_id)


def _finish(rt: Runtime, dispatch: Dispatcher, run_id: str, state: RunState, reason: str) -> None:
    cascade_run_id: str | None = None
    with rt.session() as session:
        run = queries.get_run(session, run_id)
        if run.state.is_terminal:
            return  # a concurrent delivery of this run finished it first
        run = queries.finish_run(session, run_id, state, now=utcnow(), reason=reason)
        observe_run_finished(DistributionKind.WEBHOOK, run)
        if state is RunState.SUCCEEDED and run.cascade:
            distribution = queries.get_distribution(session, run.distribution_id)
            cascade_run_id = queue_next_stacked(session, distribution, run_id)
    if cascade_run_id is not None:
        dispatch.start(cascade_run_id)
