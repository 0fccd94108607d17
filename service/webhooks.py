"""Webhooks on job completion and failure, signed per Standard Webhooks.

Headers: ``webhook-id`` (stable across retries, so receivers can deduplicate), ``webhook-timestamp``
(unix seconds of this attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"{id}.{timestamp}.{body}"`` with the secret's bytes (``whsec_`` + base64). The body holds the job
id, state, result URL, batch id and error *code* only: never the error message, a file name or a
path (patient identifiers hide in them). Deliveries are Dramatiq messages on their own queue,
retried with exponential backoff when the receiver fails or answers non-2xx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from service.errors import ServiceError

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


def build_event(record: dict[str, str]) -> dict[str, Any]:
    """The webhook body for a job record in a final state (no patient data)."""
    state = record.get("state", "")
    error = json.loads(record["error"]) if record.get("error") and state != "succeeded" else None
    return {
        "type": f"job.{state}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "job_id": record.get("id"),
            "state": state,
            "batch_id": record.get("batch_id") or None,
            "result_url": record.get("result_url") if state == "succeeded" else None,
            "job_url": record.get("job_url") or None,
            "error_code": error.get("code") if error else None,
        },
    }


def deliver(url: str, msg_id: str, body: str, secret: str, *, timeout_s: float) -> int:
    """POST one signed delivery. Returns the status.

    Raises:
        WebhookDeliveryError: on a network error or a non-2xx answer (so the message is retried).
    """
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "user-agent": "xmag-serve-webhooks",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise WebhookDeliveryError(
            f"The webhook receiver could not be reached: {type(exc).__name__}.", msg_id=msg_id
        ) from exc
    if not 200 <= response.status_code < 300:
        raise WebhookDeliveryError(
            f"The webhook receiver answered {response.status_code}.", msg_id=msg_id
        )
    return response.status_code
