"""QuPath GeoJSON for cells: one writer, and the parsing shared with the importers.

A file is a FeatureCollection (QuPath also reads a bare list of Features). Each nucleus is one
Feature::

    {"type": "Feature", "id": "<uuid>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x0, y0]]]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "measurements": {"area_um2": 41.2, ...}}}

* coordinates are level-0 pixels of the slide (of the image for a plain image), rings closed;
* ``objectType`` ``"cell"`` also carries the nucleus as ``nucleusGeometry`` (QuPath's member for
  a cell's nucleus; we know no cell boundary, so the cell geometry is the nucleus too);
* classification names are QuPath's built-in classes (``QUPATH_CLASS_NAMES``), so cells take
  QuPath's colours and meanings; an unknown cell has no classification (QuPath's "unclassified");
* measurements carry ``FEATURE_NAMES`` verbatim (units in the names), NaN ones left out (JSON
  has no NaN). The reader also knows QuPath's own "Nucleus: ..." measurement names;
* the id is a UUID derived from the cell's position and the table's source (``uuid5``), so the
  same cells give the same file.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from xmag.cells.table import CELL_TYPE_COLOURS, CELL_TYPES, FEATURE_NAMES, CellTable
from xmag.errors import XmagUsageError

__all__ = [
    "QUPATH_CLASS_NAMES",
    "QUPATH_MEASUREMENTS",
    "cell_type_from_name",
    "to_qupath_geojson",
]

#: Our type -> the QuPath class written (QuPath's built-in classes).
QUPATH_CLASS_NAMES: dict[str, str | None] = {
    "unknown": None,
    "lymphocyte": "Immune cells",
    "tumour": "Tumor",
    "stromal": "Stroma",
}
#: QuPath's own measurement names (cell detection, "Add intensity features") -> (ours, scale
#: kind): "um" lengths and "um2" areas are already in micrometres; "px"/"px2" are scaled by mpp.
QUPATH_MEASUREMENTS: dict[str, tuple[str, str]] = {
    "Nucleus: Area µm^2": ("area_um2", "um2"),
    "Nucleus: Area": ("area_um2", "px2"),
    "Nucleus: Perimeter µm": ("perimeter_um", "um"),
    "Nucleus: Perimeter": ("perimeter_um", "px"),
    "Nucleus: Circularity": ("circularity", ""),
    "Nucleus: Eccentricity": ("eccentricity", ""),
    "Nucleus: Solidity": ("solidity", ""),
    "Nucleus: Hematoxylin OD mean": ("haematoxylin_od_mean", ""),
    "Nucleus: Hematoxylin OD std dev": ("haematoxylin_od_std", ""),
    "Nucleus: Eosin OD mean": ("eosin_od_mean", ""),
    "Nucleus: Eosin OD std dev": ("eosin_od_std", ""),
}

_NAMESPACE = uuid.UUID("6f1c0d6e-4d0b-5a43-9f3e-7c2b8a1e5d90")
# Substrings of class names other tools use, in the order tried (first match wins).
_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("non-neo", "unknown"),
    ("non neo", "unknown"),
    ("nonneo", "unknown"),
    ("lymph", "lymphocyte"),
    ("immune", "lymphocyte"),
    ("inflam", "lymphocyte"),
    ("plasma", "lymphocyte"),
    ("tumo", "tumour"),
    ("neopla", "tumour"),
    ("malignant", "tumour"),
    ("carcinoma", "tumour"),
    ("epithel", "tumour"),
    ("strom", "stromal"),
    ("connective", "stromal"),
    ("spindle", "stromal"),
    ("fibro", "stromal"),
)


def cell_type_from_name(name: str | None, overrides: Mapping[str, str] | None = None) -> int:
    """Code of ``CELL_TYPES`` for another tool's class name (case-insensitive).

    ``overrides`` (their name -> one of ``CELL_TYPES``) is looked up first; then our own names,
    QuPath's classes, then substrings: lymph/immune/inflam -> lymphocyte, tumo(u)r/neoplastic/
    epithelial -> tumour (CoNSeP's epithelial class is mostly malignant), strom/connective/
    spindle/fibro -> stromal, "non-neoplastic" and anything else -> unknown.
    """
    if not name:
        return 0
    if overrides:
        for key, value in overrides.items():
            if key.lower() == name.lower():
                return CELL_TYPES.index(value) if value in CELL_TYPES else 0
    low = name.strip().lower()
    if low in CELL_TYPES:
        return CELL_TYPES.index(low)
    for part, ours in _NAME_RULES:
        if part in low:
            return CELL_TYPES.index(ours)
    return 0


def _ring(points: np.ndarray) -> list[list[float]]:
    pts = [[round(float(x), 3), round(float(y), 3)] for x, y in points]
    if pts and pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


def _polygon(points: np.ndarray) -> dict[str, Any]:
    if points.shape[0] < 3:
        # QuPath needs a ring of at least 3 vertices: a tiny square around 1-2 points.
        c = points.mean(axis=0)
        points = c + np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    return {"type": "Polygon", "coordinates": [_ring(points)]}


def to_qupath_geojson(
    table: CellTable,
    *,
    level0_mpp: float | None = None,
    object_type: str = "detection",
) -> dict[str, Any]:
    """A QuPath GeoJSON FeatureCollection of a table's nuclei.

    Args:
        table: the cells.
        level0_mpp: the slide's um/px at level 0, to place the table's frame on the slide; None
            when the frame is level 0 (a plain image).
        object_type: ``"detection"`` (a nucleus) or ``"cell"`` (adds ``nucleusGeometry``).

    Returns:
        A JSON-serialisable dict (``json.dump`` it).
    """
    if object_type not in ("detection", "cell"):
        raise XmagUsageError(f"object_type must be 'detection' or 'cell', got {object_type!r}")
    contours = table.level0_contours_px(level0_mpp)
    centres = table.level0_xy_px(level0_mpp)
    features = []
    for i in range(len(table)):
        name = CELL_TYPES[int(table.types[i])]
        props: dict[str, Any] = {"objectType": object_type}
        qp_name = QUPATH_CLASS_NAMES[name]
        if qp_name is not None:
            props["classification"] = {"name": qp_name, "color": list(CELL_TYPE_COLOURS[name])}
        props["measurements"] = {
            k: float(v)
            for k, v in zip(FEATURE_NAMES, table.features[i], strict=True)
            if math.isfinite(float(v))
        }
        cx, cy = centres[i]
        key = f"{table.source}:{cx:.3f},{cy:.3f}:{i}"
        geometry = _polygon(contours[i])
        feature: dict[str, Any] = {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, key)),
            "geometry": geometry,
        }
        if object_type == "cell":
            feature["nucleusGeometry"] = geometry
        feature["properties"] = props
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}
