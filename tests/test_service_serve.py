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


def test_ctrl_c_on_serve_stops_api_worker_and_embedded_redis_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(FAST_ENV)
    # The production grace period: a worker stuck without Redis would hold `serve` this long.
    env.update(
        {"XMAG_API_KEYS": API_KEY, "PYTHONPATH": str(ROOT), "XMAG_WORKER_SHUTDOWN_GRACE_S": "120"}
    )
    log = (tmp_path / "serve.log").open("wb")
    # Its own process group, like a shell's foreground job: Ctrl-C is SIGINT to the whole group.
    proc = subprocess.Popen(
        [*SERVE, "--data-dir", str(data), "--model", str(DEMO_MODEL), "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
        log.flush()
        text = (tmp_path / "serve.log").read_text()
        assert "connection error" not in text.lower(), text[-3000:]
        assert "heartbeat failed" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _processes_mentioning(str(data)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        log.close()
