"""Hostile input is contained: a slide whose header declares far more pixels than the file holds
fails with a typed error in seconds, in bounded memory, and the next slide is served; long
planning stages stop on cancel and on their time budget; colours that decode wrongly are caught.

The lying TIFFs are written here byte by byte (a few hundred KB declaring 1,000,000 x 1,000,000
px): every tile or strip points at the same small deflate blob, so a reader that trusts the header
decodes for hours. Each is planned in a child process, so the test fails (it does not hang) on a
core that reads them.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from xmag.errors import (
    JobCanceledError,
    ReadBudgetError,
    SlideTooLargeError,
    all_error_codes,
)
from xmag.params import TilingParams
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.stain import colour_doubt

REPO = Path(__file__).resolve().parents[1]
LIE_PX = 1_000_000
CHILD_TIMEOUT_S = 60.0  # the child is killed past this: a core that trusts the header fails
MAX_SECONDS = 30.0
MAX_RSS_GROWTH_MB = 300.0


# -- hand-written TIFFs ----------------------------------------------------------------------------
def _lying_tiff(
    path: Path,
    *,
    width: int,
    height: int,
    tiled: bool,
    segment: int,
) -> Path:
    """A classic little-endian RGB TIFF declaring ``width`` x ``height`` px, deflate-compressed,
    whose tiles (``segment`` px square) or strips (``segment`` rows) all share one blob."""
    if tiled:
        seg_w, seg_h = segment, segment
        n = -(-width // segment) * -(-height // segment)
    else:
        seg_w, seg_h = width, segment
        n = -(-height // segment)
    blob = zlib.compress(bytes(seg_w * seg_h * 3), 9)
    entries: list[tuple[int, int, int, bytes]] = []  # (tag, type, count, value bytes)

    def short(tag: int, *vals: int) -> None:
        entries.append((tag, 3, len(vals), struct.pack(f"<{len(vals)}H", *vals)))

    def long(tag: int, *vals: int) -> None:
        entries.append((tag, 4, len(vals), struct.pack(f"<{len(vals)}I", *vals)))

    n_entries = 11 if tiled else 10
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * n_entries + 4
    bits_at = data_at
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * n
    blob_at = counts_at + 4 * n
    long(256, width)
    long(257, height)
    entries.append((258, 3, 3, struct.pack("<I", bits_at)))
    short(259, 8)  # deflate
    short(262, 2)  # RGB
    short(277, 3)
    short(284, 1)
    if tiled:
        long(322, seg_w)
        long(323, seg_h)
        entries.append((324, 4, n, struct.pack("<I", offsets_at)))
        entries.append((325, 4, n, struct.pack("<I", counts_at)))
    else:
        entries.append((273, 4, n, struct.pack("<I", offsets_at)))
        long(278, seg_h)
        entries.append((279, 4, n, struct.pack("<I", counts_at)))
    entries.sort(key=lambda e: e[0])  # no resolution tags: the plans pass a default mpp
    assert len(entries) == n_entries
    with path.open("wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd_at))
        fh.write(struct.pack("<H", n_entries))
        for tag, typ, count, value in entries:
            fh.write(struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\x00"))
        fh.write(struct.pack("<I", 0))
        fh.write(struct.pack("<3H", 8, 8, 8))
        fh.write(struct.pack(f"<{n}I", *([blob_at] * n)))
        fh.write(struct.pack(f"<{n}I", *([len(blob)] * n)))
        fh.write(blob)
    return path


_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from xmag.errors import XmagError
    from xmag.params import TilingParams
    from xmag.plan import plan_slide
    from xmag.readers import open_slide

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    good = Path(sys.argv[2])
    with open_slide(good) as reader:  # warm imports and caches: growth is the lie's
        plan_slide(reader, TilingParams(default_mpp=0.5))
    base = rss_mb()
    start = time.perf_counter()
    code = None
    try:
        with open_slide(sys.argv[1]) as reader:
            plan_slide(reader, TilingParams(default_mpp=0.5))
    except XmagError as exc:
        code = exc.code
    took = time.perf_counter() - start
    grew = rss_mb() - base
    with open_slide(good) as reader:
        kept = plan_slide(reader, TilingParams(default_mpp=0.5)).grid.n_kept
    print(json.dumps({"code": code, "seconds": took, "rss_growth_mb": grew, "good_kept": kept}))
    """
)


def _plan_in_child(slide: Path, good: Path) -> dict[str, object]:
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(slide), str(good)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"planning {slide.name} ran past {CHILD_TIMEOUT_S} s: the lie was believed")
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("tiled", "segment"), [(True, 4096), (False, 16)], ids=["tiled", "strips"])
def test_a_small_tiff_declaring_a_million_pixels_a_side_fails_typed_fast_in_bounded_memory(
    tmp_path: Path, slides_dir: Path, tiled: bool, segment: int
) -> None:
    lie = _lying_tiff(
        tmp_path / "lie.tif", width=LIE_PX, height=LIE_PX, tiled=tiled, segment=segment
    )
    assert lie.stat().st_size < 1_000_000  # a small file...
    with tifffile.TiffFile(lie) as tif:  # ...that declares 10^12 pixels
        assert tif.pages[0].shape[:2] == (LIE_PX, LIE_PX)
    result = _plan_in_child(lie, slides_dir / "CMU-1-Small-Region.svs")
    assert result["code"] == "SLIDE_TOO_LARGE"
    assert float(result["seconds"]) < MAX_SECONDS  # type: ignore[arg-type]
    assert float(result["rss_growth_mb"]) < MAX_RSS_GROWTH_MB  # type: ignore[arg-type]
    assert int(result["good_kept"]) > 0  # type: ignore[call-overload]  # the next slide plans


def test_a_declared_strip_too_large_to_decode_is_refused_before_any_read(tmp_path: Path) -> None:
    # 1,024 x 70,000 px in one strip: 71.7 Mpx decoded per read, more than MAX_SEGMENT_PX.
    path = _lying_tiff(
        tmp_path / "strip.tif", width=1024, height=70_000, tiled=False, segment=70_000
    )
    with open_slide(path) as reader:
        reader._read_region = None  # type: ignore[assignment,method-assign]  # any read fails
        with pytest.raises(SlideTooLargeError) as info:
            plan_slide(reader, TilingParams(default_mpp=0.5))
    assert info.value.code == "SLIDE_TOO_LARGE"
    assert info.value.fields["segment_px"] == 1024 * 70_000


def test_an_engine_refuses_the_lie_and_embeds_the_next_slide(
    tmp_path: Path, slides_dir: Path, default_package: Path
) -> None:
    lie = _lying_tiff(tmp_path / "lie.tif", width=LIE_PX, height=LIE_PX, tiled=True, segment=4096)
    script = textwrap.dedent(
        """
        import json, sys, time
        from pathlib import Path
        from xmag.engine import Engine, SlideOptions
        from xmag.errors import XmagError
        engine = Engine.from_dir(Path(sys.argv[3]))
        start = time.perf_counter()
        try:
            engine.embed_slide(Path(sys.argv[1]), Path(sys.argv[4]) / "lie",
                               options=SlideOptions(default_mpp=0.5))
            code = None
        except XmagError as exc:
            code = exc.code
        took = time.perf_counter() - start
        good = engine.embed_slide(Path(sys.argv[2]), Path(sys.argv[4]) / "good")
        print(json.dumps({"code": code, "seconds": took, "kept": good.tiles.kept}))
        """
    )
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(lie),
                str(slides_dir / "CMU-1-Small-Region.svs"),
                str(default_package),
                str(tmp_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the engine believed the lying TIFF")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == "SLIDE_TOO_LARGE" and result["seconds"] < MAX_SECONDS
    assert result["kept"] > 0


# -- cancel and time budget inside planning -------------------------------------------------
def _flat_tiff(path: Path, width: int = 3072, height: int = 2048) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(180, 250, size=(height, width, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def test_plan_checks_cancel_between_thumbnail_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xmag.readers import base

    monkeypatch.setattr(base, "THUMBNAIL_BLOCK_PX", 512 * 512)  # many reads
    path = _flat_tiff(tmp_path / "flat.tif")
    calls = {"n": 0, "reads": 0}

    def cancel_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with open_slide(path) as reader:
        inner = reader._read_region

        def counting(*args: object) -> np.ndarray:
            calls["reads"] += 1
            return inner(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(reader, "_read_region", counting)
        with pytest.raises(JobCanceledError) as info:
            plan_slide(reader, TilingParams(default_mpp=0.5), should_cancel=cancel_after_three)
    assert info.value.code == "JOB_CANCELED"
    assert 1 <= calls["reads"] < 6  # stopped inside the thumbnail, not after it (24 reads)


def test_a_thumbnail_past_its_time_budget_fails_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xmag.readers import base

    monkeypatch.setattr(base, "THUMBNAIL_BLOCK_PX", 512 * 512)
    path = _flat_tiff(tmp_path / "flat.tif")
    with open_slide(path) as reader:
        inner = reader._read_region

        def slow(*args: object) -> np.ndarray:
            time.sleep(0.3)
            return inner(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(reader, "_read_region", slow)
        start = time.perf_counter()
        with pytest.raises(ReadBudgetError) as info:
            plan_slide(reader, TilingParams(default_mpp=0.5), timeout_s=1.0)
    assert info.value.code == "READ_BUDGET_EXCEEDED"
    assert time.perf_counter() - start < 3.0  # 24 reads would take 7 s


def test_the_new_codes_are_registered_and_mapped_to_a_status() -> None:
    from service.problems import STATUS_BY_CODE

    codes = all_error_codes()
    for code in ("SLIDE_TOO_LARGE", "READ_BUDGET_EXCEEDED"):
        assert code in codes
        assert STATUS_BY_CODE[code] == 422


# -- colours --------------------------------------------------------------------------------------
def _cmu_pixels(slides_dir: Path) -> np.ndarray:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        return reader.read_region((0, 0), 0, reader.dimensions)


def _jpeg_tiff(path: Path, pixels: np.ndarray, *, label_rgb: bool) -> Path:
    """A JPEG tiled TIFF of ``pixels`` (tifffile codes them as YCbCr, photometric YCbCr);
    ``label_rgb`` then rewrites the photometric tag to RGB, as broken converters do."""
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        resolution=(1e4 / 0.499, 1e4 / 0.499),
        resolutionunit="CENTIMETER",
    )
    if label_rgb:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags["PhotometricInterpretation"]
            assert tag.value == 6
            at = tag.valueoffset
        with path.open("r+b") as fh:
            fh.seek(at)
            fh.write(struct.pack("<H", 2))
    return path


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_ycbcr_jpeg_tiles_labelled_rgb_are_converted_and_reported(
    tmp_path: Path, slides_dir: Path
) -> None:
    pixels = _cmu_pixels(slides_dir)
    good = _jpeg_tiff(tmp_path / "good.tif", pixels, label_rgb=False)
    bad = _jpeg_tiff(tmp_path / "bad.tif", pixels, label_rgb=True)
    with open_slide(good) as reader:
        want = plan_slide(reader, TilingParams())
    with open_slide(bad) as reader:
        assert reader.colour_correction == "ycbcr-labelled-rgb"
        tile = reader.read_region((0, 0), 0, (256, 256))
        got = plan_slide(reader, TilingParams())
    # Glass reads near-white again, as in the source slide, not (243, 127, 129).
    np.testing.assert_allclose(
        tile.reshape(-1, 3).mean(0), pixels[:256, :256].reshape(-1, 3).mean(0), atol=4
    )
    assert any("YCbCr" in w and "converts" in w for w in got.qc.warnings)
    assert not any("background" in w for w in got.qc.warnings)
    assert _iou(got.tissue.mask, want.tissue.mask) > 0.95
    assert got.grid.n_kept == pytest.approx(want.grid.n_kept, rel=0.05)


def test_a_background_far_from_white_is_warned_about_when_the_cause_is_unknown(
    tmp_path: Path, slides_dir: Path
) -> None:
    # The slide's pixels converted to YCbCr and stored uncompressed as RGB: nothing in the file
    # tells, but glass reads as (Y, 128, 128).
    pixels = cv2.resize(_cmu_pixels(slides_dir), (1110, 1484), interpolation=cv2.INTER_AREA)
    ycc = cv2.cvtColor(pixels, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]
    path = tmp_path / "pink.tif"
    tifffile.imwrite(path, np.ascontiguousarray(ycc), tile=(256, 256), photometric="rgb")
    with open_slide(path) as reader:
        assert reader.colour_correction is None
        plan = plan_slide(reader, TilingParams(default_mpp=1.0))
    warned = [w for w in plan.qc.warnings if "far from near-white" in w]
    assert warned and "YCbCr pixels decoded as RGB" in warned[0]
    # Real slides, whatever their glass, raise no doubt.
    for name in ("CMU-1-Small-Region.svs", "OS-2-ndpi.ome.tif", "tcga-cr-7395-01a-01-ts1.svs"):
        with open_slide(slides_dir / name) as reader:
            real = plan_slide(reader, TilingParams(default_mpp=0.5))
            assert reader.colour_correction is None
        assert not [w for w in real.qc.warnings if "near-white" in w or "YCbCr" in w], name
    assert colour_doubt(np.array([241.0, 240.0, 243.0])) is None
