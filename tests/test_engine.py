"""The engine on real slides: shapes, determinism, parity with a direct ONNX Runtime run on tiles
read independently, progress, cancellation and no-tissue (the result store: test_store.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tifffile

from xmag.engine import Engine, SlideOptions
from xmag.errors import JobCanceledError, NoTissueError, UnknownMppError
from xmag.outputs import read_features
from xmag.package import load_package
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.results import SlideResult
from xmag.settings import EngineSettings
from xmag.tiles import read_tile

CMU = "CMU-1-Small-Region.svs"  # Aperio, 0.499 um/px, H&E
OME_IHC = "OS-2-ndpi.ome.tif"  # OME-TIFF, 0.227 um/px, Ki67 IHC
NDPI = "test3-DAPI-2-387.ndpi"  # Hamamatsu, 0.228 um/px, fluorescence
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # Aperio without mpp


@pytest.fixture(scope="session")
def package_dir(default_package: Path) -> Path:
    return default_package


def _settings(**kw: object) -> EngineSettings:
    base: dict[str, object] = {"providers": ["cpu"], "batch_size": 4, "reader_workers": 2}
    return EngineSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def engine(package_dir: Path) -> Engine:
    return Engine.from_dir(package_dir, _settings())


@pytest.fixture(scope="session")
def cmu_run(engine: Engine, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmu")
    engine.embed_slide(slides_dir / CMU, out)
    return out


@pytest.mark.parametrize(
    ("name", "options"),
    [
        (CMU, SlideOptions()),
        (OME_IHC, SlideOptions()),
        (NDPI, SlideOptions()),
        (TCGA, SlideOptions(default_mpp=0.25)),
    ],
)
def test_every_kept_tile_gets_an_embedding_of_the_card_dimension(
    engine: Engine, slides_dir: Path, tmp_path: Path, name: str, options: SlideOptions
) -> None:
    result = engine.embed_slide(slides_dir / name, tmp_path, options=options)
    feats = read_features(tmp_path / "features.h5")
    n = result.tiles.kept
    assert n > 0
    assert feats["features"].shape == (n, 384)
    assert feats["coords"].shape == (n, 2)
    assert len(result.slide_embedding) == 384
    np.testing.assert_allclose(
        result.slide_embedding, feats["features"].mean(axis=0), rtol=1e-5, atol=1e-6
    )
    stain = {p.name: p for p in result.predictions}["stain"]
    assert set(stain.probabilities) == {"he", "ihc", "fluorescence"}
    assert sum(stain.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert feats["attention/stain"].shape == (n,)
    assert feats["scores/tissue"].shape == (n, 2)
    assert result.provider == "cpu"
    assert result.model.trained is False
    assert SlideResult.model_validate_json((tmp_path / "result.json").read_text()) == result


def test_a_slide_without_mpp_is_refused_unless_a_default_is_given(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(UnknownMppError):
        engine.embed_slide(slides_dir / TCGA, tmp_path)
    assert not (tmp_path / "result.json").exists()
    result = engine.embed_slide(slides_dir / TCGA, tmp_path, options=SlideOptions(default_mpp=0.25))
    assert (result.mpp.source, result.mpp.mpp) == ("default", 0.25)


def test_an_mpp_override_wins_over_the_metadata_and_changes_the_tiling(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    base = engine.embed_slide(slides_dir / CMU, tmp_path / "a")
    coarse = engine.embed_slide(
        slides_dir / CMU, tmp_path / "b", options=SlideOptions(mpp_override=0.25)
    )
    assert coarse.mpp.source == "override"
    assert coarse.tiles.level0_tile_px == pytest.approx(2.0 * 224 / 0.25)
    assert base.tiles.level0_tile_px == pytest.approx(2.0 * 224 / base.mpp.mpp)
    assert coarse.tiles.kept < base.tiles.kept


def test_the_same_slide_gives_the_same_embeddings_bit_for_bit(
    engine: Engine, slides_dir: Path, tmp_path: Path, cmu_run: Path
) -> None:
    again = engine.embed_slide(slides_dir / CMU, tmp_path)
    first = read_features(cmu_run / "features.h5")
    second = read_features(tmp_path / "features.h5")
    assert np.array_equal(first["features"], second["features"])
    assert np.array_equal(first["coords"], second["coords"])
    stored = SlideResult.model_validate_json((cmu_run / "result.json").read_text())
    assert again.slide_embedding == stored.slide_embedding
    assert again.predictions == stored.predictions


def test_batch_size_does_not_change_the_embeddings(
    package_dir: Path, slides_dir: Path, tmp_path: Path, cmu_run: Path
) -> None:
    other = Engine.from_dir(package_dir, _settings(batch_size=1, reader_workers=1, queue_depth=1))
    other.embed_slide(slides_dir / CMU, tmp_path)
    a = read_features(cmu_run / "features.h5")["features"]
    b = read_features(tmp_path / "features.h5")["features"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _reference_input(tile: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """Independent preprocessing: float64 maths per channel, then NCHW float32."""
    x = tile.astype(np.float64) / 255.0
    x = (x - np.array(mean, np.float64)) / np.array(std, np.float64)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("name", [CMU, NDPI])
def test_engine_embeddings_equal_onnxruntime_on_tiles_read_with_read_tile(
    engine: Engine, package_dir: Path, slides_dir: Path, tmp_path: Path, name: str
) -> None:
    result = engine.embed_slide(slides_dir / name, tmp_path)
    feats = read_features(tmp_path / "features.h5")
    card = load_package(package_dir).card
    session = ort.InferenceSession(
        str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    with open_slide(slides_dir / name) as reader:
        plan = plan_slide(reader, card.tiling_params())
        kept = plan.grid.kept_indices()
        assert kept.shape[0] == result.tiles.kept
        np.testing.assert_array_equal(feats["grid_index"], kept)
        np.testing.assert_array_equal(feats["coords"], plan.grid.level0_xy[kept])
        for row, index in enumerate(kept):
            tile = read_tile(reader, plan.grid, plan.level, int(index))
            assert tile.shape == (224, 224, 3)
            x = _reference_input(tile, card.input.mean, card.input.std)
            (want,) = session.run(["embedding"], {"pixels": x})
            np.testing.assert_allclose(feats["features"][row], want[0], rtol=1e-4, atol=1e-4)
            # The check can fail: the same tile with its channels swapped is far off.
            (bgr,) = session.run(["embedding"], {"pixels": np.ascontiguousarray(x[:, ::-1])})
            assert np.abs(bgr[0] - want[0]).max() > 1e-3


def test_progress_reports_every_batch_up_to_the_kept_tile_count(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    result = engine.embed_slide(
        slides_dir / NDPI, tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    n = result.tiles.kept
    assert calls[0] == (0, n)
    assert calls[-1] == (n, n)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(calls) == 1 + -(-n // engine.batch_size)


def test_cancel_between_batches_raises_job_canceled_and_writes_nothing(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    tiles = {"done": 0}

    def progress(done: int, total: int) -> None:
        tiles["done"] = done

    def cancel_after_first_batch() -> bool:
        return tiles["done"] > 0

    with pytest.raises(JobCanceledError) as info:
        engine.embed_slide(
            slides_dir / NDPI, tmp_path, progress=progress, should_cancel=cancel_after_first_batch
        )
    assert info.value.code == "JOB_CANCELED"
    assert info.value.fields["tiles_done"] == engine.batch_size
    assert not (tmp_path / "result.json").exists()
    # Engines' model threads (xmag.inflight.ModelThread) live as long as their engine.
    alive = [t.name for t in threading.enumerate() if t.name.startswith("xmag-")]
    assert [name for name in alive if name != "xmag-model"] == []


def test_cancel_during_planning_stops_before_any_tile_is_read(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    reported: list[int] = []
    before = engine.tiles_embedded
    with pytest.raises(JobCanceledError):
        engine.embed_slide(
            slides_dir / CMU,
            tmp_path,
            progress=lambda done, total: reported.append(done),
            should_cancel=lambda: True,
        )
    assert reported == [] and engine.tiles_embedded == before  # stopped in the plan
    assert not (tmp_path / "result.json").exists()


def test_a_blank_slide_raises_no_tissue_with_its_qc(engine: Engine, tmp_path: Path) -> None:
    blank = tmp_path / "blank.tif"
    white = np.full((2048, 2048, 3), 246, np.uint8)
    tifffile.imwrite(blank, white, tile=(256, 256), photometric="rgb")
    with pytest.raises(NoTissueError) as info:
        engine.embed_slide(blank, tmp_path / "out", options=SlideOptions(default_mpp=0.5))
    assert info.value.code == "NO_TISSUE"
    assert "blank.tif" in info.value.message
    assert info.value.fields["qc"]["tiles_kept"] == 0
    assert not (tmp_path / "out" / "result.json").exists()


def test_the_result_records_provenance_and_timings(cmu_run: Path, slides_dir: Path) -> None:
    result = SlideResult.model_validate_json((cmu_run / "result.json").read_text())
    assert result.slide.reader == "openslide"
    assert result.slide.size_bytes == (slides_dir / CMU).stat().st_size
    assert len(result.slide.sha256) == 64
    assert result.mpp.source == "metadata"
    assert result.params.tile_px == 224 and result.params.target_mpp == 2.0
    assert result.qc.tiles_kept == result.tiles.kept
    assert set(result.model.checksums) == {"model.onnx", "heads/stain.onnx", "heads/tissue.onnx"}
    for stage in ("open", "hash", "plan", "read_wait", "model", "heads", "write"):
        assert result.timings[stage] >= 0.0
    assert result.cache_hit is False


def test_a_slide_smaller_than_one_tile_says_so(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(NoTissueError, match="smaller than one tile") as info:
        engine.embed_slide(slides_dir / "OS-1-detail.ome.tif", tmp_path)
    assert info.value.fields["qc"]["tiles_total"] == 0
