"""Slides-in-flight benchmark (not a test): a queue of large slides, one at a time vs overlapped.

Runs the same batch of slides through

* ``xmag embed --no-cache`` (one process, every slide hashed and computed), and
* the service with one worker (``xmag worker`` against an embedded Redis; the jobs are queued
  before the worker starts, so it sees a full queue: throughput, not one slide's latency),

with ``XMAG_SLIDES_IN_FLIGHT`` = each of ``--in-flight`` (1 is the old one-slide-at-a-time
behaviour), ``--repeats`` times, and prints per configuration the medians of:

* slides/min over the batch span (first slide started -> last result written; the model load
  is outside it);
* model busy: the encoder's seconds (``timings.model`` of every result) / the span;
* vs model alone: slides/min / the model-only rate (slides / the median summed ``timings.model``
  of the one-at-a-time runs: what the model alone sustains on this machine);
* peak RSS of the process that embeds (``ru_maxrss`` of ``xmag embed``; ``VmHWM`` of the worker).

``--accelerator-ms-per-tile MS`` replaces the encoder by a simulated accelerator (each batch
sleeps MS per tile, using no host CPU, and returns zero embeddings): on a CPU-only machine this is
how the overlap shows what it does for a GPU, whose compute does not compete with hashing,
planning and decoding for the host's cores. Everything else (reads, hashing, planning, heads,
writes, the worker's job state) is real.

Slides: ``--sources`` generated once (``python -m tests.synthetic OUT --layout 40x --width 50000
--height 37500 --seed N``) are copied round-robin into ``--slides-dir`` as ``--count`` files, each
with a few distinct bytes appended after the TIFF data (ignored by readers), so every copy has its
own sha256 and result key: no copy is a cache hit in the service, and each is hashed in full.

    python benchmarks/bench_inflight.py --sources /tmp/s00.svs /tmp/s01.svs --count 20 \\
        --slides-dir /tmp/inflight-batch --model models/demo --in-flight 1 2 --repeats 3

The machine may be shared: the spread (min-max) is printed next to each median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
FINAL = {"succeeded", "failed", "canceled", "dead"}


@dataclass
class Run:
    path: str  # "cli" or "service"
    in_flight: int
    slides: int
    ok: int
    span_s: float
    model_s: float
    peak_rss_mb: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def per_min(self) -> float:
        return 60.0 * self.slides / self.span_s

    @property
    def busy(self) -> float:
        return self.model_s / self.span_s


def make_batch(sources: list[Path], count: int, out: Path) -> list[Path]:
    """``count`` copies of ``sources`` (round-robin) with distinct tails; kept between runs."""
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(count):
        dst = out / f"slide-{i:02d}.svs"
        if not dst.exists():
            tmp = dst.with_suffix(".part")
            shutil.copyfile(sources[i % len(sources)], tmp)
            with open(tmp, "ab") as fh:
                fh.write(f"\0xmag-bench-inflight-{i:04d}\0".encode())
            tmp.rename(dst)
        slides.append(dst)
    return slides


def _xmag(accelerator_ms: float = 0.0) -> list[str]:
    if accelerator_ms > 0:  # this file as the CLI, with the encoder replaced (see _child)
        return [sys.executable, str(Path(__file__).resolve()), "--child", str(accelerator_ms)]
    script = Path(sys.executable).parent / "xmag"
    return [str(script)] if script.exists() else [sys.executable, "-m", "xmag.cli"]


def _child(accelerator_ms: float, argv: list[str]) -> None:
    """``xmag ARGV`` with a simulated accelerator: each batch sleeps ``accelerator_ms`` per tile
    (no host CPU, like a GPU's compute) and returns zero embeddings; reads, preprocessing,
    hashing, planning, heads and writes are the real ones."""
    import numpy as np

    from xmag.cli import main as xmag_main
    from xmag.engine import Engine

    def encode(self: Engine, batch: np.ndarray) -> np.ndarray:
        time.sleep(accelerator_ms * batch.shape[0] / 1000)
        self.tiles_embedded += batch.shape[0]
        return np.zeros((batch.shape[0], self.package.card.outputs.embedding.dim), np.float32)

    Engine.encode = encode  # type: ignore[method-assign]
    sys.argv = ["xmag", *argv]
    xmag_main()


#: ``XMAG_*`` variables every child gets (``--reader-nice``); the caller's own are not passed.
CHILD_ENV: dict[str, str] = {}


def _env(in_flight: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_") and k != "REDIS_URL"}
    env.update(CHILD_ENV)
    env.update(XMAG_SLIDES_IN_FLIGHT=str(in_flight), PYTHONPATH=str(HERE), **extra)
    return env


def _sum_stages(results: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in (r.get("timings") or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def run_cli(slides: list[Path], model: Path, in_flight: int, accelerator_ms: float) -> Run:
    out = Path(tempfile.mkdtemp(prefix="xmag-bench-inflight-cli-"))
    try:
        cmd = [*_xmag(accelerator_ms), "embed", *map(str, slides), "--model", str(model),
               "--out", str(out), "--no-cache", "--json"]  # fmt: skip
        with open(out / "stdout.json", "wb") as so:
            proc = subprocess.Popen(cmd, env=_env(in_flight), cwd=HERE, stdout=so,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        report = json.loads((out / "stdout.json").read_text())
        results = [o["result"] for o in report["outcomes"] if o["ok"]]
        ends = [datetime.fromisoformat(r["created_at"]).timestamp() for r in results]
        starts = [e - float(r["duration_s"]) for e, r in zip(ends, results, strict=True)]
        return Run(
            "cli",
            in_flight,
            len(slides),
            len(results),
            max(ends) - min(starts),
            sum(float(r["timings"]["model"]) for r in results),
            usage.ru_maxrss / 1024,
            _sum_stages(results),
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_service(
    slides: list[Path], model: Path, in_flight: int, timeout_s: float, accelerator_ms: float
) -> Run:
    from service.embedded_redis import EmbeddedRedis
    from service.queue import declare_actors, make_broker, redis_client
    from service.settings import ServiceSettings
    from service.store import JobSpec, JobStore
    from xmag.store import ResultStore

    data = Path(tempfile.mkdtemp(prefix="xmag-bench-inflight-svc-"))
    redis_server = EmbeddedRedis(data / "redis").start()
    worker = None
    try:
        url = redis_server.url
        extra = {
            "XMAG_DATA_DIR": str(data),
            "XMAG_MODEL_DIR": str(model.resolve()),
            "XMAG_SLIDE_ROOTS": str(slides[0].parent.resolve()),
            "XMAG_API_KEYS": "bench-key",
            "XMAG_LOG_LEVEL": "WARNING",
            "XMAG_JOB_TIME_LIMIT_S": "3600",
            "REDIS_URL": url,
        }
        settings = ServiceSettings(_env_file=None, data_dir=data)
        store = JobStore(redis_client(url), settings.namespace)
        broker = make_broker(settings, url)
        actors = declare_actors(broker, settings)
        ids = []
        for p in slides:  # the whole queue first: the worker sees a backlog
            created = store.create_job(JobSpec(slide_kind="path", slide_path=str(p.resolve())))
            actors.slides["normal"].send(created.id)
            ids.append(created.id)
        broker.close()
        log = open(data / "worker.log", "wb")  # noqa: SIM115 - closed below
        worker = subprocess.Popen([*_xmag(accelerator_ms), "worker"], cwd=HERE,
                                  env=_env(in_flight, **extra), stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        peak = 0.0
        while True:
            records = store.get_many(ids)
            with contextlib.suppress(OSError):
                peak = max(peak, _vm_hwm_mb(worker.pid))
            if all(r.state.value in FINAL for r in records):
                break
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited {worker.returncode}; see {data}/worker.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not final after {timeout_s:.0f} s")
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            peak = max(peak, _vm_hwm_mb(worker.pid))
        results_store = ResultStore(settings.results_store)
        ok = [r for r in records if r.state.value == "succeeded"]
        results = []
        for r in ok:
            stored = results_store.load(r.result_key)
            if stored is not None:
                results.append(stored.model_dump(mode="json"))
        span = (max(r.finished_ms for r in ok) - min(r.started_ms for r in ok)) / 1000
        return Run(
            "service",
            in_flight,
            len(slides),
            len(ok),
            span,
            sum(float(r["timings"]["model"]) for r in results),
            peak,
            _sum_stages(results),
        )
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        redis_server.stop()
        shutil.rmtree(data, ignore_errors=True)


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(runs: list[Run]) -> None:
    alone = {
        path: _med([r.model_s / r.slides for r in runs if r.path == path and r.in_flight == 1])
        for path in {r.path for r in runs}
        if any(r.path == path and r.in_flight == 1 for r in runs)
    }
    print(
        "| path | in flight | runs | slides ok | slides/min (min-max) | model busy (min-max) "
        "| vs model alone | peak RSS MB (max) | stage s/slide: hash, plan, read_wait, model, "
        "write |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted({(r.path, r.in_flight) for r in runs}):
        group = [r for r in runs if (r.path, r.in_flight) == key]
        rate = [r.per_min for r in group]
        busy = [r.busy for r in group]
        ref = alone.get(key[0])
        vs = f"{_med(rate) / (60.0 / ref):.2f}" if ref else "-"
        stages = ", ".join(
            f"{_med([r.stages.get(s, 0.0) / r.slides for r in group]):.2f}"
            for s in ("hash", "plan", "read_wait", "model", "write")
        )
        print(
            f"| {key[0]} | {key[1]} | {len(group)} | {min(r.ok for r in group)}/{group[0].slides} "
            f"| {_med(rate):.2f} ({min(rate):.2f}-{max(rate):.2f}) "
            f"| {_med(busy):.2f} ({min(busy):.2f}-{max(busy):.2f}) | {vs} "
            f"| {max(r.peak_rss_mb for r in group):.0f} | {stages} |"
        )
    for path, ref in sorted(alone.items()):
        print(f"model alone ({path}, one at a time): {ref:.2f} s/slide = {60 / ref:.2f} slides/min")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(float(sys.argv[2]), sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=Path, nargs="+", required=True, help="generated slides")
    ap.add_argument("--count", type=int, default=20, help="slides in the batch")
    ap.add_argument("--slides-dir", type=Path, default=Path("/tmp/xmag-bench-inflight-slides"))
    ap.add_argument("--model", type=Path, default=HERE / "models" / "demo")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", choices=["cli", "service"], default=["cli", "service"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per service run, s")
    ap.add_argument(
        "--accelerator-ms-per-tile",
        type=float,
        default=0.0,
        help="replace the encoder by a simulated accelerator: sleep this long per tile (0: the "
        "real model on this CPU)",
    )
    ap.add_argument("--json-out", type=Path, help="append every run as a JSON line here")
    ap.add_argument("--reader-nice", type=int, default=None, help="XMAG_READER_NICE for every run")
    args = ap.parse_args()
    if args.reader_nice is not None:
        CHILD_ENV["XMAG_READER_NICE"] = str(args.reader_nice)
    slides = make_batch(args.sources, args.count, args.slides_dir)
    runs: list[Run] = []
    for rep in range(args.repeats):
        for path in args.paths:
            for k in args.in_flight:  # interleaved, so load changes hit every configuration
                t0 = time.perf_counter()
                acc = args.accelerator_ms_per_tile
                run = (
                    run_cli(slides, args.model, k, acc)
                    if path == "cli"
                    else run_service(slides, args.model, k, args.timeout, acc)
                )
                runs.append(run)
                print(
                    f"repeat {rep + 1} {path} in_flight={k}: {run.ok}/{run.slides} ok, "
                    f"{run.per_min:.2f} slides/min, model busy {run.busy:.2f}, "
                    f"peak {run.peak_rss_mb:.0f} MB ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                if args.json_out:
                    with open(args.json_out, "a") as fh:
                        row = {**run.__dict__, "accelerator_ms_per_tile": acc, "at": time.time()}
                        fh.write(json.dumps(row) + "\n")
    print()
    report(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
