"""Viewer tile benchmark (a script, not a test): Deep Zoom tiles through the real HTTP endpoint.

On a generated pyramidal slide (tests/synthetic.py ``make_large_slide``, real tissue, 20x
layout, default 40,000 x 30,000 px), served by a real API process (``xmag serve --workers 0``) on
an embedded Redis, it replays what OpenSeadragon asks for during a pan/zoom sweep of a
1,400 x 900 viewport: at each Deep Zoom level from "whole slide fits" down to full resolution, the
viewport pans across the middle of the slide in steps of half a viewport, and every tile it shows
is fetched (as a browser does: at most ``--concurrency`` at once, six by default).

It prints, for the cold sweep (every tile decoded and encoded) and for the same sweep again
(answered from the server's encoded-tile cache, or 304 where the client sends If-None-Match):
tiles/s, p50 and p95 latency (ms), and bytes per tile.

    python benchmarks/bench_tiles.py [--workdir .bench] [--width 40000 --height 30000]

Run from the repository root; the slide is cached in --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# A script of the repository: its test fixtures (tests.synthetic, tests.service_helpers) import
# from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.embedded_redis import EmbeddedRedis
from tests.service_helpers import API_KEY, service_env, start_api
from tests.synthetic import cached_large_slide
from xmag.deepzoom import DEFAULT_TILE_PX, DeepZoomGenerator
from xmag.readers import open_slide

VIEWPORT_PX = (1400, 900)


def cached_slide(workdir: Path, width: int, height: int, seed: int) -> Path:
    return cached_large_slide(
        workdir, layout="20x", width=width, height=height, seed=seed, prefix="viewer"
    )


def sweep(path: Path) -> list[tuple[int, int, int]]:
    """The (level, col, row) a pan/zoom sweep of the viewport shows, in request order."""
    with open_slide(path) as reader:
        dz = DeepZoomGenerator(reader)
        levels = dz.level_dimensions
        tiles_of = dz.level_tiles
    vw, vh = VIEWPORT_PX
    first = next(i for i, (w, h) in enumerate(levels) if w >= vw or h >= vh)
    order: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for level in range(first, len(levels)):
        w, h = levels[level]
        cols, rows = tiles_of[level]
        # Pan along the slide's middle row band, half a viewport per step.
        y0 = max(0, h // 2 - vh // 2)
        for x0 in range(0, max(1, w - vw + 1), max(1, vw // 2)):
            c0, c1 = x0 // DEFAULT_TILE_PX, min(cols - 1, (x0 + vw) // DEFAULT_TILE_PX)
            r0, r1 = y0 // DEFAULT_TILE_PX, min(rows - 1, (y0 + vh) // DEFAULT_TILE_PX)
            for row in range(r0, r1 + 1):
                for col in range(c0, c1 + 1):
                    if (level, col, row) not in seen:
                        seen.add((level, col, row))
                        order.append((level, col, row))
            if len(order) > 4000:
                return order
    return order


def run(
    http: httpx.Client,
    base: str,
    tiles: list[tuple[int, int, int]],
    concurrency: int,
    etags: dict[tuple[int, int, int], str] | None = None,
) -> tuple[float, list[float], int, dict[tuple[int, int, int], str], dict[int, int]]:
    latencies: list[float] = []
    sizes = 0
    found: dict[tuple[int, int, int], str] = {}
    statuses: dict[int, int] = {}

    def fetch(t: tuple[int, int, int]) -> tuple[float, int, int, str]:
        level, col, row = t
        headers = {"If-None-Match": etags[t]} if etags else {}
        t0 = time.perf_counter()
        r = http.get(f"{base}/slide_files/{level}/{col}_{row}.jpeg", headers=headers)
        return time.perf_counter() - t0, r.status_code, len(r.content), r.headers.get("etag", "")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for t, (dt, status, size, etag) in zip(tiles, pool.map(fetch, tiles), strict=True):
            latencies.append(dt)
            sizes += size
            found[t] = etag
            statuses[status] = statuses.get(status, 0) + 1
    return time.perf_counter() - t0, latencies, sizes, found, statuses


def report(name: str, wall: float, latencies: list[float], size: int, statuses: dict) -> None:
    n = len(latencies)
    q = statistics.quantiles([x * 1000 for x in latencies], n=100)
    print(
        f"{name:<34} {n:5d} tiles  {n / wall:7.1f} tiles/s  p50 {q[49]:6.1f} ms  "
        f"p95 {q[94]:6.1f} ms  {size / n / 1024:5.1f} KiB/tile  statuses {statuses}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()
    slide = cached_slide(args.workdir, args.width, args.height, args.seed)
    tiles = sweep(slide)
    data = args.workdir / "bench-tiles-service"
    data.mkdir(parents=True, exist_ok=True)
    with EmbeddedRedis(data / "redis") as redis_server:
        env = service_env(
            redis_server.url, data, data / "no-model", XMAG_SLIDE_ROOTS=str(slide.parent)
        )
        api, url = start_api(env, data / "api.log")
        try:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            limits = httpx.Limits(max_connections=args.concurrency)
            with httpx.Client(headers=headers, timeout=120, limits=limits) as http:
                job = http.post(f"{url}/v1/jobs", json={"path": slide.name}).json()
                base = f"{url}/v1/jobs/{job['id']}"
                dzi = http.get(f"{base}/slide.dzi")
                assert dzi.status_code == 200, dzi.text
                print(
                    f"slide {slide.name}: {args.width} x {args.height} px; sweep of {len(tiles)} "
                    f"tiles over levels {tiles[0][0]}..{tiles[-1][0]}, {args.concurrency} at once"
                )
                wall, lat, size, etags, st = run(http, base, tiles, args.concurrency)
                report("cold (decode + encode)", wall, lat, size, st)
                wall, lat, size, _, st = run(http, base, tiles, args.concurrency)
                report("again (server tile cache)", wall, lat, size, st)
                wall, lat, size, _, st = run(http, base, tiles, args.concurrency, etags)
                report("again with If-None-Match (304)", wall, lat, max(size, 1), st)
        finally:
            api.stop()
    print(f"(tiles of {DEFAULT_TILE_PX} px + 1 px overlap, JPEG q80; viewport {VIEWPORT_PX})")


if __name__ == "__main__":
    main()
