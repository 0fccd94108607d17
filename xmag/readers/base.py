"""The one reader interface every later stage uses, and the registry that picks a reader by content.

Adapters (OpenSlide, tiffslide, wsidicom) live in sibling modules and register themselves with
``@register_reader``. Later stages (level choice, tissue, tile reads) only use ``SlideReader``.
Coordinates follow OpenSlide: ``level0_xy`` is the top-left corner in the level-0 reference frame,
``size`` is (width, height) in pixels of the level being read.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import numpy as np

from xmag.errors import RegionReadError, XmagUsageError

__all__ = [
    "THUMBNAIL_BLOCK_PX",
    "LevelInfo",
    "MetadataMpp",
    "SlideReader",
    "register_reader",
    "registered_readers",
]

THUMBNAIL_BLOCK_PX = 4096 * 4096  # source pixels thumbnail() reads at once (48 MiB as RGB)
_UM_PER_RESOLUTION_UNIT = {
    "centimeter": 1e4,
    "inch": 25_400.0,
    "millimeter": 1e3,
    "micrometer": 1.0,
}
# Writers put these when they know nothing: 72 or 96 dots per inch says nothing about a microscope.
_PLACEHOLDER_DPI = (72.0, 96.0)


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size in its own pixels and its downsample from level 0."""

    index: int
    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class MetadataMpp:
    """Microns per pixel at level 0 as stored in the file, and which field it came from."""

    mpp_x: float
    mpp_y: float
    field: (
        str  # e.g. "openslide.mpp-x", "tiff.XResolution", "ome.PhysicalSizeX", "dicom.PixelSpacing"
    )


class SlideReader(ABC):
    """A whole-slide image opened for reading. Use as a context manager.

    Subclasses set ``name`` (the registry key) and implement the abstract methods. ``read_region``
    must be safe to call from several threads at once (adapters lock where the library is not).
    """

    name: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path
        self._closed = False
        self._lock = threading.Lock()
        self._levels: tuple[LevelInfo, ...] = ()
        self._properties: dict[str, str] = {}

    # -- identity ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Cheap check whether this reader can open ``path`` (no full decode)."""

    @property
    @abstractmethod
    def vendor(self) -> str | None:
        """Scanner vendor or format family as the library names it ("aperio", "hamamatsu"...)."""

    @property
    @abstractmethod
    def format(self) -> str:
        """Container format: "svs", "ndpi", "ome-tiff", "tiff", "dicom", "mrxs"..."""

    @property
    def levels(self) -> tuple[LevelInfo, ...]:
        """Pyramid levels, level 0 (largest) first (adapters set ``_levels`` when they open)."""
        return self._levels

    @property
    def properties(self) -> Mapping[str, str]:
        """Raw metadata key/values, for provenance and debugging (adapters set ``_properties``)."""
        return self._properties

    @abstractmethod
    def metadata_mpp(self) -> MetadataMpp | None:
        """Level-0 mpp from the file's metadata, or None when the file does not say."""

    @abstractmethod
    def objective_power(self) -> float | None:
        """Scan objective power (20, 40...) from metadata, or None."""

    @abstractmethod
    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Adapter read; returns (height, width, 3) uint8 RGB, background white where outside."""

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        lv = self.levels[0]
        return (lv.width, lv.height)

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is ``level0_xy`` in level 0.

        Returns an (h, w, 3) uint8 RGB array. Raises ``RegionReadError`` when the pixels cannot
        be decoded (a corrupt tile), never returns substitute pixels.
        """
        self._check_open()
        if not 0 <= level < len(self.levels):
            raise XmagUsageError(f"level {level} out of range 0..{len(self.levels) - 1}")
        if size[0] <= 0 or size[1] <= 0:
            raise XmagUsageError(f"region size must be positive, got {size}")
        return self._read_region(level0_xy, level, size)

    def _undecodable(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], cause: str, fix: str
    ) -> RegionReadError:
        """The error an adapter raises when its library cannot decode a region.

        Args:
            cause: the library's error, as text.
            fix: what the user can do (rescan, re-export...).
        """
        return RegionReadError.for_region(
            self.path,
            level,
            level0_xy,
            size,
            f"cannot decode level {level} region at level-0 {level0_xy} of size {size} ({cause}); "
            f"{fix}",
        )

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide whose longer side is at most ``max_px``.

        Returns (image, downsample) where downsample is level-0 pixels per thumbnail pixel.
        Reads the smallest level at least as large as the target in blocks of at most
        ``THUMBNAIL_BLOCK_PX`` source pixels and area-resizes each block into its place, so
        memory stays bounded even on a single-level slide of 100,000 x 80,000 px.
        """
        self._check_open()
        if max_px <= 0:
            raise XmagUsageError(f"max_px must be positive, got {max_px}")
        w0, h0 = self.dimensions
        target_ds = max(1.0, max(w0, h0) / max_px)
        level = 0
        for lv in self.levels:
            if lv.downsample <= target_ds * 1.0001:
                level = lv.index
        out_w = max(1, round(w0 / target_ds))
        out_h = max(1, round(h0 / target_ds))
        return self._resize_level(level, (out_w, out_h)), w0 / out_w

    def _resize_level(self, level: int, out_size: tuple[int, int]) -> np.ndarray:
        """Area-resize the whole of ``level`` to ``out_size`` (w, h), reading block by block.

        Output blocks are chosen so their source blocks hold at most ``THUMBNAIL_BLOCK_PX``
        pixels; block edges fall on whole output pixels, so with an integer scale the result
        equals resizing the level read at once.
        """
        import cv2

        lv = self.levels[level]
        out_w, out_h = out_size
        sx, sy = lv.width / out_w, lv.height / out_h
        side_src = max(1, math.isqrt(THUMBNAIL_BLOCK_PX))
        step_x = max(1, int(side_src / max(sx, 1.0)))
        step_y = max(1, int(side_src / max(sy, 1.0)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for oy0 in range(0, out_h, step_y):
            oy1 = min(out_h, oy0 + step_y)
            y0, y1 = round(oy0 * sy), max(round(oy0 * sy) + 1, round(oy1 * sy))
            for ox0 in range(0, out_w, step_x):
                ox1 = min(out_w, ox0 + step_x)
                x0, x1 = round(ox0 * sx), max(round(ox0 * sx) + 1, round(ox1 * sx))
                level0_xy = (round(x0 * lv.downsample), round(y0 * lv.downsample))
                block = self.read_region(level0_xy, level, (x1 - x0, y1 - y0))
                if block.shape[:2] != (oy1 - oy0, ox1 - ox0):
                    block = cv2.resize(block, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                out[oy0:oy1, ox0:ox1] = block
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release library handles; called once."""

    def _check_open(self) -> None:
        if self._closed:
            raise XmagUsageError(f"reader for {self.path} is closed")

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


_REGISTRY: dict[str, tuple[int, type[SlideReader]]] = {}


def register_reader(priority: int) -> Callable[[type[SlideReader]], type[SlideReader]]:
    """Class decorator: add a reader to the registry; lower ``priority`` is tried first."""

    def deco(cls: type[SlideReader]) -> type[SlideReader]:
        if cls.name in _REGISTRY:
            raise XmagUsageError(f"reader {cls.name!r} is already registered")
        _REGISTRY[cls.name] = (priority, cls)
        return cls

    return deco


def registered_readers() -> list[type[SlideReader]]:
    """Readers in the order ``open_slide`` tries them."""
    return [cls for _, cls in sorted(_REGISTRY.values(), key=lambda pc: pc[0])]


# -- helpers shared by the adapters ------------------------------------------------------------
def mpp_from_tiff_resolution(
    x_resolution: float | None, y_resolution: float | None, unit: str | None
) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) in um from TIFF XResolution/YResolution (pixels per unit).

    ``unit`` is the ResolutionUnit name ("centimeter", "inch", "none", any case). Returns None
    for unit "none", missing or non-positive values, and the 72/96 dpi placeholders.
    """
    um_per_unit = _UM_PER_RESOLUTION_UNIT.get((unit or "").strip().lower())
    if um_per_unit is None or not x_resolution or not y_resolution:
        return None
    if x_resolution <= 0 or y_resolution <= 0:
        return None
    if unit and unit.lower() == "inch" and x_resolution in _PLACEHOLDER_DPI:
        return None
    return um_per_unit / x_resolution, um_per_unit / y_resolution


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA (h, w, 4) uint8 onto white; returns (h, w, 3) uint8."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def level_window(
    level0_xy: tuple[int, int], info: LevelInfo, size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where a region falls inside its level.

    Returns ((x, y), (x0, y0, x1, y1)): the region's top-left in the level's own frame
    (``level0_xy / downsample`` truncated, as OpenSlide and tiffslide do) and the in-bounds
    window in that frame (empty when x1 <= x0 or y1 <= y0).
    """
    x = int(level0_xy[0] / info.downsample)
    y = int(level0_xy[1] / info.downsample)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + size[0], info.width), min(y + size[1], info.height)
    return (x, y), (x0, y0, x1, y1)


def white_outside(
    pixels: np.ndarray, level_xy: tuple[int, int], window: tuple[int, int, int, int]
) -> np.ndarray:
    """Set to white the pixels of a region (top-left ``level_xy``) outside ``window``."""
    x, y = level_xy
    x0, y0, x1, y1 = window
    h, w = pixels.shape[:2]
    inside = np.zeros((h, w), dtype=bool)
    inside[max(0, y0 - y) : max(0, y1 - y), max(0, x0 - x) : max(0, x1 - x)] = True
    if not inside.all():
        pixels = pixels.copy() if not pixels.flags.writeable else pixels
        pixels[~inside] = 255
    return pixels
