"""Planning every real slide: it plans (reader, level, mpp source, modality) or fails typed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from xmag.digest import slide_digest
from xmag.errors import UnknownMppError, UnsupportedFormatError, XmagError
from xmag.mpp import MppSource
from xmag.params import TilingParams
from xmag.plan import SlideInfo, SlidePlan, plan_slide
from xmag.readers import open_slide
from xmag.results import slide_identity
from xmag.stain import Modality

SLIDES = Path(__file__).parent / "data" / "slides"


@dataclass(frozen=True)
class Plans:
    """A slide that plans at 2.0 um/px with ``tile_px`` tiles (after ``default_mpp`` if given)."""

    reader: str
    level: int
    source: MppSource
    modality: Modality
    tile_px: int = 224
    default_mpp: float | None = None
    zero_tissue: bool = False


@dataclass(frozen=True)
class Fails:
    """A slide that fails with ``code`` (at open or at planning)."""

    code: str
    then: Plans | None = None  # how it plans once the missing input (a default mpp) is given


# Every entry of tests/data/slides. Tile sizes: 224 px at 2.0 um/px is 448 um; OS-1 is 1101 px at
# 0.227 um/px = 250 um wide, so it gets 32 px tiles (64 um, 3 x 3 of them); every other slide fits
# at least one 224 px tile (OS-2: 500 um, one tile).
TABLE: dict[str, Plans | Fails] = {
    "CMU-1-Small-Region.svs": Plans("openslide", 0, MppSource.METADATA, Modality.HE),
    "tcga-cr-7395-01a-01-ts1.svs": Fails(
        "UNKNOWN_MPP",
        # Level 1 (downsample 2) is 1.0 um/px at the assumed 0.5: the closest level from above.
        then=Plans("openslide", 1, MppSource.DEFAULT, Modality.HE, default_mpp=0.5),
    ),
    "test3-DAPI-2-387.ndpi": Plans("openslide", 3, MppSource.METADATA, Modality.FLUORESCENCE),
    "OS-1-detail.ome.tif": Plans("tiffslide", 0, MppSource.METADATA, Modality.HE, tile_px=32),
    "OS-2-ndpi.ome.tif": Plans("tiffslide", 0, MppSource.METADATA, Modality.IHC),
    "BPAEC-dicom": Plans("wsidicom", 0, MppSource.METADATA, Modality.FLUORESCENCE),
    # At the assumed 0.5 um/px the whole slide (1493 x 901 px) holds one 224-px tile at 2 um/px, and
    # its only tissue fragment (~4,000 px, ~1,000 um2) is below the debris size: zero tissue. The
    # stain guess still comes from its stained pixels.
    "kidney-48-5.tif": Fails(
        "UNKNOWN_MPP",
        then=Plans(
            "tiffslide", 0, MppSource.DEFAULT, Modality.IHC, default_mpp=0.5, zero_tissue=True
        ),
    ),
    # Real fluorescence (16-bit channels shown as display RGB by fastslide_reader), both small:
    # the CZI is 592 x 228 um (296 x 114 px at 2 um/px: 64 px tiles), the VSI 178 x 182 um.
    "1_tileregion.czi": Plans(
        "fastslide", 1, MppSource.METADATA, Modality.FLUORESCENCE, tile_px=64
    ),
    "vsi-ets-test-jpg2k": Plans(
        "fastslide", 0, MppSource.METADATA, Modality.FLUORESCENCE, tile_px=32
    ),
}


def _plan(name: str, expect: Plans) -> SlidePlan:
    params = TilingParams(tile_px=expect.tile_px, target_mpp=2.0, default_mpp=expect.default_mpp)
    with open_slide(SLIDES / name) as reader:
        return plan_slide(reader, params)


def _planning_cases() -> list[tuple[str, Plans]]:
    out = []
    for name, expect in sorted(TABLE.items()):
        if isinstance(expect, Plans):
            out.append((name, expect))
        elif expect.then is not None:
            out.append((name, expect.then))
    return out


@pytest.fixture(scope="module")
def plans() -> dict[str, SlidePlan]:
    return {name: _plan(name, expect) for name, expect in _planning_cases()}


def test_the_table_covers_every_slide_in_the_test_data() -> None:
    present = {p.name for p in SLIDES.iterdir() if p.name != "PROVENANCE.md"}
    assert present == set(TABLE)


@pytest.mark.parametrize(("name", "expect"), _planning_cases(), ids=lambda v: str(v)[:30])
def test_each_slide_plans_with_its_reader_level_mpp_source_and_modality(
    name: str, expect: Plans, plans: dict[str, SlidePlan]
) -> None:
    plan = plans[name]
    qc = plan.qc
    got = (plan.slide.reader, qc.level_read, qc.mpp_source, qc.modality)
    assert got == (expect.reader, expect.level, expect.source, expect.modality), qc.modality_scores
    assert qc.zero_tissue is expect.zero_tissue
    if expect.zero_tissue:
        assert qc.tiles_kept == 0 and any("no tile" in w for w in qc.warnings)
    else:
        assert qc.tiles_kept > 0
    assert qc.tiles_kept == plan.grid.n_kept and qc.tiles_total == plan.grid.n_total


@pytest.mark.parametrize(
    ("name", "code"),
    [(n, e.code) for n, e in sorted(TABLE.items()) if isinstance(e, Fails)],
)
def test_slides_that_cannot_be_planned_fail_with_their_code(name: str, code: str) -> None:
    with pytest.raises(XmagError) as info, open_slide(SLIDES / name) as reader:
        plan_slide(reader, TilingParams())
    assert info.value.code == code
    assert name in info.value.message
    expected_type = UnknownMppError if code == "UNKNOWN_MPP" else UnsupportedFormatError
    assert isinstance(info.value, expected_type)


def test_the_7_level_ndpi_is_read_at_level_3_and_shrunk_by_1_096(
    plans: dict[str, SlidePlan],
) -> None:
    level = plans["test3-DAPI-2-387.ndpi"].level
    assert level.level == 3
    assert level.level_mpp == pytest.approx(0.2282 * 8, abs=0.002)  # 1.83 um/px
    assert level.resample_factor == pytest.approx(2.0 / (0.22817 * 8), abs=0.002)  # 1.096
    assert len(plans["test3-DAPI-2-387.ndpi"].slide.levels) == 7


def test_a_slide_read_at_its_level_0_records_how_much_it_is_shrunk(
    plans: dict[str, SlidePlan],
) -> None:
    qc = plans["CMU-1-Small-Region.svs"].qc
    assert (qc.level_read, qc.level_mpp) == (0, pytest.approx(0.499))
    assert qc.resample_factor == pytest.approx(2.0 / 0.499)
    assert qc.mpp_detail == "openslide.mpp-x" and qc.warnings == ()


def test_qc_tissue_area_is_the_mask_area_at_the_resolved_mpp(plans: dict[str, SlidePlan]) -> None:
    plan = plans["CMU-1-Small-Region.svs"]
    mask = plan.tissue.mask
    px_um = plan.tissue.downsample * 0.499
    assert plan.qc.tissue_area_mm2 == pytest.approx(mask.sum() * px_um**2 / 1e6)
    # The strip of skin covers about a third of the 1.1 x 1.5 mm field.
    assert 0.4 < plan.qc.tissue_area_mm2 < 0.9


def test_a_default_mpp_and_a_small_tissue_area_are_warned_about(
    plans: dict[str, SlidePlan],
) -> None:
    tcga = plans["tcga-cr-7395-01a-01-ts1.svs"].qc
    assert any("assumed the caller's default 0.5" in w for w in tcga.warnings)
    os2 = plans["OS-2-ndpi.ome.tif"].qc
    assert os2.tissue_area_mm2 < 0.5 and any("little tissue" in w for w in os2.warnings)


def test_an_override_coarser_than_the_target_reads_level_0_and_warns_of_upsampling() -> None:
    params = TilingParams(tile_px=64, target_mpp=2.0, mpp_override=4.0)
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as reader:
        plan = plan_slide(reader, params)
    qc = plan.qc
    assert (qc.mpp_source, qc.mpp, qc.level_read) == ("override", 4.0, 0)
    assert qc.resample_factor == pytest.approx(0.5)
    assert any(w.startswith("upsampling") for w in qc.warnings)


def test_a_slide_smaller_than_one_tile_plans_with_an_empty_grid_and_says_why() -> None:
    with open_slide(SLIDES / "OS-1-detail.ome.tif") as reader:
        plan = plan_slide(reader, TilingParams())  # 224 px at 2 um/px = 448 um > 250 um
    assert plan.qc.tiles_total == 0 and plan.qc.zero_tissue
    assert any("smaller than one tile" in w for w in plan.qc.warnings)
    assert plan.qc.tissue_area_mm2 > 0.05  # the tissue is there, the slide is just small


def test_qc_and_slide_info_serialise_to_json(plans: dict[str, SlidePlan]) -> None:
    plan = plans["BPAEC-dicom"]
    qc = json.loads(json.dumps(plan.qc.to_dict()))
    assert qc["modality"] == "fluorescence" and qc["mpp_source"] == "metadata"
    assert set(qc["modality_scores"]) >= {"he", "ihc", "fluorescence"}
    info = json.loads(TypeAdapter(SlideInfo).dump_json(plan.slide))
    assert info["format"] == "dicom" and len(info["levels"]) == len(plan.slide.levels)
    assert TypeAdapter(SlideInfo).validate_python(info) == plan.slide  # the same class reads it


def test_slide_identity_counts_every_file_of_a_dicom_folder(plans: dict[str, SlidePlan]) -> None:
    folder = SLIDES / "BPAEC-dicom"
    dicom = slide_identity(plans["BPAEC-dicom"].slide, slide_digest(folder))
    assert dicom.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert dicom.name == "BPAEC-dicom" and dicom.levels == plans["BPAEC-dicom"].slide.levels
    svs = plans["CMU-1-Small-Region.svs"].slide
    identity = slide_identity(svs, slide_digest(SLIDES / "CMU-1-Small-Region.svs"), "case 7.svs")
    assert identity.size_bytes == (SLIDES / "CMU-1-Small-Region.svs").stat().st_size
    assert identity.name == "case 7.svs" and identity.path == svs.path
    assert svs.dimensions == (2220, 2967) and svs.vendor == "aperio"


def test_a_lower_threshold_keeps_at_least_as_many_tiles_on_the_same_slide() -> None:
    kept = []
    for threshold in (0.0, 0.25, 0.75):
        with open_slide(SLIDES / "CMU-1-Small-Region.svs") as reader:
            plan = plan_slide(reader, TilingParams(tile_px=64, tissue_threshold=threshold))
        kept.append(plan.qc.tiles_kept)
    assert kept[0] == plan.qc.tiles_total  # threshold 0 keeps every tile
    assert kept[0] > kept[1] > kept[2] > 0
