"""Load benchmark (not a test): a few hundred job submissions at once on loopback.

Starts ``python -m service serve`` (embedded Redis, the API, ``--workers`` worker processes) in a
temporary data folder, submits ``--jobs`` jobs by reference from ``--concurrency`` client threads at
once, and prints the submit latency (p50, p99, max), the submission rate, and whether every job
reached a final state (with the time the workers took to drain the queue).

    python benchmarks/bench_load.py --model models/default --jobs 300 --workers 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "tests" / "data" / "slides"
FINAL = {"succeeded", "failed", "canceled", "dead"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument(
        "--slide",
        type=Path,
        action="append",
        help="small slides submitted in turn, all in one folder (default: two real slides that "
        "succeed with the default model: OS-2-ndpi.ome.tif, 1 tile; CMU-1-Small-Region.svs, 3)",
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    args = parser.parse_args()
    slides = args.slide or [SLIDES / "OS-2-ndpi.ome.tif", SLIDES / "CMU-1-Small-Region.svs"]
    if len({p.resolve().parent for p in slides}) != 1:
        raise SystemExit("--slide: give slides from one folder (it becomes XMAG_SLIDE_ROOTS)")

    key = "bench_" + secrets.token_urlsafe(24)
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="xmag-bench-load-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(
        XMAG_API_KEYS=key,
        XMAG_SLIDE_ROOTS=str(slides[0].resolve().parent),
        XMAG_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--data-dir", str(data),
           "--model", str(args.model), "--workers", str(args.workers)]  # fmt: skip
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit(f"service not ready; see {data / 'serve.log'}")

        limits = httpx.Limits(max_connections=args.concurrency)
        with httpx.Client(base_url=base, headers=headers, timeout=60, limits=limits) as http:

            def submit(i: int) -> tuple[float, str, int]:
                t0 = time.perf_counter()
                r = http.post(
                    "/v1/jobs",
                    json={"path": slides[i % len(slides)].name},
                    headers={"Idempotency-Key": f"bench-{i}"},
                )
                return time.perf_counter() - t0, r.json().get("id", ""), r.status_code

            t_start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(submit, range(args.jobs)))
            submit_s = time.perf_counter() - t_start
            latencies = [r[0] * 1000 for r in results]
            accepted = [r[1] for r in results if r[2] == 202]

            t_drain = time.perf_counter()
            states: dict[str, str] = {}
            while time.perf_counter() - t_drain < args.drain_timeout:
                pending = [j for j in accepted if states.get(j) not in FINAL]
                if not pending:
                    break
                for job_id in pending[:200]:
                    states[job_id] = http.get(f"/v1/jobs/{job_id}").json()["state"]
                time.sleep(0.5)
            drain_s = time.perf_counter() - t_drain

        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        names = ", ".join(p.name for p in slides)
        print(f"slides                {names}")
        print(f"jobs submitted        {args.jobs} from {args.concurrency} threads at once")
        print(f"accepted (202)        {len(accepted)}")
        print(f"submit latency p50    {statistics.median(latencies):.1f} ms")
        print(f"submit latency p99    {_percentile(latencies, 0.99):.1f} ms")
        print(f"submit latency max    {max(latencies):.1f} ms")
        print(f"submission rate       {args.jobs / submit_s:.0f} jobs/s ({submit_s:.2f} s)")
        print(f"final states          {counts}")
        every = (
            len(accepted) == args.jobs
            and all(s in FINAL for s in states.values())
            and len(states) == len(accepted)
        )
        print(
            f"every job final       {every} "
            f"(drained in {drain_s:.1f} s by {args.workers} worker(s))"
        )
        return 0 if every else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
