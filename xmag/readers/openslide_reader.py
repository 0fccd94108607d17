"""OpenSlide adapter for the vendor formats OpenSlide detects and xmag accepts (``FORMATS``).

OpenSlide (through openslide-bin) is tried first for everything it detects. Its handle is
thread-safe, so reads take no lock. An OpenSlide handle that failed once stays failed (OpenSlide's
error state is sticky), so after one corrupt tile every later read of the slide raises too: the
slide fails as a whole, the process does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import openslide

from xmag.errors import CorruptSlideError, UnsupportedFormatError
from xmag.readers.base import (
    LevelInfo,
    MetadataMpp,
    SlideFormat,
    SlideReader,
    mpp_from_tiff_resolution,
    register_reader,
    rgba_to_rgb_on_white,
)

__all__ = ["DICOM_WSI", "OpenSlideReader", "translate_open_error"]

#: DICOM WSI as both DICOM readers declare it (OpenSlide first, wsidicom for what it refuses).
DICOM_WSI = SlideFormat("DICOM WSI", (".dcm",), "or a folder of instances")
# The OpenSlide vendors xmag accepts, with the container format we report and the format as
# people name it. OpenSlide 4 also detects Zeiss CZI, Sakura SVSlide and its synthetic slide;
# xmag has no test data for those, so they are refused rather than half-supported.
_VENDORS: dict[str, tuple[str, SlideFormat]] = {
    "aperio": ("svs", SlideFormat("Aperio SVS", (".svs",))),
    "hamamatsu": ("ndpi", SlideFormat("Hamamatsu NDPI", (".ndpi", ".vms"))),
    "mirax": ("mrxs", SlideFormat("3DHISTECH MRXS", (".mrxs",))),
    "philips": ("philips-tiff", SlideFormat("Philips TIFF", (".tiff",))),
    "leica": ("scn", SlideFormat("Leica SCN", (".scn",))),
    "ventana": ("bif", SlideFormat("Ventana BIF", (".bif",))),
    "generic-tiff": ("tiff", SlideFormat("generic tiled TIFF", (".tif", ".tiff"))),
    "dicom": ("dicom", DICOM_WSI),
}
_FORMAT_BY_VENDOR = {vendor: fmt for vendor, (fmt, _) in _VENDORS.items()}
_DICM_OFFSET = 128  # DICOM part-10 files carry "DICM" after a 128-byte preamble


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM part-10 file (by its "DICM" magic, not its name)."""
    try:
        with path.open("rb") as fh:
            fh.seek(_DICM_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))


def _openslide_target(path: Path) -> Path:
    """The file OpenSlide should open: for a DICOM folder, its largest instance.

    OpenSlide opens a DICOM slide from any one of its files and finds the rest of the series in
    the same folder; the largest file is the likeliest to be a pyramid level, not a label.
    """
    if path.is_dir():
        files = dicom_files(path)
        if files:
            return max(files, key=lambda p: p.stat().st_size)
    return path


@register_reader(priority=10)
class OpenSlideReader(SlideReader):
    """A slide opened with OpenSlide. ``path`` may be a DICOM folder or a file."""

    name: ClassVar[str] = "openslide"
    formats: ClassVar[tuple[SlideFormat, ...]] = tuple(f for _, f in _VENDORS.values())

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        target = _openslide_target(path)
        vendor = openslide.OpenSlide.detect_format(str(target))
        if vendor not in _FORMAT_BY_VENDOR:
            raise UnsupportedFormatError(
                f"OpenSlide detects {path} as {vendor!r}, a format xmag does not accept.", path=path
            )
        try:
            self._slide = openslide.OpenSlide(str(target))
        except openslide.OpenSlideError as exc:
            raise translate_open_error(path, vendor, exc) from exc
        self._vendor = vendor
        props = self._slide.properties
        self._properties = {str(k): str(v) for k, v in props.items()}
        if vendor == "generic-tiff" and "<OME" in self._properties.get("tiff.ImageDescription", ""):
            # OpenSlide would read the pixels but not the OME metadata (PhysicalSize and unit,
            # objective): OME-TIFF belongs to the tiffslide reader.
            self._slide.close()
            raise UnsupportedFormatError(
                f"{path} is an OME-TIFF; it is read with tiffslide for its OME metadata.", path=path
            )
        self._levels = tuple(
            LevelInfo(i, w, h, float(ds))
            for i, ((w, h), ds) in enumerate(
                zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
            )
        )

    @classmethod
    def detect(cls, path: Path) -> bool:
        vendor = openslide.OpenSlide.detect_format(str(_openslide_target(path)))
        return vendor in _FORMAT_BY_VENDOR

    @property
    def vendor(self) -> str | None:
        return self._vendor

    @property
    def format(self) -> str:
        if self._vendor == "hamamatsu" and self.path.suffix.lower() != ".ndpi":
            return "vms"
        return _FORMAT_BY_VENDOR[self._vendor or ""]

    def metadata_mpp(self) -> MetadataMpp | None:
        props = self._properties
        x, y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
        if x and y and x > 0 and y > 0:
            return MetadataMpp(x, y, "openslide.mpp-x")
        xy = mpp_from_tiff_resolution(
            _float(props.get("tiff.XResolution")),
            _float(props.get("tiff.YResolution")),
            props.get("tiff.ResolutionUnit"),
        )
        return MetadataMpp(xy[0], xy[1], "tiff.XResolution") if xy else None

    def objective_power(self) -> float | None:
        for key in ("openslide.objective-power", "aperio.AppMag"):
            power = _float(self._properties.get(key))
            if power and power > 0:
                return power
        return None

    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        try:
            image = self._slide.read_region(level0_xy, level, size)
        except openslide.OpenSlideError as exc:
            raise self._undecodable(
                level0_xy,
                level,
                size,
                str(exc),
                "the slide is damaged there: rescan or re-export it.",
            ) from exc
        return rgba_to_rgb_on_white(np.asarray(image))

    def _close(self) -> None:
        self._slide.close()


def translate_open_error(
    path: Path, vendor: str | None, exc: openslide.OpenSlideError
) -> UnsupportedFormatError | CorruptSlideError:
    """The xmag error for an OpenSlide failure to open ``path`` (detected as ``vendor``).

    A refusal (UnsupportedFormatError) lets ``open_slide`` try the next reader: OpenSlide's own
    unsupported-format error, its "Unsupported ..." messages for variants it does not decode
    (e.g. "Unsupported TIFF compression: 50001", WebP tiles tiffslide reads), and any failure
    on DICOM, where OpenSlide reads only part of the standard (BPAEC: "Couldn't read
    PlanarConfiguration") and wsidicom reads more. Anything else means a damaged file.
    """
    message = str(exc)
    refused = (
        isinstance(exc, openslide.OpenSlideUnsupportedFormatError)
        or message.startswith("Unsupported")
        or vendor == "dicom"
    )
    if refused:
        return UnsupportedFormatError(f"OpenSlide does not read {path}: {message}", path=path)
    return CorruptSlideError(
        f"{path} looks like a {vendor} slide but OpenSlide cannot open it ({message}); the file "
        "is damaged or truncated: copy it again from the scanner.",
        path=path,
        vendor=vendor,
    )


def _float(value: str | None) -> float | None:
    """Parse a metadata number; None when absent or not a number."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
