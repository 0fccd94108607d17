"""Tile reads: batches equal the reference read, in order, in parallel, bounded, typed failures."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import make_large_slide
from xmag.errors import RegionReadError, XmagUsageError
from xmag.grid import TileGrid
from xmag.level import LevelChoice, choose_level
from xmag.params import TilingParams
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.readers.base import LevelInfo, MetadataMpp, SlideReader
from xmag.tiles import SlideTiles, TileBatch, iter_tile_batches, read_tile, read_tile_at

NDPI = "test3-DAPI-2-387.ndpi"
CMU = "CMU-1-Small-Region.svs"


def hand_grid(
    dimensions: tuple[int, int],
    level0_mpp: float,
    *,
    tile_px: int,
    target_mpp: float,
    keep_every: int = 1,
) -> TileGrid:
    """A grid built by hand (no tissue detection): tiles cover the slide, every k-th one kept."""
    level0_tile = target_mpp * tile_px / level0_mpp
    cols = math.ceil(dimensions[0] / level0_tile)
    rows = math.ceil(dimensions[1] / level0_tile)
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
    cell_xy = np.stack([cc.ravel(), rr.ravel()], axis=1).astype(np.int32)
    level0_xy = np.round(cell_xy * level0_tile).astype(np.int64)
    keep = np.arange(len(cell_xy)) % keep_every == 0
    return TileGrid(
        tile_px=tile_px,
        stride_px=tile_px,
        target_mpp=target_mpp,
        level0_tile=level0_tile,
        level0_stride=level0_tile,
        cols=cols,
        rows=rows,
        cell_xy=cell_xy,
        level0_xy=level0_xy,
        tissue_fraction=keep.astype(np.float32),
        keep=keep,
        tissue_threshold=0.5,
    )


class Wrapped(SlideReader):
    """A real reader behind hooks: counts reads, delays them, or fails chosen ones."""

    name = "test-wrapped"

    def __init__(self, inner: SlideReader, *, delay_s: float = 0.0) -> None:
        super().__init__(inner.path)
        self.inner = inner
        self.delay_s = delay_s
        self.calls: list[tuple[tuple[int, int], int, tuple[int, int]]] = []
        self.fail_at: tuple[int, int] | None = None  # level-0 point whose read fails
        self.fail_with: type[Exception] = RegionReadError
        self.bad_shape = False
        self.active = 0
        self._count_lock = threading.Lock()

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    @property
    def vendor(self) -> str | None:
        return self.inner.vendor

    @property
    def format(self) -> str:
        return self.inner.format

    @property
    def levels(self) -> tuple[LevelInfo, ...]:
        return self.inner.levels

    @property
    def properties(self) -> Mapping[str, str]:
        return self.inner.properties

    def metadata_mpp(self) -> MetadataMpp | None:
        return self.inner.metadata_mpp()

    def objective_power(self) -> float | None:
        return self.inner.objective_power()

    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        with self._count_lock:
            self.calls.append((level0_xy, level, size))
            self.active += 1
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_at is not None and self._covers(level0_xy, level, size, self.fail_at):
                if self.fail_with is RegionReadError:
                    raise RegionReadError(f"{self.path}: broken tile", path=self.path)
                raise self.fail_with("decoder exploded")
            pixels = self.inner.read_region(level0_xy, level, size)
            return pixels[:-1] if self.bad_shape else pixels
        finally:
            with self._count_lock:
                self.active -= 1

    def _covers(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], point: tuple[int, int]
    ) -> bool:
        ds = self.levels[level].downsample
        return all(level0_xy[i] <= point[i] < level0_xy[i] + size[i] * ds for i in range(2))


def all_tiles(batches: list[TileBatch]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([b.indices for b in batches]),
        np.concatenate([b.pixels for b in batches]),
    )


def assert_batches_equal_reference(
    reader: SlideReader, grid: TileGrid, level: LevelChoice, **kwargs: int
) -> int:
    batches = list(iter_tile_batches(reader, grid, level, **kwargs))
    indices, pixels = all_tiles(batches)
    np.testing.assert_array_equal(indices, grid.kept_indices())
    for k, index in enumerate(indices):
        np.testing.assert_array_equal(pixels[k], read_tile(reader, grid, level, int(index)))
    return len(indices)


def no_tile_threads() -> bool:
    return not any(t.name.startswith("xmag-tiles") for t in threading.enumerate())


# -- pixel equality with the reference -----------------------------------------------------------
def test_batches_equal_read_tile_on_ndpi_level_3_with_factor_1_096(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as reader:
        mpp = reader.metadata_mpp()
        assert mpp is not None
        level = choose_level(reader, mpp.mpp_x, 2.0)
        assert level.level == 3
        assert level.resample_factor == pytest.approx(1.096, abs=0.002)
        grid = hand_grid(reader.dimensions, mpp.mpp_x, tile_px=64, target_mpp=2.0, keep_every=3)
        n = assert_batches_equal_reference(reader, grid, level, batch_size=5, workers=3)
        assert n == grid.n_kept > 20


def test_batches_equal_read_tile_on_cmu_level_0_with_factor_4_008(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as reader:
        mpp = reader.metadata_mpp()
        assert mpp is not None
        level = choose_level(reader, mpp.mpp_x, 2.0)
        assert (level.level, round(level.resample_factor, 3)) == (0, 4.008)
        grid = hand_grid(reader.dimensions, mpp.mpp_x, tile_px=112, target_mpp=2.0)
        assert assert_batches_equal_reference(reader, grid, level, batch_size=4) == grid.n_total


def test_upsampled_tiles_equal_read_tile_when_the_slide_is_coarser_than_the_target(
    slides_dir: Path,
) -> None:
    with open_slide(slides_dir / CMU) as reader:
        level = choose_level(reader, 0.499, 0.25)
        assert level.resample_factor < 1
        grid = hand_grid((600, 400), 0.499, tile_px=64, target_mpp=0.25)
        assert read_tile(reader, grid, level, 0).shape == (64, 64, 3)
        assert_batches_equal_reference(reader, grid, level, batch_size=3)


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiles") / "small-40x.svs"
    make_large_slide(path, layout="40x", width=8192, height=6144, seed=3)
    return path


def test_batches_equal_read_tile_on_a_generated_40x_slide_at_level_1(slide_40x: Path) -> None:
    with open_slide(slide_40x) as reader:
        level = choose_level(reader, 0.25, 2.0)
        assert (level.level, level.resample_factor) == (1, 2.0)
        grid = hand_grid(reader.dimensions, 0.25, tile_px=112, target_mpp=2.0, keep_every=2)
        assert_batches_equal_reference(reader, grid, level, batch_size=7, workers=2)


# -- coalescing -----------------------------------------------------------------------------------
def test_neighbouring_tiles_of_a_row_are_read_with_one_region_when_the_downsample_is_whole(
    slide_40x: Path,
) -> None:
    with open_slide(slide_40x) as inner:
        reader = Wrapped(inner)
        level = choose_level(reader, 0.25, 2.0)
        grid = hand_grid(reader.dimensions, 0.25, tile_px=112, target_mpp=2.0)
        batches = list(iter_tile_batches(reader, grid, level, batch_size=grid.cols))
        assert sum(len(b) for b in batches) == grid.n_total
        assert len(reader.calls) == grid.rows  # one region per grid row
        widths = {size[0] for _, _, size in reader.calls}
        assert widths == {grid.cols * level.read_px(112)}


def test_tiles_are_read_one_by_one_when_the_downsample_is_fractional(slides_dir: Path) -> None:
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs") as inner:
        reader = Wrapped(inner)
        ds = reader.levels[1].downsample
        assert ds != round(ds)
        level = LevelChoice(1, ds, 1.0 * ds, 2.0 * ds, 2.0)
        grid = hand_grid(reader.dimensions, 1.0, tile_px=32, target_mpp=2.0 * ds)
        n = assert_batches_equal_reference(reader, grid, level, batch_size=8)
        assert len(reader.calls) == 2 * n  # the batches' reads plus read_tile's


# -- order, completeness, arguments ---------------------------------------------------------------
def test_given_indices_come_back_once_each_in_the_given_order(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as reader:
        level = choose_level(reader, 0.499, 2.0)
        grid = hand_grid(reader.dimensions, 0.499, tile_px=64, target_mpp=2.0)
        order = np.random.default_rng(0).permutation(grid.n_total)[:40]
        batches = list(iter_tile_batches(reader, grid, level, indices=order, batch_size=6))
        assert [len(b) for b in batches] == [6] * 6 + [4]
        indices, pixels = all_tiles(batches)
        np.testing.assert_array_equal(indices, order)
        np.testing.assert_array_equal(
            np.concatenate([b.level0_xy for b in batches]), grid.level0_xy[order]
        )
        for k in (0, 17, 39):
            np.testing.assert_array_equal(pixels[k], read_tile(reader, grid, level, int(order[k])))


def test_no_kept_tile_yields_no_batch(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as reader:
        level = choose_level(reader, 0.499, 2.0)
        grid = hand_grid(reader.dimensions, 0.499, tile_px=64, target_mpp=2.0)
        empty = np.array([], dtype=np.int64)
        assert list(iter_tile_batches(reader, grid, level, indices=empty)) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"workers": 0}, {"max_pending": 0}, {"indices": np.array([10_000])}],
)
def test_bad_arguments_are_refused_as_usage_errors(slides_dir: Path, kwargs: dict) -> None:
    from xmag.errors import XmagUsageError

    with open_slide(slides_dir / CMU) as reader:
        level = choose_level(reader, 0.499, 2.0)
        grid = hand_grid(reader.dimensions, 0.499, tile_px=64, target_mpp=2.0)
        with pytest.raises(XmagUsageError):
            next(iter_tile_batches(reader, grid, level, **kwargs))


# -- lifecycle, failures, memory ------------------------------------------------------------------
def test_closing_the_generator_early_stops_every_worker(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as inner:
        reader = Wrapped(inner, delay_s=0.01)
        level = choose_level(reader, 0.228, 2.0)
        grid = hand_grid(reader.dimensions, 0.228, tile_px=32, target_mpp=2.0, keep_every=2)
        gen = iter_tile_batches(reader, grid, level, batch_size=4, workers=4, max_pending=3)
        first = next(gen)
        assert len(first) == 4
        assert not no_tile_threads()
        gen.close()
        assert no_tile_threads()
        assert reader.active == 0
        assert len(reader.calls) < grid.n_kept  # the rest was never read


def test_a_consumer_that_breaks_out_leaves_no_thread_behind(slides_dir: Path) -> None:
    with open_slide(slides_dir / NDPI) as inner:
        reader = Wrapped(inner, delay_s=0.01)
        level = choose_level(reader, 0.228, 2.0)
        grid = hand_grid(reader.dimensions, 0.228, tile_px=32, target_mpp=2.0, keep_every=2)
        for batch in iter_tile_batches(reader, grid, level, batch_size=4, max_pending=2):
            assert len(batch) == 4
            break
        assert no_tile_threads()


@pytest.mark.parametrize("fail_with", [RegionReadError, OSError])
def test_a_failing_read_raises_region_read_error_and_stops_the_workers(
    slides_dir: Path, fail_with: type[Exception]
) -> None:
    with open_slide(slides_dir / NDPI) as inner:
        reader = Wrapped(inner)
        level = choose_level(reader, 0.228, 2.0)
        grid = hand_grid(reader.dimensions, 0.228, tile_px=64, target_mpp=2.0, keep_every=3)
        bad = int(grid.kept_indices()[11])
        x, y = grid.level0_xy[bad]
        reader.fail_at = (int(x) + 20, int(y) + 20)
        reader.fail_with = fail_with
        got: list[TileBatch] = []
        with pytest.raises(RegionReadError) as info:
            for batch in iter_tile_batches(reader, grid, level, batch_size=4):
                got.append(batch)
        assert sum(len(b) for b in got) <= 8  # nothing after the broken tile's batch
        if fail_with is OSError:
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.fields["level"] == 3
        assert no_tile_threads()
        with pytest.raises(RegionReadError):
            read_tile(reader, grid, level, bad)


def test_a_reader_returning_the_wrong_shape_is_a_region_read_error(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as inner:
        reader = Wrapped(inner)
        reader.bad_shape = True
        level = choose_level(reader, 0.499, 2.0)
        grid = hand_grid(reader.dimensions, 0.499, tile_px=64, target_mpp=2.0)
        with pytest.raises(RegionReadError):
            list(iter_tile_batches(reader, grid, level))


def test_reads_never_run_more_than_max_pending_batches_ahead_of_the_consumer(
    slides_dir: Path,
) -> None:
    with open_slide(slides_dir / NDPI) as inner:
        reader = Wrapped(inner)
        level = choose_level(reader, 0.228, 2.0)
        # Every other column kept: no two kept tiles touch, so each read is one tile.
        grid = hand_grid(reader.dimensions, 0.228, tile_px=32, target_mpp=2.0, keep_every=2)
        batch_size, max_pending = 3, 2
        yielded, worst_ahead = 0, 0
        for batch in iter_tile_batches(
            reader, grid, level, batch_size=batch_size, workers=4, max_pending=max_pending
        ):
            time.sleep(0.005)  # a slow consumer lets the readers run as far ahead as allowed
            worst_ahead = max(worst_ahead, len(reader.calls) - yielded)
            yielded += len(batch)
        assert yielded == grid.n_kept > 10 * batch_size
        assert worst_ahead <= max_pending * batch_size
        assert worst_ahead > batch_size  # reads do run ahead


# -- reads at any origin and the planned slide ----------------------------------------------------
def test_a_read_at_a_grid_tiles_origin_is_that_tile_and_a_shifted_origin_rounds_to_level_pixels(
    slides_dir: Path,
) -> None:
    with open_slide(slides_dir / NDPI) as reader:
        mpp = reader.metadata_mpp()
        assert mpp is not None
        level = choose_level(reader, mpp.mpp_x, 2.0)  # level 3, downsample 8
        grid = hand_grid(reader.dimensions, mpp.mpp_x, tile_px=64, target_mpp=2.0, keep_every=7)
        for index in grid.kept_indices()[:4]:
            xy = grid.level0_xy[index]
            tile = read_tile(reader, grid, level, int(index))
            np.testing.assert_array_equal(read_tile_at(reader, level, xy, 64), tile)
        # Level-0 origins 8*k-4 .. 8*k+3 all start at level pixel k (rounded half up).
        base = read_tile_at(reader, level, (800, 1600), 64)
        np.testing.assert_array_equal(read_tile_at(reader, level, (796, 1603), 64), base)
        assert not np.array_equal(read_tile_at(reader, level, (804, 1600), 64), base)
        with pytest.raises(XmagUsageError, match="tile_px"):
            read_tile_at(reader, level, (0, 0), 0)


def test_a_planned_slide_reads_the_kept_tiles_of_its_plan_like_the_engine(
    slides_dir: Path,
) -> None:
    params = TilingParams(tile_px=224, target_mpp=2.0)
    with SlideTiles.open(slides_dir / CMU, params) as slide:
        kept = slide.plan.grid.kept_indices()
        pixels = slide.pixels()
        assert pixels.shape == (len(kept), 224, 224, 3) and len(kept) > 0
        for k, index in enumerate(kept):
            want = read_tile(slide.reader, slide.plan.grid, slide.plan.level, int(index))
            np.testing.assert_array_equal(pixels[k], want)
        assert slide.pixels(np.array([], np.int64)).shape == (0, 224, 224, 3)
    with open_slide(slides_dir / CMU) as reader:
        plan = plan_slide(reader, params)
    np.testing.assert_array_equal(plan.grid.level0_xy, slide.plan.grid.level0_xy)
    with pytest.raises(XmagUsageError, match="closed"):
        slide.pixels()
