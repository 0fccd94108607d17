"""What the viewer's tile endpoints keep between requests: open slides, encoded tiles, outlines.

Bounded in memory and CPU:

* ``ReaderCache``: an LRU of at most ``DEFAULT_OPEN_SLIDES`` open slides (each a ``SlideReader``
  with its ``DeepZoomGenerator``). An evicted slide is closed once no request still uses it
  (a reference count), so a tile being made never sees its reader closed.
* ``TileCache``: an LRU of encoded JPEG tiles by ETag, at most ``DEFAULT_TILE_CACHE_BYTES``.
* ``ViewerCache.render_slots``: at most ``DEFAULT_RENDER_SLOTS`` tiles are decoded and encoded at
  once, whatever the number of server threads; other requests wait for a slot.

A slide is named by a ``SlideKey``: its real path plus the file's size and modification time, so a
file replaced on disk is opened again and its tiles get new ETags.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from xmag.deepzoom import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_OVERLAP_PX,
    DEFAULT_TILE_PX,
    DeepZoomGenerator,
)
from xmag.readers import SlideReader, open_slide
from xmag.tissue import detect_tissue

__all__ = [
    "DEFAULT_OPEN_SLIDES",
    "DEFAULT_RENDER_SLOTS",
    "DEFAULT_TILE_CACHE_BYTES",
    "OpenSlideEntry",
    "ReaderCache",
    "SlideKey",
    "TileCache",
    "ViewerCache",
    "tissue_outline_geojson",
]

#: Slides kept open at once (file handles and library caches).
DEFAULT_OPEN_SLIDES = 8
#: Encoded tiles kept in memory (bytes).
DEFAULT_TILE_CACHE_BYTES = 64 * 1024 * 1024
#: Tiles decoded and encoded at the same time (CPU bound).
DEFAULT_RENDER_SLOTS = 2
#: Tissue outlines kept (small: a few hundred points each).
DEFAULT_OUTLINES = 32
#: Longest side of the thumbnail the outline is traced on: enough for a whole-slide view, and
#: about four times faster than the engine's 2048-px tissue detection.
OUTLINE_THUMBNAIL_PX = 1024


@dataclass(frozen=True)
class SlideKey:
    """A slide file as it is now: its real path, size and modification time (ns)."""

    path: str
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> SlideKey:
        """The key of the file (or DICOM folder) at ``path`` (raises ``OSError`` when absent)."""
        real = path.resolve(strict=True)
        stat = real.stat()
        return cls(str(real), stat.st_size, stat.st_mtime_ns)

    def tag(self) -> str:
        """A short digest naming this version of the slide (part of tile ETags)."""
        raw = f"{self.path}\0{self.size_bytes}\0{self.mtime_ns}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]


class OpenSlideEntry:
    """An open slide, its Deep Zoom generator and how many requests use it."""

    def __init__(self, reader: SlideReader) -> None:
        self.reader = reader
        self.deepzoom = DeepZoomGenerator(
            reader, tile_px=DEFAULT_TILE_PX, overlap_px=DEFAULT_OVERLAP_PX
        )
        self.users = 0
        self.evicted = False


class ReaderCache:
    """An LRU of open slides; ``use(key)`` opens on a miss and lends the entry for a block.

    Args:
        capacity: slides kept open.
    """

    def __init__(self, capacity: int = DEFAULT_OPEN_SLIDES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[SlideKey, OpenSlideEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[SlideKey, threading.Lock] = {}

    @contextmanager
    def use(self, key: SlideKey) -> Iterator[OpenSlideEntry]:
        """Lend the open slide of ``key`` (opened with ``open_slide`` on a miss).

        Raises:
            the reader's errors (``UnsupportedFormatError``, ``CorruptSlideError``...).
        """
        entry = self._acquire(key)
        try:
            yield entry
        finally:
            self._release(entry)

    def _acquire(self, key: SlideKey) -> OpenSlideEntry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.users += 1
                return entry
            opening = self._opening.setdefault(key, threading.Lock())
        # One thread opens a given slide; others wait for it rather than opening it again.
        with opening:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users += 1
                    return entry
            try:
                fresh = OpenSlideEntry(open_slide(key.path))
            finally:
                with self._lock:
                    self._opening.pop(key, None)
            with self._lock:
                fresh.users += 1
                self._entries[key] = fresh
                to_close = []
                while len(self._entries) > self.capacity:
                    _, old = self._entries.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        to_close.append(old)
            for old in to_close:
                old.reader.close()
            return fresh

    def _release(self, entry: OpenSlideEntry) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.evicted and entry.users == 0
        if close:
            entry.reader.close()

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Close every slide no request uses (the others close when released)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            for entry in entries:
                entry.evicted = True
        for entry in entries:
            if entry.users == 0:
                entry.reader.close()


class TileCache:
    """An LRU of encoded tiles by ETag, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._tiles: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, etag: str) -> bytes | None:
        with self._lock:
            data = self._tiles.get(etag)
            if data is not None:
                self._tiles.move_to_end(etag)
            return data

    def put(self, etag: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(etag, None)
            if old is not None:
                self.size_bytes -= len(old)
            self._tiles[etag] = data
            self.size_bytes += len(data)
            while self.size_bytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self.size_bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._tiles)


class ViewerCache:
    """Everything one API process keeps for the viewer (one per app)."""

    def __init__(
        self,
        *,
        open_slides: int = DEFAULT_OPEN_SLIDES,
        tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
        render_slots: int = DEFAULT_RENDER_SLOTS,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    ) -> None:
        self.readers = ReaderCache(open_slides)
        self.tiles = TileCache(tile_cache_bytes)
        self.render_slots = threading.BoundedSemaphore(render_slots)
        self.jpeg_quality = jpeg_quality
        self._outlines: OrderedDict[tuple[SlideKey, float | None], dict[str, Any]] = OrderedDict()
        self._outline_lock = threading.Lock()

    def tile_etag(self, key: SlideKey, level: int, col: int, row: int) -> str:
        """A strong ETag of one tile: the slide's version, the tile geometry and the encoding."""
        raw = (
            f"{key.tag()}/{DEFAULT_TILE_PX}/{DEFAULT_OVERLAP_PX}/q{self.jpeg_quality}/"
            f"{level}/{col}_{row}"
        )
        return '"' + hashlib.sha256(raw.encode()).hexdigest()[:32] + '"'

    def tissue_outline(self, key: SlideKey, level0_mpp: float | None) -> dict[str, Any]:
        """The tissue outline GeoJSON of a slide (computed once per slide and mpp)."""
        with self._outline_lock:
            cached = self._outlines.get((key, level0_mpp))
            if cached is not None:
                return cached
        with self.render_slots, self.readers.use(key) as entry:
            outline = tissue_outline_geojson(entry.reader, level0_mpp)
        with self._outline_lock:
            self._outlines[(key, level0_mpp)] = outline
            while len(self._outlines) > DEFAULT_OUTLINES:
                self._outlines.popitem(last=False)
        return outline

    def close(self) -> None:
        self.readers.close()


def tissue_outline_geojson(reader: SlideReader, level0_mpp: float | None) -> dict[str, Any]:
    """The outline of the tissue ``xmag.tissue.detect_tissue`` finds, as level-0 GeoJSON.

    Traced on a thumbnail of at most ``OUTLINE_THUMBNAIL_PX``: a picture of where the tissue is,
    not the job's own mask (result.json's ``tissue`` says how that one was made).

    One ``Polygon`` feature per tissue region (outer ring, then its holes), in level-0 pixels.

    Args:
        reader: an open slide.
        level0_mpp: um/px at level 0 for the detector's size rules; None: the slide's own.
    """
    tissue = detect_tissue(reader, max_px=OUTLINE_THUMBNAIL_PX, level0_mpp=level0_mpp)
    mask = np.ascontiguousarray(tissue.mask.astype(np.uint8))
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features: list[dict[str, Any]] = []
    if hierarchy is not None:
        links = hierarchy[0]
        ds = tissue.downsample
        for i, contour in enumerate(contours):
            if links[i][3] != -1 or len(contour) < 3:  # holes are added to their parent
                continue
            rings = [_ring(contour, ds)]
            child = links[i][2]
            while child != -1:
                if len(contours[child]) >= 3:
                    rings.append(_ring(contours[child], ds))
                child = links[child][0]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {"objectType": "annotation", "name": "tissue"},
                }
            )
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {"method": tissue.method, "downsample": tissue.downsample},
    }


def _ring(contour: np.ndarray, downsample: float) -> list[list[float]]:
    points = contour.reshape(-1, 2).astype(np.float64) * downsample
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in points]
    ring.append(ring[0])
    return ring


def file_etag(path: Path) -> str:
    """A weak ETag of a static file from its size and modification time."""
    stat = os.stat(path)
    return f'W/"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
