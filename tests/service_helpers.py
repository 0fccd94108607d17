"""Helpers for the service tests: real processes (API, workers) on a real Redis, a webhook receiver.

The API and workers run as ``python -m service ...`` subprocesses so a test can kill -9 them, and so
their threads and warnings stay out of the test process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-submit-key-0123456789abcdef"
READ_KEY = "test-read-key-0123456789abcdef01"
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="
FINAL = {"succeeded", "failed", "canceled", "dead"}

#: Short timeouts so crash requeues and retries happen in seconds, not minutes.
FAST_ENV = {
    "XMAG_HEARTBEAT_TIMEOUT_MS": "2500",
    "XMAG_MAINTENANCE_CHANCE": "1000000",
    "XMAG_LEASE_MS": "2500",
    "XMAG_WORKER_HEARTBEAT_S": "0.3",
    "XMAG_WORKER_STALE_S": "5",
    "XMAG_WORKER_IDLE_TIMEOUT_MS": "100",
    "XMAG_RETRY_MIN_BACKOFF_MS": "100",
    "XMAG_RETRY_MAX_BACKOFF_MS": "500",
    "XMAG_WEBHOOK_MIN_BACKOFF_MS": "100",
    "XMAG_WEBHOOK_MAX_BACKOFF_MS": "500",
    "XMAG_WORKER_SHUTDOWN_GRACE_S": "5",
    "XMAG_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
    # WebhookReceiver listens on loopback, which callbacks reach only when allow-listed.
    "XMAG_CALLBACK_ALLOWED_HOSTS": "127.0.0.0/8",
    "XMAG_LOG_LEVEL": "WARNING",
    "XMAG_RECONCILE_INTERVAL_S": "0.5",
    "XMAG_RECONCILE_AFTER_S": "1",
    # Engine settings (xmag.settings): two cores are shared by the API, the workers and the tests.
    "XMAG_INTRA_OP_THREADS": "1",
    "XMAG_READER_WORKERS": "2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(redis_url: str, data_dir: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(FAST_ENV)
    env.update(
        {
            "REDIS_URL": redis_url,
            "XMAG_DATA_DIR": str(data_dir),
            "XMAG_MODEL_DIR": str(model_dir),
            "XMAG_API_KEYS": f"{API_KEY},{READ_KEY}:read",
            "XMAG_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


class Proc:
    """A ``python -m service`` subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env=env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its state (a job stays claimed) but runs no code."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log_file.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start_api(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    """Start ``serve --workers 0`` on a free port; returns it and its base URL once healthy."""
    port = free_port()
    proc = Proc(["serve", "--workers", "0", "--port", str(port)], env, log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"API exited: {proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"API did not become healthy: {proc.tail()}")


def start_worker(env: dict[str, str], log: Path) -> Proc:
    return Proc(["worker"], env, log)


def client(base: str, key: str | None = API_KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def wait_ready(http: httpx.Client, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"no ready worker: {http.get('/readyz').text}")


def wait_job(
    http: httpx.Client,
    job_id: str,
    states: set[str] = FINAL,
    timeout_s: float = 120,
    poll_s: float = 0.1,
) -> dict[str, Any]:
    """Poll a job until it reaches one of ``states`` (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} stuck in {job.get('state')}: {job}")


def upload(http: httpx.Client, path: Path) -> str:
    response = http.put("/v1/slides", params={"filename": path.name}, content=path.read_bytes())
    assert response.status_code in (200, 201), response.text
    return str(response.json()["slide_id"])


class WebhookReceiver:
    """A real local HTTP server that records webhook deliveries; can fail the first N."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], str]] = []
        self.attempts = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length).decode()
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, job_id: str, timeout_s: float = 60) -> tuple[dict[str, str], str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for headers, body in self.received:
                if json.loads(body)["data"]["job_id"] == job_id:
                    return headers, body
            time.sleep(0.05)
        raise AssertionError(f"no webhook for {job_id}; got {self.received}")


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


@dataclasses.dataclass(frozen=True)
class ApiStack:
    """An API process (no worker) on an embedded Redis: its base URL, data folder and env."""

    base: str
    data: Path
    env: dict[str, str]
    redis_url: str


@contextlib.contextmanager
def api_stack(data: Path, api_keys: str, **extra: str) -> Iterator[ApiStack]:
    """Start Redis and the API with ``XMAG_API_KEYS=api_keys``, slides named under the test
    slides; stop both on exit."""
    from service.embedded_redis import EmbeddedRedis
    from tests.conftest import SLIDES_DIR

    with EmbeddedRedis(data / "redis") as redis_server:
        env = service_env(
            redis_server.url,
            data,
            data / "no-model",
            XMAG_SLIDE_ROOTS=str(SLIDES_DIR),
            XMAG_API_KEYS=api_keys,
            **extra,
        )
        api, base = start_api(env, data / "api.log")
        try:
            yield ApiStack(base, data, env, redis_server.url)
        finally:
            api.stop()
