"""Tiling benchmark (a script, not a test): the core's tile reads vs the naive level-0 way.

On a generated 40x slide (0.25 um/px; levels 1, 4, 16: no native 5x level) of at least
40,000 x 30,000 px, planned at 2.0 um/px (224-px tiles), it measures over the same kept tiles in
the same run:

* core:  ``iter_tile_batches`` (level 1 at 1.0 um/px, 448-px reads halved, neighbours coalesced,
         reader threads);
* naive: per tile, a level-0 ``read_region`` of the tile's whole footprint (1,792 px at 40x)
         plus an area resize to 224 px, as WSInfer does; one thread (WSInfer's loop) and, for a
         fair comparison, as many threads as the core uses.

It prints tiles/s of each and the ratio, and the number of tiles at 5x (224 px at 2.0 um/px)
versus a 20x grid (224 px at 0.5 um/px) on the same tissue.

    python benchmarks/bench_tiling.py [--workdir .bench] [--width 40000 --height 30000]

The slide and its known mask are cached in --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

# A script of the repository: its test fixtures (tests.synthetic) import from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synthetic import SyntheticSlide, make_large_slide
from xmag.grid import TileGrid
from xmag.level import LevelChoice, choose_level
from xmag.params import TilingParams
from xmag.readers import open_slide
from xmag.readers.base import SlideReader
from xmag.tiles import iter_tile_batches


def cached_slide(
    workdir: Path, width: int, height: int, seed: int
) -> tuple[Path, np.ndarray, float]:
    """The generated slide and its known mask (mask, level-0 px per mask px), made once."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"synthetic-40x-{width}x{height}-seed{seed}.svs"
    mask_path = path.with_suffix(".mask.npz")
    if path.exists() and mask_path.exists():
        with np.load(mask_path) as z:
            print(f"reusing {path} ({path.stat().st_size / 1e6:.0f} MB)")
            return path, z["mask"], float(z["downsample"])
    start = time.perf_counter()
    synth: SyntheticSlide = make_large_slide(
        path, layout="40x", width=width, height=height, seed=seed
    )
    took = time.perf_counter() - start
    np.savez_compressed(mask_path, mask=synth.mask, downsample=synth.mask_downsample)
    print(
        f"generated {path} in {took:.1f} s ({path.stat().st_size / 1e6:.0f} MB, "
        f"tissue {synth.tissue_fraction:.3f})"
    )
    return path, synth.mask, synth.mask_downsample


def plan(
    reader: SlideReader, params: TilingParams, mask: np.ndarray, mask_ds: float
) -> tuple[TileGrid, LevelChoice, str]:
    """Plan with the core's ``plan_slide``; without it, a grid from the generator's known mask."""
    try:
        from xmag.plan import plan_slide  # type: ignore[import-not-found]
    except ImportError:
        plan_slide = None
    if plan_slide is not None:
        p = plan_slide(reader, params)
        return p.grid, p.level, "plan_slide (detected tissue)"
    mpp = float(reader.properties["openslide.mpp-x"])
    level = choose_level(reader, mpp, params.target_mpp)
    return mask_grid(reader.dimensions, mpp, params, mask, mask_ds), level, "known mask"


def mask_grid(
    dims: tuple[int, int], mpp: float, params: TilingParams, mask: np.ndarray, mask_ds: float
) -> TileGrid:
    """A grid whose tissue fractions come from the known mask (area-weighted by mask pixels)."""
    side = params.target_mpp * params.tile_px / mpp
    cols, rows = math.ceil(dims[0] / side), math.ceil(dims[1] / side)
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
    cell = np.stack([cc.ravel(), rr.ravel()], axis=1).astype(np.int32)
    xy = np.round(cell * side).astype(np.int64)
    # Integral image of the mask: fraction per tile (tile edges snapped to mask pixels).
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)
    h, w = mask.shape
    x0 = np.clip(np.round(xy[:, 0] / mask_ds).astype(int), 0, w)
    y0 = np.clip(np.round(xy[:, 1] / mask_ds).astype(int), 0, h)
    x1 = np.clip(np.round((xy[:, 0] + side) / mask_ds).astype(int), 0, w)
    y1 = np.clip(np.round((xy[:, 1] + side) / mask_ds).astype(int), 0, h)
    area = (side / mask_ds) ** 2
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    frac = (covered / area).astype(np.float32)
    keep = frac >= params.tissue_threshold
    return TileGrid(
        params.tile_px, params.stride_px, params.target_mpp, side, side, cols, rows,
        cell, xy, frac, keep, params.tissue_threshold,
    )  # fmt: skip


def bench_core(
    path: Path, grid: TileGrid, level: LevelChoice, indices: np.ndarray, workers: int, batch: int
) -> float:
    with open_slide(path) as reader:
        start = time.perf_counter()
        n = 0
        for b in iter_tile_batches(
            reader, grid, level, indices=indices, batch_size=batch, workers=workers
        ):
            n += len(b)
        took = time.perf_counter() - start
    assert n == len(indices)
    return n / took


def bench_naive(path: Path, grid: TileGrid, indices: np.ndarray, workers: int) -> float:
    side = round(grid.level0_tile)
    tile_px = grid.tile_px

    def one(index: int) -> np.ndarray:
        x, y = (int(v) for v in grid.level0_xy[index])
        region = reader.read_region((x, y), 0, (side, side))
        return cv2.resize(region, (tile_px, tile_px), interpolation=cv2.INTER_AREA)

    with open_slide(path) as reader:
        start = time.perf_counter()
        if workers == 1:
            for i in indices:
                one(int(i))
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, (int(i) for i in indices)):
                    pass
        took = time.perf_counter() - start
    return len(indices) / took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(".bench"))
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4, help="reader threads (core, naive-parallel)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-sample", type=int, default=500, help="max tiles for the naive pass")
    args = ap.parse_args(argv)
    if args.width < 40_000 or args.height < 30_000:
        print("note: below the 40,000 x 30,000 px the benchmark is specified for")

    path, mask, mask_ds = cached_slide(args.workdir, args.width, args.height, args.seed)
    params = TilingParams(tile_px=224, target_mpp=2.0)
    with open_slide(path) as reader:
        grid, level, how = plan(reader, params, mask, mask_ds)
        grid20, _, _ = plan(reader, TilingParams(tile_px=224, target_mpp=0.5), mask, mask_ds)
    kept = grid.kept_indices()
    print(
        f"slide {args.width}x{args.height} px at 0.25 um/px; plan by {how}: level {level.level} "
        f"({level.level_mpp:g} um/px), resample factor {level.resample_factor:g}, "
        f"read {level.read_px(grid.tile_px)} px -> {grid.tile_px} px"
    )
    print(f"tiles at 5x (224 px at 2.0 um/px): {grid.n_kept} kept of {grid.n_total}")
    print(f"tiles at 20x (224 px at 0.5 um/px): {grid20.n_kept} kept of {grid20.n_total}")
    print(f"20x / 5x kept tiles: {grid20.n_kept / max(1, grid.n_kept):.1f}x")

    sample = kept
    if len(kept) > args.naive_sample:
        step = len(kept) / args.naive_sample
        sample = kept[(np.arange(args.naive_sample) * step).astype(int)]
    note = "" if len(sample) == len(kept) else f" (a sample of {len(sample)} of {len(kept)})"
    core = bench_core(path, grid, level, kept, args.workers, args.batch_size)
    core_sample = bench_core(path, grid, level, sample, args.workers, args.batch_size)
    naive1 = bench_naive(path, grid, sample, 1)
    naive_n = bench_naive(path, grid, sample, args.workers)
    w = args.workers
    print(f"core  iter_tile_batches, {w} threads, all {len(kept)} kept: {core:.1f} tiles/s")
    print(
        f"core  iter_tile_batches, {w} threads, the naive pass's tiles: {core_sample:.1f} tiles/s"
    )
    print(f"naive level-0 read + resize, 1 thread{note}: {naive1:.1f} tiles/s")
    print(f"naive level-0 read + resize, {w} threads{note}: {naive_n:.1f} tiles/s")
    print(f"ratio core / naive (same tiles): {core_sample / naive1:.1f}x vs 1 thread, "
          f"{core_sample / naive_n:.1f}x vs {args.workers} threads")  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
