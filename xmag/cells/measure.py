"""Measure nuclei of an instance map: outline, shape, stain and texture, and a coarse type.

Shape comes from each nucleus's pixels (moments, convex hull, outline); stain from colour
deconvolution with the Ruifrok-Johnston H&E vectors (``xmag.stain``); texture from the
haematoxylin channel (gradient magnitude, and a grey-level co-occurrence matrix of 1-pixel
horizontal and vertical neighbours inside the nucleus, quantised to ``GLCM_LEVELS`` levels over
``GLCM_OD_RANGE``). The coarse type follows simple rules on these measurements
(``classify_cells``): small, round and dark is a lymphocyte; large or irregular is tumour;
elongated, or thin and pale, is stromal; anything else stays unknown. The rules are a prior, not
a classifier: on CoNSeP they agree with the pathologists' types well above chance (kappa 0.39,
benchmarks/bench_cells.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from xmag.cells.table import CELL_TYPES, FEATURE_NAMES, GEOMETRY_FEATURES, CellTable
from xmag.errors import XmagUsageError
from xmag.stain import HED_STAIN_VECTORS, optical_density

__all__ = [
    "GLCM_LEVELS",
    "GLCM_OD_RANGE",
    "TypeRules",
    "classify_cells",
    "haematoxylin_eosin_od",
    "measure_contours",
    "measure_nuclei",
    "shape_features",
]

GLCM_LEVELS = 8
GLCM_OD_RANGE = (0.0, 1.6)  # haematoxylin OD quantised over this range for the GLCM

_HED_UNIT = HED_STAIN_VECTORS / np.linalg.norm(HED_STAIN_VECTORS, axis=1, keepdims=True)
# Columns 0 and 1 of the inverse map an OD triplet to haematoxylin and eosin concentrations.
_HE_FROM_OD = np.linalg.inv(_HED_UNIT)[:, :2].astype(np.float32)
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
_N_GEOM = len(GEOMETRY_FEATURES)


def haematoxylin_eosin_od(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 haematoxylin and eosin concentrations (OD units) of (H, W, 3) uint8 RGB.

    Ruifrok-Johnston colour deconvolution (``xmag.stain.stain_concentrations``) in float32.
    """
    od = optical_density(rgb)
    return (od.reshape(-1, 3) @ _HE_FROM_OD).reshape(*rgb.shape[:2], 2)


@dataclass(frozen=True)
class TypeRules:
    """Thresholds of the coarse type rules (chosen on CoNSeP at 0.25 um/px, see the bench).

    Attributes:
        lymphocyte_max_area_um2: a lymphocyte nucleus is at most this big.
        lymphocyte_min_circularity: and at least this round.
        lymphocyte_min_darkness: and its haematoxylin OD at least this share of the frame's
            median nucleus (small, round and *dark*: relative, so it follows the stain).
        tumour_min_area_um2: a nucleus at least this big is tumour (large) ...
        tumour_max_solidity: ... and so is an irregular one (pleomorphic outline).
        stromal_min_elongation: major / minor axis from which a nucleus is spindle-shaped.
        stromal_max_width_um: a nucleus this thin (minor axis) and not dark is stromal too: a
            fibroblast cut across is short but stays narrow and pale.
    """

    lymphocyte_max_area_um2: float = 35.0
    lymphocyte_min_circularity: float = 0.45
    lymphocyte_min_darkness: float = 1.0
    tumour_min_area_um2: float = 35.0
    tumour_max_solidity: float = 0.8
    stromal_min_elongation: float = 1.7
    stromal_max_width_um: float = 3.0


def classify_cells(features: np.ndarray, rules: TypeRules | None = None) -> np.ndarray:
    """(N,) int8 type codes of ``CELL_TYPES`` from (N, len(FEATURE_NAMES)) features.

    Rules in order, the first that applies wins: small, round and dark -> lymphocyte; large or
    irregular -> tumour; elongated, or thin and not dark -> stromal; else unknown. Darkness is
    relative to the median nucleus of the same table; cells without a measured haematoxylin OD
    (NaN) are never called lymphocytes (darkness unknown).
    """
    r = rules or TypeRules()
    f = np.asarray(features, dtype=np.float32)
    n = f.shape[0]
    types = np.zeros(n, dtype=np.int8)
    if n == 0:
        return types
    area = f[:, _COL["area_um2"]]
    elongation = f[:, _COL["major_axis_um"]] / np.maximum(f[:, _COL["minor_axis_um"]], 1e-3)
    h = f[:, _COL["haematoxylin_od_mean"]]
    measured = np.isfinite(h)
    median_h = float(np.median(h[measured])) if measured.any() else math.nan
    with np.errstate(invalid="ignore"):
        dark = measured & (h >= r.lymphocyte_min_darkness * median_h)
    lymph = (
        (area <= r.lymphocyte_max_area_um2)
        & (f[:, _COL["circularity"]] >= r.lymphocyte_min_circularity)
        & dark
    )
    tumour = (area >= r.tumour_min_area_um2) | (f[:, _COL["solidity"]] < r.tumour_max_solidity)
    thin_pale = (f[:, _COL["minor_axis_um"]] <= r.stromal_max_width_um) & ~dark
    stromal = (elongation >= r.stromal_min_elongation) | thin_pale
    types[stromal] = CELL_TYPES.index("stromal")
    types[tumour] = CELL_TYPES.index("tumour")
    types[lymph] = CELL_TYPES.index("lymphocyte")
    return types


def _label_pixels(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Instance ids (ascending) and, per id, the flat indices of its pixels."""
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    if idx.size == 0:
        return np.zeros(0, np.int64), []
    lab = flat[idx]
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    idx = idx[order]
    ids, starts = np.unique(lab, return_index=True)
    return ids.astype(np.int64), np.split(idx, starts[1:])


def shape_features(mask: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Geometry features of one nucleus and its outline.

    Args:
        mask: (h, w) bool crop holding the nucleus, at least one background pixel all round.
        mpp: um/px.

    Returns:
        (features of ``GEOMETRY_FEATURES`` as float64 (8,), outline (K, 2) float32 in crop px).
    """
    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2)
    area_px = float(mask.sum())
    if outline.shape[0] >= 3:
        perim_px = cv2.arcLength(outline.reshape(-1, 1, 2), True)
    else:  # one- or two-pixel objects: the outline is a point or a segment
        perim_px = 2.0 * float(np.ptp(outline, axis=0).sum()) + 4.0
    hull = cv2.convexHull(outline.reshape(-1, 1, 2))
    hull_mask = np.zeros_like(m8)
    cv2.fillPoly(hull_mask, [hull.reshape(-1, 2)], 1)
    hull_px = float(np.count_nonzero(hull_mask | m8))
    mom = cv2.moments(m8, binaryImage=True)
    mu20, mu02, mu11 = mom["mu20"] / area_px, mom["mu02"] / area_px, mom["mu11"] / area_px
    # Pixels are unit squares: add their own second moment (1/12) so one pixel is not a point.
    mu20 += 1.0 / 12.0
    mu02 += 1.0 / 12.0
    common = math.sqrt(max(((mu20 - mu02) / 2.0) ** 2 + mu11**2, 0.0))
    l1 = (mu20 + mu02) / 2.0 + common
    l2 = max((mu20 + mu02) / 2.0 - common, 0.0)
    major_px, minor_px = 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2)
    ecc = math.sqrt(max(1.0 - l2 / l1, 0.0)) if l1 > 0 else 0.0
    # Angle of the major axis from the x axis, counter-clockwise as seen on screen (y down).
    orient = math.degrees(0.5 * math.atan2(-2.0 * mu11, mu20 - mu02)) % 180.0
    # The outline through pixel centres is about one pixel short of the region's edge all round:
    # use the perimeter of that outline grown by half a pixel (+ pi px) for circularity.
    circ = 4.0 * math.pi * area_px / (perim_px + math.pi) ** 2
    feats = np.array(
        [
            area_px * mpp * mpp,
            (perim_px + math.pi) * mpp,
            major_px * mpp,
            minor_px * mpp,
            ecc,
            area_px / max(hull_px, area_px),
            min(circ, 1.0),
            orient,
        ],
        dtype=np.float64,
    )
    return feats, outline.astype(np.float32)


def _intensity_features(he: np.ndarray, grad: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Stain and texture features (``INTENSITY_FEATURES``) of one nucleus crop."""
    h = he[..., 0][mask]
    e = he[..., 1][mask]
    lo, hi = GLCM_OD_RANGE
    q = np.clip(((he[..., 0] - lo) / (hi - lo) * GLCM_LEVELS).astype(np.int32), 0, GLCM_LEVELS - 1)
    pairs_a = []
    pairs_b = []
    for a, b, ma, mb in (
        (q[:, :-1], q[:, 1:], mask[:, :-1], mask[:, 1:]),
        (q[:-1, :], q[1:, :], mask[:-1, :], mask[1:, :]),
    ):
        both = ma & mb
        pairs_a.append(a[both])
        pairs_b.append(b[both])
    qa = np.concatenate(pairs_a)
    qb = np.concatenate(pairs_b)
    if qa.size:
        d = np.abs(qa - qb).astype(np.float64)
        contrast = float((d**2).mean())
        homogeneity = float((1.0 / (1.0 + d)).mean())
    else:
        contrast, homogeneity = math.nan, math.nan
    return np.array(
        [h.mean(), h.std(), e.mean(), e.std(), grad[mask].mean(), contrast, homogeneity],
        dtype=np.float64,
    )


def _intensity_table(he: np.ndarray, grad: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """``_intensity_features`` of every nucleus at once: (n, 7) float64.

    Args:
        index: (H, W) int64 map of 1-based row numbers (0 background): sums per nucleus by
            ``np.bincount`` instead of a crop per nucleus.
    """
    flat = index.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    safe = np.maximum(count, 1.0)
    out = np.full((n, 7), np.nan, np.float64)
    for k, channel in enumerate((he[..., 0], he[..., 1])):
        v = channel.ravel().astype(np.float64)
        mean = np.bincount(flat, weights=v, minlength=n + 1)[1:] / safe
        mean2 = np.bincount(flat, weights=v * v, minlength=n + 1)[1:] / safe
        out[:, 2 * k] = mean
        out[:, 2 * k + 1] = np.sqrt(np.maximum(mean2 - mean * mean, 0.0))
    g = grad.ravel().astype(np.float64)
    out[:, 4] = np.bincount(flat, weights=g, minlength=n + 1)[1:] / safe
    lo, hi = GLCM_OD_RANGE
    q = np.clip(((he[..., 0] - lo) / (hi - lo) * GLCM_LEVELS).astype(np.int32), 0, GLCM_LEVELS - 1)
    pairs = np.zeros(n + 1)
    d2 = np.zeros(n + 1)
    hom = np.zeros(n + 1)
    for a, b, qa, qb in (
        (index[:, :-1], index[:, 1:], q[:, :-1], q[:, 1:]),
        (index[:-1, :], index[1:, :], q[:-1, :], q[1:, :]),
    ):
        same = (a == b) & (a > 0)
        who = a[same]
        d = np.abs(qa[same] - qb[same]).astype(np.float64)
        pairs += np.bincount(who, minlength=n + 1)
        d2 += np.bincount(who, weights=d * d, minlength=n + 1)
        hom += np.bincount(who, weights=1.0 / (1.0 + d), minlength=n + 1)
    has = pairs[1:] > 0
    out[has, 5] = d2[1:][has] / pairs[1:][has]
    out[has, 6] = hom[1:][has] / pairs[1:][has]
    out[count == 0] = np.nan
    return out


def measure_nuclei(
    rgb: np.ndarray,
    labels: np.ndarray,
    mpp: float,
    *,
    source: str = "xmag-detector",
    origin_px: tuple[float, float] = (0.0, 0.0),
    rules: TypeRules | None = None,
) -> CellTable:
    """Measure every nucleus of an instance map.

    Args:
        rgb: (H, W, 3) uint8 RGB H&E image.
        labels: (H, W) integer instance map, 0 background; ids need not be consecutive. A
            nucleus made of several pieces is measured on all its pixels, outlined by its
            largest piece.
        mpp: um/px of the image.
        source: recorded in the table.
        origin_px: the image's top-left in the slide's level-0 pixels (for slide regions).
        rules: coarse type thresholds (``TypeRules()`` by default).

    Returns:
        A ``CellTable`` with one row per instance id, in ascending id order; its ``meta``
        holds ``label_ids``, the (N,) id of each row.

    Raises:
        XmagUsageError: shapes or types do not match, or ``mpp`` is not positive.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise XmagUsageError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if labels.shape != rgb.shape[:2]:
        raise XmagUsageError(f"labels {labels.shape} do not match the image {rgb.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise XmagUsageError(f"labels must be an integer instance map, got {labels.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise XmagUsageError(f"mpp must be a positive number of um/px, got {mpp!r}")
    ids, pixel_sets = _label_pixels(labels)
    n = ids.size
    he, grad = _stain_maps(rgb, mpp)
    height, width = labels.shape
    xy = np.zeros((n, 2), np.float64)
    feats = np.full((n, len(FEATURE_NAMES)), np.nan, np.float64)
    contours: list[np.ndarray] = []
    for i, flat in enumerate(pixel_sets):
        rows, cols = np.divmod(flat, width)
        xy[i] = cols.mean(), rows.mean()
        r0, r1 = max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, height)
        c0, c1 = max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, width)
        crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), bool)  # one more pixel of margin all round
        crop[rows - r0 + 1, cols - c0 + 1] = True
        geom, outline = shape_features(crop, mpp)
        contours.append(outline + np.array([c0 - 1, r0 - 1], np.float32))
        feats[i, :_N_GEOM] = geom
    index = np.zeros(labels.shape, np.int64)
    fg = labels != 0
    index[fg] = np.searchsorted(ids, labels[fg]) + 1
    feats[:, _N_GEOM:] = _intensity_table(he, grad, index, n)
    types = classify_cells(feats.astype(np.float32), rules)
    return CellTable(
        xy_um=xy * mpp,
        features=feats,
        types=types,
        contours_px=contours,
        mpp=mpp,
        source=source,
        origin_px=origin_px,
        meta={"label_ids": ids},
    )


def _stain_maps(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin / eosin OD (H, W, 2) and the haematoxylin gradient magnitude (OD per um)."""
    he = haematoxylin_eosin_od(rgb)
    hch = cv2.GaussianBlur(np.ascontiguousarray(he[..., 0]), (0, 0), 0.7)
    gx = cv2.Sobel(hch, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(hch, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    return he, np.sqrt(gx * gx + gy * gy) / np.float32(mpp)


def measure_contours(
    contours_px: Sequence[np.ndarray],
    mpp: float,
    rgb: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and centroids of nuclei given as polygons (imported from another tool).

    Each polygon is filled (pixel centres on or inside it, as ``cv2.fillPoly`` does), so a
    polygon traced through the outer pixel centres of a region measures as that region.

    Args:
        contours_px: N polygons (K, 2) of (x, y) pixel coordinates of the frame.
        mpp: um/px of the frame.
        rgb: the frame's (H, W, 3) uint8 image, for stain and texture; without it those
            features are NaN. Pixels outside the image are left out.

    Returns:
        (features (N, len(FEATURE_NAMES)) float32, centroids (N, 2) float64 in pixels).
    """
    if not (math.isfinite(mpp) and mpp > 0):
        raise XmagUsageError(f"mpp must be a positive number of um/px, got {mpp!r}")
    n = len(contours_px)
    feats = np.full((n, len(FEATURE_NAMES)), np.nan, np.float64)
    xy = np.full((n, 2), np.nan, np.float64)
    maps = _stain_maps(rgb, mpp) if rgb is not None else None
    for i, poly in enumerate(contours_px):
        pts = np.rint(np.asarray(poly, np.float64).reshape(-1, 2)).astype(np.int64)
        if pts.shape[0] == 0:
            continue
        x0, y0 = pts.min(axis=0) - 1
        x1, y1 = pts.max(axis=0) + 2
        crop = np.zeros((int(y1 - y0), int(x1 - x0)), np.uint8)
        cv2.fillPoly(crop, [(pts - [x0, y0]).astype(np.int32)], 1)
        mask = crop.astype(bool)
        rows, cols = np.nonzero(mask)
        xy[i] = cols.mean() + x0, rows.mean() + y0
        feats[i, :_N_GEOM], _ = shape_features(mask, mpp)
        if maps is None:
            continue
        he, grad = maps
        h, w = he.shape[:2]
        ya, yb, xa, xb = max(int(y0), 0), min(int(y1), h), max(int(x0), 0), min(int(x1), w)
        if ya >= yb or xa >= xb:
            continue
        inner = mask[ya - int(y0) : yb - int(y0), xa - int(x0) : xb - int(x0)]
        if inner.any():
            feats[i, _N_GEOM:] = _intensity_features(he[ya:yb, xa:xb], grad[ya:yb, xa:xb], inner)
    return feats.astype(np.float32), xy
