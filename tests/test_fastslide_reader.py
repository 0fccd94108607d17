"""The fastslide reader: real Zeiss CZI and Olympus VSI files open with their metadata mpp, read as
display RGB, survive damage with typed errors, and fastslide can be preferred for other formats."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest

from xmag.errors import CorruptSlideError, SettingsError, UnsupportedFormatError
from xmag.readers import open_slide, registered_readers, supported_formats_sentence
from xmag.readers.fastslide_reader import FASTSLIDE_REQUIREMENT, FastslideReader
from xmag.settings import known_variables

SLIDES = Path(__file__).parent / "data" / "slides"
CZI = SLIDES / "1_tileregion.czi"
VSI_DIR = SLIDES / "vsi-ets-test-jpg2k"
VSI = VSI_DIR / "vsi-ets-test-jpg2k.vsi"
SVS = SLIDES / "CMU-1-Small-Region.svs"
# The VSI's pixel size: 6.5 um camera pixels behind a 60x objective, as its metadata says (slideio
# 2.10, which reads VSI like Bio-Formats, reports 1.08333e-07 m and magnification 60).
VSI_MPP = 6.5 / 60


def _czi_metadata_mpp(path: Path) -> tuple[float, float]:
    """Level-0 (x, y) um/px from the CZI's own XML metadata (Scaling/Items/Distance, metres)."""
    data = path.read_bytes()
    meta_pos = struct.unpack_from("<q", data, 32 + 60)[0]
    assert data[meta_pos : meta_pos + 16].startswith(b"ZISRAWMETADATA")
    xml_size = struct.unpack_from("<i", data, meta_pos + 32)[0]
    xml = data[meta_pos + 32 + 256 : meta_pos + 32 + 256 + xml_size]
    root = ET.fromstring(xml)
    values = {
        d.get("Id"): float(d.findtext("Value") or "nan")
        for d in root.iter("Distance")
        if d.get("Id") in ("X", "Y")
    }
    return values["X"] * 1e6, values["Y"] * 1e6


def _czi_subblock(path: Path, index: int) -> tuple[int, int, np.ndarray]:
    """The stage (x, y) and pixels of uncompressed Gray16 sub-block ``index``, decoded here."""
    data = path.read_bytes()
    dir_pos = struct.unpack_from("<q", data, 32 + 52)[0]
    off = dir_pos + 32 + 128
    for _ in range(index + 1):
        ndims = struct.unpack_from("<i", data, off + 28)[0]
        entry_off, off = off, off + 32 + 20 * ndims
    pixel_type, file_pos, _, compression = struct.unpack_from("<iqii", data, entry_off + 2)
    assert (pixel_type, compression) == (1, 0)  # Gray16, uncompressed
    dims = {}
    for k in range(ndims):
        name, start, size, _, stored = struct.unpack_from("<4siifi", data, entry_off + 32 + 20 * k)
        dims[name.rstrip(b"\0").decode()] = (start, size, stored)
    meta_size, _, data_size = struct.unpack_from("<iiq", data, file_pos + 32)
    header = max(256, 16 + 32 + 20 * ndims)
    start = file_pos + 32 + header + meta_size
    (x, w, sw), (y, h, sh) = dims["X"], dims["Y"]
    assert (w, h) == (sw, sh) and data_size == w * h * 2
    pixels = np.frombuffer(data[start : start + data_size], dtype="<u2").reshape(h, w)
    return x, y, pixels


def _window(reader: FastslideReader) -> list[tuple[float, float]]:
    """The (low, high) display window of each channel, as the reader records it."""
    text = reader.properties["xmag.display"]
    return [(float(a), float(b)) for a, b in re.findall(r"([\d.e+-]+)-([\d.e+-]+)", text)]


def test_fastslide_is_registered_last_and_names_its_formats() -> None:
    assert [r.name for r in registered_readers()][-1] == "fastslide"
    sentence = supported_formats_sentence()
    assert "Zeiss CZI (.czi)" in sentence and "Olympus VSI (.vsi" in sentence


def test_the_czi_opens_with_the_mpp_of_its_own_metadata() -> None:
    with open_slide(CZI) as reader:
        assert isinstance(reader, FastslideReader)
        assert (reader.name, reader.vendor, reader.format) == ("fastslide", "zeiss", "czi")
        assert reader.dimensions == (1480, 570)
        assert [(lv.width, lv.height, lv.downsample) for lv in reader.levels] == [
            (1480, 570, 1.0),
            (740, 285, 2.0),
        ]
        mpp = reader.metadata_mpp()
        assert mpp is not None and mpp.field.startswith("czi.Scaling")
        assert (mpp.mpp_x, mpp.mpp_y) == pytest.approx(_czi_metadata_mpp(CZI), rel=1e-9)
        assert mpp.mpp_x == pytest.approx(0.4, rel=1e-9)
        assert reader.objective_power() == 5.0
        assert reader.properties["fastslide.format"] == "CZI"


@pytest.mark.parametrize("path", [VSI, VSI_DIR], ids=["vsi-file", "vsi-folder"])
def test_the_vsi_opens_from_its_file_or_folder_at_its_metadata_mpp(path: Path) -> None:
    with open_slide(path) as reader:
        assert (reader.name, reader.vendor, reader.format) == ("fastslide", "olympus", "vsi")
        assert reader.dimensions == (1645, 1682)
        assert len(reader.levels) == 1
        mpp = reader.metadata_mpp()
        assert mpp is not None and mpp.field.startswith("vsi.")
        assert (mpp.mpp_x, mpp.mpp_y) == pytest.approx((VSI_MPP, VSI_MPP), rel=1e-6)
        # 11 focal planes; plane 0 is empty, the middle one is read.
        assert reader.properties["xmag.z-plane"] == "5 of 11"


@pytest.mark.parametrize("path", [CZI, VSI], ids=["czi", "vsi"])
def test_regions_are_rgb_uint8_and_white_outside_the_slide(path: Path) -> None:
    with open_slide(path) as reader:
        w, h = reader.dimensions
        for level in range(len(reader.levels)):
            region = reader.read_region((0, 0), level, (300, 200))
            assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        edge = reader.read_region((w - 100, h - 50), 0, (300, 200))
        assert edge.shape == (200, 300, 3)
        assert (edge[:, 100:] == 255).all() and (edge[50:, :] == 255).all()
        assert not (edge[:50, :100] == 255).all()  # real pixels there, not the white fill
        thumb, ds = reader.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and thumb.dtype == np.uint8 and ds > 1


def test_the_czi_shows_its_sub_blocks_last_on_top_through_one_window_for_the_whole_slide() -> None:
    # Sub-blocks 0 and 1 (the first two of the top row, 400 x 300 each, overlapping in x 360-400)
    # decoded here from the file's bytes: the reader shows 0, then 1 on top, as libCZI does.
    x0, y0, first = _czi_subblock(CZI, 0)
    x1, y1, second = _czi_subblock(CZI, 1)
    assert (x1 - x0, y1 - y0) == (360, 0)
    mosaic = np.zeros((300, 760), dtype=np.float64)
    mosaic[:, :400] = first
    mosaic[:, 360:760] = second
    with open_slide(CZI) as reader:
        (lo, hi), *_ = _window(reader)
        shown = reader.read_region((0, 0), 0, (720, 270))  # sub-blocks 2 and 6 start beyond
    expected = np.clip((mosaic[:270, :720] - lo) * 255 / (hi - lo), 0, 255)
    assert np.abs(shown[..., 0].astype(np.float64) - expected).max() <= 1.0
    assert (shown[..., 0] == shown[..., 1]).all()  # one Gray16 channel shown as grey


def test_the_czi_mosaic_corner_no_sub_block_covers_is_dark_not_white() -> None:
    # Sub-blocks cover the top row and the right three of the bottom row: x < 360, y >= 300 is
    # empty. fastslide fills it with 65535 at level 0; the file's own level 1 has 0 there.
    with open_slide(CZI) as reader:
        for level in (0, 1):
            ds = reader.levels[level].downsample
            empty = reader.read_region((0, 310), level, (int(340 / ds), int(250 / ds)))
            assert (empty == 0).all(), level
        covered = reader.read_region((400, 310), 0, (340, 250))
        assert covered.mean() > 10


def test_the_vsi_channels_are_shown_in_their_own_colours() -> None:
    # C405 is blue and C488 green in the file: red stays empty, both others carry signal.
    with open_slide(VSI) as reader:
        rgb = reader.read_region((0, 0), 0, reader.dimensions)
    assert rgb[..., 0].max() == 0
    assert rgb[..., 1].mean() > 5 and rgb[..., 2].mean() > 5


@pytest.mark.parametrize(("path", "n"), [(CZI, 24), (VSI, 4)], ids=["czi", "vsi"])
def test_concurrent_reads_of_one_reader_equal_serial_reads(path: Path, n: int) -> None:
    # fastslide alone draws the CZI's overlapping sub-blocks in an order that varies per read.
    rng = np.random.default_rng(0)
    with open_slide(path) as reader:
        w, h = reader.dimensions
        xs, ys = rng.integers(0, w - 224, n), rng.integers(0, h - 160, n)
        spots = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        serial = [reader.read_region(xy, 0, (224, 160)) for xy in spots]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda xy: reader.read_region(xy, 0, (224, 160)), spots * 3))
        # A region across the overlap of the first two sub-blocks (x 360-400) reads the same.
        first = reader.read_region((348, 3), 0, (224, 160)) if path == CZI else None
        again = [
            reader.read_region((348, 3), 0, (224, 160))
            for _ in range(20 if first is not None else 0)
        ]
    assert all(np.array_equal(a, first) for a in again)
    assert all(np.array_equal(p, serial[i % len(spots)]) for i, p in enumerate(parallel))


def test_a_truncated_czi_is_corrupt_not_a_slide_of_fill(tmp_path: Path) -> None:
    # fastslide alone opens the first 100 KB and returns 65535 everywhere; the reader refuses it.
    cut = tmp_path / "cut.czi"
    cut.write_bytes(CZI.read_bytes()[:100_000])
    with pytest.raises(CorruptSlideError, match=r"cut off|missing|outside the file") as info:
        open_slide(cut)
    assert info.value.code == "CORRUPT_SLIDE" and str(cut) in info.value.message


def test_a_vsi_without_its_ets_folder_names_the_missing_folder(tmp_path: Path) -> None:
    lone = tmp_path / VSI.name
    lone.write_bytes(VSI.read_bytes())
    with pytest.raises(CorruptSlideError) as info:
        open_slide(lone)
    assert info.value.code == "CORRUPT_SLIDE"
    assert "_vsi-ets-test-jpg2k_" in info.value.message


def test_damaged_czi_and_vsi_files_fail_typed_in_a_child_process_that_does_not_crash(
    tmp_path: Path,
) -> None:
    # fastslide is C++: damaged input is opened and read in a child, so a crash fails the test
    # instead of the test run.
    data = CZI.read_bytes()
    cases = {}
    for n in (64, 1_000, 100_000, 3_000_000):
        cases[f"czi-{n}"] = tmp_path / f"cut{n}.czi"
        cases[f"czi-{n}"].write_bytes(data[:n])
    cases["czi-garbage"] = tmp_path / "garbage.czi"
    cases["czi-garbage"].write_bytes(b"ZISRAWFILE" + bytes(range(256)) * 8)
    ets = next(VSI_DIR.glob("_*_/stack*/*.ets"))
    for n in (20_000, 90_000):
        folder = tmp_path / f"vsi{n}"
        stack = folder / ets.parent.relative_to(VSI_DIR)
        stack.mkdir(parents=True)
        (folder / VSI.name).write_bytes(VSI.read_bytes())
        (stack / ets.name).write_bytes(ets.read_bytes()[:n])
        cases[f"ets-{n}"] = folder / VSI.name
    script = textwrap.dedent(
        """
        import json, sys
        from xmag.errors import XmagError
        from xmag.readers import open_slide
        out = {}
        for name, path in json.loads(sys.argv[1]).items():
            try:
                with open_slide(path) as reader:
                    reader.read_region((0, 0), 0, reader.dimensions)
                out[name] = "opened"
            except XmagError as exc:
                out[name] = exc.code
        print(json.dumps(out))
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in cases.items()})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    codes = json.loads(child.stdout.strip().splitlines()[-1])
    assert codes == {name: "CORRUPT_SLIDE" for name in cases}


def test_fastslide_can_be_preferred_for_an_aperio_slide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XMAG_READER_PREFER", raising=False)
    with open_slide(SVS) as reader:
        assert reader.name == "openslide"  # the default for OpenSlide's formats
    with open_slide(SVS, prefer="fastslide") as reader:
        assert (reader.name, reader.format) == ("fastslide", "svs")
        mpp = reader.metadata_mpp()
        assert mpp is not None and mpp.mpp_x == pytest.approx(0.499)
        region = reader.read_region((500, 700), 0, (448, 448)).astype(np.int16)
    with openslide.OpenSlide(str(SVS)) as slide:
        ref = np.asarray(slide.read_region((500, 700), 0, (448, 448)).convert("RGB"))
    # This file decodes within IDCT rounding of OpenSlide; YCbCr-tagged 4:2:0 tiles do not (see
    # the module docstring), which is why fastslide is not the default.
    assert np.abs(region - ref.astype(np.int16)).max() <= 2
    monkeypatch.setenv("XMAG_READER_PREFER", "fastslide")
    with open_slide(SVS) as reader:
        assert reader.name == "fastslide"
    with open_slide(SLIDES / "OS-1-detail.ome.tif", prefer="") as reader:
        assert reader.name == "tiffslide"  # an empty preference is no preference


def test_a_preferred_reader_that_refuses_falls_back_and_an_unknown_one_is_an_error(
    tmp_path: Path,
) -> None:
    png = tmp_path / "notes.txt"
    png.write_text("not a slide\n")
    with pytest.raises(UnsupportedFormatError):
        open_slide(png, prefer="fastslide")
    with open_slide(SLIDES / "BPAEC-dicom", prefer="fastslide") as reader:
        assert reader.name == "wsidicom"
    with pytest.raises(SettingsError, match="fastslide"):
        open_slide(SVS, prefer="fastslid")


def test_without_the_fastslide_package_czi_is_refused_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "fastslide", None)  # import fastslide -> ImportError
    with pytest.raises(UnsupportedFormatError) as info:
        open_slide(CZI)
    assert FASTSLIDE_REQUIREMENT in str(info.value.fields)
    with open_slide(SVS) as reader:  # everything else is untouched
        assert reader.name == "openslide"


def test_the_preference_variable_is_a_known_setting() -> None:
    assert "XMAG_READER_PREFER" in known_variables()
