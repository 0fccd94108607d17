"""A nucleus detector without learned weights: haematoxylin, threshold, split, measure.

1. Haematoxylin concentration by Ruifrok-Johnston colour deconvolution, smoothed (Gaussian of
   ``smooth_um``).
2. Foreground: Otsu threshold of the smoothed haematoxylin over the image, never below
   ``min_od`` (a field of pale stroma has no nuclei and Otsu would split its noise), then an
   opening and hole filling at the scale of a nucleus.
3. Touching nuclei are split by a marker watershed: markers are maxima of the smoothed distance
   transform at least ``min_separation_um`` apart (the radius of a small nucleus); each
   foreground component without a marker gets one at its deepest point. The flooding runs on
   the foreground only, so a nucleus never grows into the background.
4. Objects outside ``min_area_um2`` .. ``max_area_um2`` are dropped; the rest are measured by
   ``measure_nuclei``.

Lengths and areas are in micrometres, so one parameter set serves 0.25 and 0.5 um/px alike.
Defaults were tuned on CoNSeP crops (benchmarks/bench_cells.py). A learned model (HoVer-Net,
CellViT) finds more nuclei in crowded tissue: import its output with ``xmag.cells.importers``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from xmag.cells.measure import TypeRules, haematoxylin_eosin_od, measure_nuclei
from xmag.cells.table import CellTable
from xmag.errors import XmagUsageError

__all__ = ["DetectorParams", "detect_nuclei", "nucleus_labels", "nucleus_seeds"]


@dataclass(frozen=True)
class DetectorParams:
    """Parameters of ``detect_nuclei`` (lengths in um, areas in um2, OD in log10 units).

    Attributes:
        seed_sigmas_um: scales (Gaussian sigma) of the Laplacian-of-Gaussian blob filter that
            places one seed per nucleus; a blob of radius r responds most at sigma r / sqrt(2),
            so 1-3 um covers nuclei 3-8 um across.
        seed_min_response: lowest scale-normalised LoG response (OD) of a seed.
        min_separation_um: seeds lie at least this far apart.
        seed_disc_um: radius of the foreground disc given to every seed.
        smooth_um: sigma of the Gaussian on the haematoxylin channel for the foreground.
        min_od: lowest foreground threshold of haematoxylin concentration.
        otsu_scale: the Otsu threshold is multiplied by this (below 1 keeps paler nuclei).
        min_area_um2: smaller objects are noise.
        max_area_um2: bigger objects are clumps or stain, not one nucleus.
        fill_holes_um2: holes up to this area inside a nucleus are filled (vesicular chromatin).
    """

    seed_sigmas_um: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    seed_min_response: float = 0.3
    min_separation_um: float = 2.5
    seed_disc_um: float = 1.5
    smooth_um: float = 0.5
    min_od: float = 0.15
    otsu_scale: float = 0.8
    min_area_um2: float = 3.0
    max_area_um2: float = 400.0
    fill_holes_um2: float = 30.0


def _fill_small_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill background components enclosed by foreground that are at most ``max_hole_px``."""
    inv = (~mask).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, ww, hh, area = (stats[:, k] for k in range(5))
    border = (x == 0) | (y == 0) | (x + ww == w) | (y + hh == h)
    holes = (~border) & (area <= max_hole_px)
    holes[0] = False
    return mask | holes[lab]


def _disc(radius_px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def nucleus_seeds(hema: np.ndarray, mpp: float, params: DetectorParams | None = None) -> np.ndarray:
    """(H, W) bool: one seed (a pixel or a small plateau) per nucleus of a haematoxylin image.

    Maxima of the scale-normalised Laplacian of Gaussian (``-sigma^2 * LoG``, the largest over
    ``seed_sigmas_um``) at least ``min_separation_um`` apart and above ``seed_min_response``:
    a nucleus is a blob darker in haematoxylin than its surroundings, pale vesicular ones too.
    """
    p = params or DetectorParams()
    response = np.full(hema.shape, -np.inf, np.float32)
    for sigma_um in p.seed_sigmas_um:
        s = sigma_um / mpp
        blurred = cv2.GaussianBlur(hema, (0, 0), s)
        log = cv2.Laplacian(blurred, cv2.CV_32F, ksize=3)
        np.maximum(response, -log * np.float32(s * s), out=response)
    local_max = response >= cv2.dilate(response, _disc(max(1, round(p.min_separation_um / mpp))))
    return local_max & (response > p.seed_min_response)


def nucleus_labels(rgb: np.ndarray, mpp: float, params: DetectorParams | None = None) -> np.ndarray:
    """(H, W) int32 instance map of nuclei (0 background, ids 1..N) of (H, W, 3) uint8 RGB."""
    p = params or DetectorParams()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise XmagUsageError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise XmagUsageError(f"mpp must be a positive number of um/px, got {mpp!r}")
    raw = np.ascontiguousarray(haematoxylin_eosin_od(rgb)[..., 0])
    seeds = nucleus_seeds(raw, mpp, p)
    sigma = p.smooth_um / mpp
    hema = cv2.GaussianBlur(raw, (0, 0), sigma) if sigma > 0.3 else raw
    # Otsu on the haematoxylin quantised over 0..2 OD (beyond is black and rare).
    h8 = np.clip(hema * (255.0 / 2.0), 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(h8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu) * 2.0 / 255.0 * p.otsu_scale, p.min_od)
    opened = cv2.morphologyEx(
        (hema > thr).astype(np.uint8), cv2.MORPH_OPEN, _disc(max(1, round(0.5 / mpp)))
    )
    fg = _fill_small_holes(opened.astype(bool), round(p.fill_holes_um2 / mpp**2))
    # A seed on paler haematoxylin than the threshold still marks a nucleus (vesicular
    # chromatin, a faint section): give it a small disc of foreground to grow from.
    seed_discs = cv2.dilate(seeds.astype(np.uint8), _disc(max(1, round(p.seed_disc_um / mpp))))
    fg |= seed_discs.astype(bool)
    n_markers, markers = cv2.connectedComponents(seeds.astype(np.uint8), connectivity=8)
    if n_markers <= 1:
        return np.zeros(fg.shape, np.int32)
    # cv2.watershed floods from the markers in order of the local difference of the image: a
    # gentle ramp inside the foreground (darker haematoxylin lower) and a cliff at the
    # background (255), so nuclei split along their paler seams and the background marker
    # (label n_markers) takes only foreground that no seed reaches: blobs without a seed.
    scaled = np.clip(hema / max(float(hema[fg].max()), 1e-6), 0.0, 1.0)
    ramp = np.where(fg, 100.0 * (1.0 - scaled), 255.0)
    # cv2.watershed marks the image's outer frame as boundary: pad by one background pixel so
    # nuclei cut by the border keep their edge pixels.
    image = cv2.cvtColor(
        np.pad(ramp, 1, constant_values=255.0).astype(np.uint8), cv2.COLOR_GRAY2BGR
    )
    ws = markers.astype(np.int32)
    ws[~fg] = n_markers
    ws = np.pad(ws, 1, constant_values=n_markers)
    cv2.watershed(image, ws)
    ws = ws[1:-1, 1:-1]
    labels = np.where(fg & (ws > 0) & (ws < n_markers), ws, 0)
    areas = np.bincount(labels.ravel(), minlength=n_markers).astype(np.float64) * mpp * mpp
    keep = (areas > 0) & (areas >= p.min_area_um2) & (areas <= p.max_area_um2)
    keep[0] = False
    relabel = np.zeros(areas.size, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def detect_nuclei(
    rgb: np.ndarray,
    mpp: float,
    *,
    params: DetectorParams | None = None,
    rules: TypeRules | None = None,
    origin_px: tuple[float, float] = (0.0, 0.0),
    **overrides: float,
) -> CellTable:
    """Detect and measure the nuclei of an H&E image on the CPU, without learned weights.

    Args:
        rgb: (H, W, 3) uint8 RGB H&E image.
        mpp: its um/px (the detector works in um; about 0.25-0.5 um/px is the intended range).
        params: detector parameters (``DetectorParams()`` by default).
        rules: coarse type thresholds (``TypeRules()`` by default).
        origin_px: the image's top-left in the slide's level-0 pixels, for slide regions.
        **overrides: fields of ``DetectorParams`` to change, e.g. ``min_od=0.3``.

    Returns:
        A ``CellTable`` with source ``"xmag-detector"``; its ``meta`` records the parameters.

    Raises:
        XmagUsageError: a bad image, mpp or parameter name.
    """
    p = params or DetectorParams()
    if overrides:
        unknown = set(overrides) - set(asdict(p))
        if unknown:
            raise XmagUsageError(
                f"unknown detector parameters {sorted(unknown)}; see DetectorParams"
            )
        p = DetectorParams(**{**asdict(p), **overrides})
    labels = nucleus_labels(rgb, mpp, p)
    table = measure_nuclei(
        rgb, labels, mpp, source="xmag-detector", origin_px=origin_px, rules=rules
    )
    table.meta["detector_params"] = asdict(p)
    return table
