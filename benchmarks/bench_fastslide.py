"""fastslide vs OpenSlide on an Aperio slide (a script, not a test): read speed and pixel equality.

On a generated 40x Aperio slide (tests/synthetic.py ``make_large_slide``, real tissue, levels 1, 4,
16; default 50,000 x 37,500 px), it reads the same random 448 x 448 px regions of level 1 (10x)
with OpenSlide and with fastslide, straight through each library (level-0 coordinates for
OpenSlide, level-native for fastslide, fastslide's tile cache off as OpenSlide's is small) and
through xmag's readers (``open_slide(path, prefer=...)``), one thread and two threads sharing
one handle, interleaved A/B/A/B so load from other processes falls on both. Each round uses
fresh regions, so neither library reads from its cache.

fastslide decodes the tiles of one read on its own thread pool, so it also prints tiles per CPU
second of the process (all threads), the fair figure on a machine shared with other work.

It prints tiles/s per library, thread count and round, the median per configuration, and the
pixel difference (mean and max absolute, over RGB) of fastslide against OpenSlide on every
region read (levels 0, 1 and 2), plus whether concurrent reads of one handle equal serial ones.

    python benchmarks/bench_fastslide.py [--slide .bench/...svs] [--regions 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastslide
import numpy as np
import openslide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synthetic import cached_large_slide
from xmag.readers import SlideReader, open_slide

REGION_PX = 448


def cached_slide(workdir: Path, width: int, height: int, seed: int) -> Path:
    return cached_large_slide(workdir, layout="40x", width=width, height=height, seed=seed)


def regions(
    level_size: tuple[int, int], ds: float, n: int, seed: int
) -> list[tuple[int, int, int, int]]:
    """n random (level0_x, level0_y, level_x, level_y) tops of in-bounds regions."""
    rng = np.random.default_rng(seed)
    w, h = level_size
    xs = rng.integers(0, w - REGION_PX, n)
    ys = rng.integers(0, h - REGION_PX, n)
    return [(int(x * ds), int(y * ds), int(x), int(y)) for x, y in zip(xs, ys, strict=True)]


def read_os(slide: openslide.OpenSlide, level: int, r: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(slide.read_region((r[0], r[1]), level, (REGION_PX, REGION_PX)))[..., :3]


def read_fs(slide: fastslide.FastSlide, level: int, r: tuple[int, int, int, int]) -> np.ndarray:
    img = slide.read_region((r[2], r[3]), level, (REGION_PX, REGION_PX))
    return np.asarray(img.numpy())[..., :3]


def read_xmag(reader: SlideReader, level: int, r: tuple[int, int, int, int]) -> np.ndarray:
    return reader.read_region((r[0], r[1]), level, (REGION_PX, REGION_PX))


def rate(read, slide, level: int, rs: list, threads: int) -> tuple[float, float]:
    """(tiles per wall second, tiles per CPU second of the whole process, all its threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        for r in rs:
            read(slide, level, r)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: read(slide, level, r), rs))
    return len(rs) / (time.perf_counter() - t0), len(rs) / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path(".bench/fastslide"))
    ap.add_argument("--width", type=int, default=50_000)
    ap.add_argument("--height", type=int, default=37_500)
    ap.add_argument("--regions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--level", type=int, default=1)
    args = ap.parse_args()
    path = args.slide or cached_slide(args.workdir, args.width, args.height, 0)
    print(
        f"slide {path}; fastslide {fastslide.__version__}; "
        f"openslide {openslide.__library_version__}"
    )
    print(f"load before: {os.getloadavg()}")
    os_slide = openslide.OpenSlide(str(path))
    fs_slide = fastslide.FastSlide.from_file_path(str(path), cache=None)
    xmag_os = open_slide(path, prefer="")
    xmag_fs = open_slide(path, prefer="fastslide")
    assert (xmag_os.name, xmag_fs.name) == ("openslide", "fastslide")
    assert tuple(os_slide.level_dimensions) == tuple(fs_slide.level_dimensions), "levels differ"
    level = args.level
    ds = float(os_slide.level_downsamples[level])
    size = os_slide.level_dimensions[level]
    print(f"level {level}: {size[0]} x {size[1]} px, downsample {ds:g}")
    results: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    seed = 1
    for rnd in range(args.rounds):
        for threads in (1, 2):
            for name, read, slide in (
                ("openslide", read_os, os_slide),
                ("fastslide", read_fs, fs_slide),
                ("xmag-openslide", read_xmag, xmag_os),
                ("xmag-fastslide", read_xmag, xmag_fs),
            ):
                rs = regions(size, ds, args.regions, seed)
                seed += 1
                tps, tpc = rate(read, slide, level, rs, threads)
                results.setdefault((name, threads), []).append(tps)
                cpu.setdefault((name, threads), []).append(tpc)
                print(
                    f"round {rnd} {name:14s} {threads} thread(s): {tps:7.1f} tiles/s, "
                    f"{tpc:7.1f} tiles/CPU-s"
                )
    print(f"load after: {os.getloadavg()}")
    for prefix in ("", "xmag-"):
        for threads in (1, 2):
            o = statistics.median(results[(f"{prefix}openslide", threads)])
            f = statistics.median(results[(f"{prefix}fastslide", threads)])
            oc = statistics.median(cpu[(f"{prefix}openslide", threads)])
            fc = statistics.median(cpu[(f"{prefix}fastslide", threads)])
            print(
                f"median {prefix}{threads} thread(s): openslide {o:.1f}, fastslide {f:.1f} "
                f"tiles/s, ratio {f / o:.2f}; per CPU-s {oc:.1f} vs {fc:.1f}, ratio {fc / oc:.2f}"
            )

    for lv in range(os_slide.level_count):
        lds = float(os_slide.level_downsamples[lv])
        diffs = []
        for r in regions(os_slide.level_dimensions[lv], lds, 50, 1000 + lv):
            a = read_os(os_slide, lv, r).astype(np.int16)
            b = read_fs(fs_slide, lv, r).astype(np.int16)
            diffs.append(np.abs(a - b))
        d = np.stack(diffs)
        print(
            f"pixels level {lv}: mean abs diff {d.mean():.3f}, max {d.max()}, "
            f"fraction differing {(d > 0).mean():.4f}"
        )

    rs = regions(size, ds, 64, 999)
    serial = [read_fs(fs_slide, level, r).copy() for r in rs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda r: read_fs(fs_slide, level, r).copy(), rs * 4))
    same = all(np.array_equal(c, serial[i % len(rs)]) for i, c in enumerate(concurrent))
    print(f"fastslide 4 threads x 256 reads on one handle equal serial reads: {same}")

    # A real Aperio slide (photometric RGB JPEG tiles) for comparison with the generated one
    # (YCbCr-tagged, 4:2:0): how far fastslide's decode is from OpenSlide's on each.
    real = Path(__file__).resolve().parents[1] / "tests/data/slides/CMU-1-Small-Region.svs"
    with openslide.OpenSlide(str(real)) as a, fastslide.FastSlide.from_file_path(str(real)) as b:
        rs = regions(a.level_dimensions[0], 1.0, 30, 7)
        d = np.stack([np.abs(read_os(a, 0, r).astype(np.int16) - read_fs(b, 0, r)) for r in rs])
    print(f"pixels {real.name}: mean abs diff {d.mean():.3f}, max {d.max()}")


if __name__ == "__main__":
    main()
