"""Webhooks on job completion and failure, signed per Standard Webhooks.

Headers: ``webhook-id`` (stable across retries, so receivers can deduplicate), ``webhook-timestamp``
(unix seconds of this attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"{id}.{timestamp}.{body}"`` with the secret's bytes (``whsec_`` + base64). The body holds the job
id, state, result URL, batch id, error *code*, and the client's own reference and metadata (which
it sent and receives back); never the error message, a file name or a path (patient identifiers
hide in them). Each client's webhooks are signed with its own secret (``service.auth``; shown
once when the client is created), else with the service-wide one. Deliveries are Dramatiq
messages on their own queue, retried with exponential backoff when the receiver fails or answers
non-2xx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from service.callbacks import Resolver, pin_callback
from service.errors import ServiceError
from service.store import JobRecord, JobState

__all__ = [
    "WebhookDeliveryError",
    "build_event",
    "decode_secret",
    "deliver",
    "sign",
    "verify",
]


class WebhookDeliveryError(ServiceError):
    """The receiver did not accept the webhook (retried with backoff)."""

    code = "WEBHOOK_DELIVERY_FAILED"
    transient = True


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (a bare string is used as bytes)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    mac = hmac.new(decode_secret(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(
    secret: str, headers: dict[str, str], body: str, *, tolerance_s: int = 300
) -> dict[str, Any]:
    """Check a received webhook (what a receiver does). Returns the parsed body.

    Raises:
        ValueError: missing headers, stale timestamp or no matching signature.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, ts, sigs = (
        lower["webhook-id"],
        int(lower["webhook-timestamp"]),
        lower["webhook-signature"],
    )
    if abs(time.time() - ts) > tolerance_s:
        raise ValueError("webhook timestamp outside tolerance")
    expected = sign(secret, msg_id, ts, body)
    if not any(hmac.compare_digest(expected, s) for s in sigs.split()):
        raise ValueError("no valid webhook signature")
    return json.loads(body)


def build_event(record: JobRecord) -> dict[str, Any]:
    """The webhook body for a job record in a final state (no patient data)."""
    succeeded = record.state == JobState.SUCCEEDED
    return {
        "type": f"job.{record.state.value}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "job_id": record.id,
            "state": record.state.value,
            "batch_id": record.batch_id or None,
            "result_url": record.result_url if succeeded else None,
            "job_url": record.job_url or None,
            "error_code": record.error.code if record.error and not succeeded else None,
            "client": record.client or None,
            "reference": record.reference or None,
            "metadata": dict(record.metadata) or None,
        },
    }


def deliver(
    url: str,
    msg_id: str,
    body: str,
    secret: str,
    *,
    timeout_s: float,
    allowed_hosts: Sequence[str] = (),
    resolver: Resolver | None = None,
) -> int:
    """POST one signed delivery to the address the host resolves to once it is checked
    (``service.callbacks.pin_callback``; redirects are not followed). Returns the status.

    Raises:
        CallbackRefusedError: the host, or an address it resolves to, is refused.
        WebhookDeliveryError: on a network error or a non-2xx answer (so the message is retried).
    """
    pinned = pin_callback(url, allowed_hosts, resolver=resolver)
    timestamp = int(time.time())
    headers = {
        "host": pinned.host_header,
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "user-agent": "xmag-serve-webhooks",
    }
    try:
        # No proxy from the environment: it would connect to the name, not the checked address.
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.request(
                "POST",
                pinned.url,
                content=body,
                headers=headers,
                extensions={"sni_hostname": pinned.sni_hostname} if pinned.sni_hostname else None,
            )
    except httpx.HTTPError as exc:
        raise WebhookDeliveryError(
            f"The webhook receiver could not be reached: {type(exc).__name__}.", msg_id=msg_id
        ) from exc
    if not 200 <= response.status_code < 300:
        raise WebhookDeliveryError(
            f"The webhook receiver answered {response.status_code}.", msg_id=msg_id
        )
    return response.status_code
