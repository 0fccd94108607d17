"""Stage 6: tile reads. Pixels of grid tiles at the target mpp, one tile or batches in parallel.

``read_tile`` is the reference: one ``read_region`` of ``level.read_px(tile_px)`` pixels at the
chosen level, then an area resize to ``tile_px`` (a cubic one when the level is coarser than the
target). ``read_tile_at`` is the same read at any level-0 origin (training fields that do not sit
on a grid cell), so a square read there equals the served tile wherever a grid cell starts.
``iter_tile_batches`` returns exactly the same pixels as ``read_tile``, faster:

* reads run in a thread pool (OpenSlide and the other adapters release the GIL while decoding);
* neighbouring tiles of one grid row are read with one ``read_region`` and cropped, when the
  level's downsample is a whole number. OpenSlide interpolates when a level-0 coordinate does
  not fall on a whole pixel of the level, so with a fractional downsample two reads of the same
  tile at different phases differ; there every tile is read on its own, as ``read_tile`` does;
* at most ``max_pending`` batches are read ahead of the consumer, so memory is bounded whatever
  the slide size (about ``max_pending * batch_size * tile_px^2 * 3`` bytes plus one region of at
  most ``MAX_REGION_PX`` x ``read_px`` per worker).

When the plan's level says so (``LevelChoice.decode`` = ``"jpeg-dct-1/n"``, chosen by
``xmag.level.choose_decode`` from what the reader offers), a tile is instead decoded straight from
the level's JPEG tiles at 1/n scale (``SlideReader.read_region_reduced``), then resized the rest
of the way (nothing left for a 40x slide read at 5x from its 1 um/px level). The pixels are close
to, not equal to, the reference's (tests/test_fast_decode.py holds the tolerance); ``read_tile``
and ``iter_tile_batches`` follow the same level, so they still agree with each other exactly.
A tile whose read does not start on a whole pixel of 1/n is decoded at the next finer scale on
whose pixels it starts (1/1 at worst); one the reader refuses (past the level's edge, an absent
tile) is read as the reference. The reader caches decoded JPEG tiles (bounded, per level), so
neighbours do not decode one twice; regions are not coalesced on this path, and each worker gets
a run of consecutive tiles of the batch so its neighbours' JPEG tiles are still cached.

A failed read raises ``RegionReadError`` (never a substitute tile). Closing the generator early
(``break``, ``close()``, garbage collection) cancels queued reads and joins the worker threads.

``SlideTiles`` is the one way outside the engine (training, export parity, benchmarks) to get the
tiles a slide is served with: open, ``plan_slide``, then ``iter_tile_batches`` of chosen tiles.

Frames: ``level0_xy`` is a tile's top-left in level-0 pixels (the grid's); a tile's origin in its
level's own pixels is ``floor(level0_xy / level_downsample + 0.5)``, computed once by
``tile_level_origins`` (``level_origins`` for any origins) and used by every path.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from xmag.errors import RegionReadError, XmagError, XmagUsageError
from xmag.grid import TileGrid
from xmag.level import LevelChoice, decode_reduce
from xmag.params import TilingParams
from xmag.plan import SlidePlan, plan_slide
from xmag.readers import open_slide
from xmag.readers.base import SlideReader

__all__ = [
    "MAX_REGION_PX",
    "SlideTiles",
    "TileBatch",
    "iter_tile_batches",
    "level_origins",
    "read_level_region",
    "read_tile",
    "read_tile_at",
    "tile_level_origins",
]

MAX_REGION_PX = 4096  # widest region read at once to cover a run of neighbouring tiles
_INTEGER_DOWNSAMPLE_TOL = 1e-9
_T = TypeVar("_T")


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


def level_origins(level0_xy: np.ndarray, level: LevelChoice) -> np.ndarray:
    """Level-0 top-lefts (n, 2) -> top-lefts in the chosen level's own pixels: (n, 2) int64.

    ``floor(level0_xy / level_downsample + 0.5)``, i.e. rounded half up.
    """
    xy = np.asarray(level0_xy, dtype=np.float64).reshape(-1, 2) / level.level_downsample
    return np.floor(xy + 0.5).astype(np.int64)


def tile_level_origins(grid: TileGrid, level: LevelChoice, indices: np.ndarray) -> np.ndarray:
    """Top-left of grid tiles in the chosen level's own pixels: (n, 2) int64 (``level_origins``
    of their ``level0_xy``)."""
    return level_origins(grid.level0_xy[indices], level)


def _level0_of(level_xy: Sequence[int] | np.ndarray, level: LevelChoice) -> tuple[int, int]:
    """The level-0 coordinate passed to ``read_region`` for a region starting at ``level_xy``.

    Exact when the downsample is a whole number (the case where regions are coalesced).
    """
    ds = level.level_downsample
    return (round(float(level_xy[0]) * ds), round(float(level_xy[1]) * ds))


def read_level_region(
    reader: SlideReader, level: LevelChoice, level_xy: Sequence[int], size: tuple[int, int]
) -> np.ndarray:
    """One ``read_region`` of ``size`` level pixels at level pixel ``level_xy`` of ``level``;
    any failure, or pixels of another shape or type, becomes ``RegionReadError``."""
    level0_xy = _level0_of(level_xy, level)
    pixels = _typed_read(
        reader,
        level,
        level0_xy,
        size,
        f"reading level {level.level} region at level-0 {level0_xy} of size {size}",
        partial(reader.read_region, level0_xy, level.level, size),
    )
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


def _typed_read(
    reader: SlideReader,
    level: LevelChoice,
    level0_xy: tuple[int, int],
    size: tuple[int, int],
    what: str,
    read: Callable[[], _T],
) -> _T:
    """``read()``, with a failure the adapter did not translate still typed: ``RegionReadError``
    saying ``what`` failed (our own errors pass through)."""
    try:
        return read()
    except (XmagError, XmagUsageError):
        raise
    except Exception as exc:  # an adapter failed in a way it did not translate: still typed
        raise RegionReadError.for_region(
            reader.path,
            level.level,
            level0_xy,
            size,
            f"{what} failed ({type(exc).__name__}: {exc}); the slide may be damaged there.",
        ) from exc


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
    resampling when the sizes match). With ``level.decode`` = ``"jpeg-dct-1/n"`` the same
    pixels are decoded from the level's JPEG tiles at 1/n scale instead (module docstring).

    Raises:
        RegionReadError: the region cannot be decoded.
        XmagUsageError: ``index`` is outside the grid.
    """
    if not 0 <= index < grid.n_total:
        raise XmagUsageError(f"tile index {index} outside the grid (0..{grid.n_total - 1})")
    return read_tile_at(reader, level, grid.level0_xy[index], grid.tile_px)


def read_tile_at(
    reader: SlideReader,
    level: LevelChoice,
    level0_xy: Sequence[int] | np.ndarray,
    tile_px: int,
) -> np.ndarray:
    """A ``tile_px`` square at the target mpp whose top-left is ``level0_xy`` (level-0 pixels).

    The read of ``read_tile`` at any origin: the origin is rounded to the level's own pixels as
    ``level_origins`` does, ``level.read_px(tile_px)`` pixels are read and resampled to
    ``tile_px`` the same way. At a grid tile's ``level0_xy`` it returns that tile's pixels.

    Args:
        reader: an open slide.
        level: the level read for the target mpp (``choose_level``).
        level0_xy: top-left in level-0 pixels.
        tile_px: side of the result, pixels at ``level.target_mpp``.

    Returns:
        (tile_px, tile_px, 3) uint8 RGB.

    Raises:
        RegionReadError: the region cannot be decoded.
        XmagUsageError: ``tile_px`` below 1.
    """
    if tile_px < 1:
        raise XmagUsageError(f"tile_px must be at least 1, got {tile_px}")
    read_px = level.read_px(tile_px)
    origin = level_origins(np.asarray(level0_xy), level)[0]
    return np.ascontiguousarray(_read_one(reader, level, origin, read_px, tile_px))


def _read_one(
    reader: SlideReader, level: LevelChoice, origin: np.ndarray, read_px: int, tile_px: int
) -> np.ndarray:
    """One tile whose read starts at level pixel ``origin``, by ``level.decode``'s path."""
    reduce = decode_reduce(level)
    xy, size = (int(origin[0]), int(origin[1])), (read_px, read_px)
    level0_xy = _level0_of(xy, level)
    while reduce >= 1:
        if xy[0] % reduce == 0 and xy[1] % reduce == 0 and read_px % reduce == 0:
            scaled = _typed_read(
                reader,
                level,
                level0_xy,
                size,
                f"decoding level {level.level} at 1/{reduce}",
                partial(reader.read_region_reduced, level0_xy, level.level, size, reduce),
            )
            if scaled is None:
                break  # the reader cannot: the reference read
            return _to_tile_px(scaled, tile_px)
        reduce //= 2
    region = read_level_region(reader, level, xy, size)
    return _to_tile_px(region, tile_px)


def _read_tiles(
    reader: SlideReader,
    level: LevelChoice,
    origins: np.ndarray,
    positions: np.ndarray,
    read_px: int,
    tile_px: int,
    out: np.ndarray,
) -> None:
    """Read tiles one by one (the decoded-JPEG path) into ``out`` at their batch positions."""
    for pos, origin in zip(positions, origins, strict=True):
        out[pos] = _read_one(reader, level, origin, read_px, tile_px)


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
    region = read_level_region(reader, level, run.level_xy, (run.width, read_px))
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
    direct = decode_reduce(level) > 0
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
                if direct:  # consecutive tiles to one worker: they share JPEG tiles
                    chunks = np.array_split(np.arange(out.shape[0]), min(workers, out.shape[0]))
                    futures = [
                        pool.submit(
                            _read_tiles,
                            reader,
                            level,
                            origins[span][chunk],
                            chunk,
                            read_px,
                            grid.tile_px,
                            out,
                        )
                        for chunk in chunks
                    ]
                else:
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


class SlideTiles:
    """A slide opened and planned for reading its served tiles (a context manager).

    ``SlideTiles.open(path, params)`` runs ``open_slide`` and ``plan_slide``; ``batches`` and
    ``pixels`` then read tiles with ``iter_tile_batches``, so they are the engine's pixels.
    Closing it closes the reader; reads after that raise the reader's ``XmagUsageError``.

    Attributes:
        reader: the open slide.
        plan: its plan at ``params`` (grid, level, QC).
    """

    def __init__(self, reader: SlideReader, plan: SlidePlan):
        self.reader, self.plan = reader, plan

    @classmethod
    def open(cls, path: Path | str, params: TilingParams) -> SlideTiles:
        """Open and plan ``path`` at ``params``.

        Raises:
            XmagError: the typed errors of ``open_slide`` and ``plan_slide`` (unsupported format,
                unknown mpp...). A slide without tissue opens; ``plan.qc.zero_tissue`` says so.
        """
        reader = open_slide(Path(path))
        try:
            return cls(reader, plan_slide(reader, params))
        except BaseException:
            reader.close()
            raise

    def batches(self, indices: np.ndarray | None = None, **options: int) -> Iterator[TileBatch]:
        """``iter_tile_batches`` of the plan's grid and level (default: the kept tiles);
        ``options`` are its ``batch_size``, ``workers`` and ``max_pending``.

        Raises:
            XmagUsageError: the slide is closed (when a tile is read), or bad arguments.
        """
        return iter_tile_batches(
            self.reader, self.plan.grid, self.plan.level, indices=indices, **options
        )

    def pixels(self, indices: np.ndarray | None = None, *, workers: int = 4) -> np.ndarray:
        """Every requested tile at once: (n, tile_px, tile_px, 3) uint8 (n may be 0)."""
        chunks = [b.pixels for b in self.batches(indices, workers=workers)]
        if not chunks:
            side = self.plan.grid.tile_px
            return np.empty((0, side, side, 3), np.uint8)
        return np.concatenate(chunks)

    def close(self) -> None:
        """Close the reader (idempotent)."""
        self.reader.close()

    def __enter__(self) -> SlideTiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reader.close()
