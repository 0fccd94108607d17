"""A TIFF pyramid level of JPEG tiles decoded straight from the file, at 1/1, 1/2, 1/4 or 1/8 scale.

libjpeg(-turbo) scales in the DCT domain: decoding a tile at 1/4 scale skips most of the inverse
transform and all of the colour conversion and resampling of the dropped pixels, and the library
adapters (OpenSlide's premultiplied ARGB, tiffslide's zarr store) add per-pixel copies on top. The
thumbnail (``SlideReader.thumbnail``) uses this when a level qualifies, so planning a 150,000 px
slide decodes a few megapixels of output instead of converting 66 of them.

A level qualifies when it is tiled, 8-bit, 3 samples, contiguous, JPEG-compressed, and its tiles
decode to the same colours this way as through tifffile (checked on one tile when the level is
opened): libjpeg guesses the colour space from markers and component ids, so tiles whose JPEG
stream says one thing and the TIFF another are given an Adobe marker that states the TIFF's choice.
Any doubt, and the thumbnail falls back to ``read_region``.

Tile reads use it too (``JpegLevel.read_reduced``, behind ``SlideReader.read_region_reduced``): a
region whose edges fall on whole pixels of the 1/``reduce`` scale is assembled from tiles decoded
at that scale, kept in a small least-recently-used cache (``DECODE_CACHE_BYTES``) so neighbouring
tile reads do not decode a JPEG tile twice. A region the fast path cannot give exactly as laid out
(not aligned to the scale, reaching past the level's edge, covering an absent tile) is refused
(None) and the caller reads it with ``read_region``.

Also here: ``jpeg_colour_evidence``, which tells from a tile's JPEG header whether tiles a TIFF
labels RGB were in fact coded as YCbCr (a writer's bug: decoded as labelled, glass turns pink).
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tifffile

__all__ = [
    "DECODE_CACHE_BYTES",
    "DECODE_SCALES",
    "DecodedTileCache",
    "JpegLevel",
    "find_jpeg_level",
    "jpeg_colour_evidence",
    "ycbcr_to_rgb",
]

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
_REDUCED[8] = cv2.IMREAD_REDUCED_COLOR_8
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
_COMPRESSION_JPEG = 7
SELF_CHECK_MAX_MEAN_DIFF = 3.0  # grey levels between the fast decode and tifffile's, one tile
ROWS_PER_CHECK = 1  # tile rows decoded between two calls of ``check``
DECODE_SCALES = (1, 2, 4, 8)  # 1/n scales libjpeg decodes in the DCT domain
# Decoded tiles kept per level for tile reads: 48 MiB holds 1,000 256-px tiles at 1/2 scale or
# 256 at full scale, two tile rows of a 60,000 px wide level, so a 5x tile row reuses the tiles
# the row above decoded.
DECODE_CACHE_BYTES = 48 * 2**20


def _adobe_segment(transform: int) -> bytes:
    """An APP14 "Adobe" segment: transform 0 = components are RGB, 1 = YCbCr."""
    body = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform)
    return b"\xff\xee" + struct.pack(">H", len(body) + 2) + body


def _segments(stream: bytes) -> dict[int, bytes]:
    """The first payload of each marker of a JPEG header, up to the start of scan."""
    out: dict[int, bytes] = {}
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xDA:  # start of scan: the header ends
            break
        (length,) = struct.unpack(">H", stream[i + 2 : i + 4])
        out.setdefault(marker, stream[i + 4 : i + 2 + length])
        i += 2 + length
    return out


def jpeg_colour_evidence(stream: bytes) -> str | None:
    """How a JPEG tile says its components are coded: "ycbcr", "rgb", or None (it does not say).

    JFIF, an Adobe marker with transform 1, or component ids 1, 2, 3 with subsampled chroma mean
    YCbCr; an Adobe transform 0 or ids "R", "G", "B" mean RGB.
    """
    seg = _segments(stream)
    if 0xE0 in seg and seg[0xE0].startswith(b"JFIF"):
        return "ycbcr"
    adobe = seg.get(0xEE)
    if adobe is not None and adobe.startswith(b"Adobe") and len(adobe) >= 12:
        return "ycbcr" if adobe[11] == 1 else "rgb" if adobe[11] == 0 else None
    sof = seg.get(0xC0) or seg.get(0xC1) or seg.get(0xC2)
    if sof is None or len(sof) < 6 + 3 * 3 or sof[5] != 3:
        return None
    ids = bytes(sof[6 + 3 * k] for k in range(3))
    sampling = [sof[7 + 3 * k] for k in range(3)]
    if ids == b"RGB":
        return "rgb"
    if ids == b"\x01\x02\x03" and sampling[0] != sampling[1]:
        return "ycbcr"
    return None


def with_colour_marker(stream: bytes, transform: int) -> bytes:
    """``stream`` with its JFIF and Adobe markers replaced by an Adobe marker stating
    ``transform`` (0: the components are RGB, 1: YCbCr), which libjpeg then obeys."""
    parts = [b"\xff\xd8", _adobe_segment(transform)]
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xDA:
            break
        (length,) = struct.unpack(">H", stream[i + 2 : i + 4])
        if marker not in (0xE0, 0xEE):
            parts.append(stream[i : i + 2 + length])
        i += 2 + length
    parts.append(stream[i:])
    return b"".join(parts)


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) Y, Cb, Cr in the R, G, B slots -> RGB, (h, w, 3) uint8."""
    ycrcb = np.ascontiguousarray(pixels[..., [0, 2, 1]])
    return np.asarray(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB))


class DecodedTileCache:
    """Least-recently-used decoded tiles, keyed by (tile index, scale), at most ``max_bytes``.

    Thread-safe. Two threads missing the same tile at once both decode it (same pixels); the
    cache never holds more than ``max_bytes`` of pixels.
    """

    def __init__(self, max_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is None:
                self.misses += 1
                return None
            self._tiles.move_to_end(key)
            self.hits += 1
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        tile.flags.writeable = False  # shared between reads: nobody may change it
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._tiles[key] = tile
            self.nbytes += tile.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self.nbytes = 0


class JpegLevel:
    """The JPEG tiles of one TIFF page, read with ``os.pread`` (thread-safe, no shared seek)."""

    def __init__(self, path: Path, page: tifffile.TiffPage, *, ycbcr_as_rgb: bool) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.cols = -(-self.width // self.tile_w)
        self.rows = -(-self.height // self.tile_h)
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        tables = page.jpegtables
        self._tables = bytes(tables[2:-2]) if tables else b""  # between SOI and EOI
        self.ycbcr_as_rgb = ycbcr_as_rgb
        # What libjpeg is told when the stream does not say: the TIFF's colour space, unless
        # the tiles are known to be YCbCr whatever the TIFF says (converting them is the
        # correction). A stream that says (JFIF, Adobe) is decoded as it says, as libraries do.
        rgb = page.photometric == _PHOTOMETRIC_RGB and not ycbcr_as_rgb
        self._marker = _adobe_segment(0 if rgb else 1)
        self.transform: int | None = None  # set to force a colour space (see ``raw``)
        self.cache = DecodedTileCache()
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        self.cache.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def scales(self) -> tuple[int, ...]:
        """The 1/n scales whose decoded tiles tile the level seamlessly (n divides the tile)."""
        return tuple(n for n in DECODE_SCALES if self.tile_w % n == 0 and self.tile_h % n == 0)

    def read_reduced(
        self, level_xy: tuple[int, int], size: tuple[int, int], reduce: int
    ) -> np.ndarray | None:
        """``size`` (w, h) pixels of the level at ``level_xy`` (its own pixels), decoded at
        1/``reduce`` scale: (h / reduce, w / reduce, 3) uint8 RGB.

        Each pixel is libjpeg's DCT-domain reduction of a ``reduce`` x ``reduce`` block of the
        level. Decoded tiles come from, and go to, ``cache``.

        Returns:
            The pixels, or None when the fast path cannot give the region as laid out: ``reduce``
            is not one of ``scales()``, the region's edges do not fall on multiples of
            ``reduce``, it reaches outside the level, or it covers an absent tile.

        Raises:
            ValueError: a tile does not decode.
        """
        x, y = level_xy
        w, h = size
        if reduce not in self.scales() or w <= 0 or h <= 0:
            return None
        if x % reduce or y % reduce or w % reduce or h % reduce:
            return None
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            return None
        c0, c1 = x // self.tile_w, (x + w - 1) // self.tile_w
        r0, r1 = y // self.tile_h, (y + h - 1) // self.tile_h
        indices = [r * self.cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
        if any(int(self._counts[i]) <= 0 for i in indices):
            return None
        tw, th = self.tile_w // reduce, self.tile_h // reduce
        out = np.empty((h // reduce, w // reduce, 3), np.uint8)
        ox, oy = x // reduce, y // reduce  # region origin, scaled pixels
        for index in indices:
            tile = self._cached_tile(index, reduce)
            r, c = divmod(index, self.cols)
            tx, ty = c * tw, r * th  # tile origin, scaled pixels
            sx0, sy0 = max(ox, tx), max(oy, ty)
            sx1 = min(ox + out.shape[1], tx + tw, tx + tile.shape[1])
            sy1 = min(oy + out.shape[0], ty + th, ty + tile.shape[0])
            if sx1 < min(ox + out.shape[1], tx + tw) or sy1 < min(oy + out.shape[0], ty + th):
                raise ValueError(f"tile {index} decodes smaller than the level's tile size")
            out[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = tile[
                sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
            ]
        return out

    def _cached_tile(self, index: int, reduce: int) -> np.ndarray:
        key = (index, reduce)
        tile = self.cache.get(key)
        if tile is None:
            tile = self.decode_tile(index, reduce)
            if tile is None:  # absent: checked before, so the file changed under us
                raise ValueError(f"tile {index} is absent")
            self.cache.put(key, tile)
        return tile

    def tile_stream(self, index: int) -> bytes | None:
        """The tile's JPEG stream made whole (tables and colour marker inserted), or None when
        the tile is absent (sparse TIFF)."""
        count = int(self._counts[index])
        if count <= 0:
            return None
        data = os.pread(self._fd, count, int(self._offsets[index]))
        if len(data) < count or not data.startswith(b"\xff\xd8"):
            raise ValueError(f"tile {index} is not a JPEG stream")
        if self.transform is not None:
            return with_colour_marker(b"\xff\xd8" + self._tables + data[2:], self.transform)
        marker = b"" if jpeg_colour_evidence(data[:2048]) else self._marker
        return b"\xff\xd8" + marker + self._tables + data[2:]

    def decode_tile(self, index: int, reduce: int) -> np.ndarray | None:
        """Tile ``index`` (row-major) as (h, w, 3) RGB at 1/``reduce`` scale; None if absent."""
        stream = self.tile_stream(index)
        if stream is None:
            return None
        bgr = cv2.imdecode(np.frombuffer(stream, np.uint8), _REDUCED[reduce])
        if bgr is None:
            raise ValueError(f"tile {index} does not decode")
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def decode(
        self,
        reduce: int,
        *,
        check: Callable[[], None],
        workers: int = 2,
    ) -> np.ndarray:
        """The whole level at 1/``reduce`` scale, (ceil(h/r), ceil(w/r), 3) uint8 RGB.

        Absent tiles are white (glass). ``check`` runs between tile rows (cancel, deadline).
        Raises ValueError when a tile does not decode.
        """
        tw, th = self.tile_w // reduce, self.tile_h // reduce
        out_w, out_h = -(-self.width // reduce), -(-self.height // reduce)
        out = np.full((out_h, out_w, 3), 255, dtype=np.uint8)

        def one(index: int) -> None:
            tile = self.decode_tile(index, reduce)
            if tile is None:
                return
            r, c = divmod(index, self.cols)
            y0, x0 = r * th, c * tw
            h, w = min(th, out_h - y0, tile.shape[0]), min(tw, out_w - x0, tile.shape[1])
            out[y0 : y0 + h, x0 : x0 + w] = tile[:h, :w]

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="xmag-thumb") as pool:
            for row0 in range(0, self.rows, ROWS_PER_CHECK):
                check()
                row1 = min(self.rows, row0 + ROWS_PER_CHECK)
                list(pool.map(one, range(row0 * self.cols, row1 * self.cols)))
        return out


def find_jpeg_level(
    tif: tifffile.TiffFile, path: Path, size: tuple[int, int], *, ycbcr_as_rgb: bool
) -> JpegLevel | None:
    """The page of ``tif`` of ``size`` (w, h) as a ``JpegLevel``, when it qualifies (see the
    module docstring); None otherwise."""
    for page in tif.pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        if (int(page.imagewidth), int(page.imagelength)) != size:
            continue
        if not (
            page.is_tiled
            and page.compression == _COMPRESSION_JPEG
            and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and page.planarconfig == 1
            and page.tilewidth % 16 == 0
            and page.tilelength % 16 == 0
            and page.imagedepth == 1
        ):
            return None
        level = JpegLevel(path, page, ycbcr_as_rgb=ycbcr_as_rgb)
        if _self_check(level, page):
            return level
        level.close()
        return None
    return None


def _self_check(level: JpegLevel, page: tifffile.TiffPage) -> bool:
    """Decode the first present tile both ways; True when the colours agree."""
    present = np.flatnonzero(np.asarray(page.databytecounts) > 0)
    if present.size == 0:
        return False
    index = int(present[0])
    try:
        fast = level.decode_tile(index, 1)
        fh = page.parent.filehandle
        fh.seek(int(page.dataoffsets[index]))
        data = fh.read(int(page.databytecounts[index]))
        ref, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
    except Exception:  # any failure means: use the adapter's path
        return False
    if fast is None or ref is None:
        return False
    ref = np.asarray(ref).reshape(-1, *np.asarray(ref).shape[-3:])[0][..., :3]
    if level.ycbcr_as_rgb:
        ref = ycbcr_to_rgb(np.ascontiguousarray(ref))
    if ref.shape != fast.shape:
        return False
    diff = np.abs(ref.astype(np.int16) - fast.astype(np.int16)).mean()
    return bool(diff <= SELF_CHECK_MAX_MEAN_DIFF)
