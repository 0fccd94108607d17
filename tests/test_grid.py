"""The tile grid: counts and coordinates by hand, overlap, tissue fractions, the keep threshold."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import pytest

from xmag.grid import build_grid
from xmag.params import TilingParams
from xmag.tissue import TissueMask


def mask_of(mask: np.ndarray, downsample: float) -> TissueMask:
    thumb = np.zeros((*mask.shape, 3), np.uint8)
    return TissueMask(mask=mask.astype(bool), downsample=downsample, method="test", thumbnail=thumb)


def full_mask(dimensions: tuple[int, int], downsample: float) -> TissueMask:
    w, h = dimensions
    return mask_of(np.ones((round(h / downsample), round(w / downsample)), bool), downsample)


def params(**kw: Any) -> TilingParams:
    return TilingParams(**{"tile_px": 64, "target_mpp": 2.0, **kw})


def brute_force_fractions(mask: np.ndarray, ds: int, xy: np.ndarray, side: int) -> np.ndarray:
    """Tissue fraction per tile by blowing the mask up to level 0 (integer ds, integer tiles)."""
    level0 = np.repeat(np.repeat(mask, ds, axis=0), ds, axis=1)
    return np.array([level0[y : y + side, x : x + side].mean() for x, y in xy])


def test_tiles_of_64_px_at_2_um_on_a_0_5_um_slide_are_256_level0_px_and_only_whole_ones_count() -> (
    None
):
    # 1000 x 700 px: 3 whole tiles of 256 across (768 <= 1000 < 1024), 2 down (512 <= 700 < 768).
    grid = build_grid((1000, 700), 0.5, full_mask((1000, 700), 4.0), params())
    assert (grid.cols, grid.rows, grid.n_total) == (3, 2, 6)
    assert grid.level0_tile == 256.0 and grid.level0_stride == 256.0
    assert grid.level0_xy.tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]
    assert grid.cell_xy.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]
    assert grid.level0_xy.dtype == np.int64 and grid.cell_xy.dtype == np.int32
    assert (grid.level0_xy + grid.level0_tile <= [1000, 700]).all()


def test_a_slide_that_is_exactly_whole_tiles_wide_keeps_its_last_column() -> None:
    grid = build_grid((1024, 512), 0.5, full_mask((1024, 512), 4.0), params())
    assert (grid.cols, grid.rows) == (4, 2)
    assert grid.level0_xy[:, 0].max() == 768


def test_a_slide_smaller_than_one_tile_gives_an_empty_grid_with_the_right_shapes() -> None:
    grid = build_grid((255, 4000), 0.5, full_mask((255, 4000), 1.0), params())
    assert (grid.cols, grid.n_total, grid.n_kept) == (0, 0, 0)
    assert grid.level0_xy.shape == (0, 2) and grid.cell_xy.shape == (0, 2)
    assert grid.tissue_fraction.shape == (0,) and grid.keep.shape == (0,)


def test_overlap_shortens_the_stride_and_adds_the_tiles_that_now_fit() -> None:
    # stride 64 - 16 = 48 px at 2 um = 192 level-0 px; (1000 - 256) / 192 = 3.9 -> 4 tiles across.
    grid = build_grid((1000, 700), 0.5, full_mask((1000, 700), 4.0), params(overlap_px=16))
    assert grid.stride_px == 48 and grid.level0_stride == 192.0
    assert (grid.cols, grid.rows) == (4, 3)
    assert grid.level0_xy[: grid.cols, 0].tolist() == [0, 192, 384, 576]
    assert sorted(set(grid.level0_xy[:, 1].tolist())) == [0, 192, 384]


def test_overlap_as_large_as_the_tile_is_refused_by_the_parameters() -> None:
    with pytest.raises(pydantic.ValidationError, match="overlap_px"):
        TilingParams(tile_px=64, overlap_px=64)
    with pytest.raises(pydantic.ValidationError, match="overlap_px"):
        TilingParams(tile_px=64, overlap_px=100)
    assert TilingParams(tile_px=64, overlap_px=63).stride_px == 1


def test_non_integer_tile_sizes_round_each_origin_not_the_stride() -> None:
    # 0.227 um/px: a 224 px tile at 2 um/px is 1973.57 level-0 px; origins drift by 0.57 px a tile.
    dims = (10_000, 2_000)
    grid = build_grid(dims, 0.227, full_mask(dims, 8.0), params(tile_px=224))
    assert grid.level0_tile == pytest.approx(224 * 2.0 / 0.227)
    assert grid.cols == 5 and grid.rows == 1  # 5 * 1973.57 = 9867.8 <= 10,000
    expected = np.rint(np.arange(5) * (224 * 2.0 / 0.227)).astype(np.int64)
    assert grid.level0_xy[:, 0].tolist() == expected.tolist()
    assert grid.level0_xy[:, 0].tolist() == [0, 1974, 3947, 5921, 7894]


def test_a_known_rectangle_of_tissue_keeps_exactly_the_cells_it_covers() -> None:
    # Tiles of 256 level-0 px = 64 mask px at downsample 4. Tissue covers cells (1..2, 1..2) fully.
    mask = np.zeros((256, 320), bool)  # 1280 x 1024 level-0 px: 5 x 4 cells
    mask[64:192, 64:192] = True
    grid = build_grid((1280, 1024), 0.5, mask_of(mask, 4.0), params(tissue_threshold=0.25))
    kept_cells = {tuple(c) for c in grid.cell_xy[grid.keep].tolist()}
    assert kept_cells == {(1, 1), (2, 1), (1, 2), (2, 2)}
    assert set(np.unique(grid.tissue_fraction).tolist()) == {0.0, 1.0}


def test_half_covered_tiles_sit_exactly_on_the_threshold_edge() -> None:
    mask = np.zeros((64, 128), bool)  # 2 x 1 cells of 64 mask px
    mask[:, 32:64] = True  # right half of cell 0
    mask[:, 64:80] = True  # left quarter of cell 1
    dims = (512, 256)
    fractions = build_grid(dims, 0.5, mask_of(mask, 4.0), params()).tissue_fraction
    assert fractions.tolist() == [0.5, 0.25]
    keep = {
        t: build_grid(dims, 0.5, mask_of(mask, 4.0), params(tissue_threshold=t)).keep.tolist()
        for t in (0.0, 0.25, 0.26, 0.5, 0.51, 1.0)
    }
    assert keep == {
        0.0: [True, True],
        0.25: [True, True],
        0.26: [True, False],
        0.5: [True, False],
        0.51: [False, False],
        1.0: [False, False],
    }


def test_fractions_weigh_mask_pixels_cut_by_tile_edges_by_their_area() -> None:
    # Downsample 3 and tiles of 256 level-0 px: tile edges fall at 85.33 mask px, inside a pixel.
    rng = np.random.default_rng(0)
    mask = rng.random((200, 300)) < 0.4
    dims = (900, 600)
    p = params(overlap_px=24)  # stride 40 px at target = 160 level-0 px
    grid = build_grid(dims, 0.5, mask_of(mask, 3.0), p)
    assert grid.n_total == 5 * 3
    expected = brute_force_fractions(mask, 3, grid.level0_xy, 256)
    np.testing.assert_allclose(grid.tissue_fraction, expected, atol=1e-5)


def test_a_grid_of_over_100k_tiles_is_built_from_a_2048_px_mask() -> None:
    # 80,000 x 60,000 px at 0.25 um/px, tiles of 64 px at 2 um/px = 512 level-0 px: 156 x 117.
    # With overlap 48 the stride is 128 level-0 px: 622 x 465 = 289,230 tiles.
    dims = (80_000, 60_000)
    ds = 80_000 / 2048
    yy, xx = np.mgrid[0:1536, 0:2048]
    mask = (xx - 1024) ** 2 + (yy - 768) ** 2 < 600**2
    grid = build_grid(dims, 0.25, mask_of(mask, ds), params(overlap_px=48))
    assert (grid.cols, grid.rows) == (622, 465)
    assert grid.n_total == 289_230 and grid.tissue_fraction.shape == (289_230,)
    # The kept area matches the disc's area (pi * 600^2 mask px) to within the outline's tiles.
    disc_level0 = np.pi * (600 * ds) ** 2
    kept_area = grid.n_kept * grid.level0_stride**2
    assert kept_area == pytest.approx(disc_level0, rel=0.02)


def test_kept_indices_are_row_major_and_match_the_keep_flags() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((100, 100)) < 0.5
    grid = build_grid((1600, 1600), 0.5, mask_of(mask, 16.0), params(tissue_threshold=0.5))
    idx = grid.kept_indices()
    assert (np.diff(idx) > 0).all() and grid.keep[idx].all() and len(idx) == grid.n_kept
    cols = grid.cols
    assert (grid.cell_xy[:, 0] + grid.cell_xy[:, 1] * cols == np.arange(grid.n_total)).all()
