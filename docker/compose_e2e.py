"""``make compose-e2e``: the compose deployment, run for real on this machine.

1. Makes the base image if it is missing (``docker/base/build.sh``: mmdebstrap + docker import),
   builds the redis, API and CPU-worker images from it, and prints their sizes.
2. Starts redis + api + worker-cpu (own project name, a free port, a fresh API key, the slides
   under ``tests/data/slides`` and the model of ``make serve``, ``models/demo``, both read-only).
3. Uploads ``tests/data/slides/CMU-1-Small-Region.svs`` through the API container, submits a job,
   waits for its result and prints the time from ``up`` to that first result.
4. Kills Redis (SIGKILL: only what the append-only file holds survives) and starts it again, then
   checks that the job, its state and its result are unchanged and the key still works, and that a
   new job (another slide, by path under the read-only slides mount) completes.
5. Tears the stack down (containers, network, volumes) whatever happened; on failure it prints the
   services' last log lines first.

Environment: ``BASE_IMAGE`` (xmag-base:bookworm), ``EXTRA_CA_CERTS`` (for a missing base),
``BUILD_NETWORK`` (host: pip in a build reaches PyPI through the host's network),
``E2E_TIMEOUT_S`` (900: a deadline for each wait). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
SLIDES_DIR = ROOT / "tests" / "data" / "slides"
MODEL_DIR = ROOT / "models" / "demo"
FIRST_SLIDE = "CMU-1-Small-Region.svs"
#: The job after the Redis restart: another slide (no result-store hit), named by path.
SECOND_SLIDE = "tcga-cr-7395-01a-01-ts1.svs"
PROJECT = "xmag-e2e"
SERVICES = ("redis", "api", "worker-cpu")
IMAGES = {
    "redis": "xmag-serve-redis:latest",
    "api": "xmag-serve-api:latest",
    "worker-cpu": "xmag-serve-worker-cpu:latest",
}
FINAL = {"succeeded", "failed", "canceled", "dead"}
#: appendfsync everysec: a write is on disk within about a second; wait longer before the kill.
AOF_FSYNC_WAIT_S = 2.5


class E2EError(RuntimeError):
    """A step of the end-to-end run failed (the message says which and what was seen)."""


def log(message: str) -> None:
    print(f"[compose-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=env, text=True, capture_output=capture, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise E2EError(f"`{' '.join(command)}` exited {result.returncode} {detail}")
    return result


def compose_command() -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from compose_check import compose_command as find

    command = find()
    if command is None:
        raise E2EError(
            "no docker-compose and no `docker compose`: install one "
            "(apt-get install docker-compose) to run the stack"
        )
    return command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_env() -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_BUILDKIT" not in env:
        # A docker CLI without buildx refuses BuildKit builds; the classic builder works on every
        # engine (and caches each layer the same way).
        probe = run(["docker", "buildx", "version"], capture=True, check=False)
        env["DOCKER_BUILDKIT"] = "1" if probe.returncode == 0 else "0"
    return env


def build_images(base_image: str) -> None:
    if run(["docker", "image", "inspect", base_image], capture=True, check=False).returncode:
        log(f"base image {base_image} missing: docker/base/build.sh (mmdebstrap, a few minutes)")
        run(
            ["sh", str(ROOT / "docker" / "base" / "build.sh")],
            env={**os.environ, "BASE_IMAGE": base_image},
        )
    env = build_env()
    network = os.environ.get("BUILD_NETWORK", "host")
    for service, image in IMAGES.items():
        started = time.monotonic()
        run(
            [
                "docker",
                "build",
                "--quiet",
                "--network",
                network,
                "--build-arg",
                f"BASE_IMAGE={base_image}",
                "-f",
                str(ROOT / "docker" / f"Dockerfile.{service}"),
                "-t",
                image,
                str(ROOT),
            ],
            env=env,
            capture=True,
        )
        log(f"built {image} in {time.monotonic() - started:.0f} s")


def image_sizes(base_image: str) -> None:
    log("image sizes:")
    for image in (base_image, *IMAGES.values()):
        size = run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture=True).stdout
        print(f"    {image:34s} {int(size) / 1e6:8.1f} MB", flush=True)


class Api:
    """A tiny client of the published API port, with the run's API key."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.key = key

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if auth:
            request.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def wait_ready(self, deadline: float) -> None:
        last: Any = None
        while time.monotonic() < deadline:
            try:
                status, last = self.call("GET", "/readyz", auth=False)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last = repr(exc)
            time.sleep(2)
        raise E2EError(f"/readyz never 200 (a worker with its model loaded): last {last}")

    def submit(self, payload: dict[str, Any]) -> str:
        status, job = self.call(
            "POST", "/v1/jobs", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        if status != 202:
            raise E2EError(f"POST /v1/jobs {payload} -> {status} {job}")
        return str(job["id"])

    def wait_job(self, job_id: str, deadline: float) -> dict[str, Any]:
        job: Any = None
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/v1/jobs/{job_id}")
            if status == 200 and job["state"] in FINAL:
                if job["state"] != "succeeded":
                    raise E2EError(f"job {job_id} ended {job['state']}: {job.get('error')}")
                return dict(job)
            time.sleep(1)
        raise E2EError(f"job {job_id} not final in time: {job}")

    def result(self, job_id: str) -> dict[str, Any]:
        status, result = self.call("GET", f"/v1/jobs/{job_id}/result")
        if status != 200:
            raise E2EError(f"GET /v1/jobs/{job_id}/result -> {status} {result}")
        return dict(result)


def upload(api: Api, slide: Path) -> str:
    data = slide.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    status, body = api.call(
        "PUT",
        f"/v1/slides?filename={slide.name}",
        data,
        {"X-Content-SHA256": sha, "Content-Type": "application/octet-stream"},
    )
    if status not in (200, 201):
        raise E2EError(f"PUT /v1/slides {slide.name} -> {status} {body}")
    return sha


#: Keys with no expiry: the state that must survive (heartbeats and leases expire by design).
_PERSISTENT_KEYS_LUA = (
    "local r = {} for _, k in ipairs(redis.call('keys', '*')) do "
    "if redis.call('ttl', k) == -1 then table.insert(r, k) end end return r"
)


def persistent_keys(compose: list[str], env: dict[str, str]) -> set[str]:
    out = run(
        [
            *compose,
            "exec",
            "-T",
            "redis",
            "redis-cli",
            "--no-raw",
            "eval",
            _PERSISTENT_KEYS_LUA,
            "0",
        ],
        env=env,
        capture=True,
    ).stdout
    keys = {line.split(") ", 1)[1].strip().strip('"') for line in out.splitlines() if ") " in line}
    if not keys:
        raise E2EError(f"no keys read from Redis: {out!r}")
    return keys


def wait_log(
    compose: list[str], env: dict[str, str], service: str, needle: str, deadline: float
) -> str:
    """The last log line of ``service`` containing ``needle`` (after a restart: the new one)."""
    while time.monotonic() < deadline:
        out = run([*compose, "logs", "--no-color", "--tail", "30", service], env=env, capture=True)
        lines = [line for line in out.stdout.splitlines() if needle in line]
        if lines:
            return lines[-1].split("|", 1)[-1].strip()
        time.sleep(1)
    raise E2EError(f"{service} never logged {needle!r}")


def scenario(compose: list[str], env: dict[str, str], api: Api, timeout_s: float) -> None:
    started = time.monotonic()
    run([*compose, "up", "-d", "--no-build", *SERVICES], env=env)
    api.wait_ready(started + timeout_s)
    log(f"ready (API + a worker with its model) {time.monotonic() - started:.1f} s after `up`")

    sha = upload(api, SLIDES_DIR / FIRST_SLIDE)
    first = api.submit({"slide_id": sha})
    job = api.wait_job(first, started + timeout_s)
    result = api.result(first)
    up_to_result = time.monotonic() - started
    log(f"job {first} succeeded ({FIRST_SLIDE}); first result {up_to_result:.1f} s after `up`")
    log(f"time from up to first result: {up_to_result:.1f} s")
    print(f"    result keys: {sorted(result)[:12]}", flush=True)

    before = persistent_keys(compose, env)
    time.sleep(AOF_FSYNC_WAIT_S)
    log(f"killing redis (SIGKILL; {len(before)} keys without a TTL) and starting it again")
    run([*compose, "kill", "-s", "SIGKILL", "redis"], env=env)
    run([*compose, "start", "redis"], env=env)
    restarted = time.monotonic()
    loaded = wait_log(compose, env, "redis", "from append only file", restarted + timeout_s)
    print(f"    redis: {loaded}", flush=True)
    api.wait_ready(restarted + timeout_s)
    log(f"ready again {time.monotonic() - restarted:.1f} s after the Redis restart")
    lost = before - persistent_keys(compose, env)
    if lost:
        raise E2EError(f"{len(lost)} keys lost across the Redis restart: {sorted(lost)[:20]}")
    log(f"all {len(before)} keys written before the kill are back")

    after = api.wait_job(first, restarted + timeout_s)
    if (after["state"], after["finished_at"], after["slide_sha256"]) != (
        job["state"],
        job["finished_at"],
        job["slide_sha256"],
    ):
        raise E2EError(f"job {first} changed across the Redis restart: {job} -> {after}")
    if api.result(first) != result:
        raise E2EError(f"the result of {first} changed across the Redis restart")
    log(f"job {first} and its result unchanged after the restart (API key still accepted)")

    # This scan states no mpp (README: pass default_mpp for such slides).
    second = api.submit({"path": f"/slides/{SECOND_SLIDE}", "options": {"default_mpp": 0.5}})
    job2 = api.wait_job(second, restarted + timeout_s)
    if job2.get("cache_hit"):
        raise E2EError(f"job {second} was a result-store hit; it should have run on the worker")
    api.result(second)
    log(f"job {second} ({SECOND_SLIDE}, submitted after the restart) succeeded on the worker")


def main() -> int:
    base_image = os.environ.get("BASE_IMAGE", "xmag-base:bookworm")
    timeout_s = float(os.environ.get("E2E_TIMEOUT_S", "900"))
    if shutil.which("docker") is None:
        raise E2EError("docker not found")
    compose = [*compose_command(), "-p", PROJECT, "-f", str(COMPOSE_FILE), "--profile", "cpu"]
    log(f"compose: {' '.join(compose[:2]) if compose[0] == 'docker' else compose[0]}")
    build_images(base_image)
    image_sizes(base_image)

    port = free_port()
    key = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "BASE_IMAGE": base_image,
        "XMAG_PORT": str(port),
        "XMAG_API_KEYS": key,
        "SLIDES_DIR": str(SLIDES_DIR),
        "MODEL_DIR": str(MODEL_DIR),
        "XMAG_PUBLIC_URL": f"http://127.0.0.1:{port}",
        # The CPU worker's limit (4) cannot exceed the host's CPUs.
        "WORKER_CPUS": os.environ.get("WORKER_CPUS", str(min(4, os.cpu_count() or 1))),
    }
    api = Api(f"http://127.0.0.1:{port}", key)
    ok = False
    try:
        scenario(compose, env, api, timeout_s)
        ok = True
    finally:
        if not ok:
            log("FAILED; last log lines of each service:")
            run([*compose, "ps"], env=env, check=False)
            run([*compose, "logs", "--no-color", "--tail", "40", *SERVICES], env=env, check=False)
        log("tearing down (containers, network, volumes)")
        run([*compose, "down", "-v", "--remove-orphans", "-t", "20"], env=env, check=False)
    log("PASSED")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except E2EError as exc:
        print(f"compose-e2e: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
