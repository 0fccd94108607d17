"""Planning benchmark (a script, not a test): plan time against slide size.

Planning must cost what it needs (a thumbnail of a few megapixels from the smallest level that
covers it, then tissue, grid and QC on it), not what the slide holds. On generated 40x slides
(0.25 um/px; levels 1, 4, 16) of several widths (height = 3/4 width) it prints, per slide:

    width, tiles (kept / total at 224 px, 2.0 um/px), plan s (open + ``plan_slide``, best of
    --repeat), the thumbnail's size and pixels, the level and DCT scale it was decoded at, and the
    tissue mask's IoU against the generator's known mask.

    python benchmarks/bench_plan.py [--workdir /tmp/xmag-bench] [--widths 50000 100000 150000]

Slides are generated once into --workdir (``python -m tests.synthetic`` writes the same ones; the
150,000 px slide takes minutes and about 2 GB) and reused, with their known masks beside them
(``<slide>.mask.npy`` and ``<slide>.mask.txt``, the mask's level-0 px per pixel).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

# A script of the repository: its test fixtures (tests.synthetic) import from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synthetic import make_large_slide
from xmag.params import TilingParams
from xmag.plan import SlidePlan, plan_slide
from xmag.readers import open_slide


def cached_slide(workdir: Path, width: int, seed: int) -> tuple[Path, np.ndarray, float]:
    """The generated slide and its known mask (mask, level-0 px per mask px), made once."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"slide-{width}.svs"
    mask_npy, mask_txt = Path(f"{path}.mask.npy"), Path(f"{path}.mask.txt")
    if not (path.exists() and mask_npy.exists() and mask_txt.exists()):
        start = time.perf_counter()
        synth = make_large_slide(
            path, layout="40x", width=width, height=width * 3 // 4, seed=seed, workers=2
        )
        np.save(mask_npy, synth.mask)
        mask_txt.write_text(str(synth.mask_downsample))
        print(f"generated {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path, np.load(mask_npy), float(mask_txt.read_text())


def mask_iou(plan: SlidePlan, known: np.ndarray, known_ds: float) -> float:
    """IoU of the plan's tissue mask and the known one, compared on the known mask's grid."""
    w0, h0 = plan.slide.dimensions
    kh, kw = known.shape
    # Sample the plan mask at the level-0 centre of each known-mask pixel.
    ys = ((np.arange(kh) + 0.5) * known_ds / plan.tissue.downsample).astype(np.int64)
    xs = ((np.arange(kw) + 0.5) * known_ds / plan.tissue.downsample).astype(np.int64)
    mh, mw = plan.tissue.mask.shape
    inside_y, inside_x = ys < mh, xs < mw
    got = plan.tissue.mask[np.clip(ys, 0, mh - 1)][:, np.clip(xs, 0, mw - 1)]
    valid = inside_y[:, None] & inside_x[None, :]
    valid &= (((np.arange(kh) + 0.5) * known_ds) < h0)[:, None]
    valid &= (((np.arange(kw) + 0.5) * known_ds) < w0)[None, :]
    a, b = got & valid, known & valid
    return float((a & b).sum() / max(1, (a | b).sum()))


def time_plan(path: Path, repeat: int) -> tuple[float, SlidePlan, str]:
    best, plan, how = math.inf, None, ""
    params = TilingParams()
    for _ in range(repeat):
        start = time.perf_counter()
        with open_slide(path) as reader:
            plan = plan_slide(reader, params)
            took = time.perf_counter() - start
            level = max(lv.index for lv in reader.levels if lv.downsample <= plan.tissue.downsample)
            fast = reader._jpeg_level(level) is not None
            lv = reader.levels[level]
            reduce = 1
            while fast and reduce < 8 and lv.downsample * reduce * 2 <= plan.tissue.downsample:
                reduce *= 2
            how = f"L{level} 1/{reduce}" if fast else f"L{level} read_region"
        best = min(best, took)
    assert plan is not None
    return best, plan, how


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xmag-bench"))
    ap.add_argument("--widths", type=int, nargs="+", default=[50_000, 100_000, 150_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="plans per slide; the best is shown")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    rows = []
    for width in args.widths:
        path, known, known_ds = cached_slide(args.workdir, width, args.seed)
        took, plan, how = time_plan(path, args.repeat)
        th, tw = plan.tissue.thumbnail.shape[:2]
        rows.append(
            (
                width,
                plan.slide.dimensions[1],
                f"{plan.grid.n_kept}/{plan.grid.n_total}",
                took,
                f"{tw}x{th}",
                tw * th,
                how,
                mask_iou(plan, known, known_ds),
            )
        )
    head = (
        f"{'width':>8} {'height':>8} {'tiles kept/total':>17} {'plan s':>7} "
        f"{'thumbnail':>10} {'thumb px':>9} {'decoded':>10} {'mask IoU':>8}"
    )
    print(head)
    for w, h, tiles, took, size, px, how, iou in rows:
        print(f"{w:>8} {h:>8} {tiles:>17} {took:>7.3f} {size:>10} {px:>9} {how:>10} {iou:>8.3f}")
    if len(rows) >= 2:
        area = (rows[-1][0] / rows[0][0]) ** 2
        print(f"area x{area:.1f} -> plan time x{rows[-1][3] / rows[0][3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
