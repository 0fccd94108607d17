"""Deep Zoom tiles over every reader (xmag.deepzoom), on the real slides.

The pyramid arithmetic must be openslide's ``DeepZoomGenerator``'s (same levels, tile grid and
tile coordinates, so a DZI viewer shows the same thing), and where OpenSlide reads the slide at full
resolution the pixels must be the same. Slides OpenSlide refuses (DICOM, strip TIFF) must still give
a complete pyramid through their own reader.
"""

from __future__ import annotations

import io
import math

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator as OpenSlideDeepZoom
from PIL import Image

from tests.conftest import SLIDES_DIR
from xmag.deepzoom import MAX_TILE_PX, DeepZoomGenerator
from xmag.errors import XmagUsageError
from xmag.readers import open_slide

#: Slides of every reader: OpenSlide (svs, ndpi), tiffslide (OME-TIFF, strip TIFF), wsidicom.
SLIDES = {
    "CMU-1-Small-Region.svs": "openslide",
    "tcga-cr-7395-01a-01-ts1.svs": "openslide",
    "test3-DAPI-2-387.ndpi": "openslide",
    "OS-2-ndpi.ome.tif": None,
    "kidney-48-5.tif": None,
    "BPAEC-dicom": "wsidicom",
}
OPENSLIDE_SLIDES = [
    "CMU-1-Small-Region.svs",
    "tcga-cr-7395-01a-01-ts1.svs",
    "test3-DAPI-2-387.ndpi",
]


@pytest.mark.parametrize("name", OPENSLIDE_SLIDES)
@pytest.mark.parametrize(("tile_px", "overlap_px"), [(254, 1), (256, 0), (510, 8)])
def test_levels_grid_and_tile_regions_match_openslide_deepzoom(
    name: str, tile_px: int, overlap_px: int
) -> None:
    path = SLIDES_DIR / name
    with open_slide(path) as reader, openslide.OpenSlide(str(path)) as slide:
        ours = DeepZoomGenerator(reader, tile_px=tile_px, overlap_px=overlap_px)
        theirs = OpenSlideDeepZoom(slide, tile_size=tile_px, overlap=overlap_px)
        assert ours.level_count == theirs.level_count
        assert ours.level_dimensions == theirs.level_dimensions
        assert ours.level_tiles == theirs.level_tiles
        assert ours.tile_count == theirs.tile_count
        for level in range(ours.level_count):
            cols, rows = ours.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                read = ours.tile_read(level, col, row)
                level0_xy, _, level0_size_at_level = theirs.get_tile_coordinates(level, (col, row))
                assert read.level0_xy == level0_xy
                assert read.tile_size == theirs.get_tile_dimensions(level, (col, row))
                del level0_size_at_level  # their read level differs (they use only slide levels)


@pytest.mark.parametrize("name", OPENSLIDE_SLIDES)
def test_full_resolution_tiles_equal_openslide_and_coarse_ones_look_the_same(name: str) -> None:
    path = SLIDES_DIR / name
    with open_slide(path) as reader, openslide.OpenSlide(str(path)) as slide:
        ours = DeepZoomGenerator(reader)
        theirs = OpenSlideDeepZoom(slide, tile_size=254, overlap=1)
        top = ours.level_count - 1
        for col, row in ((0, 0), (1, 1), (2, 1)):
            a = ours.get_tile_array(top, col, row)
            b = np.asarray(theirs.get_tile(top, (col, row)).convert("RGB"))
            assert np.array_equal(a, b), (col, row)
        for level in (top - 2, top - 4):
            a = ours.get_tile_array(level, 0, 0).astype(np.int16)
            b = np.asarray(theirs.get_tile(level, (0, 0)).convert("RGB")).astype(np.int16)
            assert a.shape == b.shape
            assert np.abs(a - b).mean() < 8, level  # other resampling filter, same picture


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_every_reader_gives_a_complete_pyramid_of_jpeg_tiles(name: str) -> None:
    with open_slide(SLIDES_DIR / name) as reader:
        if SLIDES[name] is not None:
            assert reader.name == SLIDES[name]
        dz = DeepZoomGenerator(reader)
        w, h = reader.dimensions
        assert dz.level_dimensions[-1] == (w, h) and dz.level_dimensions[0] == (1, 1)
        assert dz.level_count == math.ceil(math.log2(max(w, h))) + 1
        dzi = dz.get_dzi()
        assert f'<Size Width="{w}" Height="{h}"/>' in dzi and 'TileSize="254"' in dzi
        for level in (0, dz.level_count // 2, dz.level_count - 2, dz.level_count - 1):
            cols, rows = dz.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1)}:
                jpeg = dz.get_tile_jpeg(level, col, row)
                image = Image.open(io.BytesIO(jpeg))
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == dz.tile_read(level, col, row).tile_size


def test_a_tile_from_the_thumbnail_source_matches_one_read_from_the_slide() -> None:
    # CMU-1-Small-Region has one level of 2220 x 2967: its coarse Deep Zoom levels come from the
    # whole-slide thumbnail, the finer ones from level 0. Both must show the same place.
    with open_slide(SLIDES_DIR / "CMU-1-Small-Region.svs") as reader:
        dz = DeepZoomGenerator(reader)
        level = dz.level_count - 3  # downsample 4: from the thumbnail
        assert dz.tile_read(level, 1, 1).source == -1
        from_thumbnail = dz.get_tile_array(level, 1, 1).astype(np.int16)
        read = dz.tile_read(level, 1, 1)
        region = reader.read_region(read.level0_xy, 0, read.level0_size)
        direct = np.asarray(Image.fromarray(region).resize(read.tile_size, Image.BOX))
        assert np.abs(from_thumbnail - direct.astype(np.int16)).mean() < 8


def test_bad_addresses_and_sizes_are_refused() -> None:
    with open_slide(SLIDES_DIR / "OS-2-ndpi.ome.tif") as reader:
        dz = DeepZoomGenerator(reader)
        cols, rows = dz.level_tiles[-1]
        assert dz.has_tile(dz.level_count - 1, cols - 1, rows - 1)
        for level, col, row in ((-1, 0, 0), (dz.level_count, 0, 0), (0, 1, 0), (0, 0, -1)):
            assert not dz.has_tile(level, col, row)
            with pytest.raises(XmagUsageError, match="no Deep Zoom tile"):
                dz.get_tile_array(level, col, row)
        for tile_px, overlap_px in ((0, 0), (MAX_TILE_PX + 1, 1), (254, 128), (254, -1)):
            with pytest.raises(XmagUsageError):
                DeepZoomGenerator(reader, tile_px=tile_px, overlap_px=overlap_px)


def test_a_tile_that_would_read_too_many_source_pixels_comes_from_the_thumbnail() -> None:
    with open_slide(SLIDES_DIR / "OS-2-ndpi.ome.tif") as reader:  # one level of 2202 x 2202
        full = DeepZoomGenerator(reader)
        tight = DeepZoomGenerator(reader, max_source_px=100 * 100)
        level = full.level_count - 1  # full resolution: 256 x 256 source pixels per tile
        assert full.tile_read(level, 1, 1).source == 0
        read = tight.tile_read(level, 1, 1)
        assert read.source == -1  # from the 2048-px thumbnail (ds 1.075) instead
        assert read.source_size[0] < full.tile_read(level, 1, 1).source_size[0]
        a = tight.get_tile_array(level, 1, 1).astype(np.int16)
        b = full.get_tile_array(level, 1, 1).astype(np.int16)
        assert a.shape == b.shape and np.abs(a - b).mean() < 12  # coarser, same place
