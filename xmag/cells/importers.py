"""Cells found by other tools, read into a ``CellTable``: QuPath, HoVer-Net, CellViT.

==========================  =====================================================================
format                      what is read
==========================  =====================================================================
QuPath GeoJSON              Features of objectType ``detection`` or ``cell`` (annotations and
                            tiles are skipped); the nucleus is ``nucleusGeometry`` when present,
                            else the geometry; classification name; measurements (a dict, or
                            QuPath 0.2's list of ``{name, value}``)
HoVer-Net JSON              ``{"mag": ..., "nuc": {id: {bbox, centroid, contour, type_prob,
                            type}}}``; type codes of the model's dataset (``HOVERNET_TYPES``)
CellViT cells JSON          ``{"wsi_metadata": ..., "type_map": ..., "cells": [{bbox, centroid,
                            contour, type_prob, type, ...}]}``
CellViT GeoJSON             one Feature per cell type whose MultiPolygon holds every cell of that
                            type (its ``--geojson`` export); each polygon becomes a cell
==========================  =====================================================================

Coordinates are taken as pixels of the frame the tool ran on (level 0 of the slide, or the
image); ``mpp`` is that frame's um/px. Types map to ``CELL_TYPES`` by the tool's codes or names
(``cell_type_from_name``). Measurements the file carries are kept (ours by name, QuPath's
"Nucleus: ..." ones converted); the missing ones are computed from each contour, the stain and
texture ones only when the frame's image is given (else NaN).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmag.cells.measure import TypeRules, classify_cells, measure_contours
from xmag.cells.qupath import QUPATH_MEASUREMENTS, cell_type_from_name
from xmag.cells.table import CELL_TYPES, FEATURE_NAMES, CellTable
from xmag.errors import SlideNotFoundError, UnknownMppError, UnsupportedFormatError

__all__ = [
    "CELLVIT_PANNUKE_TYPES",
    "HOVERNET_TYPES",
    "CellFileError",
    "read_cells",
    "read_cellvit",
    "read_hovernet_json",
    "read_qupath_geojson",
    "retype",
]

#: Type codes of HoVer-Net's released models -> our types (code -> name of ``CELL_TYPES``).
HOVERNET_TYPES: dict[str, dict[int, str]] = {
    # PanNuke: 1 neoplastic, 2 inflammatory, 3 connective, 4 dead, 5 non-neoplastic epithelial.
    "pannuke": {
        0: "unknown",
        1: "tumour",
        2: "lymphocyte",
        3: "stromal",
        4: "unknown",
        5: "unknown",
    },
    # CoNSeP: 1 other, 2 inflammatory, 3 epithelial (mostly malignant), 4 spindle-shaped.
    "consep": {0: "unknown", 1: "unknown", 2: "lymphocyte", 3: "tumour", 4: "stromal"},
    # MoNuSAC: 1 epithelial, 2 lymphocyte, 3 macrophage, 4 neutrophil.
    "monusac": {0: "unknown", 1: "tumour", 2: "lymphocyte", 3: "unknown", 4: "unknown"},
}
#: CellViT's PanNuke class names -> our types ("Epithelial" is PanNuke's non-neoplastic one).
CELLVIT_PANNUKE_TYPES: dict[str, str] = {
    "Background": "unknown",
    "Neoplastic": "tumour",
    "Inflammatory": "lymphocyte",
    "Connective": "stromal",
    "Dead": "unknown",
    "Epithelial": "unknown",
}
_CELLVIT_PANNUKE_CODES = {
    0: "Background",
    1: "Neoplastic",
    2: "Inflammatory",
    3: "Connective",
    4: "Dead",
    5: "Epithelial",
}


class CellFileError(UnsupportedFormatError):
    """A cell file that is not in the format it was read as, or is malformed (code
    ``UNSUPPORTED_FORMAT``; fields ``path`` and ``format``)."""


def _load(source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Any]) -> tuple[Any, str]:
    """The parsed JSON of a path (or an already parsed object) and a name for messages."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SlideNotFoundError(f"{path}: no such cell file", path=path)
        try:
            return json.loads(path.read_text(encoding="utf-8")), str(path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CellFileError(
                f"{path}: not JSON ({exc}); expected a GeoJSON or JSON cell file",
                path=path,
                format="json",
            ) from exc
    return source, "<object>"


def _require_mpp(mpp: float | None, name: str) -> float:
    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        raise UnknownMppError(
            f"{name}: the cells' frame needs its um/px; pass mpp= (the slide's level-0 mpp, "
            f"or the image's), got {mpp!r}",
            path=name,
        )
    return float(mpp)


def _build(
    contours: list[np.ndarray],
    types: list[int],
    given: list[dict[str, float]],
    centroids: list[np.ndarray | None],
    *,
    mpp: float,
    image: np.ndarray | None,
    source: str,
    meta: dict[str, Any],
) -> CellTable:
    """A table from parsed cells: measured features overwritten by the file's own."""
    feats, xy = measure_contours(contours, mpp, image)
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    for i, measured in enumerate(given):
        for name, value in measured.items():
            feats[i, col[name]] = value
    for i, c in enumerate(centroids):
        if c is not None:
            xy[i] = c
    return CellTable(
        xy_um=xy * mpp,
        features=feats,
        types=np.asarray(types, np.int8),
        contours_px=contours,
        mpp=mpp,
        source=source,
        meta=meta,
    )


def _open_ring(ring: Any) -> np.ndarray:
    pts = np.asarray(ring, np.float64).reshape(-1, 2)
    if pts.shape[0] > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    return pts.astype(np.float32)


def _polygons(geometry: Mapping[str, Any] | None) -> list[np.ndarray]:
    """Exterior rings of a Polygon or MultiPolygon (holes dropped), open."""
    if not geometry:
        return []
    kind = geometry.get("type")
    coords = geometry.get("coordinates") or []
    if kind == "Polygon":
        return [_open_ring(coords[0])] if coords else []
    if kind == "MultiPolygon":
        return [_open_ring(poly[0]) for poly in coords if poly]
    return []


def _measurements(raw: Any, mpp: float) -> dict[str, float]:
    """Our features from a QuPath measurements dict or list; unknown names are left out."""
    items: list[tuple[Any, Any]]
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(m.get("name"), m.get("value")) for m in raw if isinstance(m, Mapping)]
    else:
        return {}
    out: dict[str, float] = {}
    for name, value in items:
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        if name in FEATURE_NAMES:
            out[name] = float(value)
        elif name in QUPATH_MEASUREMENTS:
            ours, unit = QUPATH_MEASUREMENTS[name]
            scale = {"px": mpp, "px2": mpp * mpp}.get(unit, 1.0)
            out.setdefault(ours, float(value) * scale)
    return out


def _features_list(doc: Any, name: str, fmt: str) -> list[Mapping[str, Any]]:
    if isinstance(doc, Mapping) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
    elif isinstance(doc, Mapping) and doc.get("type") == "Feature":
        feats = [doc]
    elif isinstance(doc, list):
        feats = doc
    else:
        feats = None
    if not isinstance(feats, list):
        raise CellFileError(
            f"{name}: not GeoJSON (expected a FeatureCollection or a list of Features)",
            path=name,
            format=fmt,
        )
    return [f for f in feats if isinstance(f, Mapping)]


def _class_name(props: Mapping[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        value = cls.get("name")
        return str(value) if value is not None else None
    return str(cls) if isinstance(cls, str) else None


def read_qupath_geojson(
    source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Any],
    *,
    mpp: float | None,
    image: np.ndarray | None = None,
    type_names: Mapping[str, str] | None = None,
) -> CellTable:
    """Nuclei of a QuPath GeoJSON export (ours from ``CellTable.to_geojson`` too).

    Args:
        source: a path, or the parsed JSON.
        mpp: um/px of the coordinates' frame (the slide's level-0 mpp).
        image: the frame's RGB image, to measure stain and texture not in the file.
        type_names: class name -> one of ``CELL_TYPES``, before the built-in name rules.

    Raises:
        SlideNotFoundError, CellFileError, UnknownMppError.
    """
    doc, name = _load(source)
    scale = _require_mpp(mpp, name)
    contours: list[np.ndarray] = []
    types: list[int] = []
    given: list[dict[str, float]] = []
    ids: list[str | None] = []
    for feature in _features_list(doc, name, "qupath"):
        props = feature.get("properties") or {}
        if props.get("objectType", "detection") not in ("detection", "cell"):
            continue
        polys = _polygons(feature.get("nucleusGeometry") or feature.get("geometry"))
        if not polys:
            continue
        contours.append(max(polys, key=lambda p: p.shape[0]))
        types.append(cell_type_from_name(_class_name(props), type_names))
        given.append(_measurements(props.get("measurements"), scale))
        ids.append(feature.get("id"))
    return _build(
        contours,
        types,
        given,
        [None] * len(contours),
        mpp=scale,
        image=image,
        source="qupath",
        meta={"file": name, "ids": ids},
    )


def read_hovernet_json(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    mpp: float | None,
    types: str | Mapping[int, str],
    image: np.ndarray | None = None,
) -> CellTable:
    """Nuclei of a HoVer-Net JSON (``nuc`` -> id -> {bbox, centroid, contour, type_prob, type}).

    Args:
        source: a path, or the parsed JSON.
        mpp: um/px of the frame HoVer-Net ran on.
        types: the model's dataset, a key of ``HOVERNET_TYPES`` ("pannuke", "consep",
            "monusac"), or its own code -> name of ``CELL_TYPES``. No default: the file does not
            say which model wrote it, and the codes mean different cells.
        image: the frame's RGB image, to measure stain and texture.

    Returns:
        A table in ascending nucleus id order; ``meta["ids"]`` holds the ids and
        ``meta["type_prob"]`` the probabilities (NaN where absent). A nucleus without a type
        (``null``, a segmentation-only model) is unknown.
    """
    doc, name = _load(source)
    scale = _require_mpp(mpp, name)
    if isinstance(types, str):
        if types not in HOVERNET_TYPES:
            raise CellFileError(
                f"unknown HoVer-Net type set {types!r}; use one of {sorted(HOVERNET_TYPES)} "
                "or a mapping of codes to cell types",
                path=name,
                format="hovernet",
            )
        code_map: Mapping[int, str] = HOVERNET_TYPES[types]
    else:
        code_map = types
    nuc = doc.get("nuc") if isinstance(doc, Mapping) else None
    if not isinstance(nuc, Mapping):
        raise CellFileError(
            f"{name}: not a HoVer-Net JSON (no 'nuc' object of nuclei)",
            path=name,
            format="hovernet",
        )
    keys = sorted(nuc, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    contours, codes, centroids, probs = [], [], [], []
    for key in keys:
        cell = nuc[key]
        contour, centroid, prob = _hovernet_nucleus(cell, f"nucleus {key}", name, "hovernet")
        contours.append(contour)
        code = cell.get("type")
        codes.append(
            CELL_TYPES.index(code_map.get(int(code), "unknown")) if code is not None else 0
        )
        centroids.append(centroid)
        probs.append(prob)
    return _build(
        contours,
        codes,
        [{} for _ in contours],
        centroids,
        mpp=scale,
        image=image,
        source="hovernet",
        meta={"file": name, "ids": keys, "type_prob": np.asarray(probs, np.float32)},
    )


def _hovernet_nucleus(
    cell: Mapping[str, Any], label: str, name: str, fmt: str
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Contour, centroid (or None) and type probability (or NaN) of one nucleus record in
    HoVer-Net's layout, which CellViT's cells JSON keeps.

    Raises:
        CellFileError: the record has no usable contour.
    """
    try:
        contour = _open_ring(cell["contour"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CellFileError(
            f"{name}: {label} has no usable contour ({exc})", path=name, format=fmt
        ) from exc
    c = cell.get("centroid")
    centroid = np.asarray(c, np.float64).reshape(2) if c is not None else None
    prob = cell.get("type_prob")
    return contour, centroid, float(prob) if prob is not None else math.nan


def read_cellvit(
    source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Any],
    *,
    mpp: float | None = None,
    image: np.ndarray | None = None,
    type_names: Mapping[str, str] | None = None,
) -> CellTable:
    """Nuclei of CellViT's outputs: its cells JSON, or its GeoJSON (one MultiPolygon per type).

    Args:
        source: a path, or the parsed JSON.
        mpp: um/px of the frame; for a cells JSON, defaults to its ``wsi_metadata.base_mpp``.
        image: the frame's RGB image, to measure stain and texture.
        type_names: class name -> one of ``CELL_TYPES``; defaults to CellViT's PanNuke names
            (``CELLVIT_PANNUKE_TYPES``), then the built-in name rules.
    """
    doc, name = _load(source)
    names = {**CELLVIT_PANNUKE_TYPES, **(type_names or {})}
    if isinstance(doc, Mapping) and "cells" in doc:
        meta_mpp = (doc.get("wsi_metadata") or {}).get("base_mpp")
        scale = _require_mpp(mpp if mpp is not None else meta_mpp, name)
        raw_map = doc.get("type_map") or _CELLVIT_PANNUKE_CODES
        code_names = {int(k): str(v) for k, v in raw_map.items()}
        contours, codes, centroids, probs = [], [], [], []
        for i, cell in enumerate(doc["cells"]):
            contour, centroid, prob = _hovernet_nucleus(cell, f"cell {i}", name, "cellvit")
            contours.append(contour)
            code = cell.get("type")
            type_name = code_names.get(int(code)) if code is not None else None
            codes.append(cell_type_from_name(type_name, names))
            centroids.append(centroid)
            probs.append(prob)
        return _build(
            contours,
            codes,
            [{} for _ in contours],
            centroids,
            mpp=scale,
            image=image,
            source="cellvit",
            meta={"file": name, "type_prob": np.asarray(probs, np.float32)},
        )
    scale = _require_mpp(mpp, name)
    contours, codes = [], []
    for feature in _features_list(doc, name, "cellvit"):
        props = feature.get("properties") or {}
        code = cell_type_from_name(_class_name(props), names)
        for poly in _polygons(feature.get("geometry")):
            contours.append(poly)
            codes.append(code)
    return _build(
        contours,
        codes,
        [{} for _ in contours],
        [None] * len(contours),
        mpp=scale,
        image=image,
        source="cellvit",
        meta={"file": name},
    )


def read_cells(
    path: str | os.PathLike[str],
    *,
    mpp: float | None,
    image: np.ndarray | None = None,
    hovernet_types: str | Mapping[int, str] | None = None,
) -> CellTable:
    """Read any supported cell file, telling the format by its content.

    A ``nuc`` object is HoVer-Net (needs ``hovernet_types``); a ``cells`` list is CellViT's
    JSON; GeoJSON whose Features are MultiPolygon annotations is CellViT's, any other GeoJSON
    QuPath's.
    """
    doc, name = _load(path)
    if isinstance(doc, Mapping) and "nuc" in doc:
        if hovernet_types is None:
            raise CellFileError(
                f"{name}: a HoVer-Net file; say which model wrote it (hovernet_types= one of "
                f"{sorted(HOVERNET_TYPES)})",
                path=name,
                format="hovernet",
            )
        return read_hovernet_json(doc, mpp=mpp, types=hovernet_types, image=image)
    if isinstance(doc, Mapping) and "cells" in doc:
        return read_cellvit(doc, mpp=mpp, image=image)
    features = _features_list(doc, name, "geojson")
    multi = [
        f
        for f in features
        if (f.get("geometry") or {}).get("type") == "MultiPolygon"
        and (f.get("properties") or {}).get("objectType", "annotation") == "annotation"
    ]
    if features and len(multi) == len(features):
        return read_cellvit(doc, mpp=mpp, image=image)
    return read_qupath_geojson(doc, mpp=mpp, image=image)


def retype(table: CellTable, rules: TypeRules | None = None) -> CellTable:
    """The table with types from our rules on its features (for tools that give no types)."""
    return CellTable(
        xy_um=table.xy_um,
        features=table.features,
        types=classify_cells(table.features, rules),
        contours_px=table.contours_px,
        mpp=table.mpp,
        source=table.source,
        origin_px=table.origin_px,
        meta=dict(table.meta),
    )
