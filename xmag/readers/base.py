"""The one reader interface every later stage uses, and the registry that picks a reader by content.

Adapters (OpenSlide, tiffslide, wsidicom) live in sibling modules and register themselves with
``@register_reader``. Later stages (level choice, tissue, tile reads) only use ``SlideReader``.
Coordinates follow OpenSlide: ``level0_xy`` is the top-left corner in the level-0 reference frame,
``size`` is (width, height) in pixels of the level being read.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import numpy as np

from xmag.errors import XmagUsageError

__all__ = [
    "LevelInfo",
    "MetadataMpp",
    "SlideReader",
    "register_reader",
    "registered_readers",
]


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
    field: str  # e.g. "openslide.mpp-x", "tiff.XResolution", "ome.PhysicalSizeX", "dicom.PixelSpacing"


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
    @abstractmethod
    def levels(self) -> tuple[LevelInfo, ...]:
        """Pyramid levels, level 0 (largest) first."""

    @property
    @abstractmethod
    def properties(self) -> Mapping[str, str]:
        """Raw metadata key/values, for provenance and debugging."""

    @abstractmethod
    def metadata_mpp(self) -> MetadataMpp | None:
        """Level-0 mpp from the file's metadata, or None when the file does not say."""

    @abstractmethod
    def objective_power(self) -> float | None:
        """Scan objective power (20, 40...) from metadata, or None."""

    @abstractmethod
    def _read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Adapter read; returns (height, width, 3) uint8 RGB, background white where outside."""

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        lv = self.levels[0]
        return (lv.width, lv.height)

    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
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

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide whose longer side is at most ``max_px``.

        Returns (image, downsample) where downsample is level-0 pixels per thumbnail pixel.
        Reads the smallest level at least as large as the target, then area-resizes, so memory
        stays bounded on any slide.
        """
        import cv2

        self._check_open()
        w0, h0 = self.dimensions
        target_ds = max(w0, h0) / max_px
        level = 0
        for lv in self.levels:
            if lv.downsample <= target_ds * 1.0001:
                level = lv.index
        lv = self.levels[level]
        img = self.read_region((0, 0), level, (lv.width, lv.height))
        out_w = max(1, round(w0 / max(target_ds, 1.0)))
        out_h = max(1, round(h0 / max(target_ds, 1.0)))
        if (out_w, out_h) != (lv.width, lv.height):
            img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return img, w0 / out_w

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
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
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
