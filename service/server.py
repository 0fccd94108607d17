"""How the API is served: uvicorn with time and size limits a slow or malicious client cannot hold.

uvicorn's defaults leave a connection open for as long as a client trickles its headers (its
keep-alive timeout only runs between requests) or stalls mid-body, so a few hundred slow clients
(slowloris) take every connection. ``server_config`` sets:

* ``HEADER_TIMEOUT_S``: the whole request head must arrive within this, counted from the
  connection (or the end of the previous response); trickling one byte at a time does not reset it;
* ``BODY_IDLE_TIMEOUT_S``: a request body (an upload) that stops arriving for this long is cut
  (the upload is discarded by its streaming path, which sees a disconnect);
* ``KEEP_ALIVE_S`` between requests, ``MAX_HEADER_BYTES`` for the head
  (``h11_max_incomplete_event_size``), ``MAX_CONCURRENCY`` connections and tasks
  (``limit_concurrency``: 503 beyond it) and a bounded ``backlog``;
* ``RequestGuard``: refuses a request with both ``Content-Length`` and ``Transfer-Encoding``
  (RFC 9112 6.1: the framing is ambiguous, the classic request-smuggling vector) with 400 and
  closes the connection.

Absolute URLs (``Location``, job and result links, webhook bodies) never come from the request's
``Host`` header: ``service.api._deps.base_url`` uses ``XMAG_PUBLIC_URL``, else the address the
server is bound to.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.logs import get_logger

__all__ = [
    "BODY_IDLE_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "KEEP_ALIVE_S",
    "MAX_CONCURRENCY",
    "MAX_HEADER_BYTES",
    "GuardedH11Protocol",
    "RequestGuard",
    "server_config",
]

HEADER_TIMEOUT_S = 10.0  # the whole request head, from connection or previous response
BODY_IDLE_TIMEOUT_S = 30.0  # no body byte for this long while a body is owed: cut
KEEP_ALIVE_S = 5.0  # idle keep-alive connection between requests
MAX_HEADER_BYTES = 32 * 1024  # request line + headers
MAX_CONCURRENCY = 512  # connections + tasks before answering 503
BACKLOG = 256  # pending TCP connections the kernel queues

_log = get_logger("service.server")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a body idle timeout.

    The limits are class attributes so a configured subclass (``server_config``) can change them.
    """

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:  # the head is in: the body clock runs
            self._cancel_head()
            self._arm_body()
        elif self.conn.their_state is not h11.IDLE:
            self._cancel_head()
            self._cancel_body()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head()  # the next request's head has its own deadline

    # -- timers -------------------------------------------------------------------------------
    def _arm_head(self) -> None:
        self._cancel_head()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_body(self) -> None:
        self._cancel_body()
        self._body_timer = self.loop.call_later(self.body_idle_timeout_s, self._body_expired)

    def _cancel_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _log.warning(
                "request head not received in time; connection closed",
                extra={"client": str(self.client), "timeout_s": self.header_timeout_s},
            )
            self.transport.close()

    def _body_expired(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the app is not reading: not the client's fault
            self._arm_body()
            return
        _log.warning(
            "request body stalled; connection closed",
            extra={"client": str(self.client), "timeout_s": self.body_idle_timeout_s},
        )
        self.transport.close()


class RequestGuard:
    """ASGI middleware: refuses ambiguous framing before the app sees the request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope.get("headers", ())}
            if b"content-length" in names and b"transfer-encoding" in names:
                await _refuse(
                    send,
                    "The request has both Content-Length and Transfer-Encoding; send one.",
                )
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, detail: str) -> None:
    body = json.dumps(
        {
            "type": "urn:xmag:problem:bad-request",
            "title": "Bad Request",
            "status": 400,
            "code": "BAD_REQUEST",
            "detail": detail,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
    keep_alive_s: float = KEEP_ALIVE_S,
    max_concurrency: int = MAX_CONCURRENCY,
    **extra: Any,
) -> uvicorn.Config:
    """The uvicorn configuration the API runs with (``xmag serve``): ``app`` behind
    ``RequestGuard``, on ``GuardedH11Protocol`` with the limits above."""
    protocol = type(
        "ConfiguredH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "body_idle_timeout_s": body_idle_timeout_s},
    )
    return uvicorn.Config(
        RequestGuard(app),
        host=host,
        port=port,
        http=protocol,
        ws="none",
        timeout_keep_alive=int(max(1, keep_alive_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=max_concurrency,
        backlog=BACKLOG,
        log_config=None,
        access_log=False,
        **extra,
    )
