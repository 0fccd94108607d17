"""Stage 6: tile reads. Pixels of grid tiles at the target mpp, one tile or batches in parallel.

``read_tile`` is the reference: one ``read_region`` of ``level.read_px(tile_px)`` pixels at the
chosen level, then an area resize to ``tile_px`` (a cubic one when the level is coarser than the
target). ``iter_tile_batches`` returns exactly the same pixels, faster:

* reads run in a thread pool (OpenSlide and the other adapters release the GIL while decoding);
* neighbouring tiles of one grid row are read with one ``read_region`` and cropped, when the
  level's downsample is a whole number. OpenSlide interpolates when a level-0 coordinate does
  not fall on a whole pixel of the level, so with a fractional downsample two reads of the same
  tile at different phases differ; there every tile is read on its own, as ``read_tile`` does;
* at most ``max_pending`` batches are read ahead of the consumer, so memory is bounded whatever
  the slide size (about ``max_pending * batch_size * tile_px^2 * 3`` bytes plus one region of at
  most ``MAX_REGION_PX`` x ``read_px`` per worker).

A failed read raises ``RegionReadError`` (never a substitute tile). Closing the generator early
(``break``, ``close()``, garbage collection) cancels queued reads and joins the worker threads.

Frames: ``level0_xy`` is a tile's top-left in level-0 pixels (the grid's); a tile's origin in its
level's own pixels is ``floor(level0_xy / level_downsample + 0.5)``, computed once by
``tile_level_origins`` and used by both paths.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from xmag.errors import RegionReadError, XmagError, XmagUsageError
from xmag.grid import TileGrid
from xmag.level import LevelChoice
from xmag.readers.base import SlideReader

__all__ = [
    "MAX_REGION_PX",
    "TileBatch",
    "iter_tile_batches",
    "read_tile",
    "tile_level_origins",
]

MAX_REGION_PX = 4096  # widest region read at once to cover a run of neighbouring tiles
_INTEGER_DOWNSAMPLE_TOL = 1e-9


@dataclass(frozen=True, eq=False)
class TileBatch:
    """A batch of tiles in the order requested.

    Attributes:
        indices: (n,) int64 indices into the grid arrays.
        level0_xy: (n, 2) int64 top-left of each tile in level-0 pixels (the grid's).
        pixels: (n, tile_px, tile_px, 3) uint8 RGB at the target mpp.
    """

    indices: np.ndarray
    level0_xy: np.ndarray
    pixels: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def tile_level_origins(grid: TileGrid, level: LevelChoice, indices: np.ndarray) -> np.ndarray:
    """Top-left of tiles in the chosen level's own pixels: (n, 2) int64.

    ``floor(level0_xy / level_downsample + 0.5)``, i.e. rounded half up.
    """
    xy = grid.level0_xy[indices].astype(np.float64) / level.level_downsample
    return np.floor(xy + 0.5).astype(np.int64)


def _level0_of(level_xy: Sequence[int] | np.ndarray, level: LevelChoice) -> tuple[int, int]:
    """The level-0 coordinate passed to ``read_region`` for a region starting at ``level_xy``.

    Exact when the downsample is a whole number (the case where regions are coalesced).
    """
    ds = level.level_downsample
    return (round(float(level_xy[0]) * ds), round(float(level_xy[1]) * ds))


def _read(
    reader: SlideReader, level: LevelChoice, level_xy: Sequence[int], size: tuple[int, int]
) -> np.ndarray:
    """One ``read_region`` at ``level``; any failure becomes ``RegionReadError``."""
    level0_xy = _level0_of(level_xy, level)
    try:
        pixels = reader.read_region(level0_xy, level.level, size)
    except (XmagError, XmagUsageError):
        raise
    except Exception as exc:  # an adapter failed in a way it did not translate: still typed
        raise RegionReadError.for_region(
            reader.path,
            level.level,
            level0_xy,
            size,
            f"reading level {level.level} region at level-0 {level0_xy} of size {size} failed "
            f"({type(exc).__name__}: {exc}); the slide may be damaged there.",
        ) from exc
    expected = (size[1], size[0], 3)
    if pixels.shape != expected or pixels.dtype != np.uint8:
        raise RegionReadError.for_region(
            reader.path,
            level.level,
            level0_xy,
            size,
            f"the reader returned {pixels.shape} {pixels.dtype} for a level {level.level} region "
            f"at level-0 {level0_xy}, expected {expected} uint8.",
        )
    return pixels


def _to_tile_px(pixels: np.ndarray, tile_px: int) -> np.ndarray:
    """Resample a square read to ``tile_px``: area filter down, cubic up, untouched when equal."""
    read_px = pixels.shape[0]
    if read_px == tile_px:
        return pixels
    interp = cv2.INTER_AREA if read_px > tile_px else cv2.INTER_CUBIC
    return cv2.resize(pixels, (tile_px, tile_px), interpolation=interp)


def read_tile(reader: SlideReader, grid: TileGrid, level: LevelChoice, index: int) -> np.ndarray:
    """Pixels of grid tile ``index`` at the target mpp: (tile_px, tile_px, 3) uint8 RGB.

    The reference read: one ``read_region`` of ``level.read_px(grid.tile_px)`` pixels of
    ``level.level`` at the tile's level origin (``tile_level_origins``), then ``cv2.INTER_AREA``
    down to ``grid.tile_px`` (``INTER_CUBIC`` up when the level is coarser than the target; no
    resampling when the sizes match).

    Raises:
        RegionReadError: the region cannot be decoded.
        XmagUsageError: ``index`` is outside the grid.
    """
    if not 0 <= index < grid.n_total:
        raise XmagUsageError(f"tile index {index} outside the grid (0..{grid.n_total - 1})")
    read_px = level.read_px(grid.tile_px)
    origin = tile_level_origins(grid, level, np.array([index]))[0]
    region = _read(reader, level, origin, (read_px, read_px))
    return np.ascontiguousarray(_to_tile_px(region, grid.tile_px))


@dataclass(frozen=True)
class _Run:
    """Tiles ``positions`` of a batch read with one region starting at ``level_xy``."""

    positions: np.ndarray  # positions in the batch
    offsets_x: np.ndarray  # x of each tile inside the region, level pixels
    level_xy: tuple[int, int]
    width: int


def _plan_runs(origins: np.ndarray, read_px: int, coalesce: bool) -> list[_Run]:
    """Group a batch's tiles into regions: consecutive tiles on one level row that touch or
    overlap, up to ``MAX_REGION_PX`` wide. Without ``coalesce`` every tile is its own region."""
    runs: list[_Run] = []
    start = 0
    n = origins.shape[0]
    for i in range(1, n + 1):
        if coalesce and i < n:
            x0, y0 = origins[start]
            xp = origins[i - 1][0]
            xi, yi = origins[i]
            joins = yi == y0 and xp <= xi <= xp + read_px and xi + read_px - x0 <= MAX_REGION_PX
            if joins:
                continue
        x0, y0 = origins[start]
        offsets = origins[start:i, 0] - x0
        width = int(offsets[-1]) + read_px
        runs.append(_Run(np.arange(start, i), offsets, (int(x0), int(y0)), width))
        start = i
    return runs


def _read_run(
    reader: SlideReader,
    level: LevelChoice,
    run: _Run,
    read_px: int,
    tile_px: int,
    out: np.ndarray,
) -> None:
    """Read one region and write its tiles, resampled, into ``out`` at their batch positions."""
    region = _read(reader, level, run.level_xy, (run.width, read_px))
    for pos, dx in zip(run.positions, run.offsets_x, strict=True):
        out[pos] = _to_tile_px(region[:, dx : dx + read_px], tile_px)


def iter_tile_batches(
    reader: SlideReader,
    grid: TileGrid,
    level: LevelChoice,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 32,
    workers: int = 4,
    max_pending: int = 4,
) -> Iterator[TileBatch]:
    """Batches of tile pixels, pixel-identical to ``read_tile``, read in parallel.

    Args:
        reader: an open slide; ``read_region`` must be thread-safe (every adapter's is).
        grid: the tile grid (level-0 frame).
        level: the level read and its resample factor (from ``choose_level``).
        indices: tiles to read, in the order to return them; default the kept tiles in grid
            (row-major) order.
        batch_size: tiles per batch (the last one may be smaller).
        workers: reader threads.
        max_pending: batches read ahead of the consumer (bounds memory).

    Yields:
        ``TileBatch`` objects in order; together they hold every requested tile once.

    Raises:
        RegionReadError: a region could not be decoded (remaining reads are cancelled).
        XmagUsageError: bad arguments (an index outside the grid, a size below 1).
    """
    order = _check_args(grid, indices, batch_size, workers, max_pending)
    if order.size == 0:
        return
    read_px = level.read_px(grid.tile_px)
    ds = level.level_downsample
    coalesce = abs(ds - round(ds)) <= _INTEGER_DOWNSAMPLE_TOL and read_px <= MAX_REGION_PX
    origins = tile_level_origins(grid, level, order)
    n_batches = math.ceil(order.size / batch_size)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xmag-tiles")
    pending: deque[tuple[slice, np.ndarray, list[Future[None]]]] = deque()
    submitted = 0
    try:
        for _ in range(n_batches):
            while submitted < n_batches and len(pending) < max_pending:
                span = slice(submitted * batch_size, min(order.size, (submitted + 1) * batch_size))
                out = np.empty((span.stop - span.start, grid.tile_px, grid.tile_px, 3), np.uint8)
                futures = [
                    pool.submit(_read_run, reader, level, run, read_px, grid.tile_px, out)
                    for run in _plan_runs(origins[span], read_px, coalesce)
                ]
                pending.append((span, out, futures))
                submitted += 1
            span, out, futures = pending.popleft()
            for fut in futures:
                fut.result()
            idx = order[span]
            yield TileBatch(idx, grid.level0_xy[idx].astype(np.int64), out)
    finally:
        # Early close or an error: drop queued reads, wait for the running ones (one region
        # each), so no worker outlives the generator.
        for _, _, futures in pending:
            for fut in futures:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _check_args(
    grid: TileGrid,
    indices: np.ndarray | None,
    batch_size: int,
    workers: int,
    max_pending: int,
) -> np.ndarray:
    """Validate arguments; return the tile indices to read as int64."""
    for name, value in (
        ("batch_size", batch_size),
        ("workers", workers),
        ("max_pending", max_pending),
    ):
        if value < 1:
            raise XmagUsageError(f"{name} must be at least 1, got {value}")
    if indices is None:
        return grid.kept_indices().astype(np.int64)
    order = np.asarray(indices)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise XmagUsageError(
            f"indices must be a 1-D integer array, got {order.dtype} {order.shape}"
        )
    order = order.astype(np.int64)
    if order.size and (order.min() < 0 or order.max() >= grid.n_total):
        raise XmagUsageError(f"indices must lie in 0..{grid.n_total - 1}")
    return order
