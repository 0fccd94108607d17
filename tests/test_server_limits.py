"""The API's server cannot be held by slow or malformed clients, and its docs need no CDN.

A real uvicorn server runs on loopback with ``service.server.server_config`` (short limits so the
test is quick); raw sockets play the slow clients. Every loop is bounded and the server stops by
itself at the end.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from service.server import server_config

HEADER_TIMEOUT_S = 3.0
BODY_IDLE_TIMEOUT_S = 2.0
TRICKLE_EVERY_S = 2.0  # one byte every 2 s: resets any idle timer, never finishes the head
MAX_TRICKLE_BYTES = 15  # bounded: 30 s at most, long after the server must have cut


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A tiny ASGI app: GET answers at once, POST reads its whole body first."""
    if scope["type"] != "http":
        return
    size = 0
    if scope["method"] == "POST":
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    body = f"ok {size}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server() -> Iterator[str]:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = server_config(
        _app,
        host="127.0.0.1",
        port=port,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_idle_timeout_s=BODY_IDLE_TIMEOUT_S,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset)."""
    try:
        sock.settimeout(0.05)
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_client_trickling_its_headers_is_cut_off_while_others_are_served(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 64
    start = time.monotonic()
    cut_after = None
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        for i in range(MAX_TRICKLE_BYTES):
            try:
                slow.sendall(head[i : i + 1])
            except OSError:
                cut_after = time.monotonic() - start
                break
            if i == 1:  # meanwhile a healthy client is served at once
                t = time.monotonic()
                assert httpx.get(server + "/", timeout=5).text == "ok 0"
                assert time.monotonic() - t < 1.0
            wait_until = time.monotonic() + TRICKLE_EVERY_S
            while time.monotonic() < wait_until:
                if _closed_by_server(slow):
                    cut_after = time.monotonic() - start
                    break
            if cut_after is not None:
                break
    assert cut_after is not None, "the trickling client was never cut off"
    assert cut_after < HEADER_TIMEOUT_S + TRICKLE_EVERY_S + 1.0


def test_a_stalled_request_body_is_cut_off(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        start = time.monotonic()
        cut = False
        while time.monotonic() - start < BODY_IDLE_TIMEOUT_S + 5:
            if _closed_by_server(sock):
                cut = True
                break
    assert cut and time.monotonic() - start < BODY_IDLE_TIMEOUT_S + 2.0
    # A body that keeps coming is not cut.
    assert httpx.post(server + "/upload", content=b"y" * 5000, timeout=5).text == "ok 5000"


def test_content_length_with_transfer_encoding_is_refused(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        answer = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in answer.lower()


def test_the_server_config_sets_its_limits() -> None:
    config = server_config(_app, host="127.0.0.1", port=0)
    assert config.timeout_keep_alive <= 5
    assert config.h11_max_incomplete_event_size is not None
    assert config.h11_max_incomplete_event_size <= 64 * 1024
    assert config.limit_concurrency is not None


def test_links_never_take_the_host_header() -> None:
    from service.api._deps import base_url

    def request(public_url: str | None) -> Request:
        app = SimpleNamespace(
            state=SimpleNamespace(
                xmag=SimpleNamespace(settings=SimpleNamespace(public_url=public_url))
            )
        )
        scope = {
            "type": "http",
            "scheme": "http",
            "method": "GET",
            "path": "/v1/jobs",
            "root_path": "",
            "query_string": b"",
            "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"evil.example")],
            "app": app,
        }
        return Request(scope)

    assert base_url(request(None)) == "http://127.0.0.1:8000"
    assert base_url(request("https://xmag.hospital.org/")) == "https://xmag.hospital.org"


def test_the_docs_page_loads_its_assets_from_the_service() -> None:
    from service.api import create_app
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(), "redis://127.0.0.1:1/0", deliver_webhooks=False)
    client = TestClient(app)  # no lifespan: no Redis needed for the docs
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
    urls += re.findall(r"""url\s*:\s*["']([^"']+)["']""", page.text)
    assert urls and all(not re.match(r"^(https?:)?//", u) for u in urls), urls
    assert "cdn" not in page.text.lower()
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.content
