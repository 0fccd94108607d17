"""Deep Zoom tiles of any slide xmag reads (the DZI pyramids web viewers such as OpenSeadragon use).

The level and tile arithmetic is openslide's ``DeepZoomGenerator``: Deep Zoom level ``L`` of
``level_count`` halves the level-0 size ``level_count - 1 - L`` times (rounding up), so the last
level is the slide at full resolution and level 0 is one pixel; each level is cut into
``tile_px``-square tiles (the last row and column smaller), and every tile is widened by
``overlap_px`` on each side that has a neighbour. Unlike openslide's generator it only uses the
public ``SlideReader`` interface, so every registered reader (OpenSlide, tiffslide, wsidicom) gets
the same pyramid.

Pixels come from the coarsest *source* whose downsample does not exceed the Deep Zoom level's:
a pyramid level of the slide, or, for the coarse Deep Zoom levels of a slide whose own pyramid
stops early (a single-level TIFF), one whole-slide thumbnail of at most ``THUMBNAIL_PX`` per side
made once (``SlideReader.thumbnail`` reads it block by block). A tile's source region is read in
blocks of at most ``READ_BLOCK_PX`` source pixels and area-resized into place, so memory per tile
is bounded; ``max_source_px`` bounds the source pixels one tile may cost (CPU): a tile that would
read more (a Deep Zoom level far between the slide's own levels, e.g. of a 100,000-px single-level
TIFF) is cut from the whole-slide thumbnail instead, a coarser picture of the same place
(``TileRead.source`` says which; OpenSeadragon shows coarser tiles while it loads anyway).

Frames: ``dz`` pixels are pixels of a Deep Zoom level; ``level0`` pixels are the slide's level-0
reference frame, as in ``SlideReader.read_region``.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from xmag.errors import XmagUsageError
from xmag.readers.base import SlideReader

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_OVERLAP_PX",
    "DEFAULT_TILE_PX",
    "MAX_TILE_PX",
    "DeepZoomGenerator",
    "TileRead",
]

#: Tile side in Deep Zoom pixels (254 + 2 x 1 overlap = 256, openslide's default).
DEFAULT_TILE_PX = 254
#: Pixels each tile shares with each neighbour.
DEFAULT_OVERLAP_PX = 1
#: Largest accepted ``tile_px`` (a tile is at most (MAX_TILE_PX + 2 overlap)^2 RGB pixels).
MAX_TILE_PX = 1024
#: JPEG quality of encoded tiles (Pillow's scale, 1-95).
DEFAULT_JPEG_QUALITY = 80
#: Longest side of the one whole-slide thumbnail that feeds the coarse levels.
THUMBNAIL_PX = 2048
#: Source pixels read at once (one block: 2048 x 2048 RGB = 12 MiB).
READ_BLOCK_PX = 2048 * 2048
#: Default cap of source pixels one tile may read (a 8192 x 8192 region).
DEFAULT_MAX_SOURCE_PX = 8192 * 8192


@dataclass(frozen=True)
class TileRead:
    """Where one Deep Zoom tile comes from.

    Attributes:
        level0_xy: top-left of the tile's region in the level-0 frame.
        level0_size: (w, h) of that region in level-0 pixels (clipped to the slide).
        source: index of the slide level read, or -1 for the whole-slide thumbnail.
        source_size: (w, h) of the region in source pixels.
        tile_size: (w, h) of the tile in Deep Zoom pixels (overlap included).
    """

    level0_xy: tuple[int, int]
    level0_size: tuple[int, int]
    source: int
    source_size: tuple[int, int]
    tile_size: tuple[int, int]


class DeepZoomGenerator:
    """Deep Zoom levels and tiles of an open slide (thread-safe: several tiles may be made at once).

    Args:
        reader: an open slide; the generator does not close it.
        tile_px: tile side in Deep Zoom pixels, 1..``MAX_TILE_PX``.
        overlap_px: pixels shared with each neighbour, 0..``tile_px // 2``.
        max_source_px: most source pixels one tile may read from a slide level (CPU bound per
            tile); beyond it the tile comes from the whole-slide thumbnail.

    Raises:
        XmagUsageError: a tile size or overlap out of range.
    """

    def __init__(
        self,
        reader: SlideReader,
        *,
        tile_px: int = DEFAULT_TILE_PX,
        overlap_px: int = DEFAULT_OVERLAP_PX,
        max_source_px: int = DEFAULT_MAX_SOURCE_PX,
    ) -> None:
        if not 1 <= tile_px <= MAX_TILE_PX:
            raise XmagUsageError(f"tile_px must be 1..{MAX_TILE_PX}, got {tile_px}")
        if not 0 <= overlap_px <= tile_px // 2:
            raise XmagUsageError(f"overlap_px must be 0..{tile_px // 2}, got {overlap_px}")
        self.reader = reader
        self.tile_px = tile_px
        self.overlap_px = overlap_px
        self.max_source_px = max_source_px
        w, h = reader.dimensions
        sizes = [(w, h)]
        while w > 1 or h > 1:
            w, h = max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))
            sizes.append((w, h))
        self._dz_sizes: tuple[tuple[int, int], ...] = tuple(reversed(sizes))
        self._thumbnail: tuple[np.ndarray, float] | None = None
        self._thumbnail_lock = threading.Lock()

    # -- geometry ----------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        """Number of Deep Zoom levels (level ``level_count - 1`` is level 0 of the slide)."""
        return len(self._dz_sizes)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(w, h) in Deep Zoom pixels of each level, smallest first."""
        return self._dz_sizes

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles of each level."""
        return tuple(
            (math.ceil(w / self.tile_px), math.ceil(h / self.tile_px)) for w, h in self._dz_sizes
        )

    @property
    def tile_count(self) -> int:
        """Tiles over every level."""
        return sum(c * r for c, r in self.level_tiles)

    def level_downsample(self, level: int) -> float:
        """Level-0 pixels per Deep Zoom pixel of ``level`` (a power of two)."""
        if not 0 <= level < self.level_count:
            raise XmagUsageError(f"Deep Zoom level {level} out of range 0..{self.level_count - 1}")
        return float(2 ** (self.level_count - 1 - level))

    def has_tile(self, level: int, col: int, row: int) -> bool:
        """Whether ``(level, col, row)`` addresses a tile of this pyramid."""
        if not 0 <= level < self.level_count:
            return False
        cols, rows = self.level_tiles[level]
        return 0 <= col < cols and 0 <= row < rows

    def tile_read(self, level: int, col: int, row: int) -> TileRead:
        """Where tile ``(col, row)`` of Deep Zoom ``level`` comes from (no pixels read).

        Raises:
            XmagUsageError: no such tile (check with ``has_tile``).
        """
        if not self.has_tile(level, col, row):
            raise XmagUsageError(
                f"no Deep Zoom tile at level {level}, column {col}, row {row}; levels are "
                f"0..{self.level_count - 1} and level {level} has "
                f"{self.level_tiles[level] if 0 <= level < self.level_count else 'no'} tiles"
            )
        dz_w, dz_h = self._dz_sizes[level]
        cols, rows = self.level_tiles[level]
        ov = self.overlap_px
        # Top-left in this level's frame, widened by the overlap towards existing neighbours.
        x = col * self.tile_px - (ov if col > 0 else 0)
        y = row * self.tile_px - (ov if row > 0 else 0)
        tw = min(self.tile_px, dz_w - col * self.tile_px) + ov * (col > 0) + ov * (col < cols - 1)
        th = min(self.tile_px, dz_h - row * self.tile_px) + ov * (row > 0) + ov * (row < rows - 1)
        ds = self.level_downsample(level)
        w0, h0 = self.reader.dimensions
        # Through the slide level's frame, in openslide's order of float operations, so the
        # level-0 origin is the very pixel openslide's generator reads.
        slide_ds = self.reader.levels[self._slide_level_for(ds)].downsample
        l0x, l0y = int(slide_ds * (ds / slide_ds * x)), int(slide_ds * (ds / slide_ds * y))
        l0w = min(math.ceil(tw * ds), w0 - l0x)
        l0h = min(math.ceil(th * ds), h0 - l0y)
        source, source_ds = self._source_for(ds)
        sw = max(1, math.ceil(l0w / source_ds))
        sh = max(1, math.ceil(l0h / source_ds))
        if source >= 0 and sw * sh > self.max_source_px:
            source, source_ds = -1, max(1.0, max(w0, h0) / THUMBNAIL_PX)
            sw = max(1, math.ceil(l0w / source_ds))
            sh = max(1, math.ceil(l0h / source_ds))
        return TileRead((l0x, l0y), (l0w, l0h), source, (sw, sh), (tw, th))

    def _slide_level_for(self, dz_downsample: float) -> int:
        """The coarsest slide level whose downsample does not exceed ``dz_downsample``."""
        best = 0
        for lv in self.reader.levels:
            if lv.downsample <= dz_downsample * 1.0001 and lv.downsample > (
                self.reader.levels[best].downsample
            ):
                best = lv.index
        return best

    def _source_for(self, dz_downsample: float) -> tuple[int, float]:
        """The coarsest source not coarser than ``dz_downsample``: (slide level or -1, its ds)."""
        index = self._slide_level_for(dz_downsample)
        best = (index, self.reader.levels[index].downsample)
        coarsest = self.reader.levels[-1]
        if max(coarsest.width, coarsest.height) > THUMBNAIL_PX:
            w0, h0 = self.reader.dimensions
            thumb_ds = max(1.0, max(w0, h0) / THUMBNAIL_PX)
            if best[1] < thumb_ds <= dz_downsample * 1.0001:
                return (-1, thumb_ds)
        return best

    # -- pixels ------------------------------------------------------------------------------
    def get_tile_array(self, level: int, col: int, row: int) -> np.ndarray:
        """Tile ``(col, row)`` of Deep Zoom ``level`` as an (h, w, 3) uint8 RGB array.

        Raises:
            XmagUsageError: no such tile.
            RegionReadError: the slide cannot be decoded there (never replaced by blank pixels).
        """
        read = self.tile_read(level, col, row)
        sw, sh = read.source_size
        tw, th = read.tile_size
        if read.source < 0:
            return self._from_thumbnail(read)
        return self._read_resized(read.level0_xy, read.source, (sw, sh), (tw, th))

    def get_tile_jpeg(
        self, level: int, col: int, row: int, *, quality: int = DEFAULT_JPEG_QUALITY
    ) -> bytes:
        """The tile encoded as a baseline JPEG (Pillow)."""
        buffer = io.BytesIO()
        Image.fromarray(self.get_tile_array(level, col, row)).save(
            buffer, format="JPEG", quality=quality
        )
        return buffer.getvalue()

    def get_dzi(self, image_format: str = "jpeg") -> str:
        """The DZI XML document describing this pyramid."""
        w, h = self.reader.dimensions
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{image_format}" Overlap="{self.overlap_px}" TileSize="{self.tile_px}">'
            f'<Size Width="{w}" Height="{h}"/></Image>'
        )

    def _read_resized(
        self,
        level0_xy: tuple[int, int],
        source: int,
        source_size: tuple[int, int],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """Read ``source_size`` pixels of slide level ``source`` in blocks, area-resized."""
        sw, sh = source_size
        ow, oh = out_size
        if sw * sh <= READ_BLOCK_PX:
            pixels = self.reader.read_region(level0_xy, source, (sw, sh))
            return _resize(pixels, (ow, oh))
        ds = self.reader.levels[source].downsample
        sx, sy = sw / ow, sh / oh
        side = math.isqrt(READ_BLOCK_PX)
        step_x, step_y = max(1, int(side / max(sx, 1.0))), max(1, int(side / max(sy, 1.0)))
        out = np.empty((oh, ow, 3), dtype=np.uint8)
        for oy0 in range(0, oh, step_y):
            oy1 = min(oh, oy0 + step_y)
            y0, y1 = round(oy0 * sy), max(round(oy0 * sy) + 1, round(oy1 * sy))
            for ox0 in range(0, ow, step_x):
                ox1 = min(ow, ox0 + step_x)
                x0, x1 = round(ox0 * sx), max(round(ox0 * sx) + 1, round(ox1 * sx))
                xy = (level0_xy[0] + round(x0 * ds), level0_xy[1] + round(y0 * ds))
                block = self.reader.read_region(xy, source, (x1 - x0, y1 - y0))
                out[oy0:oy1, ox0:ox1] = _resize(block, (ox1 - ox0, oy1 - oy0))
        return out

    def _from_thumbnail(self, read: TileRead) -> np.ndarray:
        image, ds = self._whole_slide_thumbnail()
        x0 = int(read.level0_xy[0] / ds)
        y0 = int(read.level0_xy[1] / ds)
        sw = max(1, math.ceil(read.level0_size[0] / ds))
        sh = max(1, math.ceil(read.level0_size[1] / ds))
        crop = image[y0 : y0 + sh, x0 : x0 + sw]
        if crop.shape[:2] != (sh, sw):  # rounding at the slide's edge: pad with background
            padded = np.full((sh, sw, 3), 255, dtype=np.uint8)
            padded[: crop.shape[0], : crop.shape[1]] = crop
            crop = padded
        return _resize(crop, read.tile_size)

    def _whole_slide_thumbnail(self) -> tuple[np.ndarray, float]:
        with self._thumbnail_lock:
            if self._thumbnail is None:
                self._thumbnail = self.reader.thumbnail(THUMBNAIL_PX)
            return self._thumbnail


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize (h, w, 3) ``pixels`` to ``size`` (w, h); returns them as is when equal."""
    if pixels.shape[1] == size[0] and pixels.shape[0] == size[1]:
        return np.ascontiguousarray(pixels)
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
