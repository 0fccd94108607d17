"""Planning reads what it needs: the thumbnail is decoded from the smallest level that covers it,
at a reduced JPEG scale when the level is finer still, and tissue detection runs on a bounded
number of pixels, whatever the slide's size (the timings are in benchmarks/bench_plan.py)."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from tests.synthetic import SyntheticSlide, make_large_slide
from xmag import tissue as tissue_module
from xmag.readers import open_slide
from xmag.readers._jpeg_level import JpegLevel
from xmag.tissue import MAX_WORK_PX, tissue_mask_from_image


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """8,192 x 6,144 px at 40x: levels of 8,192, 2,048 and 512 px wide (JPEG tiles)."""
    out = tmp_path_factory.mktemp("bounds") / "slide.svs"
    return make_large_slide(out, layout="40x", width=8192, height=6144, seed=1, workers=1)


@pytest.mark.parametrize(("max_px", "reduce"), [(512, 1), (256, 2), (128, 4)])
def test_the_thumbnail_decodes_the_coarsest_covering_level_at_a_reduced_scale(
    slide: SyntheticSlide, monkeypatch: pytest.MonkeyPatch, max_px: int, reduce: int
) -> None:
    decoded: list[tuple[int, int]] = []
    inner = JpegLevel.decode_tile

    def recording(self: JpegLevel, index: int, r: int) -> np.ndarray | None:
        tile = inner(self, index, r)
        decoded.append((self.width, r))
        return tile

    monkeypatch.setattr(JpegLevel, "decode_tile", recording)
    fds = len(os.listdir("/proc/self/fd"))
    with open_slide(slide.path) as reader:
        region_reads: list[object] = []
        read = reader._read_region
        monkeypatch.setattr(reader, "_read_region", lambda *a: region_reads.append(a) or read(*a))
        thumb, downsample = reader.thumbnail(max_px)
        reads_fast = len(region_reads)
        monkeypatch.setattr(reader, "_jpeg_level", lambda level: None)  # the block-read path
        slow, _ = reader.thumbnail(max_px)
    assert len(os.listdir("/proc/self/fd")) <= fds  # the tiles' file handles closed with it
    assert max(thumb.shape[:2]) == max_px and downsample == pytest.approx(8192 / max_px)
    # Only level 2 (512 px wide, 2 x 2 tiles) was decoded: one tile whole when the level was
    # first opened (its colours checked against tifffile's decoder), then every tile at
    # 1/reduce; no region was read.
    assert {w for w, _ in decoded} == {512}
    assert decoded[0] == (512, 1) and {r for _, r in decoded[1:]} == {reduce}
    assert len(decoded) == 1 + 4
    assert reads_fast == 0 and len(region_reads) > 0  # the comparison path did read regions...
    # ... and the fast thumbnail matches it (DCT scaling vs area resize).
    diff = np.abs(thumb.astype(np.int16) - slow.astype(np.int16))
    assert diff.mean() < 3.0


def test_tissue_detection_runs_on_a_bounded_number_of_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, ...]] = []
    brightfield = tissue_module._DETECTORS["brightfield"]

    def recording(image: np.ndarray, um_per_px: float) -> np.ndarray:
        seen.append(image.shape)
        return brightfield(image, um_per_px)

    monkeypatch.setitem(tissue_module._DETECTORS, "brightfield", recording)
    image = np.full((3072, 4096, 3), 240, np.uint8)
    cv2.circle(image, (2048, 1536), 900, (180, 90, 160), -1)
    mask, _ = tissue_mask_from_image(image, um_per_px=8.0, method="brightfield")
    assert mask.shape == (3072, 4096)
    assert seen and seen[0][0] * seen[0][1] <= MAX_WORK_PX
    yy, xx = np.mgrid[:3072, :4096]
    disk = (yy - 1536) ** 2 + (xx - 2048) ** 2 <= 900**2
    assert (mask & disk).sum() / (mask | disk).sum() > 0.98
