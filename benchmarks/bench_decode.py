"""Decode-path benchmark (a script, not a test): 5x tiles read today's way vs decoded from JPEG
tiles at 1/n scale.

On generated slides (made once in --workdir, git-ignored ``.bench/``): a 40x slide (0.25 um/px;
levels 1, 4, 16, no native 5x level) and a 20x slide (0.5 um/px; its level 1 is 5x), planned at
2.0 um/px with 224-px tiles, it reads the same run of consecutive kept tiles with
``iter_tile_batches`` and prints tiles/s and the pixel difference from today's path:

* region          today's path: level ``read_region`` (row runs coalesced) + area resize;
* jpeg-dct-1/2    40x: level 1 (1 um/px) JPEG tiles decoded at 1/2 (no resize left);
* L0 jpeg-dct-1/8 40x: level 0 (0.25 um/px) JPEG tiles decoded at 1/8, as a single-level 40x
                  slide is read (its reference: level 0 1,792-px regions + area resize);
* jpeg-dct-1/1    20x: the native 5x level's JPEG tiles decoded at full scale (no adapter copies;
                  what ``decode="auto"`` chooses there). The 20x slide is half the 40x one's
                  size rounded down to a multiple of 64 px, so its levels' downsamples are whole
                  numbers as a scanner's usually are; with a fractional one (18,750 / 4 =
                  4,687.5 px) both rows would measure ``read_region``.

Each configuration is measured ``--reps`` times, interleaved (A/B/A/B) so other load on the
machine spreads over all of them, each time on a freshly opened reader (cold decode cache); the
table gives the best and median tiles/s and the load average.

    python benchmarks/bench_decode.py [--workdir .bench/decode] [--tiles 250] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synthetic import LayoutName, cached_large_slide
from xmag.level import REGION_DECODE, LevelChoice, choose_decode
from xmag.params import TilingParams
from xmag.plan import SlidePlan, plan_slide
from xmag.readers import open_slide
from xmag.tiles import iter_tile_batches


def cached_slide(workdir: Path, layout: LayoutName, width: int, height: int) -> Path:
    return cached_large_slide(workdir, layout=layout, width=width, height=height, seed=1)


def read_all(path: Path, plan: SlidePlan, level: LevelChoice, idx: np.ndarray, threads: int):
    """(seconds, pixels) of reading ``idx`` on a freshly opened reader."""
    with open_slide(path) as reader:
        reader.decode_scales(level.level)  # open the JPEG level outside the timing
        t0 = time.perf_counter()
        chunks = [
            b.pixels
            for b in iter_tile_batches(reader, plan.grid, level, indices=idx, workers=threads)
        ]
        return time.perf_counter() - t0, np.concatenate(chunks)


def diff_stats(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    per_tile = d.reshape(d.shape[0], -1).mean(axis=1)
    return (
        f"mean {d.mean():.2f}  p99 {np.percentile(d, 99):.0f}  max {d.max()}  "
        f"worst-tile mean {per_tile.max():.2f}"
    )


def bench_slide(
    path: Path,
    configs: dict[str, LevelChoice],
    plan: SlidePlan,
    args: argparse.Namespace,
    *,
    tiles: int,
    threads_list: list[int],
    reps: int,
) -> None:
    kept = plan.grid.kept_indices()
    start = max(0, kept.size // 2 - tiles // 2)
    idx = kept[start : start + tiles]  # consecutive kept tiles: rows as the engine reads
    print(f"\n{path.name}: {idx.size} consecutive kept tiles of {kept.size}")
    for threads in threads_list:
        times: dict[str, list[float]] = {name: [] for name in configs}
        pixels: dict[str, np.ndarray] = {}
        loads = []
        for _ in range(reps):
            for name, level in configs.items():
                took, px = read_all(path, plan, level, idx, threads)
                times[name].append(idx.size / took)
                pixels.setdefault(name, px)
                loads.append(os.getloadavg()[0])
        first = next(iter(configs))  # the reference configuration
        base = statistics.median(times[first])
        print(f"  {threads} thread(s), load avg {min(loads):.1f}-{max(loads):.1f}")
        for name, rates in times.items():
            diff = diff_stats(pixels[name], pixels[first]) if name != first else "(reference)"
            med = statistics.median(rates)
            print(
                f"    {name:<17} best {max(rates):7.1f}  median {med:7.1f} tiles/s "
                f"({med / base:4.2f}x {first})  vs {first}: {diff}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(".bench/decode"))
    ap.add_argument("--width", type=int, default=50_000, help="40x slide width, px")
    ap.add_argument("--height", type=int, default=37_500, help="40x slide height, px")
    ap.add_argument("--tiles", type=int, default=250)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--level0-tiles", type=int, default=40, help="tiles of the level-0 rows")
    ap.add_argument("--skip-20x", action="store_true")
    args = ap.parse_args()

    params = TilingParams()
    p40 = cached_slide(args.workdir, "40x", args.width, args.height)
    with open_slide(p40) as reader:
        plan = plan_slide(reader, params)
        level0 = LevelChoice(0, 1.0, plan.level.level_mpp / plan.level.level_downsample, 2.0, 8.0)
        level0_fast = choose_decode(reader, level0, params.tile_px, "auto")
    configs = {
        "region": dataclasses.replace(plan.level, decode=REGION_DECODE),
        plan.level.decode: plan.level,
    }
    run = {"tiles": args.tiles, "threads_list": args.threads, "reps": args.reps}
    bench_slide(p40, configs, plan, args, **run)  # type: ignore[arg-type]
    # Level 0 read whole (a single-level 40x slide): today's reads are slow, so fewer tiles.
    configs = {"L0 region": level0, f"L0 {level0_fast.decode}": level0_fast}
    bench_slide(p40, configs, plan, args, tiles=args.level0_tiles, threads_list=[1], reps=1)

    if not args.skip_20x:
        # Whole downsamples (levels at 1/4, 1/16): sides a multiple of 64 px.
        w20, h20 = args.width // 2 // 64 * 64, args.height // 2 // 64 * 64
        p20 = cached_slide(args.workdir, "20x", w20, h20)
        with open_slide(p20) as reader:
            plan = plan_slide(reader, params)
        configs = {"region": dataclasses.replace(plan.level, decode=REGION_DECODE)}
        configs[plan.level.decode] = plan.level
        bench_slide(p20, configs, plan, args, **run)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
