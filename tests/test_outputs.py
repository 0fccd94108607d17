"""Result files: the HDF5 layout CLAM/TRIDENT read, GeoJSON QuPath imports, the heatmap PNG,
atomic writes, and the published JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema_rs
import numpy as np
import pytest
from PIL import Image

from xmag.engine import Engine
from xmag.outputs import (
    atomic_write,
    read_features,
    render_heatmap,
    tile_features_geojson,
    write_features,
)
from xmag.results import SCHEMA_FILES, SlideResult, schema_text
from xmag.settings import EngineSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"
SLIDES = {"cmu": "CMU-1-Small-Region.svs", "ihc": "OS-2-ndpi.ome.tif"}


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, default_package: Path
) -> dict[str, Path]:
    engine = Engine.from_dir(default_package, EngineSettings(providers=["cpu"], batch_size=8))
    out = {}
    for key, name in SLIDES.items():
        out[key] = tmp_path_factory.mktemp(key)
        engine.embed_slide(slides_dir / name, out[key])
    return out


def _result(run: Path) -> SlideResult:
    return SlideResult.model_validate_json((run / "result.json").read_text())


@pytest.mark.parametrize("key", sorted(SLIDES))
def test_features_h5_has_the_clam_trident_layout(runs: dict[str, Path], key: str) -> None:
    result = _result(runs[key])
    h5 = read_features(runs[key] / "features.h5")
    n = result.tiles.kept
    assert h5["features"].dtype == np.float32 and h5["features"].shape == (n, 384)
    assert h5["coords"].dtype == np.int64 and h5["coords"].shape == (n, 2)
    attrs = h5["attrs"]
    assert attrs["patch_size"] == 224
    assert attrs["patch_size_level0"] == round(result.tiles.level0_tile_px)
    assert attrs["patch_level"] == result.level.level
    assert attrs["mpp"] == pytest.approx(result.mpp.mpp)
    assert attrs["target_mpp"] == 2.0
    w, h = result.slide.dimensions
    assert (h5["coords"][:, 0] < w).all() and (h5["coords"][:, 1] < h).all()
    assert (h5["coords"] >= 0).all()


@pytest.mark.parametrize("key", sorted(SLIDES))
def test_tiles_geojson_is_a_valid_feature_collection_inside_the_slide(
    runs: dict[str, Path], key: str
) -> None:
    result = _result(runs[key])
    doc = json.loads((runs[key] / "tiles.geojson").read_text())
    coords = read_features(runs[key] / "features.h5")["coords"]
    w, h = result.slide.dimensions
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == result.tiles.kept
    for i, feat in enumerate(doc["features"]):
        assert feat["type"] == "Feature"
        assert feat["geometry"]["type"] == "Polygon"
        (ring,) = feat["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert 0 <= min(xs) < max(xs) <= w and 0 <= min(ys) < max(ys) <= h
        assert (min(xs), min(ys)) == (coords[i][0], coords[i][1])
        props = feat["properties"]
        assert props["objectType"] == "tile" and props["tile_index"] == i
        assert props["classification"]["name"] in ("background", "tissue")
        assert set(props["measurements"]) == {
            "tissue: background",
            "tissue: tissue",
            "stain: attention",
        }


def test_geojson_rings_are_clipped_to_the_slide_edge() -> None:
    doc = tile_features_geojson(
        np.array([[900, 0]]),
        200.0,
        (1000, 1000),
        grid_index=np.array([3]),
        scores={"t": (["a", "b"], np.array([[0.2, 0.8]]))},
    )
    (ring,) = doc["features"][0]["geometry"]["coordinates"]
    assert max(p[0] for p in ring) == 1000
    assert doc["features"][0]["properties"]["classification"]["name"] == "b"


@pytest.mark.parametrize("key", sorted(SLIDES))
def test_heatmap_png_shows_the_thumbnail_with_coloured_tiles(
    runs: dict[str, Path], key: str
) -> None:
    result = _result(runs[key])
    img = np.asarray(Image.open(runs[key] / "heatmap.png").convert("RGB"))
    mask_h, mask_w = result.tissue.mask_shape
    scale = min(max(1.0, 512 / max(mask_h, mask_w)), 1024 / max(mask_h, mask_w))
    assert img.shape[1] == round(mask_w * scale) + 90  # colour bar panel
    assert img.shape[0] >= round(mask_h * scale) + 28  # header
    assert img.std() > 10  # not blank
    assert result.artifacts.heatmap_values == "attention:stain"


def test_heatmap_colours_tiles_by_value_and_outlines_tissue() -> None:
    thumb = np.full((600, 600, 3), 240, np.uint8)
    mask = np.zeros((600, 600), bool)
    mask[100:500, 100:500] = True
    coords = np.array([[0, 0], [1000, 1000]])  # level-0 px, downsample 10
    img = render_heatmap(thumb, 10.0, mask, coords, 1000.0, np.array([0.0, 1.0]), "test values")
    body = img[28:, :600]
    low, high = body[50, 50].astype(int), body[150, 150].astype(int)
    assert np.abs(low - high).sum() > 100  # min and max get different colours
    assert not np.array_equal(body[100, 300], thumb[100, 300])  # outline drawn on the edge
    assert np.array_equal(body[300, 300], thumb[300, 300])  # untouched inside, no tile there


def test_features_round_trip_with_scores_and_attention(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((5, 8)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2) * 100
    write_features(
        tmp_path / "f.h5",
        features=feats,
        coords=coords,
        grid_index=np.arange(5),
        tile_px=224,
        level0_tile_px=896.4,
        patch_level=1,
        mpp=0.25,
        target_mpp=2.0,
        level0_size=(4000, 3000),
        scores={"t": np.ones((5, 2))},
        attention={"s": np.full(5, 0.2)},
    )
    back = read_features(tmp_path / "f.h5")
    assert np.array_equal(back["features"], feats)
    assert np.array_equal(back["coords"], coords)
    assert back["attrs"]["patch_size_level0"] == 896
    assert back["scores/t"].shape == (5, 2) and back["attention/s"].shape == (5,)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("filename", sorted(SCHEMA_FILES))
def test_the_committed_schema_equals_the_generated_one(filename: str) -> None:
    committed = (DOCS / filename).read_text()
    assert committed == schema_text(SCHEMA_FILES[filename]), (
        f"docs/{filename} is stale: run `python -m xmag.results docs`"
    )


@pytest.mark.parametrize("key", sorted(SLIDES))
def test_result_json_validates_against_the_published_schema(
    runs: dict[str, Path], key: str
) -> None:
    schema = json.loads((DOCS / "result.schema.json").read_text())
    instance = json.loads((runs[key] / "result.json").read_text())
    jsonschema_rs.validator_for(schema).validate(instance)
    broken = {**instance, "slide_embedding": "not a list"}
    assert not jsonschema_rs.validator_for(schema).is_valid(broken)
