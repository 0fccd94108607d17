"""Slide readers on the real slides: routing, typed errors, pixels, thread safety, thumbnails."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
import wsidicom
from PIL import Image

import xmag.readers as readers
from xmag.errors import (
    CorruptSlideError,
    RegionReadError,
    SlideNotFoundError,
    UnsupportedFormatError,
    XmagError,
    XmagUsageError,
)
from xmag.readers import base as readers_base
from xmag.readers import open_slide, registered_readers, supported_formats_sentence
from xmag.readers.base import SlideReader, mpp_from_tiff_resolution, register_reader
from xmag.readers.dicom_reader import DicomReader
from xmag.readers.openslide_reader import OpenSlideReader, translate_open_error
from xmag.readers.tiff_reader import TiffReader

SLIDES = Path(__file__).parent / "data" / "slides"
SVS = SLIDES / "CMU-1-Small-Region.svs"
DICOM_DIR = SLIDES / "BPAEC-dicom"

# Every entry of tests/data/slides: (reader, vendor, format, level count) or the error code.
EXPECTED: dict[str, tuple[str, str | None, str, int] | str] = {
    "CMU-1-Small-Region.svs": ("openslide", "aperio", "svs", 1),
    "tcga-cr-7395-01a-01-ts1.svs": ("openslide", "aperio", "svs", 2),
    "test3-DAPI-2-387.ndpi": ("openslide", "hamamatsu", "ndpi", 7),
    "OS-1-detail.ome.tif": ("tiffslide", None, "ome-tiff", 1),
    "OS-2-ndpi.ome.tif": ("tiffslide", None, "ome-tiff", 1),
    "kidney-48-5.tif": ("tiffslide", None, "tiff", 1),
    "BPAEC-dicom": ("wsidicom", "dicom", "dicom", 8),
    "vsi-ets-test-jpg2k": ("fastslide", "olympus", "vsi", 1),
    "1_tileregion.czi": ("fastslide", "zeiss", "czi", 2),
    "PROVENANCE.md": "UNSUPPORTED_FORMAT",
}
OPENABLE = sorted(k for k, v in EXPECTED.items() if isinstance(v, tuple))


def test_the_expectation_table_covers_every_entry_of_the_slide_folder() -> None:
    assert sorted(p.name for p in SLIDES.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_slide_opens_with_its_reader_or_fails_with_its_code(name: str) -> None:
    expected = EXPECTED[name]
    if isinstance(expected, str):
        with pytest.raises(XmagError) as info:
            open_slide(SLIDES / name)
        assert info.value.code == expected
        assert str(SLIDES / name) in info.value.message
        return
    reader_name, vendor, fmt, n_levels = expected
    with open_slide(SLIDES / name) as reader:
        assert (reader.name, reader.vendor, reader.format) == (reader_name, vendor, fmt)
        assert len(reader.levels) == n_levels


@pytest.mark.parametrize("name", OPENABLE)
def test_levels_start_at_level_zero_and_shrink(name: str) -> None:
    with open_slide(SLIDES / name) as reader:
        levels = reader.levels
        assert levels[0].downsample == 1.0
        assert [lv.index for lv in levels] == list(range(len(levels)))
        for lv in levels:
            assert lv.downsample == pytest.approx(reader.dimensions[0] / lv.width, rel=0.02)
        assert all(a.downsample < b.downsample for a, b in itertools.pairwise(levels))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in reader.properties.items())


@pytest.mark.parametrize("name", OPENABLE)
def test_read_region_returns_rgb_uint8_and_white_outside_the_slide(name: str) -> None:
    with open_slide(SLIDES / name) as reader:
        w0, h0 = reader.dimensions
        # 256 x 192 px: the VSI's fluorescence background is exactly 0 over 64 x 48 px there.
        inside = reader.read_region((w0 // 3, h0 // 3), 0, (256, 192))
        assert inside.shape == (192, 256, 3) and inside.dtype == np.uint8
        assert inside.std() > 0  # real pixels, not a constant fill
        corner = reader.read_region((w0 - 20, h0 - 10), 0, (50, 30))
        assert corner.shape == (30, 50, 3)
        assert (corner[10:, :] == 255).all() and (corner[:, 20:] == 255).all()
        outside = reader.read_region((-100, -100), 0, (40, 40))
        assert (outside == 255).all()
        top = len(reader.levels) - 1
        lv = reader.levels[top]
        whole = reader.read_region((0, 0), top, (lv.width, lv.height))
        assert whole.shape == (lv.height, lv.width, 3)


@pytest.mark.parametrize("name", OPENABLE)
def test_concurrent_reads_equal_sequential_reads(name: str) -> None:
    with open_slide(SLIDES / name) as reader:
        w0, h0 = reader.dimensions
        xy = [(int(w0 * f), int(h0 * g)) for f in (0.1, 0.4, 0.7) for g in (0.2, 0.6)]
        sequential = [reader.read_region(p, 0, (96, 96)) for p in xy]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda p: reader.read_region(p, 0, (96, 96)), xy * 3))
        for i, arr in enumerate(concurrent):
            np.testing.assert_array_equal(arr, sequential[i % len(xy)])


def test_a_dcm_file_inside_a_dicom_folder_opens_the_folders_slide() -> None:
    with open_slide(DICOM_DIR) as folder, open_slide(DICOM_DIR / "7_0.dcm") as one:
        assert one.name == "wsidicom" and one.levels == folder.levels
        np.testing.assert_array_equal(
            one.read_region((500, 500), 0, (128, 128)),
            folder.read_region((500, 500), 0, (128, 128)),
        )


def test_openslide_refuses_the_bpaec_dicom_set_so_wsidicom_reads_it() -> None:
    with pytest.raises(UnsupportedFormatError, match="PlanarConfiguration"):
        OpenSlideReader(DICOM_DIR)


def test_dicom_fluorescence_channels_are_composed_by_their_colour_names() -> None:
    with open_slide(DICOM_DIR) as reader:
        rgb = reader.read_region((1000, 1000), 0, (200, 200))
    wsi = wsidicom.WsiDicom.open(DICOM_DIR)
    try:
        # Optical path identifiers 0, 1, 2 are described as Green, Blue, Red in this set.
        for channel, path in zip((0, 1, 2), ("2", "0", "1"), strict=True):
            plane = wsi.read_region((1000, 1000), 0, (200, 200), path=path, as_array=True)
            np.testing.assert_array_equal(rgb[..., channel], plane.reshape(200, 200))
    finally:
        wsi.close()


# -- errors -------------------------------------------------------------------------------------
def _assert_unsupported(path: Path) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        open_slide(path)
    assert info.value.code == "UNSUPPORTED_FORMAT"
    assert str(path) in info.value.message
    assert supported_formats_sentence() in info.value.message


def test_a_missing_path_fails_with_slide_not_found(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as info:
        open_slide(tmp_path / "nope.svs")
    assert info.value.code == "SLIDE_NOT_FOUND" and "nope.svs" in info.value.message


def test_an_empty_file_is_a_corrupt_slide(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(CorruptSlideError, match=r"is empty \(0 bytes\)"):
        open_slide(empty)


def test_text_png_and_jpeg_files_are_unsupported_and_a_damaged_czi_is_corrupt(
    tmp_path: Path,
) -> None:
    tile = np.asarray(Image.open(Path(__file__).parent / "data/patches/nct-crc-he/kather1.tif"))
    text = tmp_path / "notes.txt"
    text.write_text("not a slide\n")
    png, jpeg = tmp_path / "tile.png", tmp_path / "tile.jpg"
    Image.fromarray(tile).save(png)
    Image.fromarray(tile).save(jpeg)
    czi = tmp_path / "scan.czi"
    czi.write_bytes(b"ZISRAWFILE" + bytes(range(256)) * 8)
    for path in (text, png, jpeg):
        _assert_unsupported(path)
    # OpenSlide 4 detects CZI ("zeiss") but xmag does not take CZI from it: fastslide reads CZI,
    # and refuses this one (a CZI header over garbage) as damaged.
    assert openslide.OpenSlide.detect_format(str(czi)) == "zeiss"
    with pytest.raises(CorruptSlideError, match="Zeiss CZI") as info:
        open_slide(czi)
    assert info.value.code == "CORRUPT_SLIDE"
    with pytest.raises(UnsupportedFormatError, match="does not accept"):
        OpenSlideReader(czi)


def test_the_vsi_folder_and_its_vsi_file_open_with_fastslide() -> None:
    folder = SLIDES / "vsi-ets-test-jpg2k"
    for path in (folder, folder / "vsi-ets-test-jpg2k.vsi"):
        with open_slide(path) as reader:
            assert (reader.name, reader.format) == ("fastslide", "vsi")


def test_a_truncated_svs_fails_at_open_as_corrupt(tmp_path: Path) -> None:
    # Aperio writes its image directories after the tile data, so the first half of the file has
    # a TIFF header pointing past its end: no reader can list the levels.
    data = SVS.read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSlideError) as info:
        open_slide(truncated)
    assert info.value.code == "CORRUPT_SLIDE" and str(truncated) in info.value.message


def _corrupt_middle_tile(src: Path, dst: Path) -> tuple[int, int, int]:
    """Copy ``src`` and overwrite the middle of one JPEG tile's data; returns (x, y, tile_px)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        tiles_x = -(-page.imagewidth // page.tilewidth)
        tile_px = page.tilewidth
    index = len(offsets) // 2
    with dst.open("r+b") as fh:
        fh.seek(offsets[index] + counts[index] // 2)
        fh.write(b"\xff\xda" * 200)  # bogus start-of-scan markers inside the entropy data
    ty, tx = divmod(index, tiles_x)
    return tx * tile_px, ty * tile_px, tile_px


@pytest.mark.parametrize("reader_cls", [OpenSlideReader, TiffReader])
def test_a_corrupt_tile_raises_region_read_error_naming_file_level_and_region(
    tmp_path: Path, reader_cls: type[SlideReader]
) -> None:
    broken = tmp_path / "broken.svs"
    x, y, tile_px = _corrupt_middle_tile(SVS, broken)
    with reader_cls(broken) as reader:
        assert reader.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)  # far from the damage
        with pytest.raises(RegionReadError) as info:
            reader.read_region((x, y), 0, (tile_px, tile_px))
    err = info.value
    assert err.code == "REGION_READ_FAILED"
    assert str(broken) in err.message and "level 0" in err.message and f"({x}, {y})" in err.message
    assert err.fields["level"] == 0 and err.fields["level0_xy"] == [x, y]
    # The process survives and other slides still read.
    with open_slide(SVS) as good:
        assert good.read_region((x, y), 0, (tile_px, tile_px)).std() > 0


def test_a_truncated_dicom_instance_fails_with_a_typed_error(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_DIR, folder)
    level0 = folder / "5_0.dcm"
    data = level0.read_bytes()
    level0.write_bytes(data[: len(data) // 2])
    # wsidicom reads the header at open and the frames on demand: the read is what fails.
    with open_slide(folder) as reader, pytest.raises(RegionReadError, match="EOFError"):
        reader.read_region((0, 0), 0, (256, 256))


# -- error translation at the edge --------------------------------------------------------------
def test_openslide_open_errors_are_translated_to_refusals_or_corrupt_slides() -> None:
    path = Path("slide.svs")
    cases: list[tuple[openslide.OpenSlideError, str | None, type[XmagError]]] = [
        (openslide.OpenSlideUnsupportedFormatError("Unsupported or missing image file"), None,
         UnsupportedFormatError),
        (openslide.OpenSlideError("Unsupported TIFF compression: 50001"), "generic-tiff",
         UnsupportedFormatError),
        (openslide.OpenSlideError("Couldn't read PlanarConfiguration"), "dicom",
         UnsupportedFormatError),
        (openslide.OpenSlideError("Cannot read TIFF directory"), "aperio", CorruptSlideError),
    ]  # fmt: skip
    for exc, vendor, expected in cases:
        translated = translate_open_error(path, vendor, exc)
        assert type(translated) is expected and str(exc) in translated.message


def test_a_webp_tiled_tiff_openslide_refuses_falls_back_to_tiffslide(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "webp.tif"
    tifffile.imwrite(path, pixels, tile=(128, 128), photometric="rgb", compression="webp")
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with open_slide(path) as reader:
        assert reader.name == "tiffslide"


def test_a_folder_of_non_wsi_dicom_is_refused_by_wsidicom(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture, not WSI
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation, ds.PixelData = 7, 0, bytes(64)
    ds.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert DicomReader.detect(tmp_path)
    with pytest.raises(UnsupportedFormatError):
        DicomReader(tmp_path)
    _assert_unsupported(tmp_path)


# -- registry -----------------------------------------------------------------------------------
def test_the_registry_tries_openslide_then_tiffslide_then_wsidicom_then_fastslide() -> None:
    names = [r.name for r in registered_readers()]
    assert names == ["openslide", "tiffslide", "wsidicom", "fastslide"]


def test_registering_a_reader_name_twice_is_refused() -> None:
    class Duplicate(TiffReader):
        name = "tiffslide"

    with pytest.raises(XmagUsageError, match="already registered"):
        register_reader(priority=99)(Duplicate)
    assert registered_readers()[1] is TiffReader


def test_the_supported_formats_sentence_names_every_format_every_reader_declares() -> None:
    sentence = supported_formats_sentence()
    for reader_cls in registered_readers():
        assert reader_cls.formats, reader_cls.name
        for fmt in reader_cls.formats:
            assert fmt.describe() in sentence
            assert all(ext.startswith(".") and ext == ext.lower() for ext in fmt.extensions)
    # DICOM WSI is opened by two readers and listed once.
    assert sentence.count("DICOM WSI") == 1
    assert sentence.startswith("Supported formats: ") and sentence.endswith(".")


def test_a_reader_that_declares_no_formats_is_refused() -> None:
    class Formatless(TiffReader):
        name = "formatless"
        formats = ()

    with pytest.raises(XmagUsageError, match="declares no formats"):
        register_reader(priority=99)(Formatless)
    assert "formatless" not in {r.name for r in registered_readers()}


def test_a_new_reader_s_formats_join_the_sentence_without_editing_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Vsi(TiffReader):
        name = "vsi-test"
        formats = (readers.SlideFormat("Olympus VSI", (".vsi",)),)

    monkeypatch.setattr(readers_base, "_REGISTRY", dict(readers_base._REGISTRY))
    register_reader(priority=99)(Vsi)
    assert supported_formats_sentence().endswith(", and Olympus VSI (.vsi).")


def test_the_package_exports_exactly_its_public_names() -> None:
    public = {n for n in dir(readers) if not n.startswith("_")} - {
        "annotations", "os", "Path", "base", "dicom_reader", "openslide_reader", "tiff_reader",
        "fastslide_reader",
        "CorruptSlideError", "SlideNotFoundError", "UnsupportedFormatError",
    }  # fmt: skip
    assert set(readers.__all__) == public
    assert set(readers.__all__) == {
        "LevelInfo", "MetadataMpp", "SlideFormat", "SlideReader", "open_slide",
        "registered_readers", "supported_formats_sentence",
    }  # fmt: skip


def _openslide_rgb(path: Path, xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region(xy, 0, size).convert("RGB"))


def _tiffslide_rgb(path: Path, xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        return slide.read_region(xy, 0, size, as_array=True)


def _wsidicom_first_path(path: Path, xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    wsi = wsidicom.WsiDicom.open(path)
    try:
        # BPAEC's optical path "1" is the one named Blue, the reader's third channel.
        return wsi.read_region(xy, 0, size, path="1", as_array=True).reshape(size[1], size[0])
    finally:
        wsi.close()


def _fastslide_rgb(path: Path, xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    import fastslide

    with fastslide.FastSlide.from_file_path(str(path)) as slide:
        return np.array(slide.read_region(xy, 0, size).numpy())[..., :3]


# Per reader: (slide, the library's own read, which of our channels to compare). fastslide reads
# the SVS here (it opens it when preferred): its 8-bit RGB passes through as the library gives it.
LIBRARY_READS: dict[str, tuple[Path, Callable[..., np.ndarray], slice | int]] = {
    "openslide": (SVS, _openslide_rgb, slice(None)),
    "tiffslide": (SLIDES / "OS-2-ndpi.ome.tif", _tiffslide_rgb, slice(None)),
    "wsidicom": (DICOM_DIR, _wsidicom_first_path, 2),
    "fastslide": (SVS, _fastslide_rgb, slice(None)),
}


@pytest.mark.parametrize("reader_cls", registered_readers(), ids=lambda c: c.name)
def test_every_registered_reader_returns_the_librarys_pixels(reader_cls: type[SlideReader]) -> None:
    path, library_read, channels = LIBRARY_READS[reader_cls.name]
    xy, size = (700, 600), (300, 200)
    with reader_cls(path) as reader:
        ours = reader.read_region(xy, 0, size)
    np.testing.assert_array_equal(ours[..., channels], library_read(path, xy, size))


def test_tiffslide_and_openslide_agree_on_the_svs_pixels() -> None:
    with OpenSlideReader(SVS) as a, TiffReader(SVS) as b:
        pa = a.read_region((1000, 1200), 0, (480, 480)).astype(int)
        pb = b.read_region((1000, 1200), 0, (480, 480)).astype(int)
        assert (a.dimensions, a.metadata_mpp().mpp_x) == (b.dimensions, b.metadata_mpp().mpp_x)
    # Same JPEG tiles through two libjpeg builds: equal up to decoder rounding.
    assert np.abs(pa - pb).mean() < 1.0


def test_openslide_transparent_pixels_are_composited_onto_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    rgb = readers_base.rgba_to_rgb_on_white(rgba)
    assert rgb.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]]


# -- thumbnails ---------------------------------------------------------------------------------
def _single_level_tiff(path: Path, width: int, height: int) -> np.ndarray:
    """A one-level tiled TIFF (lossless) of smooth real-looking structure; returns its pixels."""
    tile = np.asarray(Image.open(Path(__file__).parent / "data/patches/nct-crc-he/kather2.tif"))
    pixels = np.tile(tile, (height // tile.shape[0] + 1, width // tile.shape[1] + 1, 1))
    pixels = np.ascontiguousarray(pixels[:height, :width, :3])
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    return pixels


def test_thumbnail_reads_a_single_level_slide_in_bounded_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flat.tif"
    pixels = _single_level_tiff(path, 3072, 2048)
    monkeypatch.setattr(readers_base, "THUMBNAIL_BLOCK_PX", 512 * 512)
    with open_slide(path) as reader:
        assert len(reader.levels) == 1
        reads: list[tuple[int, int]] = []
        inner = reader._read_region

        def recording(xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
            reads.append(size)
            return inner(xy, level, size)

        monkeypatch.setattr(reader, "_read_region", recording)
        thumb, downsample = reader.thumbnail(384)
    assert thumb.shape == (256, 384, 3) and downsample == 8.0
    assert len(reads) == 24 and max(w * h for w, h in reads) <= 512 * 512
    # With an integer scale, block-wise area resizing equals resizing the whole level at once.
    whole = cv2.resize(pixels, (384, 256), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(thumb, whole)


def test_thumbnail_with_a_fractional_scale_matches_a_whole_read_closely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flat.tif"
    pixels = _single_level_tiff(path, 2500, 1700)
    monkeypatch.setattr(readers_base, "THUMBNAIL_BLOCK_PX", 400 * 400)
    with open_slide(path) as reader:
        thumb, downsample = reader.thumbnail(300)
    whole = cv2.resize(pixels, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
    assert thumb.shape[1] == 300 and downsample == pytest.approx(2500 / 300)
    assert np.abs(thumb.astype(int) - whole.astype(int)).mean() < 2.0


def test_thumbnail_of_a_pyramid_reads_the_closest_level_above_the_target() -> None:
    with open_slide(SLIDES / "test3-DAPI-2-387.ndpi") as reader:
        thumb, downsample = reader.thumbnail(500)
    assert max(thumb.shape[:2]) == 500 and downsample == pytest.approx(4864 / 500, rel=0.01)


def test_a_closed_reader_refuses_reads() -> None:
    reader = open_slide(SVS)
    reader.close()
    with pytest.raises(XmagUsageError, match="closed"):
        reader.read_region((0, 0), 0, (8, 8))


# -- TIFF resolution tags -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("xres", "yres", "unit", "expected"),
    [
        (20000.0, 20000.0, "centimeter", (0.5, 0.5)),
        (50800.0, 101600.0, "INCH", (0.5, 0.25)),
        (72.0, 72.0, "inch", None),  # a writer's placeholder, not a microscope
        (1.0, 1.0, "none", None),
        (20000.0, 20000.0, None, None),
        (0.0, 20000.0, "centimeter", None),
    ],
)
def test_tiff_resolution_tags_give_mpp_only_with_a_real_unit(
    xres: float, yres: float, unit: str | None, expected: tuple[float, float] | None
) -> None:
    assert mpp_from_tiff_resolution(xres, yres, unit) == expected
