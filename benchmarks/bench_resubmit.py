"""Resubmit benchmark (not a test): what a repeated job costs, over the REST API only.

Starts ``xmag serve`` (embedded Redis, the API, one worker) in a temporary data folder, on a free
loopback port, and measures two things:

a. **Resubmitting an uploaded slide.** Uploads a small real slide (``PUT /v1/slides``), runs a job
   on it, then submits the same job again (no Idempotency-Key, so a new job) and times that second
   job from submit to ``succeeded``. Prints whether its result says ``cache_hit``, its tile count,
   and how the ``/metrics`` counters moved on the resubmit (``xmag_tiles``, ``xmag_tiles_seconds``,
   the ``hash`` stage): counters that grow on a job that embedded no tile count work twice.
b. **Hashing a large by-path slide.** Generates a large synthetic slide (40x, 50,000 x 37,500 px by
   default) under ``XMAG_SLIDE_ROOTS``, submits it by path twice and prints, for each job, the
   ``timings.hash`` of its result.json, the ``hash`` stage seconds the worker recorded in
   ``/metrics`` for it, and its submit -> succeeded latency. For reference it also times a sha256
   of the slide file in this process (page cache warm).

``--engine-cache on`` also sets ``XMAG_CACHE_DIR`` (the engine's own result cache, off by default);
``both`` (the default) runs each repeat once without and once with it. Each repeat starts a fresh
service in a fresh data folder; the table shows medians over ``--repeats``.

It uses only the CLI and the REST API, so it runs against any version of the code. Run it with the
interpreter of the environment under test; ``--code-root`` (default: the repository holding this
script) is put first on the service's PYTHONPATH and is where the default model and the small
slide are taken from::

    python benchmarks/bench_resubmit.py --model models/demo --repeats 3
    PYTHONPATH=/tmp/baseline python benchmarks/bench_resubmit.py --code-root /tmp/baseline
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parents[1]
FINAL = {"succeeded", "failed", "canceled", "dead"}
POLL_S = 0.02


# --------------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc; empty where /proc is missing)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class Server:
    """``xmag serve`` as a subprocess in its own process group; ``stop`` ends it and its children.

    The workers run in sessions of their own (``serve`` stops them in order on SIGTERM), so the
    descendants are collected by pid before stopping and any left afterwards are killed by pid.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.known: set[int] = set()

    def remember_children(self) -> None:
        if self.proc.poll() is None:
            self.known.update(_children(self.proc.pid))

    def stop(self, timeout_s: float = 30.0) -> None:
        self.remember_children()
        pid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # anything left in the group
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in self.known) and time.monotonic() < deadline:
            time.sleep(0.2)
        for child in self.known:
            if _alive(child):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
        self._log.close()


def _serve_command(port: int, data: Path, model: Path, workers: int) -> list[str]:
    """``xmag serve`` from this interpreter's environment, else ``python -m service serve``."""
    script = Path(sys.executable).parent / "xmag"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "service"]
    return [*head, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
            "--model", str(model), "--workers", str(workers)]  # fmt: skip


def _generator_module(env: dict[str, str], cwd: Path) -> str:
    """The synthetic-slide module of the code under test: xmag.synthetic or tests.synthetic."""
    for module in ("xmag.synthetic", "tests.synthetic"):
        probe = subprocess.run(
            [sys.executable, "-c",
             f"import importlib; m = importlib.import_module({module!r}); m.make_large_slide"],
            env=env, cwd=cwd, capture_output=True, timeout=120,
        )  # fmt: skip
        if probe.returncode == 0:
            return module
    raise SystemExit("no synthetic slide generator (xmag.synthetic or tests.synthetic) found")


def generate_slide(out: Path, size: tuple[int, int], env: dict[str, str], cwd: Path) -> float:
    module = _generator_module(env, cwd)
    cmd = [sys.executable, "-m", module, str(out), "--layout", "40x",
           "--width", str(size[0]), "--height", str(size[1])]  # fmt: skip
    print(f"generating {out.name} with python -m {module} ({size[0]}x{size[1]} px, 40x) ...",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"slide generation failed:\n{done.stdout}\n{done.stderr}")
    took = time.perf_counter() - t0
    print(done.stdout.strip(), flush=True)
    return took


# --------------------------------------------------------------------------------------------
# REST


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """One sample by name and labels (label order-insensitive); 0.0 when absent."""
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


WATCHED = {
    "tiles": ("xmag_tiles_total", {}),
    "tiles_seconds": ("xmag_tiles_seconds_total", {}),
    "hash_stage_s": ("xmag_stage_duration_seconds_sum", {"stage": "hash"}),
    "hash_stage_n": ("xmag_stage_duration_seconds_count", {"stage": "hash"}),
    "jobs_succeeded": ("xmag_jobs_finished_total", {"state": "succeeded"}),
}


def watched(http: httpx.Client) -> dict[str, float]:
    r = http.get("/metrics")
    r.raise_for_status()
    values = parse_metrics(r.text)
    out = {}
    for label, (name, labels) in WATCHED.items():
        v = metric(values, name, **labels)
        if v == 0.0 and name.endswith("_total"):  # client libraries differ on the suffix
            v = metric(values, name[: -len("_total")], **labels)
        out[label] = v
    return out


def _ts(value: Any) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError, TypeError):
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None


@dataclass
class JobRun:
    job_id: str
    state: str
    latency_s: float  # submit request sent -> first poll that saw a final state
    server_s: float | None  # created_at -> finished_at, from the job record
    run_s: float | None  # started_at -> finished_at
    result: dict[str, Any] = field(default_factory=dict)
    metrics_delta: dict[str, float] = field(default_factory=dict)
    error: Any = None

    @property
    def timings(self) -> dict[str, Any]:
        return self.result.get("timings") or {}

    @property
    def tiles(self) -> Any:
        qc = self.result.get("qc") or {}
        tiles = self.result.get("tiles") or {}
        return qc.get("tiles_kept", tiles.get("n_kept", tiles.get("count")))


def run_job(http: httpx.Client, body: dict[str, Any], timeout_s: float) -> JobRun:
    """Submit one job, wait for a final state, fetch its result and the metrics it moved."""
    before = watched(http)
    t0 = time.perf_counter()
    r = http.post("/v1/jobs", json=body)
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs -> {r.status_code}: {r.text}")
    job = r.json()
    job_id = job["id"]
    deadline = t0 + timeout_s
    while job.get("state") not in FINAL:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"job {job_id} not final after {timeout_s:.0f} s: {job}")
        time.sleep(POLL_S)
        job = http.get(f"/v1/jobs/{job_id}").json()
    latency = time.perf_counter() - t0
    created, started, finished = (_ts(job.get(k)) for k in ("created_at", "started_at",
                                                             "finished_at"))  # fmt: skip
    result: dict[str, Any] = {}
    if job["state"] == "succeeded":
        rr = http.get(f"/v1/jobs/{job_id}/result")
        if rr.status_code == 200:
            result = rr.json()
    # The worker records metrics right after it marks the job final: give it a moment.
    after = watched(http)
    settle = time.perf_counter() + 5
    while after.get("jobs_succeeded", 0) <= before.get("jobs_succeeded", 0) and \
            job["state"] == "succeeded" and time.perf_counter() < settle:  # fmt: skip
        time.sleep(0.1)
        after = watched(http)
    return JobRun(
        job_id=job_id,
        state=job["state"],
        latency_s=latency,
        server_s=finished - created if created and finished else None,
        run_s=finished - started if started and finished else None,
        result=result,
        metrics_delta={k: after[k] - before.get(k, 0.0) for k in after},
        error=job.get("error"),
    )


@contextlib.contextmanager
def service(args: argparse.Namespace, slide_root: Path, engine_cache: bool,
            keep: bool) -> Iterator[tuple[httpx.Client, Path]]:  # fmt: skip
    key = "bench_" + secrets.token_urlsafe(24)
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="xmag-bench-resubmit-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(
        XMAG_API_KEYS=key,
        XMAG_SLIDE_ROOTS=str(slide_root),
        XMAG_LOG_LEVEL="WARNING",
        XMAG_WORKER_SHUTDOWN_GRACE_S="20",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(args.code_root), os.environ.get("PYTHONPATH", "")) if p
        ),
        NO_PROXY="127.0.0.1,localhost",
    )
    if engine_cache:
        env["XMAG_CACHE_DIR"] = str(data / "engine-cache")
    cmd = _serve_command(port, data / "data", args.model.resolve(), args.workers)
    server = Server(cmd, env, args.code_root, data / "serve.log")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60,
                          trust_env=False) as http:  # fmt: skip
            deadline = time.monotonic() + args.start_timeout
            while True:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"xmag serve exited ({server.proc.returncode}); see "
                                       f"{server.log_path}")  # fmt: skip
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service not ready in {args.start_timeout:.0f} s; see "
                                       f"{server.log_path}")  # fmt: skip
                time.sleep(0.2)
            server.remember_children()
            yield http, data
    finally:
        server.stop()
        if keep:
            print(f"kept {data} (serve.log, data/)", flush=True)
        else:
            shutil.rmtree(data, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Repeat:
    engine_cache: bool
    small: list[JobRun]
    large: list[JobRun]


def scenario_small(http: httpx.Client, small: Path, timeout_s: float) -> list[JobRun]:
    content = small.read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    r = http.put(
        "/v1/slides",
        params={"filename": small.name},
        content=content,
        headers={"X-Content-SHA256": sha, "Content-Type": "application/octet-stream"},
    )
    if r.status_code not in (200, 201):
        raise RuntimeError(f"PUT /v1/slides -> {r.status_code}: {r.text}")
    slide_id = r.json()["slide_id"]
    body = {"slide_id": slide_id, "options": {"default_mpp": 0.5}}
    return [run_job(http, body, timeout_s) for _ in range(2)]


def scenario_large(http: httpx.Client, large: Path, timeout_s: float) -> list[JobRun]:
    body = {"path": str(large)}
    return [run_job(http, body, timeout_s) for _ in range(2)]


def sha256_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# report


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _spread(values: list[float | None]) -> str:
    vals = [v for v in values if isinstance(v, int | float)]
    if len(vals) < 2:
        return ""
    return f" ({min(vals):.3f}-{max(vals):.3f})"


def _same_result(a: JobRun, b: JobRun) -> bool | None:
    if not a.result or not b.result:
        return None
    return a.result.get("created_at") == b.result.get("created_at")


def report(repeats: list[Repeat], large: Path, gen_s: float | None, sha_s: list[float]) -> None:
    size_mb = large.stat().st_size / 1e6
    print()
    for cache in sorted({r.engine_cache for r in repeats}):
        runs = [r for r in repeats if r.engine_cache == cache]
        n = len(runs)
        title = "XMAG_CACHE_DIR set (engine result cache on)" if cache else \
            "service defaults (XMAG_CACHE_DIR unset)"  # fmt: skip
        print(f"### {title}: median of {n} run(s) (min-max)\n")
        print("| scenario | job | submit->succeeded s | server created->finished s | "
              "result cache_hit | result tiles | result timings.hash s | "
              "metrics Δ tiles | metrics Δ tiles_seconds | metrics Δ hash stage s | "
              "same result.json as job 1 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, pick in (("small upload (CMU-1-Small-Region.svs)", lambda r: r.small),
                           (f"large by path ({size_mb:.0f} MB)", lambda r: r.large)):  # fmt: skip
            for i, label in enumerate(("1st (cold)", "2nd (resubmit)")):
                jobs = [pick(r)[i] for r in runs]
                hits = {j.result.get("cache_hit") for j in jobs}
                tiles = {j.tiles for j in jobs}
                same = {_same_result(pick(r)[0], pick(r)[1]) for r in runs} if i else {None}
                states = {j.state for j in jobs}
                cells = [
                    name if i == 0 else "",
                    label + ("" if states == {"succeeded"} else f" [{','.join(sorted(states))}]"),
                    _fmt(_med([j.latency_s for j in jobs])) + _spread([j.latency_s for j in jobs]),
                    _fmt(_med([j.server_s for j in jobs])),
                    "/".join(_fmt(h) for h in sorted(hits, key=str)),
                    "/".join(_fmt(t) for t in sorted(tiles, key=str)),
                    _fmt(_med([j.timings.get("hash") for j in jobs]), 4),
                    _fmt(_med([j.metrics_delta.get("tiles") for j in jobs]), 0),
                    _fmt(_med([j.metrics_delta.get("tiles_seconds") for j in jobs])),
                    _fmt(_med([j.metrics_delta.get("hash_stage_s") for j in jobs]), 4),
                    "/".join(_fmt(s) for s in sorted(same, key=str)) if i else "",
                ]
                print("| " + " | ".join(cells) + " |")
        print()
    print(f"large slide: {large} ({size_mb:.1f} MB)"
          + (f", generated in {gen_s:.1f} s" if gen_s is not None else ""))  # fmt: skip
    print(f"sha256 of the large slide in this process (page cache warm): "
          f"median {statistics.median(sha_s):.3f} s over {len(sha_s)}")  # fmt: skip
    for r in repeats:
        for j in (*r.small, *r.large):
            if j.state != "succeeded":
                print(f"job {j.job_id}: {j.state} {j.error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--code-root",
        type=Path,
        default=HERE,
        help="repository whose code the service runs (first on PYTHONPATH)",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="model package (default: <code-root>/models/demo)"
    )
    parser.add_argument("--size", default="50000x37500", help="large slide WxH at 40x")
    parser.add_argument(
        "--large-slide",
        type=Path,
        default=None,
        help="use this slide instead of generating one (its folder becomes XMAG_SLIDE_ROOTS)",
    )
    parser.add_argument(
        "--small-slide",
        type=Path,
        default=None,
        help="default: <code-root>/tests/data/slides/CMU-1-Small-Region.svs",
    )
    parser.add_argument("--engine-cache", choices=("off", "on", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--job-timeout", type=float, default=900.0)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument(
        "--keep", action="store_true", help="keep the data folders, server logs and generated slide"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw figures here")
    args = parser.parse_args()
    args.code_root = args.code_root.resolve()
    args.model = (args.model or args.code_root / "models" / "demo").resolve()
    small = (
        args.small_slide or args.code_root / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
    ).resolve()
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error("--size: WxH, e.g. 50000x37500")

    tmp_slides: Path | None = None
    gen_s = None
    try:
        if args.large_slide:
            large = args.large_slide.resolve()
        else:
            tmp_slides = Path(tempfile.mkdtemp(prefix="xmag-bench-slides-"))
            large = tmp_slides / f"synthetic-40x-{w}x{h}.svs"
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(args.code_root), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
            gen_s = generate_slide(large, (w, h), env, args.code_root)
        sha_s = [sha256_seconds(large) for _ in range(3)]

        modes = {"off": [False], "on": [True], "both": [False, True]}[args.engine_cache]
        repeats: list[Repeat] = []
        for rep in range(args.repeats):
            for cache in modes:
                print(f"run {rep + 1}/{args.repeats}, engine cache {'on' if cache else 'off'} ...",
                      flush=True)  # fmt: skip
                with service(args, large.parent, cache, args.keep) as (http, _):
                    small_runs = scenario_small(http, small, args.job_timeout)
                    large_runs = scenario_large(http, large, args.job_timeout)
                repeats.append(Repeat(cache, small_runs, large_runs))
                for j in (*small_runs, *large_runs):
                    print(f"  {j.job_id}: {j.state} {j.latency_s:.3f} s, cache_hit="
                          f"{j.result.get('cache_hit')}, hash={j.timings.get('hash')}, "
                          f"Δmetrics={ {k: round(v, 4) for k, v in j.metrics_delta.items()} }",
                          flush=True)  # fmt: skip
        report(repeats, large, gen_s, sha_s)
        if args.json:
            args.json.write_text(json.dumps([
                {"engine_cache": r.engine_cache,
                 "small": [j.__dict__ | {"result": {k: j.result.get(k) for k in (
                     "cache_hit", "created_at", "timings", "qc", "duration_s")}} for j in r.small],
                 "large": [j.__dict__ | {"result": {k: j.result.get(k) for k in (
                     "cache_hit", "created_at", "timings", "qc", "duration_s")}} for j in r.large]}
                for r in repeats], indent=1, default=str))  # fmt: skip
    finally:
        if tmp_slides is not None:
            if args.keep:
                print(f"kept {tmp_slides}", flush=True)
            else:
                shutil.rmtree(tmp_slides, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
