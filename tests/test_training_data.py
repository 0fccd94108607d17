"""Paired 20x/5x fields from real slides, mpp checks, extraction to a folder of crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

require_torch()

from tests.training_helpers import CMU1, SLIDES  # noqa: E402
from training.config import DataConfig, SlideEntry, StudentView  # noqa: E402
from training.data import CropFolder, FieldGeometry, SlideFields  # noqa: E402
from training.extract import extract_crops  # noqa: E402
from xmag.errors import NoTissueError, SlideError  # noqa: E402
from xmag.params import TilingParams  # noqa: E402
from xmag.preprocess import Preprocessor  # noqa: E402
from xmag.tiles import SlideTiles  # noqa: E402
from xmag.tissue import TissueMask  # noqa: E402

DAPI = SLIDES / "test3-DAPI-2-387.ndpi"


def _whole_slide(reader) -> TissueMask:
    """Every pixel counts as tissue: the tests choose where fields go, not a detector."""
    thumb, ds = reader.thumbnail(256)
    return TissueMask(np.ones(thumb.shape[:2], bool), ds, "whole-slide", thumb)


def _no_tissue(reader) -> TissueMask:
    thumb, ds = reader.thumbnail(256)
    return TissueMask(np.zeros(thumb.shape[:2], bool), ds, "none", thumb)


@pytest.mark.parametrize("slide", [CMU1, DAPI], ids=["svs-20x", "ndpi-40x"])
def test_the_5x_view_from_the_pyramid_shows_the_same_field_as_the_resized_20x_crop(
    slide: Path,
) -> None:
    g = FieldGeometry()
    views = {}
    for view in StudentView:
        f = SlideFields(SlideEntry(path=slide), g, student_view=view, tissue_fn=_whole_slide)
        try:
            pair = f.read((200, 300))
        finally:
            f.close()
        assert pair.hi.shape == (896, 896, 3) and pair.lo.shape == (224, 224, 3)
        views[view] = pair
    assert np.array_equal(views[StudentView.PYRAMID].hi, views[StudentView.RESIZE].hi)
    diff = np.abs(
        views[StudentView.PYRAMID].lo.astype(int) - views[StudentView.RESIZE].lo.astype(int)
    )
    assert diff.mean() < 6  # same field; only the resampling path differs


def test_a_shifted_field_is_a_different_field() -> None:
    f = SlideFields(SlideEntry(path=CMU1), FieldGeometry(), tissue_fn=_whole_slide)
    try:
        a, b = f.read((200, 300)), f.read((1000, 1500))
    finally:
        f.close()
    assert np.abs(a.lo.astype(int) - b.lo.astype(int)).mean() > 10


def test_a_slide_scanned_coarser_than_the_teacher_is_refused_unless_upsampling_is_allowed() -> None:
    entry = SlideEntry(path=SLIDES / "BPAEC-dicom")  # 1.29 um/px at its largest level
    with pytest.raises(SlideError, match="coarser than the teacher"):
        SlideFields(entry, FieldGeometry(), tissue_fn=_whole_slide)
    SlideFields(entry, FieldGeometry(), tissue_fn=_whole_slide, allow_upsample=True).close()


def test_a_slide_without_a_tissue_field_raises_no_tissue() -> None:
    with pytest.raises(NoTissueError, match="no 448-um field"):
        SlideFields(SlideEntry(path=CMU1), FieldGeometry(), tissue_fn=_no_tissue)


def test_extraction_writes_crops_that_the_folder_mode_reads_back(tmp_path: Path) -> None:
    cfg = DataConfig(slides=(SlideEntry(path=CMU1),), student_view=StudentView.RESIZE)
    manifest = extract_crops(cfg, tmp_path, 3, show_progress=False, tissue_fn=_whole_slide)
    assert len(manifest.read_text().splitlines()) == 3
    crops = CropFolder.load(tmp_path)
    assert len(crops) == 3
    p = crops.pairs[0]
    assert (
        p.hi.shape == (896, 896, 3) and p.lo.shape == (224, 224, 3) and p.student_view == "resize"
    )
    # A second call appends: the manifest continues.
    extract_crops(cfg, tmp_path, 2, show_progress=False, tissue_fn=_whole_slide)
    assert len(CropFolder.load(tmp_path)) == 5


def test_a_slide_smaller_than_one_field_is_refused() -> None:
    entry = SlideEntry(path=SLIDES / "OS-1-detail.ome.tif")  # 1101 px at 0.227 um/px = 250 um
    with pytest.raises(SlideError, match="smaller than one 448-um field"):
        SlideFields(entry, FieldGeometry(), tissue_fn=_whole_slide)


@pytest.mark.parametrize("slide", [CMU1, DAPI], ids=["svs-20x-level0", "ndpi-40x-level3"])
def test_the_5x_tiles_training_draws_for_a_field_are_the_tiles_the_engine_serves(
    slide: Path,
) -> None:
    """No train/serve skew: a field whose corner is a grid cell's has, as its 5x view, exactly
    the served tile of that cell (same level, origin rounding and resampling), and the student's
    normalisation of it equals the engine's preprocessing."""
    from training.augment import to_float
    from training.config import StudentConfig
    from training.normalise import Normalise

    student = StudentConfig()
    params = TilingParams(tile_px=student.img_size, target_mpp=student.mpp, tissue_threshold=0.0)
    with SlideTiles.open(slide, params) as served:
        grid = served.plan.grid
        fields = SlideFields(SlideEntry(path=slide), FieldGeometry(), tissue_fn=_whole_slide)
        try:
            # Cells whose field lies on the slide (SlideFields keeps fields inside it).
            w0, h0 = fields.reader.dimensions
            inside = np.flatnonzero(
                (grid.level0_xy[:, 0] + fields.level0_side <= w0)
                & (grid.level0_xy[:, 1] + fields.level0_side <= h0)
            )
            assert len(inside) >= 2
            batch = next(served.batches(inside, batch_size=len(inside)))
            for xy, tile in zip(batch.level0_xy, batch.pixels, strict=True):
                lo = fields.read((int(xy[0]), int(xy[1]))).lo
                np.testing.assert_array_equal(lo, tile)
        finally:
            fields.close()
    engine_input = Preprocessor.from_spec(student)(batch.pixels)
    training_input = Normalise(student.preprocessor())(to_float(batch.pixels)).numpy()
    np.testing.assert_allclose(training_input, engine_input, atol=1e-5)


def test_the_student_normalisation_follows_the_core_preprocessor_channel_order() -> None:
    from training.augment import to_float
    from training.normalise import Normalise, preprocess_tiles

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for order in ("RGB", "BGR"):
        pre = Preprocessor(mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4), channel_order=order)
        torch_side = Normalise(pre)(to_float(pixels)).numpy()
        np.testing.assert_allclose(torch_side, pre(pixels), atol=1e-5)
        np.testing.assert_array_equal(preprocess_tiles(pre, pixels).numpy(), pre(pixels))
