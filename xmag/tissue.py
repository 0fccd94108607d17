"""Stage 3: where the tissue is, on a low-resolution image of the slide.

Detectors are registered by name (``@register_detector``) and work on an RGB thumbnail whose pixel
size in um is known, so every size rule is stated in um and scales with the slide's mpp:

* ``brightfield`` (H&E, IHC): tissue absorbs light on a bright background. Otsu's threshold on
  saturation + mean optical density, clamped between a floor (an almost empty slide is not forced
  to find tissue) and a ceiling (a slide that is all tissue is not split into dark and pale tissue).
  Marker ink (green, blue, black strokes wider than a nucleus) is removed first.
* ``fluorescence``: signal is bright on a dark background. Otsu's threshold on the brightest
  channel, at least ``FLUORESCENCE_MIN_SIGNAL`` above the background level; nuclei are then closed
  into regions.

Both then remove components smaller than ``MIN_TISSUE_UM2`` (debris) and fill holes smaller than
``MAX_HOLE_UM2``.

The modality is guessed once per slide, here: ``detect_tissue`` guesses it on the thumbnail,
``method="auto"`` takes the detector it names (``detector_for``), H&E vs IHC is then settled on the
stained pixels of the mask found, and the ``TissueMask`` carries the modality with the mask, so the
QC (``xmag.qc``) reports the modality that chose the detector. A caller picks a detector by name
with ``TilingParams.tissue_detector``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

from xmag.errors import UnknownMppError, XmagUsageError
from xmag.readers.base import DEFAULT_THUMBNAIL_TIMEOUT_S, CancelFn, SlideReader
from xmag.stain import (
    Modality,
    channel_max,
    guess_modality,
    ink_colour,
    mean_optical_density,
    saturation,
)

__all__ = [
    "DEFAULT_THUMBNAIL_PX",
    "FALLBACK_MPP",
    "MAX_HOLE_UM2",
    "MAX_WORK_PX",
    "MIN_TISSUE_UM2",
    "DetectorFn",
    "TissueMask",
    "detect_tissue",
    "detector_for",
    "register_detector",
    "registered_detectors",
    "tissue_mask_from_image",
]

DEFAULT_THUMBNAIL_PX = 2048  # longest side of the image tissue is detected on
MIN_TISSUE_UM2 = 2_500.0  # components smaller than 50 x 50 um are debris, not tissue
MAX_HOLE_UM2 = 10_000.0  # holes smaller than 100 x 100 um (lumina, fat cells) are filled
WORK_UM_PER_PX = 1.0  # detectors never run finer than this: cells are resolved, kernels stay small
# Detectors never run on more pixels than this (a 1,672 x 1,254 px image): the cost of a plan
# stays flat with slide size, and a 2,048 px thumbnail of a large slide is already 6-20 um/px,
# far finer than a 5x tile (448 um) needs.
MAX_WORK_PX = 2**21
SMOOTH_UM = 4.0  # Gaussian sigma before thresholding: bridges the gaps between cells
CLOSE_UM = 8.0  # closing radius after thresholding (brightfield)
INK_MIN_WIDTH_UM = 30.0  # ink-coloured regions narrower than this are nuclei, not marker strokes
INK_MARGIN_UM = 10.0  # removed around a stroke too: its anti-aliased edge is not tissue
# Brightfield feature = saturation + mean OD (log10): glass ~0.02-0.06, pale tissue from ~0.15.
BRIGHTFIELD_MIN_THRESHOLD = 0.10
BRIGHTFIELD_MAX_THRESHOLD = 0.20
FLUORESCENCE_MIN_SIGNAL = 20.0  # grey levels above the background level (10th percentile)
FLUORESCENCE_CLOSE_UM = 25.0  # closing radius that merges nuclei and cells into regions
# Size rules need the pixel size; a slide that states no mpp is measured as if it were 20x.
FALLBACK_MPP = 0.5

DetectorFn = Callable[[np.ndarray, float], np.ndarray]
"""A detector: (thumbnail (h, w, 3) uint8 RGB, um per thumbnail pixel) -> (h, w) bool mask."""

_DETECTORS: dict[str, DetectorFn] = {}


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the whole slide at low resolution.

    Attributes:
        mask: (h, w) bool, True where tissue.
        downsample: level-0 pixels per mask pixel (same in x and y).
        method: the detector's registry name.
        thumbnail: (h, w, 3) uint8 RGB image the mask was computed on (kept for QC and heatmaps).
        modality: the slide's modality, guessed once on ``thumbnail`` (it chose the detector when
            ``method`` was "auto"); UNKNOWN for masks built without a guess.
        modality_scores: the evidence behind it (see ``xmag.stain.guess_modality``).
    """

    mask: np.ndarray
    downsample: float
    method: str
    thumbnail: np.ndarray
    modality: Modality = Modality.UNKNOWN
    modality_scores: Mapping[str, float] = field(default_factory=dict)

    def tissue_area_mm2(self, level0_mpp: float) -> float:
        """Area covered by tissue in mm2 given level-0 um/px."""
        px_um = self.downsample * level0_mpp
        return float(self.mask.sum()) * (px_um * px_um) / 1e6


def register_detector(name: str) -> Callable[[DetectorFn], DetectorFn]:
    """Function decorator: add a tissue detector under ``name``; a taken name is refused."""

    def deco(fn: DetectorFn) -> DetectorFn:
        if name == "auto" or name in _DETECTORS:
            raise XmagUsageError(f"tissue detector {name!r} is already registered")
        _DETECTORS[name] = fn
        return fn

    return deco


def registered_detectors() -> tuple[str, ...]:
    """Detector names, in registration order (``"auto"`` is not one: it picks among them)."""
    return tuple(_DETECTORS)


def detector_for(modality: Modality) -> str:
    """The detector ``method="auto"`` runs for a guessed modality."""
    return "fluorescence" if modality is Modality.FLUORESCENCE else "brightfield"


def detect_tissue(
    reader: SlideReader,
    *,
    method: str = "auto",
    max_px: int = DEFAULT_THUMBNAIL_PX,
    level0_mpp: float | None = None,
    should_cancel: CancelFn | None = None,
    timeout_s: float | None = DEFAULT_THUMBNAIL_TIMEOUT_S,
) -> TissueMask:
    """Detect tissue on ``reader.thumbnail(max_px)``.

    Args:
        reader: an open slide.
        method: a registered detector name, or ``"auto"`` (the one ``detector_for`` names for
            the guessed modality).
        max_px: longest side of the thumbnail in pixels.
        level0_mpp: level-0 um/px for the size rules; by default the slide's own (metadata or
            objective power), else ``FALLBACK_MPP``. ``plan_slide`` passes the resolved mpp.
        should_cancel: called between the thumbnail's reads; True raises ``JobCanceledError``.
        timeout_s: wall-time budget of the thumbnail (``ReadBudgetError`` past it).

    Returns:
        The mask with ``downsample`` = level-0 pixels per mask pixel, and the slide's modality.
        An empty mask when the slide has no tissue (never raises ``NoTissueError``: the caller
        decides).

    Raises:
        SlideTooLargeError: the thumbnail would read more than the reader allows (no small
            pyramid level, or dimensions the file cannot hold).
    """
    if level0_mpp is None:
        level0_mpp = _slide_mpp_or_fallback(reader)
    thumbnail, downsample = reader.thumbnail(
        max_px, should_cancel=should_cancel, timeout_s=timeout_s
    )
    modality, scores = guess_modality(thumbnail)
    mask, used = tissue_mask_from_image(
        thumbnail, um_per_px=downsample * level0_mpp, method=method, modality=modality
    )
    if modality is not Modality.FLUORESCENCE:
        # Settle H&E vs IHC on the stained pixels of the tissue found. Bright vs dark background
        # is the same measurement on the same image, so this cannot turn into fluorescence.
        modality, scores = guess_modality(thumbnail, mask)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        method=used,
        thumbnail=thumbnail,
        modality=modality,
        modality_scores=scores,
    )


def tissue_mask_from_image(
    thumbnail: np.ndarray,
    *,
    um_per_px: float,
    method: str = "auto",
    modality: Modality | None = None,
) -> tuple[np.ndarray, str]:
    """Tissue mask of an RGB image whose pixels are ``um_per_px`` um wide.

    Args:
        thumbnail: (h, w, 3) uint8 RGB.
        um_per_px: width of one pixel of ``thumbnail`` in um.
        method: a registered detector name, or ``"auto"``.
        modality: the image's guessed modality, which ``"auto"`` follows; guessed here when None.

    Returns:
        ((h, w) bool mask, name of the detector used).

    Raises:
        XmagUsageError: ``method`` is neither ``"auto"`` nor registered.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[-1] != 3 or thumbnail.dtype != np.uint8:
        raise XmagUsageError(f"expected an (h, w, 3) uint8 RGB image, got {thumbnail.shape}")
    if not (math.isfinite(um_per_px) and um_per_px > 0):
        raise XmagUsageError(f"um_per_px must be a positive number, got {um_per_px!r}")
    if method != "auto" and method not in _DETECTORS:
        raise XmagUsageError(
            f"unknown tissue detector {method!r}; choose one of "
            f"{', '.join(('auto', *registered_detectors()))}"
        )
    h, w = thumbnail.shape[:2]
    work, work_um = thumbnail, um_per_px
    # Finer than needed, or more pixels than needed: detect on a smaller copy, scale back.
    scale = min(um_per_px / WORK_UM_PER_PX, math.sqrt(MAX_WORK_PX / (w * h)))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        work = cv2.resize(thumbnail, size, interpolation=cv2.INTER_AREA)
        work_um = um_per_px * w / size[0]
    if method == "auto":
        method = detector_for(modality if modality is not None else guess_modality(thumbnail)[0])
    mask = _DETECTORS[method](work, work_um).astype(bool, copy=False)
    if work is not thumbnail:
        up = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        mask = up >= 0.5
    return mask, method


# -- detectors ------------------------------------------------------------------------------------
@register_detector("brightfield")
def _brightfield(thumbnail: np.ndarray, um_per_px: float) -> np.ndarray:
    """H&E and IHC: coloured or dark tissue on bright glass, ink strokes removed."""
    rgb = _smooth(thumbnail, SMOOTH_UM / um_per_px)
    ink = _ink_strokes(thumbnail, um_per_px)
    feature = saturation(rgb) + mean_optical_density(rgb)
    threshold = _otsu(feature[~ink], BRIGHTFIELD_MIN_THRESHOLD, BRIGHTFIELD_MAX_THRESHOLD)
    mask = (feature > threshold) & ~ink
    mask = _close(mask, CLOSE_UM / um_per_px) & ~ink
    return _clean(mask, um_per_px)


@register_detector("fluorescence")
def _fluorescence(thumbnail: np.ndarray, um_per_px: float) -> np.ndarray:
    """Fluorescence: bright signal on a dark background; nuclei closed into regions."""
    signal = channel_max(_smooth(thumbnail, SMOOTH_UM / um_per_px)).astype(np.float32)
    floor = float(np.percentile(signal, 10)) + FLUORESCENCE_MIN_SIGNAL
    threshold = _otsu(signal.ravel(), floor, math.inf)
    mask = _close(signal > threshold, FLUORESCENCE_CLOSE_UM / um_per_px)
    return _clean(mask, um_per_px)


# -- helpers --------------------------------------------------------------------------------------
def _slide_mpp_or_fallback(reader: SlideReader) -> float:
    from xmag.mpp import resolve_mpp

    try:
        return resolve_mpp(reader).mpp
    except UnknownMppError:
        # Only the debris and hole sizes depend on it; the plan refuses such a slide anyway
        # unless the caller states a default, which it then passes here.
        return FALLBACK_MPP


def _smooth(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.5:  # under half a pixel: the thumbnail is already coarser than the blur
        return rgb
    return cv2.GaussianBlur(rgb, (0, 0), sigma_px)


def _otsu(values: np.ndarray, lo: float, hi: float) -> float:
    """Otsu's threshold of ``values`` (256 bins over their range), clamped to [lo, hi]."""
    values = values.astype(np.float32, copy=False)
    if values.size == 0:
        return lo
    vmin, vmax = float(values.min()), float(values.max())
    if vmax - vmin < 1e-6:
        return min(max(vmin, lo), hi)
    hist, edges = np.histogram(values, bins=256, range=(vmin, vmax))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    threshold = float(edges[int(np.argmax(between[:-1])) + 1])
    return min(max(threshold, lo), hi)


def _disk(radius_px: float) -> np.ndarray | None:
    r = round(radius_px)
    if r < 1:
        return None
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _close(mask: np.ndarray, radius_px: float) -> np.ndarray:
    kernel = _disk(radius_px)
    if kernel is None:
        return mask
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)


def _ink_strokes(rgb: np.ndarray, um_per_px: float) -> np.ndarray:
    """Ink-coloured regions wider than ``INK_MIN_WIDTH_UM``, grown by ``INK_MARGIN_UM``."""
    ink = ink_colour(rgb)
    if not ink.any():
        return ink
    strokes = ink.astype(np.uint8)
    opening = _disk(INK_MIN_WIDTH_UM / 2 / um_per_px)
    if opening is not None:
        strokes = np.asarray(cv2.morphologyEx(strokes, cv2.MORPH_OPEN, opening))
    margin = _disk(max(1.0, INK_MARGIN_UM / um_per_px))
    assert margin is not None  # radius >= 1
    return np.asarray(cv2.dilate(strokes, margin)).astype(bool)


def _clean(mask: np.ndarray, um_per_px: float) -> np.ndarray:
    """Remove debris below ``MIN_TISSUE_UM2`` and fill holes below ``MAX_HOLE_UM2``."""
    px_um2 = um_per_px * um_per_px
    mask = _drop_small(mask, MIN_TISSUE_UM2 / px_um2)
    holes = _drop_small(~mask, MAX_HOLE_UM2 / px_um2, keep_border=True)
    return mask | ~holes


def _drop_small(mask: np.ndarray, min_px: float, *, keep_border: bool = False) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_px`` pixels.

    With ``keep_border``, components touching the image edge stay whatever their size (for holes:
    background open to the slide's edge is not a hole).
    """
    if not mask.any() or min_px <= 1:
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    if keep_border:
        h, w = mask.shape
        x0, y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        x1, y1 = x0 + stats[:, cv2.CC_STAT_WIDTH], y0 + stats[:, cv2.CC_STAT_HEIGHT]
        keep |= (x0 == 0) | (y0 == 0) | (x1 == w) | (y1 == h)
    keep[0] = False  # label 0 is the other value
    return keep[labels]
