"""wsidicom adapter: DICOM WSI sets OpenSlide refuses (e.g. monochrome multi-channel instances).

A folder of instances is one slide; a single .dcm path opens the slide of its folder. wsidicom
objects are not documented as thread-safe, so every read takes the reader's lock. Fluorescence
sets store one monochrome optical path per channel; when there are three named red, green and
blue (or three unnamed), they are composed into RGB, otherwise the first path is shown as grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pydicom.errors
import wsidicom
import wsidicom.errors as wd_errors

from xmag.errors import CorruptSlideError, UnsupportedFormatError
from xmag.readers.base import (
    LevelInfo,
    MetadataMpp,
    SlideFormat,
    SlideReader,
    read_in_window,
    register_reader,
)
from xmag.readers.openslide_reader import DICOM_WSI, dicom_files, is_dicom_file

__all__ = ["DicomReader"]

# wsidicom saying "this is not a WSI set it can read", as opposed to a broken one.
_NOT_WSI_ERRORS = (wd_errors.WsiDicomNotFoundError, wd_errors.WsiDicomNotSupportedError)
# Everything else wsidicom or pydicom raise on bad files (wsidicom errors share no base class).
_DICOM_ERRORS = (
    wd_errors.WsiDicomError,
    wd_errors.WsiDicomFileError,
    wd_errors.WsiDicomMatchError,
    wd_errors.WsiDicomNoResolutionError,
    wd_errors.WsiDicomOutOfBoundsError,
    wd_errors.WsiDicomStrictRequirementError,
    wd_errors.WsiDicomUidDuplicateError,
    wd_errors.WsiDicomBotOverflow,
    pydicom.errors.InvalidDicomError,
    ValueError,
    KeyError,
    AttributeError,
    OSError,
    EOFError,  # a truncated instance, found when its frames are read
    RuntimeError,  # codec errors (imagecodecs, pylibjpeg)
)
_RGB_NAMES = ("red", "green", "blue")
_PROPERTY_KEYS = ("Manufacturer", "ManufacturerModelName", "PhotometricInterpretation")


@register_reader(priority=30)
class DicomReader(SlideReader):
    """A DICOM WSI set opened with wsidicom (its selected pyramid, focal plane 0)."""

    name: ClassVar[str] = "wsidicom"
    formats: ClassVar[tuple[SlideFormat, ...]] = (DICOM_WSI,)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        folder = path if path.is_dir() else path.parent
        try:
            self._wsi = wsidicom.WsiDicom.open(folder)
        except _NOT_WSI_ERRORS as exc:
            raise UnsupportedFormatError(
                f"{folder} holds DICOM files but no whole-slide image wsidicom reads: {exc}",
                path=path,
            ) from exc
        except _DICOM_ERRORS as exc:
            raise CorruptSlideError(
                f"the DICOM set {folder} cannot be opened ({type(exc).__name__}: {exc}); an "
                "instance is missing or damaged: copy the whole folder again.",
                path=path,
            ) from exc
        self._wsi_levels = list(self._wsi.levels)
        base = self._wsi_levels[0]
        self._levels = tuple(
            LevelInfo(
                i,
                lv.size.width,
                lv.size.height,
                (base.size.width / lv.size.width + base.size.height / lv.size.height) / 2,
            )
            for i, lv in enumerate(self._wsi_levels)
        )
        self._dataset = base.datasets[0].as_dataset()  # a pydicom Dataset
        self._paths = _rgb_paths(self._dataset, list(base.optical_paths))
        self._properties = {
            f"dicom.{key}": str(self._dataset.get(key))
            for key in _PROPERTY_KEYS
            if self._dataset.get(key) is not None
        }
        self._properties["dicom.OpticalPaths"] = ",".join(base.optical_paths)

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_dir():
            return bool(dicom_files(path))
        return path.is_file() and is_dicom_file(path)

    @property
    def vendor(self) -> str | None:
        return "dicom"

    @property
    def format(self) -> str:
        return "dicom"

    def metadata_mpp(self) -> MetadataMpp | None:
        mpp = self._wsi_levels[0].mpp  # wsidicom gives um per pixel (from PixelSpacing in mm)
        if mpp is None or mpp.width <= 0 or mpp.height <= 0:
            return None
        return MetadataMpp(float(mpp.width), float(mpp.height), "dicom.PixelSpacing")

    def objective_power(self) -> float | None:
        for path in self._dataset.get("OpticalPathSequence", []):
            power = path.get("ObjectiveLensPower")
            if power is not None and float(power) > 0:
                return float(power)
        return None

    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        wsi_level = self._wsi_levels[level].level

        def read(xy: tuple[int, int], wh: tuple[int, int]) -> np.ndarray:
            try:
                with self._lock:
                    planes = [
                        self._wsi.read_region(xy, wsi_level, wh, path=p, as_array=True)
                        for p in self._paths
                    ]
            except _DICOM_ERRORS as exc:
                raise self._undecodable(
                    level0_xy,
                    level,
                    size,
                    f"{type(exc).__name__}: {exc}",
                    "the instance is damaged there: export the set again.",
                ) from exc
            return _compose(planes)

        return read_in_window(level0_xy, self._levels[level], size, read)

    def _close(self) -> None:
        self._wsi.close()


def _rgb_paths(dataset: pydicom.Dataset, paths: list[str]) -> list[str | None]:
    """Optical paths to read: [None] (the default) for colour, else one per RGB channel."""
    if int(dataset.get("SamplesPerPixel", 3)) == 3 or len(paths) != 3:
        return [None]
    names = {
        str(op.get("OpticalPathDescription", "")).strip().lower(): str(op.OpticalPathIdentifier)
        for op in dataset.get("OpticalPathSequence", [])
    }
    if all(n in names for n in _RGB_NAMES):
        return [names[n] for n in _RGB_NAMES]
    return list(paths)  # three unnamed channels: stored order as R, G, B


def _compose(planes: list[np.ndarray]) -> np.ndarray:
    """Planes from wsidicom -> (h, w, 3) uint8 RGB."""
    if len(planes) == 3:
        return np.stack([_grey(p) for p in planes], axis=2)
    arr = planes[0]
    if arr.ndim == 3 and arr.shape[2] >= 3:
        return arr[..., :3]
    return np.repeat(_grey(arr)[..., None], 3, axis=2)


def _grey(arr: np.ndarray) -> np.ndarray:
    return arr[..., 0] if arr.ndim == 3 else arr
