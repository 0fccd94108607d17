"""``xmag cells`` on real images and slides, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.cells_data import CONSEP_DIR, CONSEP_MPP, load_consep
from xmag.cells.importers import read_qupath_geojson
from xmag.cells.regions import detect_image
from xmag.cli import build_app

TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # two levels (downsample ~2), no mpp in the file
OS1 = "OS-1-detail.ome.tif"  # one level at 0.227 um/px: resampled to 0.5


def _cells(*args: str) -> object:
    return CliRunner().invoke(build_app(), ["cells", *args])


def _bounds(doc: dict) -> tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in doc["features"]])
    return pts.min(0), pts.max(0)


def test_a_plain_image_with_its_mpp_gives_the_detectors_cells(tmp_path: Path) -> None:
    crop = load_consep()[0]
    out = tmp_path / "cells.geojson"
    res = _cells(str(CONSEP_DIR / f"{crop.name}.jpg"), "--mpp", str(CONSEP_MPP), "--out", str(out))
    assert res.exit_code == 0, res.output
    back = read_qupath_geojson(out, mpp=CONSEP_MPP)
    direct = detect_image(crop.rgb, CONSEP_MPP)
    assert len(back) == len(direct) > 20
    np.testing.assert_array_equal(back.types, direct.types)
    np.testing.assert_array_equal(back.features, direct.features)


def test_a_plain_image_without_mpp_fails_with_its_code_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "cells.geojson"
    res = _cells(str(CONSEP_DIR / "test_5_005.jpg"), "--out", str(out))
    assert res.exit_code == 1
    assert "UNKNOWN_MPP" in res.output and "--mpp" in res.output
    assert not out.exists()


def test_a_slide_region_is_read_at_the_level_nearest_half_a_micron(
    tmp_path: Path, slides_dir: Path
) -> None:
    out = tmp_path / "cells.geojson"
    region = (1200, 800, 1024, 768)
    args = [str(slides_dir / TCGA), "--mpp", "0.25", "--region", ",".join(map(str, region))]
    res = _cells(*args, "--out", str(out), "--object-type", "cell")
    assert res.exit_code == 0, res.output
    assert "read level 1" in res.output
    doc = json.loads(out.read_text())
    assert len(doc["features"]) > 50
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"cell"}
    lo, hi = _bounds(doc)  # level-0 coordinates, inside the region
    assert (lo >= [region[0] - 1, region[1] - 1]).all()
    assert (hi <= [region[0] + region[2], region[1] + region[3]]).all()
    # Spread over the region, not bunched in a corner (the frame is placed right).
    assert (hi - lo > 0.8 * np.array(region[2:])).all()


def test_a_one_level_slide_is_resampled_to_half_a_micron(tmp_path: Path, slides_dir: Path) -> None:
    out = tmp_path / "cells.geojson"
    res = _cells(str(slides_dir / OS1), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "read level 0" in res.output and "to 0.5 um/px" in res.output
    back = read_qupath_geojson(out, mpp=0.227)
    assert len(back) > 100
    lo, hi = _bounds(json.loads(out.read_text()))
    assert (lo >= -1).all() and (hi <= 1101).all() and (hi - lo > 900).all()
    # Measured at 0.5 um/px, the large (tumour) nuclei of this field are 7-9 um across: areas
    # at the wrong scale would be 4.8x off.
    assert 30 < float(np.quantile(back.feature("area_um2"), 0.9)) < 70


def test_a_slide_without_mpp_fails_with_its_code(tmp_path: Path, slides_dir: Path) -> None:
    res = _cells(str(slides_dir / TCGA), "--region", "0,0,256,256", "--out", str(tmp_path / "x"))
    assert res.exit_code == 1
    assert "UNKNOWN_MPP" in res.output


@pytest.mark.parametrize("region", ["1,2,3", "a,b,c,d", "0,0,0,10", "99999,0,10,10"])
def test_bad_regions_are_usage_errors(tmp_path: Path, slides_dir: Path, region: str) -> None:
    res = _cells(str(slides_dir / OS1), "--region", region, "--out", str(tmp_path / "x.geojson"))
    assert res.exit_code == 2, res.output
    assert "region" in res.output
