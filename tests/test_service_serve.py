"""`xmag serve` as a person runs it: embedded Redis + API + a worker, stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service_helpers import API_KEY, FAST_ENV, ROOT, free_port

DEMO_MODEL = ROOT / "models" / "demo"
SERVE = [sys.executable, "-m", "service", "serve"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _start_serve(
    tmp_path: Path, data: Path, port: int, **extra_env: str
) -> subprocess.Popen[bytes]:
    """`xmag serve` in its own process group (like a shell's foreground job: Ctrl-C is SIGINT to
    the whole group), its output in ``tmp_path/serve.log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(FAST_ENV)
    env.update({"XMAG_API_KEYS": API_KEY, "PYTHONPATH": str(ROOT), **extra_env})
    with (tmp_path / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [*SERVE, "--data-dir", str(data), "--model", str(DEMO_MODEL), "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_ctrl_c_on_serve_stops_api_worker_and_embedded_redis_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    # The production grace period: a worker stuck without Redis would hold `serve` this long.
    proc = _start_serve(tmp_path, data, port, XMAG_WORKER_SHUTDOWN_GRACE_S="120")
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            time.sleep(0.3)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        assert (data / "redis" / "appendonlydir").exists() or any((data / "redis").glob("*.aof*"))

        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert _processes_mentioning(str(data)) == []
        assert not (data / "redis" / "redis.sock").exists()
        # In order: the workers stop while Redis still answers, then Redis goes.
        text = (tmp_path / "serve.log").read_text()
        assert "connection error" not in text.lower(), text[-3000:]
        assert "heartbeat failed" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _processes_mentioning(str(data)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_serve_starts_its_embedded_redis_again_when_the_server_is_killed(tmp_path: Path) -> None:
    """The OOM killer (here SIGKILL) takes the embedded Redis: `serve` starts it again from its
    append-only file, and the API (its key included) and the worker carry on."""
    data = tmp_path / "data"
    port = free_port()
    log_path = tmp_path / "serve.log"
    proc = _start_serve(tmp_path, data, port)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def ready_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    return True
            time.sleep(0.3)
        return False

    try:
        assert ready_within(90), log_path.read_text()[-3000:]
        assert httpx.get(f"{base}/v1/jobs", headers=headers, timeout=5).status_code == 200
        (server,) = [p for p in _processes_mentioning(str(data)) if "redis-server" in p]
        os.kill(int(server.split(":")[0]), signal.SIGKILL)
        time.sleep(0.5)
        assert ready_within(60), log_path.read_text()[-3000:]
        assert httpx.get(f"{base}/v1/jobs", headers=headers, timeout=5).status_code == 200
        (again,) = [p for p in _processes_mentioning(str(data)) if "redis-server" in p]
        assert again != server
        assert "embedded Redis exited" in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _processes_mentioning(str(data)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
