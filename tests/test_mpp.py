"""Microns per pixel with provenance, resolved on the real slides and on TIFFs written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from xmag.errors import InvalidMppError, UnknownMppError
from xmag.mpp import MppSource, resolve_mpp
from xmag.readers import open_slide

SLIDES = Path(__file__).parent / "data" / "slides"

# name: (mpp, source, metadata field) resolved with no override and no default.
RESOLVED = {
    "CMU-1-Small-Region.svs": (0.499, MppSource.METADATA, "openslide.mpp-x"),
    "test3-DAPI-2-387.ndpi": (0.228, MppSource.METADATA, "openslide.mpp-x"),
    "OS-1-detail.ome.tif": (0.227, MppSource.METADATA, "ome.PhysicalSizeX"),
    "OS-2-ndpi.ome.tif": (0.227, MppSource.METADATA, "ome.PhysicalSizeX"),
    "BPAEC-dicom": (1.29, MppSource.METADATA, "dicom.PixelSpacing"),
}
NO_MPP = ["tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif"]


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_real_slides_resolve_their_mpp_from_metadata(name: str) -> None:
    mpp, source, detail = RESOLVED[name]
    with open_slide(SLIDES / name) as reader:
        info = resolve_mpp(reader)
    assert info.mpp == pytest.approx(mpp, abs=0.001)
    assert (info.source, info.detail, info.warnings) == (source, detail, ())


@pytest.mark.parametrize("name", NO_MPP)
def test_a_slide_without_mpp_or_power_fails_with_unknown_mpp_unless_a_default_is_allowed(
    name: str,
) -> None:
    with open_slide(SLIDES / name) as reader:
        assert reader.metadata_mpp() is None and reader.objective_power() is None
        with pytest.raises(UnknownMppError) as info:
            resolve_mpp(reader)
        assert info.value.code == "UNKNOWN_MPP" and name in info.value.message
        resolved = resolve_mpp(reader, default=0.5)
    assert (resolved.mpp, resolved.source) == (0.5, MppSource.DEFAULT)


def test_objective_power_comes_from_metadata() -> None:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as svs:
        assert svs.objective_power() == 20.0
    with open_slide(SLIDES / "test3-DAPI-2-387.ndpi") as ndpi:
        assert ndpi.objective_power() == 40.0


def test_an_override_beats_the_metadata() -> None:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as reader:
        info = resolve_mpp(reader, override=0.25, default=1.0)
    assert (info.mpp, info.source) == (0.25, MppSource.OVERRIDE)


@pytest.mark.parametrize("value", [0.01, 50.0])
def test_an_implausible_mpp_is_kept_with_a_warning(value: float) -> None:
    with open_slide(SLIDES / "kidney-48-5.tif") as reader:
        info = resolve_mpp(reader, override=value)
    assert info.mpp == value
    assert any("implausible" in w for w in info.warnings)


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "0.5", True])
def test_an_invalid_override_or_default_is_refused(value: object) -> None:
    with open_slide(SLIDES / "kidney-48-5.tif") as reader:
        with pytest.raises(InvalidMppError) as info:
            resolve_mpp(reader, override=value)  # type: ignore[arg-type]
        assert info.value.code == "INVALID_MPP"
        with pytest.raises(InvalidMppError):
            resolve_mpp(reader, default=value)  # type: ignore[arg-type]


def test_a_numpy_float_override_is_accepted() -> None:
    with open_slide(SLIDES / "kidney-48-5.tif") as reader:
        assert resolve_mpp(reader, override=np.float32(0.5)).mpp == 0.5


def _pixels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (400, 600, 3), dtype=np.uint8)


def test_tiff_resolution_tags_in_centimetres_give_metadata_mpp_and_flag_anisotropy(
    tmp_path: Path,
) -> None:
    # A strip TIFF (OpenSlide refuses it, tiffslide reads it) with 0.5 x 0.6 um pixels.
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(
        path,
        _pixels(),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.6),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as reader:
        assert reader.name == "tiffslide"
        info = resolve_mpp(reader)
    assert (info.mpp_x, info.mpp_y) == pytest.approx((0.5, 0.6))
    assert (info.source, info.detail) == (MppSource.METADATA, "tiff.XResolution")
    assert any("anisotropic" in w for w in info.warnings)


def test_a_72_dpi_placeholder_resolution_is_not_an_mpp(tmp_path: Path) -> None:
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, _pixels(), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with open_slide(path) as reader:
        assert reader.metadata_mpp() is None


def test_ome_physical_size_is_converted_from_its_unit(tmp_path: Path) -> None:
    path = tmp_path / "nm.ome.tif"
    metadata = {"PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"}
    metadata |= {"PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm", "axes": "YXS"}
    tifffile.imwrite(path, _pixels(), photometric="rgb", tile=(128, 128), metadata=metadata)
    with open_slide(path) as reader:
        # Tiled, so OpenSlide could read it as generic TIFF; OME goes to tiffslide all the same.
        assert (reader.name, reader.format) == ("tiffslide", "ome-tiff")
        info = resolve_mpp(reader)
    assert info.mpp == pytest.approx(0.25) and info.detail == "ome.PhysicalSizeX"


def test_an_aperio_tiff_with_appmag_but_no_mpp_falls_back_to_objective_power(
    tmp_path: Path,
) -> None:
    path = tmp_path / "appmag.svs"
    description = "Aperio Image Library v12.0.5\r\n600x400 (128x128) JPEG/RGB Q=70|AppMag = 20"
    tifffile.imwrite(
        path,
        _pixels(),
        photometric="rgb",
        tile=(128, 128),
        compression="jpeg",
        description=description,
        metadata=None,  # keeps the Aperio text the first and only ImageDescription
    )
    with open_slide(path) as reader:
        assert (reader.name, reader.vendor) == ("openslide", "aperio")
        assert reader.metadata_mpp() is None
        info = resolve_mpp(reader)
    assert (info.mpp, info.source, info.detail) == (
        0.5,
        MppSource.OBJECTIVE_POWER,
        "objective power 20",
    )
