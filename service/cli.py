"""``xmag serve`` and ``xmag worker``, plugged into the core CLI through the ``xmag.commands`` entry
point group (the core never imports the service).

``xmag serve`` without ``REDIS_URL`` starts everything on one machine: the embedded Redis (AOF, in
``<data-dir>/redis``), the API, and ``--workers`` worker processes that it restarts when they die.
With ``REDIS_URL`` it uses that Redis. ``xmag worker`` runs one worker (one per GPU) against
``REDIS_URL`` or against the embedded Redis of a local ``xmag serve`` with the same ``--data-dir``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]

#: A worker that dies sooner than this after starting is restarted with growing delays (s).
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def _settings(data_dir: Path | None, model: Path | None) -> Any:
    from service.settings import ServiceSettings

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if model is not None:
        overrides["model_dir"] = model
    settings = ServiceSettings(**overrides)
    settings.data_dir = settings.data_dir.resolve()
    settings.model_dir = settings.model_dir.resolve()
    return settings


class _WorkerSupervisor(threading.Thread):
    """Keeps ``count`` worker processes running; restarts one that exits (with backoff)."""

    def __init__(self, count: int, env: dict[str, str], devices: Sequence[str] = ()) -> None:
        super().__init__(name="xmag-worker-supervisor", daemon=True)
        self.count = count
        self.env = env
        self.devices = list(devices)  # XMAG_GPU_DEVICES: worker i gets devices[i % len]
        self.stopping = threading.Event()
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self.failures = [0] * count

    def _spawn(self, slot: int) -> None:
        from service.embedded_redis import die_with_parent

        # The kernel stops a worker if `xmag serve` dies hard (the signal follows this thread,
        # which lives as long as the supervisor does). Its own session keeps a terminal's Ctrl-C
        # (SIGINT to the whole foreground group) away from it: `serve` stops workers in order.
        from xmag.runtime import worker_device_env

        self.processes[slot] = subprocess.Popen(
            [sys.executable, "-m", "service", "worker"],
            env={**self.env, **worker_device_env(slot, self.devices)},
            preexec_fn=die_with_parent,
            start_new_session=True,
        )

    def run(self) -> None:
        started = [0.0] * self.count
        for slot in range(self.count):
            self._spawn(slot)
            started[slot] = time.monotonic()
        while not self.stopping.wait(0.5):
            for slot, process in enumerate(self.processes):
                if process is None or process.poll() is None:
                    continue
                lived = time.monotonic() - started[slot]
                self.failures[slot] = 0 if lived > 60 else self.failures[slot] + 1
                delay = _RESTART_BACKOFF_S[min(self.failures[slot], len(_RESTART_BACKOFF_S) - 1)]
                if self.stopping.wait(delay):
                    return
                self._spawn(slot)
                started[slot] = time.monotonic()

    def stop(self, timeout_s: float) -> None:
        self.stopping.set()
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            if process is None:
                continue
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port of the API.")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Slide store, results store, embedded Redis [XMAG_DATA_DIR]."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model package the workers load [XMAG_MODEL_DIR].")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Worker processes to run here (0: API only).")
    ] = 1,
) -> None:
    """Run the API (and, without REDIS_URL, an embedded Redis) plus worker processes."""
    import uvicorn

    from service.api import create_app
    from service.auth import ApiKeyStore
    from service.embedded_redis import EmbeddedRedis, RedisWatchdog
    from service.logs import configure_logging
    from service.queue import redis_client
    from service.server import server_config

    settings = _settings(data_dir, model)
    configure_logging(settings.log_level)
    embedded = watchdog = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.redis_dir).start()
        url = embedded.url
        watchdog = RedisWatchdog(embedded)
        watchdog.start()
    supervisor = None
    try:
        with contextlib.closing(redis_client(url)) as client:
            keys = ApiKeyStore(client, settings.namespace)
            keys.sync_configured(settings.api_keys)
            new_key = keys.ensure_one()
        if new_key is not None:
            # Shown once: only its sha256 is stored.
            typer.echo(f"Created API key (shown once, store it now): {new_key}")
        if workers:
            env = {**os.environ, "REDIS_URL": url, "XMAG_DATA_DIR": str(settings.data_dir)}
            env["XMAG_MODEL_DIR"] = str(settings.model_dir)
            supervisor = _WorkerSupervisor(workers, env, settings.engine.gpu_devices)
            supervisor.start()
        # uvicorn handles SIGTERM itself, then restores the previous handler and raises the
        # signal again: with the default handler that kills this process before the `finally`
        # below stops the workers and the embedded Redis. This handler turns it into SystemExit.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        # Header, body and keep-alive timeouts, size and concurrency limits (service.server).
        uvicorn.Server(server_config(create_app(settings, url), host=host, port=port)).run()
    finally:
        if supervisor is not None:
            supervisor.stop(timeout_s=settings.worker_shutdown_grace_s)
        if watchdog is not None:
            watchdog.stop()  # before the server: its stop must not look like a crash
        if embedded is not None:
            embedded.stop()


def worker(
    data_dir: Annotated[
        Path | None, typer.Option(help="Shared data folder (results store) [XMAG_DATA_DIR].")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model package to load [XMAG_MODEL_DIR].")
    ] = None,
) -> None:
    """Run one worker process (one per GPU) against REDIS_URL or a local `xmag serve`."""
    from service.errors import ServiceUnavailableError
    from service.worker import run_worker

    settings = _settings(data_dir, model)
    url = settings.redis_url
    if not url:
        socket_path = settings.redis_dir / "redis.sock"
        if not socket_path.exists():
            raise ServiceUnavailableError(
                f"No REDIS_URL and no embedded Redis at {socket_path}; start `xmag serve` with "
                "this --data-dir first, or set REDIS_URL."
            )
        url = f"unix://{socket_path}"
    raise typer.Exit(run_worker(settings, url))


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``worker`` and ``keys`` to the ``xmag`` CLI."""
    import service.settings  # noqa: F401 - registers its XMAG_ variables with xmag.settings

    app.command("serve")(serve)
    app.command("worker")(worker)
    from service.keys_cli import keys_app

    app.add_typer(keys_app, name="keys")
