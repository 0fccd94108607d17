"""The one reader interface every later stage uses, and the registry that picks a reader by content.

Adapters (OpenSlide, tiffslide, wsidicom) live in sibling modules and register themselves with
``@register_reader``. Later stages (level choice, tissue, tile reads) only use ``SlideReader``.
Coordinates follow OpenSlide: ``level0_xy`` is the top-left corner in the level-0 reference frame,
``size`` is (width, height) in pixels of the level being read.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from xmag.errors import (
    JobCanceledError,
    ReadBudgetError,
    RegionReadError,
    SlideTooLargeError,
    XmagUsageError,
)

if TYPE_CHECKING:
    import tifffile

    from xmag.readers._jpeg_level import JpegLevel

__all__ = [
    "DEFAULT_THUMBNAIL_TIMEOUT_S",
    "MAX_SEGMENT_PX",
    "MAX_THUMBNAIL_SOURCE_PX",
    "THUMBNAIL_BLOCK_PX",
    "CancelFn",
    "LevelInfo",
    "MetadataMpp",
    "SlideFormat",
    "SlideReader",
    "register_reader",
    "registered_readers",
    "supported_formats_sentence",
]

THUMBNAIL_BLOCK_PX = 4096 * 4096  # source pixels thumbnail() reads at once (48 MiB as RGB)
# A thumbnail is made from one level read whole: a slide whose smallest level fitting the
# thumbnail holds more pixels than this is refused (SLIDE_TOO_LARGE) before any read. 2^31 px is
# a 53,000 x 40,000 px level: real pyramids offer a level of a few megapixels; a single-level
# slide that large takes minutes to decode, and a file declaring 10^12 px is a lie.
MAX_THUMBNAIL_SOURCE_PX = 2**31
# Largest internal tile or strip a slide may declare: libraries decode one whole at each read
# (a declared 65,536 px square tile is a 12 GiB allocation per read). 2^26 px = 192 MiB as RGB.
MAX_SEGMENT_PX = 2**26
DEFAULT_THUMBNAIL_TIMEOUT_S = 120.0  # wall time one thumbnail may take; checked between reads
THUMBNAIL_DECODE_WORKERS = 2  # threads decoding JPEG tiles for a thumbnail (fast path)

CancelFn = Callable[[], bool]
"""Called between reads of long stages; True stops the stage with ``JobCanceledError``."""
_UM_PER_RESOLUTION_UNIT = {
    "centimeter": 1e4,
    "inch": 25_400.0,
    "millimeter": 1e3,
    "micrometer": 1.0,
}
# Writers put these when they know nothing: 72 or 96 dots per inch says nothing about a microscope.
_PLACEHOLDER_DPI = (72.0, 96.0)


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class LevelInfo:
    """One pyramid level: its size in its own pixels and its downsample from level 0.

    Also the ``levels`` entries of result.json and ``xmag inspect --json`` (a pydantic
    dataclass: the same class is the stage output and the published schema).
    """

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


@dataclass(frozen=True)
class SlideFormat:
    """A format a reader opens, as people name it, with the file name endings it comes with.

    Attributes:
        title: e.g. "Aperio SVS"; the supported-formats sentence lists these.
        extensions: lowercase endings with the dot (".svs"); empty when the name says nothing.
        note: a few words printed after the endings (e.g. "or a folder of instances").
    """

    title: str
    extensions: tuple[str, ...] = ()
    note: str = ""

    def describe(self) -> str:
        """ "Aperio SVS (.svs)", "DICOM WSI (.dcm, or a folder of instances)"."""
        detail = ", ".join((*self.extensions, *((self.note,) if self.note else ())))
        return f"{self.title} ({detail})" if detail else self.title


class SlideReader(ABC):
    """A whole-slide image opened for reading. Use as a context manager.

    Subclasses set ``name`` (the registry key) and ``formats`` (what they open, for people: the
    supported-formats sentence is built from every registered reader's), and implement the
    abstract methods. ``read_region`` must be safe to call from several threads at once (adapters
    lock where the library is not).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[SlideFormat, ...]] = ()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._closed = False
        self._lock = threading.Lock()
        self._levels: tuple[LevelInfo, ...] = ()
        self._properties: dict[str, str] = {}
        self._tiff_probe: _TiffProbe | None = None
        self._probe_lock = threading.Lock()

    # -- identity ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Cheap check whether this reader can open ``path`` (no full decode)."""

    @classmethod
    def detect_preferred(cls, path: Path) -> bool:
        """The check used when this reader is preferred (``open_slide(prefer=...)``): by default
        ``detect``; a reader that opens more when asked for by name widens it."""
        return cls.detect(path)

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
        pixels = self._read_region(level0_xy, level, size)
        if self.colour_correction is not None:
            # YCbCr-coded tiles the file labels RGB: the adapter returned Y, Cb, Cr as R, G, B.
            from xmag.readers._jpeg_level import ycbcr_to_rgb

            level_xy, window = level_window(level0_xy, self.levels[level], size)
            pixels = white_outside(ycbcr_to_rgb(pixels), level_xy, window)
        return pixels

    def decode_scales(self, level: int) -> tuple[int, ...]:
        """The 1/n scales at which ``read_region_reduced`` decodes ``level`` (empty: none).

        A reader offers them for a level stored as JPEG tiles that decode, straight from the file,
        to the colours its ``read_region`` gives (``xmag.readers._jpeg_level``): (1, 2, 4, 8) for
        a TIFF level of 256-px tiles. Readers whose library does more than decode tiles (NDPI,
        DICOM, anything not a tiled JPEG TIFF) offer none.
        """
        self._check_open()
        if not 0 <= level < len(self.levels):
            raise XmagUsageError(f"level {level} out of range 0..{len(self.levels) - 1}")
        fast = self._jpeg_level(level)
        return fast.scales() if fast is not None else ()

    def read_region_reduced(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], reduce: int
    ) -> np.ndarray | None:
        """``read_region`` of ``size`` (w, h) pixels of ``level``, decoded at 1/``reduce`` scale.

        libjpeg reduces each ``reduce`` x ``reduce`` block in the DCT domain, which costs a
        fraction of decoding it whole; the pixels are close to, not equal to, an area resize of
        ``read_region`` (tests/test_fast_decode.py holds the tolerance). Decoded JPEG tiles are
        cached per level (bounded) so neighbouring reads do not decode a tile twice.

        Args:
            level0_xy: top-left in level-0 pixels; must fall on a whole pixel of ``level``.
            level: pyramid level; ``reduce`` must be one of ``decode_scales(level)``.
            size: (w, h) in pixels of ``level``.
            reduce: 1, 2, 4 or 8.

        Returns:
            (h / reduce, w / reduce, 3) uint8 RGB, or None when this reader cannot give the
            region this way (the level does not qualify, the region's origin or size is not a
            multiple of ``reduce``, it reaches outside the level or covers an absent tile): read
            it with ``read_region`` then.

        Raises:
            RegionReadError: a tile does not decode.
        """
        self._check_open()
        if not 0 <= level < len(self.levels):
            raise XmagUsageError(f"level {level} out of range 0..{len(self.levels) - 1}")
        fast = self._jpeg_level(level)
        if fast is None:
            return None
        info = self.levels[level]
        x, y = level0_xy[0] / info.downsample, level0_xy[1] / info.downsample
        level_xy = (round(x), round(y))
        if abs(x - level_xy[0]) > 1e-6 or abs(y - level_xy[1]) > 1e-6:
            return None  # between two pixels of the level: libraries interpolate there
        try:
            return fast.read_reduced(level_xy, size, reduce)
        except ValueError as exc:
            raise self._undecodable(
                level0_xy, level, size, str(exc), "the slide is damaged there."
            ) from exc

    @property
    def colour_correction(self) -> str | None:
        """The colour correction applied to every read, or None.

        ``"ycbcr-labelled-rgb"``: the file's JPEG tiles are coded as YCbCr (their JPEG header
        says so) but the TIFF labels them RGB, and the library decodes them as labelled, which
        turns glass pink; ``read_region`` converts them. Told from the header of one tile and
        confirmed by how the library decodes it.
        """
        return "ycbcr-labelled-rgb" if self._probe().ycbcr_as_rgb else None

    def check_segment_sizes(self) -> None:
        """Refuse a TIFF whose declared internal tiles or strips are too large to decode.

        Raises:
            SlideTooLargeError: a tile or strip holds more than ``MAX_SEGMENT_PX`` pixels.
        """
        biggest = self._probe().largest_segment_px
        if biggest > MAX_SEGMENT_PX:
            raise SlideTooLargeError(
                f"{self.path} declares internal tiles or strips of {biggest:,} px, more than "
                f"the {MAX_SEGMENT_PX:,} px decoded at once; re-export it as a tiled pyramidal "
                "TIFF (256-1024 px tiles).",
                path=self.path,
                segment_px=biggest,
                max_segment_px=MAX_SEGMENT_PX,
            )

    def _probe(self) -> _TiffProbe:
        """What the file says as a TIFF, looked at once (reads may come from several threads)."""
        probe = self._tiff_probe
        if probe is None:
            with self._probe_lock:
                if self._tiff_probe is None:
                    self._tiff_probe = _TiffProbe.of(self)
                probe = self._tiff_probe
        return probe

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

    def thumbnail(
        self,
        max_px: int = 1024,
        *,
        should_cancel: CancelFn | None = None,
        timeout_s: float | None = DEFAULT_THUMBNAIL_TIMEOUT_S,
        max_source_px: int = MAX_THUMBNAIL_SOURCE_PX,
    ) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide whose longer side is at most ``max_px``.

        Returns (image, downsample) where downsample is level-0 pixels per thumbnail pixel.
        Reads the smallest level at least as large as the target. When that level is made of
        JPEG tiles in a TIFF, they are decoded straight from the file at 1/2, 1/4 or 1/8 scale
        when that still covers the target (``xmag.readers._jpeg_level``); otherwise the level is
        read in blocks of at most ``THUMBNAIL_BLOCK_PX`` source pixels, each area-resized into
        its place. Memory stays bounded by the output and one block.

        Args:
            max_px: longest side of the thumbnail, px.
            should_cancel: called between reads; True raises ``JobCanceledError``.
            timeout_s: wall-time budget, checked between reads (None: no limit).
            max_source_px: most pixels of the level read (checked before any read).

        Raises:
            SlideTooLargeError: the level to read holds more than ``max_source_px`` pixels.
            ReadBudgetError: reading took longer than ``timeout_s``.
            JobCanceledError: ``should_cancel()`` returned True.
            RegionReadError: a block could not be decoded.
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
        lv = self.levels[level]
        source_px = lv.width * lv.height
        if source_px > max_source_px:
            raise SlideTooLargeError(
                f"{self.path}: a thumbnail of this slide would read level {level} whole, "
                f"{lv.width:,} x {lv.height:,} px ({source_px:,} px), more than the "
                f"{max_source_px:,} px allowed; the slide has no small pyramid level (or "
                "declares dimensions its data cannot hold): re-export it as a pyramidal TIFF.",
                path=self.path,
                level=level,
                level_size=[lv.width, lv.height],
                max_source_px=max_source_px,
            )
        check = _StageCheck("thumbnail", self.path, should_cancel, timeout_s)
        check()
        fast = self._jpeg_level(level)
        reduce = 1
        while fast is not None and reduce < 8 and lv.downsample * reduce * 2 <= target_ds * 1.0001:
            reduce *= 2
        if fast is not None:
            import cv2

            try:
                decoded = fast.decode(reduce, check=check, workers=THUMBNAIL_DECODE_WORKERS)
            except ValueError as exc:
                raise self._undecodable(
                    (0, 0), level, (lv.width, lv.height), str(exc), "the slide is damaged there."
                ) from exc
            image = cv2.resize(decoded, (out_w, out_h), interpolation=cv2.INTER_AREA)
            return np.asarray(image), w0 / out_w
        return self._resize_level(level, (out_w, out_h), check), w0 / out_w

    def _jpeg_level(self, level: int) -> JpegLevel | None:
        """The level as JPEG tiles to decode directly (see ``_jpeg_level``), or None."""
        lv = self.levels[level]
        return self._probe().jpeg_level(self, (lv.width, lv.height))

    def _resize_level(
        self, level: int, out_size: tuple[int, int], check: Callable[[], None] | None = None
    ) -> np.ndarray:
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
                if check is not None:
                    check()
                block = self.read_region(level0_xy, level, (x1 - x0, y1 - y0))
                if block.shape[:2] != (oy1 - oy0, ox1 - ox0):
                    block = cv2.resize(block, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                out[oy0:oy1, ox0:ox1] = block
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._tiff_probe is not None:
                self._tiff_probe.close()
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
        if not cls.formats:
            raise XmagUsageError(
                f"reader {cls.name!r} declares no formats; set {cls.__name__}.formats"
            )
        _REGISTRY[cls.name] = (priority, cls)
        return cls

    return deco


def registered_readers() -> list[type[SlideReader]]:
    """Readers in the order ``open_slide`` tries them."""
    return [cls for _, cls in sorted(_REGISTRY.values(), key=lambda pc: pc[0])]


def supported_formats_sentence() -> str:
    """ "Supported formats: Aperio SVS (.svs), ..., and DICOM WSI (...)." from the registry.

    Formats are listed in the order readers are tried, each once (two readers may open one).
    """
    titles = list(dict.fromkeys(f.describe() for cls in registered_readers() for f in cls.formats))
    listed = ", ".join(titles[:-1]) + f", and {titles[-1]}" if len(titles) > 1 else "".join(titles)
    return f"Supported formats: {listed}."


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


def read_in_window(
    level0_xy: tuple[int, int],
    info: LevelInfo,
    size: tuple[int, int],
    read: Callable[[tuple[int, int], tuple[int, int]], np.ndarray],
) -> np.ndarray:
    """A (h, w, 3) region on white: ``read(xy, wh)`` gives the pixels of the part inside the
    level (its top-left and size in the level's frame), pasted where they fall; the rest (a
    region reaching past the level's edges) stays white, as OpenSlide pads it."""
    out = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    (x, y), (x0, y0, x1, y1) = level_window(level0_xy, info, size)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = read((x0, y0), (x1 - x0, y1 - y0))
    return out


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


class _StageCheck:
    """Called between the reads of a long stage: cancel, then the wall-time budget."""

    def __init__(
        self, stage: str, path: Path, should_cancel: CancelFn | None, timeout_s: float | None
    ) -> None:
        self.stage, self.path = stage, path
        self.should_cancel, self.timeout_s = should_cancel, timeout_s
        self.started = time.monotonic()

    def __call__(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCanceledError(
                f"{self.path}: canceled during the {self.stage}.", path=self.path, stage=self.stage
            )
        took = time.monotonic() - self.started
        if self.timeout_s is not None and took > self.timeout_s:
            raise ReadBudgetError(
                f"{self.path}: the {self.stage} read for {took:.0f} s, more than its "
                f"{self.timeout_s:g} s budget; the slide decodes far slower than its size "
                "promises (damaged or hostile file): re-export it.",
                path=self.path,
                stage=self.stage,
                timeout_s=self.timeout_s,
            )


class _TiffProbe:
    """What a reader learns by looking at its file as a TIFF with tifffile (nothing if not one):
    the largest declared tile or strip, whether JPEG tiles labelled RGB are coded YCbCr, and
    levels whose JPEG tiles can be decoded directly."""

    def __init__(self) -> None:
        self.tif: tifffile.TiffFile | None = None
        self.largest_segment_px = 0
        self.ycbcr_as_rgb = False
        self._levels: dict[tuple[int, int], JpegLevel | None] = {}
        self._levels_lock = threading.Lock()  # tile reads ask from several threads

    @classmethod
    def of(cls, reader: SlideReader) -> _TiffProbe:
        probe = cls()
        path = reader.path
        try:
            if not path.is_file():
                return probe
            with path.open("rb") as fh:
                if fh.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                    return probe
            import tifffile

            tif = tifffile.TiffFile(path)
        except Exception:  # not a TIFF tifffile reads: no probe, adapters decide
            return probe
        if tif.is_ndpi:  # NDPI "tiles" are restart intervals of one JPEG: OpenSlide's business
            tif.close()
            return probe
        probe.tif = tif
        sizes = {(lv.width, lv.height) for lv in reader.levels}
        for page in tif.pages:
            if not isinstance(page, tifffile.TiffPage):
                continue
            if (int(page.imagewidth), int(page.imagelength)) not in sizes:
                continue
            if page.is_tiled:
                seg = int(page.tilewidth) * int(page.tilelength) * max(1, int(page.tiledepth))
            else:
                seg = int(page.imagewidth) * min(int(page.rowsperstrip), int(page.imagelength))
            probe.largest_segment_px = max(probe.largest_segment_px, seg)
        if probe.largest_segment_px <= MAX_SEGMENT_PX:  # else the probe's one read is too big
            probe.ycbcr_as_rgb = _ycbcr_labelled_rgb(reader, tif)
        return probe

    def jpeg_level(self, reader: SlideReader, size: tuple[int, int]) -> JpegLevel | None:
        if self.tif is None:
            return None
        if size in self._levels:
            return self._levels[size]
        with self._levels_lock:
            if size not in self._levels:
                from xmag.readers._jpeg_level import find_jpeg_level

                self._levels[size] = find_jpeg_level(
                    self.tif, reader.path, size, ycbcr_as_rgb=self.ycbcr_as_rgb
                )
            return self._levels[size]

    def close(self) -> None:
        for level in self._levels.values():
            if level is not None:
                level.close()
        if self.tif is not None:
            self.tif.close()


def _ycbcr_labelled_rgb(reader: SlideReader, tif: object) -> bool:
    """True when level 0's JPEG tiles say YCbCr, the TIFF says RGB, and the reader's library
    returns them unconverted (its pixels match the raw components, not the converted ones)."""
    import tifffile

    from xmag.readers._jpeg_level import JpegLevel, jpeg_colour_evidence

    assert isinstance(tif, tifffile.TiffFile)
    lv0 = reader.levels[0]
    for page in tif.pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        if (int(page.imagewidth), int(page.imagelength)) != (lv0.width, lv0.height):
            continue
        if not (page.is_tiled and page.compression == 7 and page.photometric == 2):
            return False
        counts = np.asarray(page.databytecounts)
        present = np.flatnonzero(counts > 0)
        if present.size == 0:
            return False
        index = int(present[0])
        fh = tif.filehandle
        fh.seek(int(page.dataoffsets[index]))
        head = fh.read(min(int(counts[index]), 4096))
        if jpeg_colour_evidence(head) != "ycbcr":
            return False
        try:
            raw_level = JpegLevel(reader.path, page, ycbcr_as_rgb=False)
            raw_level.transform = 0  # the components as stored, whatever the stream says
            try:
                raw = raw_level.decode_tile(index, 1)  # components as stored (Adobe: RGB)
            finally:
                raw_level.close()
            cols = -(-lv0.width // int(page.tilewidth))
            r, c = divmod(index, cols)
            tw, th = int(page.tilewidth), int(page.tilelength)
            w, h = min(tw, lv0.width - c * tw), min(th, lv0.height - r * th)
            lib = reader._read_region((c * tw, r * th), 0, (w, h))
        except Exception:  # cannot confirm: leave the pixels as the library gives
            return False
        if raw is None:
            return False
        raw = raw[:h, :w].astype(np.int16)
        from xmag.readers._jpeg_level import ycbcr_to_rgb

        converted = ycbcr_to_rgb(raw.astype(np.uint8)).astype(np.int16)
        lib16 = lib.astype(np.int16)
        return bool(np.abs(lib16 - raw).mean() < np.abs(lib16 - converted).mean())
    return False
