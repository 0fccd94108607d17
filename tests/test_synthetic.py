"""Generated large slides: real Aperio pyramids of real tissue with a known mask to find."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from tests.synthetic import BACKGROUND_RGB, SyntheticSlide, make_large_slide
from xmag.errors import XmagUsageError
from xmag.level import choose_level
from xmag.mpp import MppSource, resolve_mpp
from xmag.params import TilingParams
from xmag.readers import open_slide
from xmag.tiles import iter_tile_batches, read_tile

# Tile counts: the detector sees the slide through a thumbnail and its own colour thresholds, so
# tiles whose true tissue fraction lies near the keep threshold can go either way. Those are the
# tiles on the outline: with ~1,000 tiles of 64 px at 2.0 um/px and a few smooth blobs about one
# in five tiles touches the outline, and only those within a few percent of the threshold are in
# doubt. 10% of the expected count allows half of the outline tiles near the threshold to flip
# while still failing on a wrong level, a wrong mpp, a shifted grid or a detector that misses
# (or doubles) a blob.
KEPT_TOLERANCE = 0.10
# Pixels: a 5x tile read from the pyramid and resampled vs the same field read at level 0 and
# area-resized. Both are averages of the same tissue; JPEG error and the different resampling
# paths leave a few grey levels of difference (measured ~2-4); a shifted or mis-scaled tile differs
# by 15+ on this tissue. The 20x layout's native 5x level is rendered from the source tissue on its
# own (not downsampled from level 0), so it differs more from a level-0 read (measured up to 7.4).
REFERENCE_MAX_MEAN_ABS_DIFF = {"40x": 6.0, "20x": 10.0}
# ...and the aligned reference must always be much closer than one shifted by 1/8 of a tile.
SHIFTED_MIN_RATIO = 2.0


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    out = tmp_path_factory.mktemp("synthetic") / "large-40x.svs"
    return make_large_slide(out, layout="40x", width=12_000, height=9_008, seed=11)


@pytest.fixture(scope="module")
def slide_20x(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    out = tmp_path_factory.mktemp("synthetic") / "large-20x.svs"
    return make_large_slide(out, layout="20x", width=8_000, height=6_000, seed=12)


def read_rgb(slide: openslide.OpenSlide, xy: tuple[int, int], level: int, size: tuple[int, int]):
    return np.asarray(slide.read_region(xy, level, size))[..., :3]


# -- the file -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixture", "mpp", "power"), [("slide_40x", 0.25, "40"), ("slide_20x", 0.5, "20")]
)
def test_openslide_opens_a_generated_slide_as_aperio_with_its_levels_and_mpp(
    request: pytest.FixtureRequest, fixture: str, mpp: float, power: str
) -> None:
    synth: SyntheticSlide = request.getfixturevalue(fixture)
    assert openslide.OpenSlide.detect_format(str(synth.path)) == "aperio"
    with openslide.OpenSlide(str(synth.path)) as slide:
        assert slide.dimensions == synth.dimensions
        assert slide.level_dimensions == synth.level_dimensions
        assert slide.level_count == 3
        np.testing.assert_allclose(slide.level_downsamples, (1, 4, 16), rtol=1e-3)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == mpp
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == power


@pytest.mark.parametrize(
    ("fixture", "level_mpp", "factor"), [("slide_40x", 1.0, 2.0), ("slide_20x", 2.0, 1.0)]
)
def test_the_level_read_at_5x_is_level_1_of_either_layout(
    request: pytest.FixtureRequest, fixture: str, level_mpp: float, factor: float
) -> None:
    synth: SyntheticSlide = request.getfixturevalue(fixture)
    with open_slide(synth.path) as reader:
        mpp = resolve_mpp(reader)
        assert (mpp.source, mpp.mpp) == (MppSource.METADATA, synth.mpp)
        level = choose_level(reader, mpp.mpp, 2.0)
        assert level.level == 1
        assert level.level_mpp == pytest.approx(level_mpp)
        assert level.resample_factor == factor


def test_the_known_mask_is_where_the_slide_shows_stained_tissue(slide_40x: SyntheticSlide) -> None:
    with openslide.OpenSlide(str(slide_40x.path)) as slide:
        low = read_rgb(slide, (0, 0), 2, slide.level_dimensions[2])  # 16 px = one mask pixel
    hsv = cv2.cvtColor(low, cv2.COLOR_RGB2HSV)
    stained = (hsv[..., 1] > 25) & (low.min(axis=2) < 225)
    mask = slide_40x.mask[: low.shape[0], : low.shape[1]]
    assert 0.3 < mask.mean() < 0.5
    assert stained[mask].mean() > 0.95  # the mosaic is dense tissue
    assert stained[~mask].mean() < 0.05  # glass (and a thin pen stroke)
    # Glass reads back as the colour written: a YCbCr/RGB mix-up would tint it.
    inner = cv2.erode((~mask).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    glass = low[inner & ~stained]
    np.testing.assert_allclose(glass.mean(axis=0), BACKGROUND_RGB, atol=2.0)


def test_the_pen_stroke_lies_outside_the_known_mask(slide_40x: SyntheticSlide) -> None:
    assert slide_40x.pen_level0 is not None
    ds = slide_40x.mask_downsample
    for x, y in slide_40x.pen_level0:
        assert not slide_40x.mask[int(y // ds), int(x // ds)]
    with openslide.OpenSlide(str(slide_40x.path)) as slide:
        x, y = slide_40x.pen_level0[0]
        ink = read_rgb(slide, (x - 16, y - 16), 0, (32, 32)).reshape(-1, 3).mean(axis=0)
    assert ink[1] > ink[0] + 30  # green marker, not glass or tissue


def test_levels_show_the_same_tissue_at_their_own_scale(slide_40x: SyntheticSlide) -> None:
    ys, xs = np.nonzero(slide_40x.mask)
    ds = int(slide_40x.mask_downsample)
    x, y = int(np.median(xs)) * ds // 16 * 16, int(np.median(ys)) * ds // 16 * 16
    with openslide.OpenSlide(str(slide_40x.path)) as slide:
        level0 = read_rgb(slide, (x, y), 0, (2048, 2048))
        level1 = read_rgb(slide, (x, y), 1, (512, 512)).astype(np.float32)
        shifted = read_rgb(slide, (x + 4, y), 1, (512, 512)).astype(np.float32)
    down = cv2.resize(level0, (512, 512), interpolation=cv2.INTER_AREA).astype(np.float32)
    same = np.abs(down - level1).mean()
    assert same < 10.0  # JPEG and resampling paths differ at full resolution
    assert np.abs(down - shifted).mean() > same + 5  # one pixel off is visibly worse
    blur = lambda im: cv2.GaussianBlur(im, (0, 0), 2.0)  # noqa: E731
    assert np.abs(blur(down) - blur(level1)).mean() < 2.5


def test_expected_tissue_fraction_weighs_the_mask_by_area(slide_40x: SyntheticSlide) -> None:
    w, h = slide_40x.dimensions
    ds = slide_40x.mask_downsample
    assert slide_40x.expected_tissue_fraction((0, 0), (w, h)) == pytest.approx(
        slide_40x.tissue_fraction, rel=0.01
    )
    assert slide_40x.expected_tissue_fraction((w, h), (500, 500)) == 0.0
    row, col = np.argwhere(slide_40x.mask)[0]
    one = slide_40x.expected_tissue_fraction((col * ds, row * ds), (ds, ds))
    half = slide_40x.expected_tissue_fraction((col * ds - ds / 2, row * ds), (ds, ds))
    assert one == 1.0
    assert half == pytest.approx(0.5 + 0.5 * slide_40x.mask[row, col - 1])


def test_the_same_seed_gives_the_same_slide_and_another_seed_another(tmp_path: Path) -> None:
    a = make_large_slide(tmp_path / "a.svs", layout="20x", width=2048, height=1536, seed=5)
    b = make_large_slide(tmp_path / "b.svs", layout="20x", width=2048, height=1536, seed=5)
    c = make_large_slide(tmp_path / "c.svs", layout="20x", width=2048, height=1536, seed=6)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert (a.mask != c.mask).mean() > 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "10x", "width": 4096, "height": 4096},
        {"layout": "40x", "width": 100, "height": 4096},
        {"layout": "40x", "width": 4096, "height": 4096, "tissue_fraction": 0.99},
    ],
)
def test_bad_generator_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(XmagUsageError):
        make_large_slide(tmp_path / "x.svs", **kwargs)
    assert not (tmp_path / "x.svs").exists()


# -- the core on generated slides (needs the planning stage) ---------------------------------------
@pytest.fixture(scope="module")
def plan_slide():
    plan = pytest.importorskip("xmag.plan", reason="xmag.plan (plan_slide) has not landed yet")
    return plan.plan_slide


@pytest.mark.parametrize("fixture", ["slide_40x", "slide_20x"])
def test_kept_tiles_match_the_known_mask_within_tolerance(
    request: pytest.FixtureRequest, fixture: str, plan_slide
) -> None:
    synth: SyntheticSlide = request.getfixturevalue(fixture)
    params = TilingParams(tile_px=64, target_mpp=2.0)
    with open_slide(synth.path) as reader:
        plan = plan_slide(reader, params)
    grid = plan.grid
    side = grid.level0_tile
    expected = np.array(
        [
            synth.expected_tissue_fraction((float(x), float(y)), (side, side))
            for x, y in grid.level0_xy
        ]
    )
    expected_keep = expected >= params.tissue_threshold
    assert grid.n_total > 300  # 23 x 17 = 391 whole 64 px tiles on the 40x slide
    assert abs(grid.n_kept - expected_keep.sum()) <= KEPT_TOLERANCE * expected_keep.sum()
    # The same tiles, not just as many: disagreements are a minority of outline tiles.
    assert (grid.keep != expected_keep).sum() <= KEPT_TOLERANCE * expected_keep.sum()
    assert not plan.qc.zero_tissue


@pytest.mark.parametrize("fixture", ["slide_40x", "slide_20x"])
def test_tile_pixels_match_a_direct_level_0_read_and_equal_read_tile(
    request: pytest.FixtureRequest, fixture: str, plan_slide
) -> None:
    synth: SyntheticSlide = request.getfixturevalue(fixture)
    with open_slide(synth.path) as reader:
        plan = plan_slide(reader, TilingParams())
        grid, level = plan.grid, plan.level
        assert level.level == 1
        chosen = grid.kept_indices()[:: max(1, grid.n_kept // 6)]
        batches = list(iter_tile_batches(reader, grid, level, indices=chosen, batch_size=4))
        pixels = np.concatenate([b.pixels for b in batches])
        side = round(grid.level0_tile)
        for k, index in enumerate(chosen):
            np.testing.assert_array_equal(pixels[k], read_tile(reader, grid, level, int(index)))
            x, y = (int(v) for v in grid.level0_xy[index])
            direct = reader.read_region((x, y), 0, (side, side))
            ref = cv2.resize(direct, (grid.tile_px, grid.tile_px), interpolation=cv2.INTER_AREA)
            diff = np.abs(ref.astype(np.float32) - pixels[k]).mean()
            assert diff < REFERENCE_MAX_MEAN_ABS_DIFF[synth.layout], (index, diff)
            shifted = reader.read_region((x + side // 8, y), 0, (side, side))
            ref_shifted = cv2.resize(
                shifted, (grid.tile_px, grid.tile_px), interpolation=cv2.INTER_AREA
            )
            diff_shifted = np.abs(ref_shifted.astype(np.float32) - pixels[k]).mean()
            assert diff_shifted > SHIFTED_MIN_RATIO * diff, (index, diff, diff_shifted)
