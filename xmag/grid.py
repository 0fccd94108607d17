"""Stage 4: the tile grid at the target mpp, in level-0 pixels and in grid cells.

The grid covers the whole slide (kept and dropped tiles alike) so callers can draw it, count it and
explain why a tile was dropped. ``keep`` marks tiles whose tissue fraction passes the threshold.
Tissue fractions come from a summed-area table of the mask, so building a grid of 100,000 tiles
costs a few array operations, not a loop over tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from xmag.errors import SlideTooLargeError, XmagUsageError
from xmag.params import TilingParams
from xmag.tissue import TissueMask

__all__ = ["MAX_GRID_TILES", "TileGrid", "build_grid"]

# Most tiles a grid may hold (kept or not): about 60 bytes per tile in the grid arrays, so 4
# million is a quarter GB. A 150,000 x 112,500 px slide tiled at its own 0.25 um/px with 224 px
# tiles is 336,000 tiles; more than 4 million means absurd dimensions or mpp.
MAX_GRID_TILES = 4_000_000


@dataclass(frozen=True)
class TileGrid:
    """Every tile position of a slide at the target mpp.

    Attributes:
        tile_px: tile side in pixels at the target mpp (the model input size).
        stride_px: distance between tile origins in pixels at the target mpp.
        target_mpp: um/px of the tiles.
        level0_tile: tile side in level-0 pixels (float: target_mpp * tile_px / level0_mpp).
        level0_stride: stride in level-0 pixels (float).
        cols, rows: grid shape.
        cell_xy: (N, 2) int32 grid cell (col, row) of every tile, row-major.
        level0_xy: (N, 2) int64 top-left of every tile in level-0 pixels (rounded).
        tissue_fraction: (N,) float32 fraction of each tile covered by the tissue mask.
        keep: (N,) bool, tissue_fraction >= threshold.
        tissue_threshold: the threshold used.
    """

    tile_px: int
    stride_px: int
    target_mpp: float
    level0_tile: float
    level0_stride: float
    cols: int
    rows: int
    cell_xy: np.ndarray
    level0_xy: np.ndarray
    tissue_fraction: np.ndarray
    keep: np.ndarray
    tissue_threshold: float

    @property
    def n_total(self) -> int:
        return int(self.cell_xy.shape[0])

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def kept_indices(self) -> np.ndarray:
        """Indices into the grid arrays of the kept tiles, in row-major order."""
        return np.flatnonzero(self.keep)


# Float slack when fitting tiles and comparing fractions: a tile that fits exactly still fits, and a
# fraction of exactly the threshold passes despite rounding in the summed-area arithmetic.
_FIT_EPS = 1e-6
_FRACTION_EPS = 1e-9


def build_grid(
    dimensions: tuple[int, int], level0_mpp: float, tissue: TissueMask, params: TilingParams
) -> TileGrid:
    """Tile the slide at ``params.target_mpp`` from its top-left corner (0, 0).

    Tiles are ``params.tile_px`` pixels at the target mpp, i.e. ``level0_tile = tile_px *
    target_mpp / level0_mpp`` level-0 pixels, with origins every ``level0_stride = (tile_px -
    overlap_px) * target_mpp / level0_mpp`` level-0 pixels. Only whole tiles that fit inside the
    slide are in the grid: the strip along the right and bottom edges narrower than a tile is left
    out (a slide smaller than one tile gives an empty grid). ``level0_xy`` is the float origin
    rounded to the nearest level-0 pixel.

    ``tissue_fraction`` is the share of each tile's area covered by the mask, with mask pixels
    cut by the tile's edges counted by the area they share with it (exact for a mask that is
    constant over each of its pixels).

    Args:
        dimensions: level-0 (width, height) in pixels.
        level0_mpp: level-0 um/px.
        tissue: the mask, ``tissue.downsample`` level-0 pixels per mask pixel.
        params: tile size, target mpp, overlap and keep threshold.

    Raises:
        XmagUsageError: ``level0_mpp`` or the dimensions are not positive.
        SlideTooLargeError: the grid would hold more than ``MAX_GRID_TILES`` tiles.
    """
    w0, h0 = dimensions
    if not (math.isfinite(level0_mpp) and level0_mpp > 0) or w0 <= 0 or h0 <= 0:
        raise XmagUsageError(f"need positive dimensions and mpp, got {dimensions}, {level0_mpp}")
    scale = params.target_mpp / level0_mpp  # level-0 pixels per target pixel
    level0_tile = params.tile_px * scale
    level0_stride = params.stride_px * scale
    cols = _fit_count(w0, level0_tile, level0_stride)
    rows = _fit_count(h0, level0_tile, level0_stride)
    if cols * rows > MAX_GRID_TILES:
        raise SlideTooLargeError(
            f"{w0:,} x {h0:,} px at {level0_mpp:g} um/px makes {cols:,} x {rows:,} tiles of "
            f"{params.tile_px} px at {params.target_mpp:g} um/px, more than the "
            f"{MAX_GRID_TILES:,} allowed; check the slide's dimensions and mpp.",
            dimensions=[w0, h0],
            tiles=cols * rows,
            max_tiles=MAX_GRID_TILES,
        )
    xs = np.rint(np.arange(cols) * level0_stride).astype(np.int64)
    ys = np.rint(np.arange(rows) * level0_stride).astype(np.int64)
    fraction = _tile_fractions(tissue, xs, ys, level0_tile)  # (rows, cols)
    row_idx, col_idx = np.divmod(np.arange(rows * cols, dtype=np.int64), max(cols, 1))
    cell_xy = np.stack([col_idx, row_idx], axis=1).astype(np.int32)
    level0_xy = np.stack([xs[col_idx], ys[row_idx]], axis=1).astype(np.int64)
    tissue_fraction = fraction.reshape(-1)
    keep = tissue_fraction >= params.tissue_threshold - _FRACTION_EPS
    return TileGrid(
        tile_px=params.tile_px,
        stride_px=params.stride_px,
        target_mpp=params.target_mpp,
        level0_tile=level0_tile,
        level0_stride=level0_stride,
        cols=cols,
        rows=rows,
        cell_xy=cell_xy.reshape(-1, 2),
        level0_xy=level0_xy.reshape(-1, 2),
        tissue_fraction=tissue_fraction.astype(np.float32),
        keep=keep,
        tissue_threshold=params.tissue_threshold,
    )


def _fit_count(length: int, tile: float, stride: float) -> int:
    """How many tiles of ``tile`` px every ``stride`` px fit whole in ``length`` px."""
    if length + _FIT_EPS < tile:
        return 0
    return math.floor((length - tile) / stride + _FIT_EPS) + 1


def _tile_fractions(
    tissue: TissueMask, xs: np.ndarray, ys: np.ndarray, level0_tile: float
) -> np.ndarray:
    """(len(ys), len(xs)) float64 tissue fraction of the tiles at level-0 origins xs x ys.

    The summed-area table S of the mask, interpolated bilinearly at a real-valued corner, is the
    exact integral of the (piecewise-constant) mask up to that corner; the table is interpolated
    along y for the tile rows, then along x for the tile columns (separable, so the cost is
    O(rows * mask width + rows * cols)).
    """
    if xs.size == 0 or ys.size == 0:
        return np.zeros((ys.size, xs.size), dtype=np.float64)
    mask = tissue.mask
    # (h + 1, w + 1), first row and column 0; float64 counts are exact up to 2**53 pixels.
    table = np.asarray(cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F))
    ds = tissue.downsample
    side = level0_tile / ds  # tile side in mask pixels
    x0, x1 = xs / ds, xs / ds + side
    y0, y1 = ys / ds, ys / ds + side
    at_y0, at_y1 = _interp_rows(table, y0), _interp_rows(table, y1)  # (rows, w + 1)

    def at(rows_table: np.ndarray, x: np.ndarray) -> np.ndarray:
        return _interp_rows(rows_table.T, x).T  # (rows, cols)

    inside = at(at_y1, x1) - at(at_y1, x0) - at(at_y0, x1) + at(at_y0, x0)
    return np.clip(inside / (side * side), 0.0, 1.0)


def _interp_rows(table: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows of ``table`` linearly interpolated at real row positions ``pos`` (clamped to it)."""
    n = table.shape[0] - 1
    pos = np.clip(pos, 0.0, float(n))
    i = np.minimum(np.floor(pos).astype(np.int64), max(n - 1, 0))
    t = (pos - i)[:, None]
    if n == 0:
        return table[i]
    return table[i] * (1.0 - t) + table[i + 1] * t
