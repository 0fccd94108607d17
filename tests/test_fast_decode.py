"""Tiles decoded straight from JPEG tiles at 1/n scale stay within a stated tolerance of the
reference reads (``read_region`` and an area resize), on generated and real slides, and a wrong
crop would not.

Tolerance (grey levels, all three channels of a 224-px 5x tile, tiles holding tissue):

* per tile: mean absolute difference <= ``TILE_MEAN_TOL``, 99th percentile <= ``TILE_P99_TOL``;
* over the tiles of a slide: mean <= ``SLIDE_MEAN_TOL``, and at most a fifth of the mean
  difference of the reference and itself shifted by one 5x pixel (what a crop one pixel off
  gives: about 18 grey levels).

Measured when this was written: the generated 40x slide (level 1 at 1/2), mean 0.6 and worst
tile 1.1 / p99 8; CMU-1-Small-Region.svs (level 0 at 1/2, then 449 -> 224 px), mean 1.1 and worst
tile 2.0 / p99 13. A native 5x level (the generated 20x slide) keeps the reference path: decoding
it directly at full scale gives the same pixels but no speed (benchmarks/bench_decode.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from pydantic import TypeAdapter

from tests.synthetic import make_large_slide
from xmag.errors import RegionReadError
from xmag.level import REGION_DECODE, LevelChoice, choose_decode, choose_level, decode_reduce
from xmag.params import SlideOptions, TilingParams
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.readers._jpeg_level import DecodedTileCache
from xmag.readers.base import SlideReader
from xmag.store import ResultIdentity
from xmag.tiles import iter_tile_batches, read_tile, read_tile_at

TILE_MEAN_TOL = 2.5  # grey levels, mean |fast - reference| of one tile
TILE_P99_TOL = 16  # grey levels, 99th percentile of |fast - reference| of one tile
SLIDE_MEAN_TOL = 1.5  # grey levels, mean over a slide's tiles
SHIFT_RATIO = 5.0  # a one-pixel-off crop differs at least this much more than the fast path
TISSUE_STD = 20.0  # a tile whose reference has this grey-level spread holds tissue
CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fast") / "fast-40x.svs"
    make_large_slide(path, layout="40x", width=6144, height=4608, seed=3)
    return path


@pytest.fixture(scope="module")
def slide_20x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fast") / "fast-20x.svs"
    make_large_slide(path, layout="20x", width=4096, height=3072, seed=12)
    return path


def exact(level: LevelChoice) -> LevelChoice:
    return dataclasses.replace(level, decode=REGION_DECODE)


def compare(
    reader: SlideReader,
    level: LevelChoice,
    origins: list[tuple[int, int]],
    shift: int,
    tile_px: int = 224,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tissue tile: mean and p99 of |fast - reference|, and mean of |shifted - reference|
    where the shifted read starts ``shift`` level-0 pixels right and down."""
    means, p99s, shifted = [], [], []
    for x, y in origins:
        ref = read_tile_at(reader, exact(level), (x, y), tile_px).astype(np.int16)
        if ref.std() < TISSUE_STD:
            continue
        fast = read_tile_at(reader, level, (x, y), tile_px).astype(np.int16)
        shifted_xy = (x + shift, y + shift)
        off = read_tile_at(reader, exact(level), shifted_xy, tile_px).astype(np.int16)
        diff = np.abs(fast - ref)
        means.append(diff.mean())
        p99s.append(np.percentile(diff, 99))
        shifted.append(np.abs(off - ref).mean())
    return np.array(means), np.array(p99s), np.array(shifted)


def assert_within_tolerance(means: np.ndarray, p99s: np.ndarray, shifted: np.ndarray) -> None:
    assert means.size >= 5, "too few tissue tiles to judge"
    assert means.max() <= TILE_MEAN_TOL, f"worst tile mean {means.max():.2f}"
    assert p99s.max() <= TILE_P99_TOL, f"worst tile p99 {p99s.max():.1f}"
    assert means.mean() <= SLIDE_MEAN_TOL, f"slide mean {means.mean():.2f}"
    assert means.mean() * SHIFT_RATIO <= shifted.mean(), (
        f"the fast path ({means.mean():.2f}) is not much closer to the reference than a read "
        f"one pixel off ({shifted.mean():.2f})"
    )


def lattice(reader: SlideReader, side: int, step: int, margin: int) -> list[tuple[int, int]]:
    w, h = reader.dimensions
    return [
        (x, y) for y in range(0, h - side - margin, step) for x in range(0, w - side - margin, step)
    ]


# -- the tolerance, on generated and real slides ------------------------------------------------
def test_a_40x_slide_at_5x_decodes_level_1_at_half_scale_within_tolerance(slide_40x: Path) -> None:
    with open_slide(slide_40x) as reader:
        level = choose_decode(reader, choose_level(reader, 0.25, 2.0), 224, "auto")
        assert (level.level, level.decode) == (1, "jpeg-dct-1/2")
        # Steps of 896 level-0 px: origins on even and odd level-1 pixels (1/2 and 1/1 decodes).
        origins = lattice(reader, 1792, 900, 8)
        assert_within_tolerance(*compare(reader, level, origins, shift=8))


def test_a_real_svs_at_5x_decodes_level_0_at_half_scale_within_tolerance(
    slides_dir: Path,
) -> None:
    with open_slide(slides_dir / CMU) as reader:
        level = choose_decode(reader, choose_level(reader, 0.499, 2.0), 224, "auto")
        assert (level.level, level.decode, level.read_px(224)) == (0, "jpeg-dct-1/2", 898)
        origins = lattice(reader, 898, 450, 4)
        assert_within_tolerance(*compare(reader, level, origins, shift=4))


def test_a_real_ome_tiff_read_from_level_0_at_an_eighth_within_tolerance(
    slides_dir: Path,
) -> None:
    """A scan at 0.227 um/px converted to OME-TIFF (tiffslide), read as if 0.25 um/px so that
    a 5x tile of 112 px is 896 px of level 0: decoded at 1/8."""
    with open_slide(slides_dir / "OS-2-ndpi.ome.tif") as reader:
        level = choose_decode(reader, choose_level(reader, 0.25, 2.0), 112, "auto")
        assert (level.level, level.decode) == (0, "jpeg-dct-1/8")
        origins = lattice(reader, 896, 320, 8)
        assert_within_tolerance(*compare(reader, level, origins, shift=8, tile_px=112))


def test_levels_that_do_not_qualify_keep_the_region_path(slides_dir: Path) -> None:
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs") as reader:
        assert reader.decode_scales(0) == reader.decode_scales(1) == ()
        level = choose_decode(reader, choose_level(reader, 0.25, 2.0), 224, "auto")
        assert level.decode == REGION_DECODE
    with open_slide(slides_dir / CMU) as reader:  # JPEG tiles, a fractional downsample asked
        level = choose_decode(reader, LevelChoice(0, 1.5, 0.75, 2.0, 2.0), 224, "auto")
        assert level.decode == REGION_DECODE


def test_a_native_5x_level_decodes_its_jpeg_tiles_whole_to_read_regions_pixels(
    slide_20x: Path,
) -> None:
    """Read without resizing, the level's JPEG tiles are decoded at 1/1 (2.3-2.6x the tiles/s of
    read_region, bench_decode.py) and every tile is read_region's, pixel for pixel."""
    with open_slide(slide_20x) as reader:
        level = choose_decode(reader, choose_level(reader, 0.5, 2.0), 224, "auto")
        assert (level.level, level.resample_factor, level.decode) == (1, 1.0, "jpeg-dct-1/1")
        plan = plan_slide(reader, TilingParams())
        assert plan.level.decode == "jpeg-dct-1/1"
        kept = plan.grid.kept_indices()
        assert kept.size >= 8
        grid = plan.grid
        fast, ref = (
            np.concatenate([b.pixels for b in iter_tile_batches(reader, grid, lv, indices=kept)])
            for lv in (plan.level, exact(plan.level))
        )
        np.testing.assert_array_equal(fast, ref)
        for x, y in lattice(reader, 896, 700, 4)[:6]:  # origins off the grid too
            direct = reader.read_region_reduced((x, y), 1, (224, 224), 1)
            assert direct is not None
            np.testing.assert_array_equal(direct, reader.read_region((x, y), 1, (224, 224)))


def test_a_single_level_40x_read_uses_eighth_scale_within_tolerance(slide_40x: Path) -> None:
    """Level 0 read for 5x (as a single-level 40x slide is): 896 px decoded at 1/8 to 112 px."""
    with open_slide(slide_40x) as reader:
        level = choose_decode(reader, LevelChoice(0, 1.0, 0.25, 2.0, 8.0), 112, "auto")
        assert level.decode == "jpeg-dct-1/8"
        origins = lattice(reader, 896, 1200, 8)
        assert_within_tolerance(*compare(reader, level, origins, shift=8, tile_px=112))


# -- the same pixels whichever way they are asked for ------------------------------------------
def test_batches_equal_read_tile_on_the_fast_path_whatever_the_threads(slide_40x: Path) -> None:
    with open_slide(slide_40x) as reader:
        plan = plan_slide(reader, TilingParams(tile_px=112))
        assert decode_reduce(plan.level) == 2
        grid = plan.grid
        indices = np.arange(grid.n_total)
        one = np.concatenate(
            [b.pixels for b in iter_tile_batches(reader, grid, plan.level, indices=indices)]
        )
        many = np.concatenate(
            [
                b.pixels
                for b in iter_tile_batches(
                    reader, grid, plan.level, indices=indices[::-1], batch_size=5, workers=3
                )
            ]
        )
        np.testing.assert_array_equal(one, many[::-1])
        for k in (0, grid.n_total // 2, grid.n_total - 1):
            np.testing.assert_array_equal(one[k], read_tile(reader, grid, plan.level, k))


def test_exact_decode_keeps_the_reference_path_and_changes_the_result_identity(
    slide_40x: Path,
) -> None:
    with open_slide(slide_40x) as reader:
        auto = plan_slide(reader, TilingParams(tile_px=112))
        strict = plan_slide(reader, TilingParams(tile_px=112, decode="exact"))
        assert (auto.level.decode, strict.level.decode) == ("jpeg-dct-1/2", REGION_DECODE)
        recorded = TypeAdapter(LevelChoice).dump_python(auto.level, mode="json")  # result.json
        assert recorded["decode"] == "jpeg-dct-1/2"
        index = int(strict.grid.kept_indices()[0])
        x, y = strict.grid.level0_xy[index] // 4
        region = reader.read_region((int(x) * 4, int(y) * 4), 1, (224, 224))
        expected = cv2.resize(region, (112, 112), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(read_tile(reader, strict.grid, strict.level, index), expected)
    assert SlideOptions(decode="exact").decode == "exact"
    keys = {
        ResultIdentity(
            slide_sha256="0" * 64,
            model={"m.onnx": "1" * 64},
            variant=None,
            params=TilingParams(decode=mode),
            code_version="test",
        ).key()
        for mode in ("auto", "exact")
    }
    assert len(keys) == 2


def test_readers_without_plain_jpeg_tiles_keep_the_region_path(slides_dir: Path) -> None:
    with open_slide(slides_dir / "test3-DAPI-2-387.ndpi") as reader:  # one JPEG, restarts
        assert reader.decode_scales(0) == ()
        level = choose_decode(reader, choose_level(reader, 0.5, 2.0), 224, "auto")
        assert level.decode == REGION_DECODE


def test_the_reader_refuses_regions_it_cannot_give_as_laid_out(slide_40x: Path) -> None:
    with open_slide(slide_40x) as reader:
        w1, h1 = reader.levels[1].width, reader.levels[1].height
        assert reader.read_region_reduced((0, 0), 1, (448, 448), 2) is not None
        assert reader.read_region_reduced((4, 0), 1, (448, 448), 2) is None  # odd level-1 x
        assert reader.read_region_reduced((0, 0), 1, (446, 448), 4) is None  # size not / 4
        assert reader.read_region_reduced((2, 0), 1, (448, 448), 1) is None  # between pixels
        past_edge = ((w1 - 200) * 4, 0)
        assert reader.read_region_reduced(past_edge, 1, (448, 448), 2) is None
        assert reader.read_region_reduced((0, (h1 - 448) * 4), 1, (448, 448), 2) is not None
        # A tile past the edge comes back through the reference path, white outside.
        level = choose_decode(reader, choose_level(reader, 0.25, 2.0), 224, "auto")
        tile = read_tile_at(reader, level, ((w1 - 200) * 4, 0), 224)
        np.testing.assert_array_equal(tile, read_tile_at(reader, exact(level), past_edge, 224))


def test_the_decoded_tile_cache_stays_within_its_bytes() -> None:
    cache = DecodedTileCache(max_bytes=3 * 100)
    for i in range(10):
        cache.put((i, 1), np.full(100, i, np.uint8))
        assert cache.nbytes <= 300
    assert cache.get((0, 1)) is None and cache.get((9, 1)) is not None
    assert cache.get((7, 1)) is not None and cache.get((6, 1)) is None


def test_a_damaged_jpeg_tile_is_a_region_read_error_on_the_fast_path(
    slides_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "damaged.svs"
    shutil.copy(slides_dir / CMU, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        offset, count = int(page.dataoffsets[5]), int(page.databytecounts[5])
        tile_w = int(page.tilewidth)
    with path.open("r+b") as fh:  # tile 5 of level 0: no longer a JPEG stream
        fh.seek(offset)
        fh.write(b"\x00" * count)
    with open_slide(path) as reader:
        level = choose_decode(reader, choose_level(reader, 0.499, 2.0), 224, "auto")
        assert level.decode == "jpeg-dct-1/2"
        with pytest.raises(RegionReadError):
            read_tile_at(reader, level, (4 * tile_w, 0), 224)
