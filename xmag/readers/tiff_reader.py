"""tiffslide/tifffile adapter: OME-TIFF and the TIFFs OpenSlide refuses (strip, one-level...).

tiffslide gives the pyramid (tifffile series levels) and region reads; tifffile gives the tags and
the OME-XML. Neither shares a file handle safely between threads, so every read takes the
reader's lock.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import tifffile
import tiffslide

from xmag.errors import CorruptSlideError, UnsupportedFormatError
from xmag.readers.base import (
    LevelInfo,
    MetadataMpp,
    SlideFormat,
    SlideReader,
    level_window,
    mpp_from_tiff_resolution,
    register_reader,
    white_outside,
)

__all__ = ["TiffReader"]

_OLYMPUS_SIS_TAG = 33560
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
# OME length units -> micrometres (OME's default unit is the micrometre).
_UM_PER_OME_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
# Errors the libraries raise on bad bytes: tifffile's own, codec errors (imagecodecs errors are
# RuntimeError subclasses), bad values in tags or streams, and I/O errors on short files.
_TIFF_ERRORS = (
    tifffile.TiffFileError,
    RuntimeError,
    ValueError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
)


@register_reader(priority=20)
class TiffReader(SlideReader):
    """A TIFF opened with tiffslide (series 0, its levels as the pyramid)."""

    name: ClassVar[str] = "tiffslide"
    formats: ClassVar[tuple[SlideFormat, ...]] = (
        SlideFormat("OME-TIFF", (".ome.tif", ".ome.tiff")),
        SlideFormat("other 8-bit TIFFs readable by tifffile", (".tif", ".tiff")),
    )

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._slide = tiffslide.TiffSlide(path)
        except _TIFF_ERRORS as exc:
            raise _corrupt(path, exc) from exc
        try:
            self._load(path)
        except BaseException:  # any refusal leaves no open file handle behind; re-raised as is
            self._slide.close()
            raise

    def _load(self, path: Path) -> None:
        """Levels and metadata; raises CorruptSlideError or UnsupportedFormatError."""
        tf = self._slide.ts_tifffile
        if not tf.pages:
            raise CorruptSlideError(
                f"{path} is a TIFF with no readable image directory; it is probably truncated: "
                "copy it again.",
                path=path,
            )
        if path.suffix.lower() == ".vsi" and _OLYMPUS_SIS_TAG in tf.pages.first.tags:
            # A VSI's own TIFF holds only an overview; the slide is in .ets files beside it.
            raise UnsupportedFormatError(
                f"{path} is an Olympus VSI container whose slide pixels live in .ets files "
                "tifffile does not read.",
                path=path,
            )
        try:
            series = tf.series[0]
            self._is_ome = bool(tf.is_ome)
            self._ome = _parse_ome(tf.ome_metadata) if self._is_ome else None
            page = series.levels[0].keyframe
            self._levels = tuple(
                LevelInfo(i, w, h, float(ds))
                for i, ((w, h), ds) in enumerate(
                    zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
                )
            )
            self._resolution = mpp_from_tiff_resolution(
                _rational(page.tags.get("XResolution")),
                _rational(page.tags.get("YResolution")),
                _unit_name(page.tags.get("ResolutionUnit")),
            )
            props = self._slide.properties
        except (*_TIFF_ERRORS, ET.ParseError) as exc:
            raise _corrupt(path, exc) from exc
        if series.dtype != np.uint8:
            raise UnsupportedFormatError(
                f"{path} holds {series.dtype} pixels; only 8-bit RGB or grey TIFFs are read: "
                "convert it to 8-bit.",
                path=path,
            )
        self._properties = {str(k): str(v) for k, v in props.items() if v is not None}

    @classmethod
    def detect(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        with path.open("rb") as fh:
            return fh.read(4) in _TIFF_MAGIC

    @property
    def vendor(self) -> str | None:
        return self._properties.get("tiffslide.vendor")

    @property
    def format(self) -> str:
        if self._is_ome:
            return "ome-tiff"
        return "svs" if self.vendor == "aperio" else "tiff"

    def metadata_mpp(self) -> MetadataMpp | None:
        if self._ome is not None and self._ome.mpp is not None:
            return MetadataMpp(*self._ome.mpp, "ome.PhysicalSizeX")
        aperio = _float(self._properties.get("aperio.MPP"))
        if aperio and aperio > 0:
            return MetadataMpp(aperio, aperio, "aperio.MPP")
        if self._resolution is not None:
            return MetadataMpp(*self._resolution, "tiff.XResolution")
        return None

    def objective_power(self) -> float | None:
        candidates = [
            self._ome.power if self._ome else None,
            _float(self._properties.get("aperio.AppMag")),
        ]
        return next((p for p in candidates if p and p > 0), None)

    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        level_xy, window = level_window(level0_xy, self._levels[level], size)
        x0, y0, x1, y1 = window
        if x1 <= x0 or y1 <= y0:  # wholly outside: tiffslide would warn and pad with black
            return np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        try:
            with self._lock:
                arr = self._slide.read_region(level0_xy, level, size, as_array=True)
        except _TIFF_ERRORS as exc:
            raise self._undecodable(
                level0_xy,
                level,
                size,
                f"{type(exc).__name__}: {exc}",
                "the slide is damaged there: re-export it.",
            ) from exc
        return white_outside(_to_rgb(arr), level_xy, window)

    def _close(self) -> None:
        self._slide.close()


def _corrupt(path: Path, exc: BaseException) -> CorruptSlideError:
    return CorruptSlideError(
        f"{path} is a TIFF but its image directories cannot be read ({type(exc).__name__}: "
        f"{exc}); the file is probably truncated or damaged: copy it again.",
        path=path,
    )


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w, c) uint8 from tiffslide -> (h, w, 3) RGB (grey replicated, alpha dropped)."""
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _rational(tag: tifffile.TiffTag | None) -> float | None:
    """A TIFF RATIONAL tag value (numerator, denominator) as a float."""
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else None
    return float(value)


def _unit_name(tag: tifffile.TiffTag | None) -> str | None:
    return None if tag is None else getattr(tag.value, "name", str(tag.value))


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _local(tag: str) -> str:
    """XML tag without its namespace (OME schemas change namespace between versions)."""
    return tag.rsplit("}", 1)[-1]


@dataclass(frozen=True)
class _OmeInfo:
    mpp: tuple[float, float] | None  # level-0 (x, y) in um
    power: float | None  # objective NominalMagnification


def _parse_ome(xml: str | None) -> _OmeInfo:
    """Level-0 mpp and objective power of the first OME Image (the series tiffslide reads)."""
    if not xml:
        return _OmeInfo(None, None)
    root = ET.fromstring(xml)
    image = next((e for e in root.iter() if _local(e.tag) == "Image"), None)
    pixels = None if image is None else next((e for e in image if _local(e.tag) == "Pixels"), None)
    mpp = None
    if pixels is not None:
        x = _ome_length(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
        y = _ome_length(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"))
        mpp = (x, y) if x and y else None
    objective_id = None
    if image is not None:
        settings = next((e for e in image if _local(e.tag) == "ObjectiveSettings"), None)
        objective_id = None if settings is None else settings.get("ID")
    power = None
    for e in root.iter():
        if _local(e.tag) == "Objective" and objective_id in (None, e.get("ID")):
            power = _float(e.get("NominalMagnification"))
            break
    return _OmeInfo(mpp, power)


def _ome_length(value: str | None, unit: str | None) -> float | None:
    """An OME length in micrometres; None when absent, unparsable or in an unknown unit."""
    number = _float(value)
    scale = _UM_PER_OME_UNIT.get(unit or "µm")
    if number is None or scale is None or number <= 0:
        return None
    return number * scale
