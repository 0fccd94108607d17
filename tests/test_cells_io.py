"""Cells in and out: QuPath GeoJSON (ours), HoVer-Net JSON and CellViT JSON/GeoJSON (theirs).

The fixtures are real cells (the detector on a CoNSeP crop) written the way each tool writes
them; reading them back must give the same cells.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.cells_data import CONSEP_MPP, load_consep
from xmag.cells import importers, measure, qupath, regions, table
from xmag.cells.detect import detect_nuclei
from xmag.cells.importers import (
    CellFileError,
    read_cells,
    read_cellvit,
    read_hovernet_json,
    read_qupath_geojson,
)
from xmag.cells.table import CELL_TYPES, FEATURE_NAMES, GEOMETRY_FEATURES, CellTable
from xmag.errors import SlideNotFoundError, UnknownMppError

N_GEOM = len(GEOMETRY_FEATURES)
# Our types -> each tool's codes (any code that maps back to "unknown" will do for unknown).
TO_CONSEP = {0: 1, 1: 2, 2: 3, 3: 4}
TO_PANNUKE = {0: 4, 1: 2, 2: 1, 3: 3}
PANNUKE_NAMES = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead"}


@pytest.fixture(scope="module")
def crop():
    return load_consep()[1]


@pytest.fixture(scope="module")
def cells(crop) -> CellTable:
    t = detect_nuclei(crop.rgb, CONSEP_MPP)
    assert len(set(t.types.tolist())) == len(CELL_TYPES)  # every type present: a real check
    return t


def _bbox(contour: np.ndarray) -> list[list[int]]:
    (cmin, rmin), (cmax, rmax) = contour.min(0), contour.max(0)
    return [[int(rmin), int(cmin)], [int(rmax) + 1, int(cmax) + 1]]


def _hovernet_doc(t: CellTable) -> dict:
    """What HoVer-Net's run_infer.py writes: nuclei keyed by id from 1, (x, y) points."""
    nuc = {}
    for i, contour in enumerate(t.contours_px):
        nuc[str(i + 1)] = {
            "bbox": _bbox(contour),
            "centroid": [float(v) for v in t.xy_px[i]],
            "contour": contour.astype(int).tolist(),
            "type_prob": 0.9,
            "type": TO_CONSEP[int(t.types[i])],
        }
    return {"mag": 40, "nuc": nuc}


def _cellvit_json(t: CellTable) -> dict:
    """CellViT's cells.json: metadata, its type map, one record per cell."""
    return {
        "wsi_metadata": {"base_magnification": 40, "base_mpp": CONSEP_MPP},
        "type_map": {"0": "Background", **{str(k): v for k, v in PANNUKE_NAMES.items()}},
        "cells": [
            {
                "bbox": _bbox(c),
                "centroid": [float(v) for v in t.xy_px[i]],
                "contour": c.astype(int).tolist(),
                "type_prob": 0.8,
                "type": TO_PANNUKE[int(t.types[i])],
                "patch_coordinates": [0, 0],
                "cell_status": 0,
                "offset_global": [0, 0],
            }
            for i, c in enumerate(t.contours_px)
        ],
    }


def _cellvit_geojson(t: CellTable) -> list:
    """CellViT's --geojson export: a list of Features, one MultiPolygon per type."""
    features = []
    for ours in sorted(set(t.types.tolist())):
        code = TO_PANNUKE[ours]
        polys = []
        for i in np.flatnonzero(t.types == ours):
            ring = t.contours_px[i].astype(int).tolist()
            polys.append([[*ring, ring[0]]])
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "MultiPolygon", "coordinates": polys},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": PANNUKE_NAMES[code], "color": [255, 0, 0]},
                },
            }
        )
    return features


def _write(tmp_path: Path, name: str, doc: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _same_cells(a: CellTable, b: CellTable, centroid_atol_um: float) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.types, b.types)
    np.testing.assert_allclose(a.xy_um, b.xy_um, atol=centroid_atol_um)
    for ca, cb in zip(a.contours_px, b.contours_px, strict=True):
        np.testing.assert_allclose(ca, cb, atol=1e-3)


def test_qupath_geojson_round_trips_our_cells(tmp_path, cells) -> None:
    doc = cells.to_geojson()
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(cells)
    first = doc["features"][0]
    uuid.UUID(first["id"])  # a UUID
    assert first["properties"]["objectType"] == "detection"
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    classes = {f["properties"].get("classification", {}).get("name") for f in doc["features"]}
    assert classes == {None, "Immune cells", "Tumor", "Stroma"}
    path = _write(tmp_path, "cells.geojson", doc)
    back = read_qupath_geojson(path, mpp=CONSEP_MPP)
    assert back.source == "qupath"
    _same_cells(cells, back, centroid_atol_um=1.0)
    # The measurements written are the measurements read, to float32 precision.
    np.testing.assert_array_equal(back.features, cells.features)
    assert back.meta["ids"] == [f["id"] for f in doc["features"]]
    # The same cells give the same file (ids derive from the cells).
    assert json.dumps(cells.to_geojson()) == json.dumps(doc)


def test_qupath_cells_of_a_slide_region_land_at_level0_coordinates(cells) -> None:
    # The crop as if read at 0.25 um/px from a slide scanned at 0.125 um/px, at (1000, 2000).
    region = CellTable(
        xy_um=cells.xy_um,
        features=cells.features,
        types=cells.types,
        contours_px=cells.contours_px,
        mpp=cells.mpp,
        source=cells.source,
        origin_px=(1000, 2000),
    )
    doc = region.to_geojson(level0_mpp=0.125, object_type="cell")
    f = doc["features"][0]
    assert f["properties"]["objectType"] == "cell"
    assert f["nucleusGeometry"] == f["geometry"]
    x, y = f["geometry"]["coordinates"][0][0]
    px, py = cells.contours_px[0][0]
    assert (x, y) == pytest.approx((1000 + 2 * px + 0.5, 2000 + 2 * py + 0.5))
    back = read_qupath_geojson(doc, mpp=0.125)
    np.testing.assert_allclose(back.xy_px, region.level0_xy_px(0.125), atol=4.0)
    np.testing.assert_array_equal(back.types, cells.types)


def test_qupath_exports_with_its_own_names_and_old_lists_are_understood() -> None:
    square = [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {  # QuPath 0.2: measurements as a list, cells with a nucleus geometry
                "type": "Feature",
                "id": "a",
                "geometry": {"type": "Polygon", "coordinates": [square]},
                "nucleusGeometry": {"type": "Polygon", "coordinates": [square]},
                "properties": {
                    "objectType": "cell",
                    "classification": {"name": "Lymphocyte", "colorRGB": -16777216},
                    "measurements": [
                        {"name": "Nucleus: Area µm^2", "value": 99.5},
                        {"name": "Nucleus: Hematoxylin OD mean", "value": 0.61},
                        {"name": "Nucleus: Perimeter", "value": 80.0},
                        {"name": "Cell: Area µm^2", "value": 150.0},
                    ],
                },
            },
            {  # a tissue annotation is not a cell
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [square]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
            },
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [square]},
                "properties": {"objectType": "detection", "classification": {"name": "Necrosis"}},
            },
        ],
    }
    t = read_qupath_geojson(doc, mpp=0.5)
    assert len(t) == 2
    assert t.type_names == ["lymphocyte", "unknown"]
    assert t.feature("area_um2")[0] == pytest.approx(99.5)  # theirs kept
    assert t.feature("haematoxylin_od_mean")[0] == pytest.approx(0.61)
    assert t.feature("perimeter_um")[0] == pytest.approx(40.0)  # px scaled by mpp
    # Ours from the outline where they gave none: a 21 x 21 px square at 0.5 um/px.
    assert t.feature("area_um2")[1] == pytest.approx(21 * 21 * 0.25)
    assert t.feature("solidity")[1] == pytest.approx(1.0)
    assert np.isnan(t.feature("haematoxylin_od_mean")[1])  # no image: no stain
    np.testing.assert_allclose(t.xy_px, [[20, 20], [20, 20]])


def test_hovernet_json_round_trips(tmp_path, crop, cells) -> None:
    path = _write(tmp_path, "hovernet.json", _hovernet_doc(cells))
    back = read_hovernet_json(path, mpp=CONSEP_MPP, types="consep", image=crop.rgb)
    assert back.source == "hovernet"
    _same_cells(cells, back, centroid_atol_um=1e-4)
    assert back.meta["ids"][:3] == ["1", "2", "3"]
    np.testing.assert_allclose(back.meta["type_prob"], 0.9)
    # Features recomputed from the outlines and the image: close to the detector's own.
    area = FEATURE_NAMES.index("area_um2")
    rel = np.abs(back.features[:, area] - cells.features[:, area]) / cells.features[:, area]
    assert np.median(rel) < 0.05
    h = FEATURE_NAMES.index("haematoxylin_od_mean")
    np.testing.assert_allclose(
        np.median(back.features[:, h]), np.median(cells.features[:, h]), rtol=0.1
    )
    # Without the image: geometry only.
    bare = read_cells(path, mpp=CONSEP_MPP, hovernet_types="consep")
    assert np.isnan(bare.features[:, N_GEOM:]).all()
    np.testing.assert_array_equal(bare.features[:, :N_GEOM], back.features[:, :N_GEOM])


def test_hovernet_type_sets_differ_and_one_must_be_named(tmp_path, cells) -> None:
    doc = _hovernet_doc(cells)
    consep = read_hovernet_json(doc, mpp=CONSEP_MPP, types="consep")
    pannuke = read_hovernet_json(doc, mpp=CONSEP_MPP, types="pannuke")
    assert not np.array_equal(consep.types, pannuke.types)
    untyped = {"mag": None, "nuc": {k: {**v, "type": None} for k, v in doc["nuc"].items()}}
    assert (read_hovernet_json(untyped, mpp=CONSEP_MPP, types="consep").types == 0).all()
    path = _write(tmp_path, "hovernet.json", doc)
    with pytest.raises(CellFileError, match="which model") as info:
        read_cells(path, mpp=CONSEP_MPP)
    assert info.value.code == "UNSUPPORTED_FORMAT"
    with pytest.raises(CellFileError, match="type set"):
        read_hovernet_json(doc, mpp=CONSEP_MPP, types="lizard")


def test_cellvit_json_round_trips_and_takes_its_mpp_from_the_file(tmp_path, cells) -> None:
    path = _write(tmp_path, "cells.json", _cellvit_json(cells))
    back = read_cellvit(path)  # base_mpp from wsi_metadata
    assert back.source == "cellvit" and back.mpp == CONSEP_MPP
    _same_cells(cells, back, centroid_atol_um=1e-4)
    assert read_cells(path, mpp=None).source == "cellvit"


def test_cellvit_geojson_round_trips(tmp_path, cells) -> None:
    path = _write(tmp_path, "cells.geojson", _cellvit_geojson(cells))
    back = read_cells(path, mpp=CONSEP_MPP)  # told from QuPath's by its MultiPolygons
    assert back.source == "cellvit"
    order = np.argsort(cells.types, kind="stable")  # the file groups cells by type
    _same_cells(cells.subset(order), back, centroid_atol_um=1.0)


def test_pannuke_epithelial_is_not_called_tumour_but_consep_epithelial_is() -> None:
    square = [[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [[square]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Epithelial"}},
    }
    assert read_cellvit([feature], mpp=0.25).type_names == ["unknown"]
    assert qupath.cell_type_from_name("Epithelial") == CELL_TYPES.index("tumour")
    assert qupath.cell_type_from_name("Non-Neoplastic Epithelial") == 0


def test_bad_cell_files_raise_typed_errors(tmp_path, cells) -> None:
    with pytest.raises(SlideNotFoundError):
        read_cells(tmp_path / "missing.geojson", mpp=0.5)
    text = tmp_path / "notes.geojson"
    text.write_text("not json", encoding="utf-8")
    with pytest.raises(CellFileError, match="not JSON"):
        read_cells(text, mpp=0.5)
    with pytest.raises(CellFileError, match="not GeoJSON"):
        read_qupath_geojson({"type": "Point", "coordinates": [1, 2]}, mpp=0.5)
    with pytest.raises(UnknownMppError, match="mpp="):
        read_qupath_geojson(cells.to_geojson(), mpp=None)
    broken = _hovernet_doc(cells)
    del broken["nuc"]["1"]["contour"]
    with pytest.raises(CellFileError, match="contour"):
        read_hovernet_json(broken, mpp=0.25, types="consep")


def test_tables_concat_across_regions_and_subset(cells) -> None:
    a = CellTable(**{**_fields(cells), "origin_px": (0, 0)})
    b = CellTable(**{**_fields(cells), "origin_px": (512, 0)})
    with pytest.raises(Exception, match="level0_mpp"):
        CellTable.concat([a, b])
    # Frames at 0.25 um/px of a slide at 0.125 um/px: b sits 256 frame px to the right.
    joined = CellTable.concat([a, b], level0_mpp=0.125)
    assert len(joined) == 2 * len(cells) and joined.origin_px == (0.0, 0.0)
    np.testing.assert_allclose(joined.xy_px[len(cells) :, 0], cells.xy_px[:, 0] + 256, atol=1e-3)
    np.testing.assert_allclose(
        joined.level0_xy_px(0.125)[len(cells) :], b.level0_xy_px(0.125), atol=1e-3
    )
    mask = cells.types == CELL_TYPES.index("lymphocyte")
    sub = cells.subset(mask)
    assert len(sub) == int(mask.sum()) and set(sub.type_names) == {"lymphocyte"}
    assert len(cells.subset([0, 2])) == 2
    assert "CellTable(" in repr(cells)


def _fields(t: CellTable) -> dict:
    return {
        "xy_um": t.xy_um,
        "features": t.features,
        "types": t.types,
        "contours_px": t.contours_px,
        "mpp": t.mpp,
        "source": t.source,
    }


def test_tables_refuse_inconsistent_columns(cells) -> None:
    f = _fields(cells)
    with pytest.raises(Exception, match="features"):
        CellTable(**{**f, "features": cells.features[:, :3]})
    with pytest.raises(Exception, match="contours"):
        CellTable(**{**f, "contours_px": cells.contours_px[:-1]})
    with pytest.raises(Exception, match="type codes"):
        CellTable(**{**f, "types": np.full(len(cells), 7)})
    with pytest.raises(Exception, match="type codes"):
        CellTable(**{**f, "types": np.full(len(cells), 260)})  # not wrapped to 4 by int8
    with pytest.raises(Exception, match="mpp"):
        CellTable(**{**f, "mpp": -1.0})


@pytest.mark.parametrize("module", [table, measure, importers, qupath, regions])
def test_public_names_exist(module) -> None:
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name}"
