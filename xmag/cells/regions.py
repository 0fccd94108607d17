"""Nuclei of large images and slide regions: read in chunks, detect, keep each cell once.

A slide region (level-0 pixels ``x, y, w, h``) is read at the level ``xmag.level.choose_level``
picks for ``target_mpp`` (``DEFAULT_CELL_MPP``, 0.5 um/px: the detector is as good there as at
0.25 um/px on CoNSeP and four times faster) and resampled as ``xmag.tiles`` resamples tiles (area
filter down, cubic up). The frame of the result is the region at ``target_mpp`` whose origin is
``(x, y)`` in level 0.

Both paths work chunk by chunk (``chunk_px`` square at the frame's mpp) with a margin of
``CHUNK_MARGIN_UM`` on every side, so memory is bounded whatever the region's size; a cell
belongs to the chunk whose core holds its centroid, so cells on chunk seams are found whole and
kept once. The coarse types' darkness rule is relative to each chunk's median nucleus.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from xmag.cells.detect import DetectorParams, detect_nuclei
from xmag.cells.measure import TypeRules
from xmag.cells.table import CellTable
from xmag.errors import XmagUsageError
from xmag.level import LevelChoice, choose_level
from xmag.readers.base import SlideReader
from xmag.tiles import level_origins, read_level_region

__all__ = [
    "CHUNK_MARGIN_UM",
    "DEFAULT_CELL_MPP",
    "DEFAULT_CHUNK_PX",
    "detect_image",
    "detect_slide_region",
]

DEFAULT_CELL_MPP = 0.5  # um/px the slide path reads at (20x)
DEFAULT_CHUNK_PX = 2048  # chunk side at the frame's mpp
CHUNK_MARGIN_UM = 16.0  # wider than the largest nucleus kept (400 um2 is ~23 um across)

# (chunk x, y, w, h) in frame px -> (pixels, sub-pixel offset of their (0, 0) in frame px)
_ReadChunk = Callable[[int, int, int, int], tuple[np.ndarray, tuple[float, float]]]


def _detect_chunks(
    read: _ReadChunk,
    width: int,
    height: int,
    mpp: float,
    *,
    chunk_px: int,
    params: DetectorParams | None,
    rules: TypeRules | None,
    origin_px: tuple[float, float],
) -> CellTable:
    if chunk_px < 64:
        raise XmagUsageError(f"chunk_px must be at least 64, got {chunk_px}")
    margin = math.ceil(CHUNK_MARGIN_UM / mpp)
    parts: list[CellTable] = []
    for cy in range(0, height, chunk_px):
        for cx in range(0, width, chunk_px):
            cw, ch = min(chunk_px, width - cx), min(chunk_px, height - cy)
            ax, ay = max(0, cx - margin), max(0, cy - margin)
            bx, by = min(width, cx + cw + margin), min(height, cy + ch + margin)
            pixels, (dx, dy) = read(ax, ay, bx - ax, by - ay)
            found = detect_nuclei(pixels, mpp, params=params, rules=rules)
            xy = found.xy_px + np.array([ax + dx, ay + dy], np.float32)
            core = (xy[:, 0] >= cx) & (xy[:, 0] < cx + cw) & (xy[:, 1] >= cy) & (xy[:, 1] < cy + ch)
            parts.append(found.subset(core).shifted(ax + dx, ay + dy))
    if not parts:
        return CellTable.empty(mpp, "xmag-detector", origin_px)
    joined = CellTable.concat(parts)
    return CellTable(
        xy_um=joined.xy_um,
        features=joined.features,
        types=joined.types,
        contours_px=joined.contours_px,
        mpp=mpp,
        source="xmag-detector",
        origin_px=origin_px,
        meta={"detector_params": parts[0].meta.get("detector_params"), "chunk_px": chunk_px},
    )


def detect_image(
    rgb: np.ndarray,
    mpp: float,
    *,
    chunk_px: int = DEFAULT_CHUNK_PX,
    params: DetectorParams | None = None,
    rules: TypeRules | None = None,
    origin_px: tuple[float, float] = (0.0, 0.0),
) -> CellTable:
    """``detect_nuclei`` over an image of any size, in chunks (same cells, bounded memory)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise XmagUsageError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")

    def read(x: int, y: int, w: int, h: int) -> tuple[np.ndarray, tuple[float, float]]:
        return np.ascontiguousarray(rgb[y : y + h, x : x + w]), (0.0, 0.0)

    return _detect_chunks(
        read,
        rgb.shape[1],
        rgb.shape[0],
        mpp,
        chunk_px=chunk_px,
        params=params,
        rules=rules,
        origin_px=origin_px,
    )


def detect_slide_region(
    reader: SlideReader,
    level0_mpp: float,
    region_level0: tuple[int, int, int, int] | None = None,
    *,
    target_mpp: float = DEFAULT_CELL_MPP,
    chunk_px: int = DEFAULT_CHUNK_PX,
    params: DetectorParams | None = None,
    rules: TypeRules | None = None,
) -> tuple[CellTable, LevelChoice]:
    """Detect the nuclei of a slide region.

    Args:
        reader: an open slide.
        level0_mpp: its level-0 um/px (``xmag.mpp.resolve_mpp``).
        region_level0: ``(x, y, w, h)`` in level-0 pixels; None for the whole slide.
        target_mpp: um/px of the frame the detector sees.
        chunk_px: chunk side at ``target_mpp``.
        params, rules: detector parameters and type rules.

    Returns:
        (cells in the frame of the region, origin ``(x, y)``, at ``target_mpp``, or at the
        level's own mpp when that is within ``LEVEL_MATCH_TOLERANCE`` of it (read as is); the
        level read).

    Raises:
        RegionReadError: a part of the region cannot be decoded.
        XmagUsageError: an empty region, or one outside the slide.
    """
    width0, height0 = reader.dimensions
    x0, y0, w0, h0 = region_level0 if region_level0 is not None else (0, 0, width0, height0)
    if w0 <= 0 or h0 <= 0:
        raise XmagUsageError(f"region {region_level0} is empty: width and height must be > 0")
    if x0 >= width0 or y0 >= height0 or x0 + w0 <= 0 or y0 + h0 <= 0:
        raise XmagUsageError(
            f"region {region_level0} lies outside the slide's level 0 ({width0} x {height0} px)"
        )
    level = choose_level(reader, level0_mpp, target_mpp)
    # The frame's true mpp: the level's own when it is within tolerance of the target (read
    # as is), else the target it is resampled to.
    frame_mpp = level.level_mpp * level.resample_factor
    scale = frame_mpp / level0_mpp  # level-0 px per frame px
    width, height = max(1, round(w0 / scale)), max(1, round(h0 / scale))

    def read(x: int, y: int, w: int, h: int) -> tuple[np.ndarray, tuple[float, float]]:
        start = np.array([[x0 + x * scale, y0 + y * scale]], np.float64)
        level_xy = level_origins(start, level)[0]
        size = (level.read_px(w), level.read_px(h))
        pixels = read_level_region(reader, level, level_xy, size)
        if size != (w, h):
            interp = cv2.INTER_AREA if size[0] > w else cv2.INTER_CUBIC
            pixels = cv2.resize(pixels, (w, h), interpolation=interp)
        # Where the read really starts, in frame px (level origins are whole level pixels).
        real = level_xy * level.level_downsample
        return np.ascontiguousarray(pixels), (
            float((real[0] - x0) / scale - x),
            float((real[1] - y0) / scale - y),
        )

    table = _detect_chunks(
        read,
        width,
        height,
        frame_mpp,
        chunk_px=chunk_px,
        params=params,
        rules=rules,
        origin_px=(float(x0), float(y0)),
    )
    table.meta["level"] = level.level
    table.meta["level0_mpp"] = level0_mpp
    return table, level
