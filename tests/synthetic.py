"""Large synthetic slides built from real tissue, written as pyramidal Aperio TIFFs.

The real slides in ``tests/data/slides`` are a few thousand pixels a side; scale (memory,
throughput, thousands of tiles) needs slides of tens of thousands. ``make_large_slide`` writes one
that OpenSlide opens as Aperio SVS, with tissue cut from a real H&E scan (CMU-1-Small-Region.svs)
placed inside a known mask of a few smooth random blobs, on a slightly noisy near-white background,
with an optional pen stroke outside the mask. The mask is returned, so tests can check tile counts
against it.

Layouts (level-0 um/px and pyramid downsamples):

    "40x"  0.25 um/px, levels 1, 4, 16  (0.25, 1.0, 4.0 um/px): no native 5x level
    "20x"  0.50 um/px, levels 1, 4, 16  (0.5, 2.0, 8.0 um/px): a native 5x level

Memory stays bounded: pixels are rendered in blocks of at most 16 tiles of 256 px, straight into
the TIFF writer, from textures at each level's mpp (never a whole level, nor a whole row of tiles).
Every level is rendered from the same source tissue, mask and coordinates at its own mpp, so a
region of level 1 matches the same region of level 0 area-downsampled (up to resampling and JPEG
error).

A test and benchmark fixture, not part of the library: it lives beside the tests whose real
slide it cuts tissue from. CLI, from the repository root:
``python -m tests.synthetic OUT --layout 40x --width 40000 --height 30000``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import openslide
import tifffile

from xmag.errors import XmagUsageError

__all__ = [
    "DEFAULT_TISSUE_SOURCE",
    "LAYOUTS",
    "SlideLayout",
    "SyntheticSlide",
    "main",
    "make_large_slide",
]

LayoutName = Literal["20x", "40x"]

DEFAULT_TISSUE_SOURCE = (
    Path(__file__).resolve().parent / "data" / "slides" / "CMU-1-Small-Region.svs"
)
TIFF_TILE_PX = 256  # internal JPEG tile side, as Aperio scanners write
MASK_MAX_PX = 2048  # longer side of the known mask; its downsample is a power of two >= 16
MIN_PIECE_UM2 = 0.25e6  # mask pieces (and holes) under 0.25 mm2 are removed: detectors drop debris
MOSAIC_BLOCK_UM = 96.0  # side of one tissue block cut from the source, in um
MOSAIC_BLOCKS = 8  # the tissue texture is MOSAIC_BLOCKS x MOSAIC_BLOCKS blocks, then repeats
DENSE_BLOCK_FRACTION = 0.9  # a source block is used when at least this fraction is tissue
RENDER_BLOCK_TILES = 16  # tiles rendered per task: bounds memory whatever the slide width
WRITE_BUFFER_BYTES = 32 << 20  # raw tiles tifffile gathers before encoding them in parallel
NOISE_PERIOD_PX = 512  # background noise texture side, pixels of any level
BACKGROUND_RGB = (241, 240, 243)  # near-white glass, as scanners record it
BACKGROUND_NOISE_SIGMA = 1.5  # grey levels
PEN_RGB = (24, 96, 64)  # a dark green marker
PEN_WIDTH_UM = 60.0
PEN_MARGIN_UM = 100.0  # the stroke stays at least this far from the tissue mask
_SUBPIXEL_BITS = 4  # fixed-point bits for cv2 drawing


@dataclass(frozen=True)
class SlideLayout:
    """A scanner layout: level-0 um/px, objective power and pyramid downsamples (integers)."""

    mpp: float
    app_mag: int
    downsamples: tuple[int, ...]


LAYOUTS: dict[str, SlideLayout] = {
    "40x": SlideLayout(mpp=0.25, app_mag=40, downsamples=(1, 4, 16)),
    "20x": SlideLayout(mpp=0.5, app_mag=20, downsamples=(1, 4, 16)),
}


@dataclass(frozen=True, eq=False)
class SyntheticSlide:
    """A generated slide and the truth about it.

    Attributes:
        path: the written TIFF.
        layout: "20x" or "40x".
        dimensions: level-0 (width, height) in pixels.
        mpp: level-0 um/px written in the metadata.
        level_dimensions: (width, height) of each level.
        level_downsamples: nominal downsample of each level (1, 4, 16).
        mask: (h, w) bool known tissue mask; True where tissue was placed.
        mask_downsample: level-0 pixels per mask pixel.
        seed: the random seed.
        pen_level0: the pen stroke polyline in level-0 (x, y) pixels, or None when none was drawn.
        pen_width_level0: stroke width in level-0 pixels (0 when no stroke).
    """

    path: Path
    layout: str
    dimensions: tuple[int, int]
    mpp: float
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mask: np.ndarray
    mask_downsample: float
    seed: int
    pen_level0: tuple[tuple[int, int], ...] | None
    pen_width_level0: float

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by the known mask."""
        return float(self.mask.mean())

    def expected_tissue_fraction(
        self, level0_xy: tuple[float, float], level0_size: tuple[float, float]
    ) -> float:
        """Fraction of a level-0 rectangle covered by the known mask (area-weighted).

        Args:
            level0_xy: top-left (x, y) in level-0 pixels.
            level0_size: (width, height) in level-0 pixels; parts outside the slide count as
                background, so the fraction is over the whole rectangle.
        """
        w, h = level0_size
        if w <= 0 or h <= 0:
            raise XmagUsageError(f"rectangle size must be positive, got {level0_size}")
        ds = self.mask_downsample
        x0, y0 = level0_xy[0] / ds, level0_xy[1] / ds
        wx = _overlap_weights(x0, x0 + w / ds, self.mask.shape[1])
        wy = _overlap_weights(y0, y0 + h / ds, self.mask.shape[0])
        covered = float(wy @ self.mask.astype(np.float64) @ wx)
        return covered / ((w / ds) * (h / ds))


def _overlap_weights(a: float, b: float, n: int) -> np.ndarray:
    """Length of overlap of [a, b) with each unit cell [i, i + 1), i in 0..n-1."""
    idx = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(idx + 1, b) - np.maximum(idx, a), 0.0, None)


# -- source tissue --------------------------------------------------------------------------------
def _load_source(source: Path) -> tuple[np.ndarray, float]:
    """The whole level 0 of ``source`` as RGB, and its um/px (small slides only)."""
    if not source.exists():
        raise XmagUsageError(
            f"tissue source {source} does not exist; pass source= the path of a small H&E slide "
            "(e.g. tests/data/slides/CMU-1-Small-Region.svs from the repository)."
        )
    with openslide.OpenSlide(str(source)) as slide:
        mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        if not math.isfinite(mpp) or mpp <= 0:
            raise XmagUsageError(f"tissue source {source} states no mpp; use a slide that does.")
        w, h = slide.dimensions
        if w * h > 64_000_000:
            raise XmagUsageError(f"tissue source {source} is too large ({w}x{h}); use a small one.")
        rgba = np.asarray(slide.read_region((0, 0), 0, (w, h)))
    return np.ascontiguousarray(rgba[..., :3]), mpp


def _tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels of an H&E image: saturated and not near-white."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] > 25) & (rgb.min(axis=2) < 225)


def _tissue_mosaic(source: np.ndarray, block_px: int, rng: np.random.Generator) -> np.ndarray:
    """A square texture of ``MOSAIC_BLOCKS``^2 dense tissue blocks cut from ``source``.

    Blocks are taken on a half-block lattice where at least ``DENSE_BLOCK_FRACTION`` of the pixels
    are stained, and placed with random rotations and flips, so the texture is all tissue.
    """
    tissue = _tissue_pixels(source).astype(np.float32)
    h, w = tissue.shape
    step = max(1, block_px // 2)
    candidates: list[tuple[int, int, float]] = []
    for y in range(0, h - block_px + 1, step):
        for x in range(0, w - block_px + 1, step):
            frac = float(tissue[y : y + block_px, x : x + block_px].mean())
            candidates.append((y, x, frac))
    if not candidates:
        raise XmagUsageError(f"tissue source is smaller than one {block_px}-px block")
    candidates.sort(key=lambda c: -c[2])
    dense = [c for c in candidates if c[2] >= DENSE_BLOCK_FRACTION] or candidates[:8]
    n = MOSAIC_BLOCKS
    out = np.empty((n * block_px, n * block_px, 3), dtype=np.uint8)
    for i in range(n * n):
        y, x, _ = dense[int(rng.integers(len(dense)))]
        block = np.rot90(source[y : y + block_px, x : x + block_px], k=int(rng.integers(4)))
        if rng.integers(2):
            block = block[:, ::-1]
        r, c = divmod(i, n)
        out[r * block_px : (r + 1) * block_px, c * block_px : (c + 1) * block_px] = block
    return out


# -- known mask -----------------------------------------------------------------------------------
def _mask_downsample(width: int, height: int) -> int:
    ds = 16
    while max(width, height) / ds > MASK_MAX_PX:
        ds *= 2
    return ds


def _tissue_field(shape: tuple[int, int], n_blobs: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field over the mask grid: a few anisotropic Gaussian blobs, rough edges.

    Thresholding it gives the tissue mask; the field itself is interpolated when rendering, so
    edges are smooth at every level.
    """
    hm, wm = shape
    scale = float(min(hm, wm))
    yy, xx = np.mgrid[0:hm, 0:wm].astype(np.float32)
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.2, 0.8) * wm, rng.uniform(0.2, 0.8) * hm
        sx, sy = rng.uniform(0.10, 0.25) * scale, rng.uniform(0.10, 0.25) * scale
        theta = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        field += rng.uniform(0.7, 1.0) * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    # Low-frequency noise roughens the outlines like real tissue edges.
    coarse = rng.normal(size=(max(2, hm // 16), max(2, wm // 16))).astype(np.float32)
    rough = cv2.resize(coarse, (wm, hm), interpolation=cv2.INTER_CUBIC)
    field += 0.06 * rough * float(field.max())
    # Keep tissue off the slide border (a scan's edge is glass).
    border = max(2.0, 0.04 * scale)
    dist = np.minimum(np.minimum(xx, wm - 1 - xx), np.minimum(yy, hm - 1 - yy))
    field *= np.clip(dist / border, 0.0, 1.0)
    return field


def _clean_field(raw: np.ndarray, mask_ds: int, mpp: float) -> np.ndarray:
    """Drop specks and fill pinholes of a thresholded mask; return it slightly smoothed (0-1).

    The smoothed mask is the field the renderer interpolates (threshold 0.5), so the rendered
    outline is smooth at every level and agrees with the returned bool mask (``field > 0.5``).
    """
    min_px = MIN_PIECE_UM2 / (mask_ds * mpp) ** 2
    cleaned = raw.copy()
    for value in (True, False):  # pieces of tissue, then holes in it
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            (cleaned == value).astype(np.uint8), connectivity=8
        )
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_px)
        small = small[small > 0]  # label 0 is the other value
        cleaned[np.isin(labels, small) & (cleaned == value)] = not value
    return cv2.GaussianBlur(cleaned.astype(np.float32), (0, 0), 1.0)


def _pen_stroke(
    mask: np.ndarray, mask_ds: int, mpp: float, rng: np.random.Generator
) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """A random-walk marker stroke that keeps ``PEN_MARGIN_UM`` away from the mask, or None.

    Returns (polyline in level-0 pixels, width in level-0 pixels).
    """
    width0 = PEN_WIDTH_UM / mpp
    clear_px = (width0 / 2 + PEN_MARGIN_UM / mpp) / mask_ds  # needed distance, mask pixels
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    hm, wm = mask.shape
    # Distance to the slide edge counts too: the stroke stays on the slide.
    yy, xx = np.mgrid[0:hm, 0:wm]
    dist = np.minimum(dist, np.minimum(np.minimum(xx, wm - 1 - xx), np.minimum(yy, hm - 1 - yy)))
    free = np.argwhere(dist > clear_px)
    if len(free) == 0:
        return None
    step = max(2.0, 2 * clear_px)
    best: list[tuple[float, float]] = []
    for _ in range(40):
        y, x = free[int(rng.integers(len(free)))].astype(float)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(24):
            heading += rng.normal(0, 0.35)
            nx, ny = x + step * math.cos(heading), y + step * math.sin(heading)
            if not (0 <= nx < wm and 0 <= ny < hm) or dist[int(ny), int(nx)] <= clear_px:
                break
            x, y = nx, ny
            pts.append((x, y))
        if len(pts) > len(best):
            best = pts
        if len(best) >= 8:
            break
    if len(best) < 4:
        return None
    poly = tuple((round((px + 0.5) * mask_ds), round((py + 0.5) * mask_ds)) for px, py in best)
    return poly, width0


# -- rendering ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LevelTextures:
    """Per-level inputs of the renderer, at that level's mpp."""

    downsample: int
    width: int
    height: int
    tissue: np.ndarray  # (P, P, 3) uint8, periodic
    noise: np.ndarray  # (NOISE_PERIOD_PX, NOISE_PERIOD_PX, 3) int16, periodic


class _Renderer:
    """Renders blocks of 256-px tiles of any level from the shared field, textures and pen."""

    def __init__(
        self,
        field: np.ndarray,
        threshold: float,
        mask_ds: int,
        levels: Sequence[_LevelTextures],
        pen: tuple[tuple[tuple[int, int], ...], float] | None,
    ) -> None:
        self.field = field
        self.threshold = threshold
        self.mask_ds = mask_ds
        self.levels = levels
        self.pen = pen

    def block(self, level: int, row: int, col0: int, n_cols: int) -> np.ndarray:
        """Tiles ``col0 .. col0 + n_cols - 1`` of tile row ``row`` of ``level``, side by side.

        Returns (256, n_cols * 256, 3) uint8 RGB; the frame is the level's own pixels.
        """
        lv = self.levels[level]
        t = TIFF_TILE_PX
        x0, y0, width = col0 * t, row * t, n_cols * t
        bg = _periodic(lv.noise, x0, y0, width, t) + np.array(BACKGROUND_RGB, dtype=np.int16)
        background = np.clip(bg, 0, 255).astype(np.uint8)
        self._draw_pen(background, lv.downsample, x0, y0)
        tissue_here = self._alpha(lv.downsample, x0, y0, width)
        if not tissue_here.any():
            return background
        tissue = _periodic(lv.tissue, x0, y0, width, t)
        return np.where(tissue_here[..., None], tissue, background)

    def _alpha(self, ds: int, x0: int, y0: int, width: int) -> np.ndarray:
        """Where tissue is in a block: the field, interpolated at pixel centres, over threshold."""
        a = ds / self.mask_ds
        # Inverse map: block pixel (j, i) -> field coordinate ((x0 + j + 0.5) * a - 0.5, ...).
        m = np.array(
            [[a, 0.0, (x0 + 0.5) * a - 0.5], [0.0, a, (y0 + 0.5) * a - 0.5]], dtype=np.float64
        )
        sampled = cv2.warpAffine(
            self.field,
            m,
            (width, TIFF_TILE_PX),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )
        return sampled > self.threshold

    def _draw_pen(self, block: np.ndarray, ds: int, x0: int, y0: int) -> None:
        if self.pen is None:
            return
        poly, width0 = self.pen
        pts = np.array(poly, dtype=np.float64) / ds - (x0, y0)
        half = width0 / ds / 2 + 2
        h, w = block.shape[:2]
        if (
            pts[:, 1].max() + half < 0
            or pts[:, 1].min() - half > h
            or pts[:, 0].max() + half < 0
            or pts[:, 0].min() - half > w
        ):
            return
        fixed = np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.polylines(
            block,
            [fixed.reshape(-1, 1, 2)],
            isClosed=False,
            color=PEN_RGB,
            thickness=max(1, round(width0 / ds)),
            lineType=cv2.LINE_AA,
            shift=_SUBPIXEL_BITS,
        )


def _periodic(texture: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """The window (x0, y0, width, height) of ``texture`` repeated periodically in x and y."""
    ph, pw = texture.shape[:2]
    rows = np.take(texture, np.arange(y0, y0 + height) % ph, axis=0)
    return np.take(rows, np.arange(x0, x0 + width) % pw, axis=1)


def _iter_tiles(
    renderer: _Renderer, level: int, pool: ThreadPoolExecutor, lookahead: int
) -> Iterator[np.ndarray]:
    """Tiles of ``level`` in row-major order; blocks of up to ``RENDER_BLOCK_TILES`` tiles of a
    row are rendered ``lookahead`` blocks ahead in ``pool``."""
    lv = renderer.levels[level]
    rows = math.ceil(lv.height / TIFF_TILE_PX)
    cols = math.ceil(lv.width / TIFF_TILE_PX)
    jobs = [
        (r, c, min(RENDER_BLOCK_TILES, cols - c))
        for r in range(rows)
        for c in range(0, cols, RENDER_BLOCK_TILES)
    ]
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    next_job = 0
    t = TIFF_TILE_PX
    try:
        for _ in range(len(jobs)):
            while next_job < len(jobs) and len(pending) < lookahead:
                r, c, n = jobs[next_job]
                pending.append((n, pool.submit(renderer.block, level, r, c, n)))
                next_job += 1
            n, fut = pending.popleft()
            block = fut.result()
            for i in range(n):
                yield np.ascontiguousarray(block[:, i * t : (i + 1) * t])
    finally:
        for _, fut in pending:
            fut.cancel()


def _aperio_description(
    width: int,
    height: int,
    level_size: tuple[int, int],
    quality: int,
    layout: SlideLayout,
    seed: int,
) -> str:
    """ImageDescription in the Aperio style OpenSlide recognises (first line "Aperio ...")."""
    t = TIFF_TILE_PX
    head = f"Aperio Image Library v10.0.50\r\n{width}x{height} [0,0 {width}x{height}] ({t}x{t})"
    if level_size != (width, height):
        head += f" -> {level_size[0]}x{level_size[1]}"
    return (
        f"{head} JPEG/RGB Q={quality}|AppMag = {layout.app_mag}|MPP = {layout.mpp}"
        f"|Generator = tests.synthetic|Seed = {seed}"
    )


def make_large_slide(
    out_path: str | Path,
    *,
    layout: LayoutName,
    width: int,
    height: int,
    seed: int = 0,
    tissue_fraction: float = 0.4,
    n_blobs: int = 4,
    pen: bool = True,
    jpeg_quality: int = 80,
    source: str | Path | None = None,
    workers: int = 2,
) -> SyntheticSlide:
    """Write a pyramidal Aperio TIFF of real tissue inside a known random mask.

    Args:
        out_path: the .svs/.tif file to write (overwritten).
        layout: "40x" (0.25 um/px; levels 1, 4, 16) or "20x" (0.5 um/px; levels 1, 4, 16).
        width, height: level-0 size in pixels (at least 1024 each).
        seed: seeds the mask, the tissue mosaic and the pen stroke; same seed, same slide.
        tissue_fraction: fraction of the slide area covered by the mask (0.05-0.9).
        n_blobs: number of Gaussian blobs making the mask.
        pen: draw a marker stroke outside the mask when there is room.
        jpeg_quality: JPEG quality of the tiles (Aperio writes 70-90).
        source: the slide whose tissue is used (default: CMU-1-Small-Region.svs of tests/data).
        workers: threads rendering blocks and encoding tiles.

    Returns:
        The slide's description, with the known tissue mask.

    Memory is bounded by a few blocks of tiles, the writer's encode buffer
    (``WRITE_BUFFER_BYTES``), the textures (about 30 MB at 40x) and the mask, whatever the size.
    """
    if layout not in LAYOUTS:
        raise XmagUsageError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if width < 1024 or height < 1024:
        raise XmagUsageError(f"width and height must be at least 1024 px, got {width}x{height}")
    if not 0.05 <= tissue_fraction <= 0.9:
        raise XmagUsageError(f"tissue_fraction must be in 0.05-0.9, got {tissue_fraction}")
    spec = LAYOUTS[layout]
    out = Path(out_path)
    rng = np.random.default_rng(seed)

    mask_ds = _mask_downsample(width, height)
    mshape = (math.ceil(height / mask_ds), math.ceil(width / mask_ds))
    field = _tissue_field(mshape, n_blobs, rng)
    field = _clean_field(field > np.quantile(field, 1.0 - tissue_fraction), mask_ds, spec.mpp)
    threshold = 0.5
    mask = field > threshold
    stroke = _pen_stroke(mask, mask_ds, spec.mpp, rng) if pen else None

    src_rgb, src_mpp = _load_source(Path(source) if source else DEFAULT_TISSUE_SOURCE)
    block_px = max(16, round(MOSAIC_BLOCK_UM / src_mpp))
    mosaic = _tissue_mosaic(src_rgb, block_px, rng)
    del src_rgb
    textures = _level_textures(mosaic, src_mpp, spec, width, height, rng)
    renderer = _Renderer(field, threshold, mask_ds, textures, stroke)

    t = TIFF_TILE_PX
    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="xmag-synth") as pool,
        tifffile.TiffWriter(out, bigtiff=True) as tif,
    ):
        for i, lv in enumerate(textures):
            tif.write(
                _iter_tiles(renderer, i, pool, lookahead=max(2, workers + 1)),
                shape=(lv.height, lv.width, 3),
                dtype=np.uint8,
                tile=(t, t),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                description=_aperio_description(
                    width, height, (lv.width, lv.height), jpeg_quality, spec, seed
                ),
                subfiletype=0,
                maxworkers=max(1, workers),
                buffersize=WRITE_BUFFER_BYTES,
                metadata=None,
            )
    return SyntheticSlide(
        path=out,
        layout=layout,
        dimensions=(width, height),
        mpp=spec.mpp,
        level_dimensions=tuple((lv.width, lv.height) for lv in textures),
        level_downsamples=tuple(float(d) for d in spec.downsamples),
        mask=mask,
        mask_downsample=float(mask_ds),
        seed=seed,
        pen_level0=stroke[0] if stroke else None,
        pen_width_level0=stroke[1] if stroke else 0.0,
    )


def cached_large_slide(
    workdir: str | Path,
    *,
    layout: LayoutName,
    width: int,
    height: int,
    seed: int = 0,
    prefix: str = "synthetic",
) -> Path:
    """``make_large_slide`` once per (layout, size, seed) in ``workdir``; later calls reuse it.

    Benchmarks share their slides this way (``<prefix>-<layout>-<w>x<h>-seed<n>.svs``), so a
    slide generated by one benchmark is not generated again by the next.
    """
    folder = Path(workdir)
    path = folder / f"{prefix}-{layout}-{width}x{height}-seed{seed}.svs"
    if path.exists():
        print(f"reusing {path} ({path.stat().st_size / 1e6:.0f} MB)")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_large_slide(path, layout=layout, width=width, height=height, seed=seed)
    print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
    return path


def _level_textures(
    mosaic: np.ndarray,
    src_mpp: float,
    spec: SlideLayout,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> list[_LevelTextures]:
    """The tissue and noise textures of each level, at the level's own mpp.

    The level-0 period is a multiple of the largest downsample, so one texture pixel of level k
    covers exactly ``downsample`` level-0 texture pixels and all levels line up.
    """
    top = max(spec.downsamples)
    period_um = mosaic.shape[0] * src_mpp
    period0 = max(top, round(period_um / spec.mpp / top) * top)
    out = []
    for ds in spec.downsamples:
        p = period0 // ds
        interp = cv2.INTER_AREA if p < mosaic.shape[0] else cv2.INTER_CUBIC
        tissue = cv2.resize(mosaic, (p, p), interpolation=interp)
        noise = np.round(
            rng.normal(0, BACKGROUND_NOISE_SIGMA, size=(NOISE_PERIOD_PX, NOISE_PERIOD_PX, 3))
        ).astype(np.int16)
        out.append(
            _LevelTextures(
                ds, max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds)), tissue, noise
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.synthetic OUT --layout 40x --width W --height H``: write one slide."""
    ap = argparse.ArgumentParser(prog="python -m tests.synthetic", description=main.__doc__)
    ap.add_argument("out", type=Path, help="TIFF file to write")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="40x")
    ap.add_argument("--width", type=int, default=40_000, help="level-0 width, px")
    ap.add_argument("--height", type=int, default=30_000, help="level-0 height, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tissue-fraction", type=float, default=0.4)
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-pen", action="store_true", help="draw no pen stroke")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    slide = make_large_slide(
        args.out,
        layout=args.layout,
        width=args.width,
        height=args.height,
        seed=args.seed,
        tissue_fraction=args.tissue_fraction,
        jpeg_quality=args.quality,
        pen=not args.no_pen,
        workers=args.workers,
    )
    took = time.perf_counter() - start
    size_mb = slide.path.stat().st_size / 1e6
    print(
        f"wrote {slide.path} ({slide.layout}, {slide.dimensions[0]}x{slide.dimensions[1]} px, "
        f"levels {slide.level_dimensions}, tissue {slide.tissue_fraction:.3f}, "
        f"{size_mb:.1f} MB) in {took:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
