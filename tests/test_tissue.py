"""Tissue detection and the stain/modality guess: synthetic images with known masks, real slides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import xmag.tissue as tissue_module
from xmag.errors import XmagUsageError
from xmag.params import SlideOptions, TilingParams
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.stain import Modality, guess_modality, ink_colour
from xmag.tissue import (
    MAX_HOLE_UM2,
    MIN_TISSUE_UM2,
    TissueMask,
    detect_tissue,
    detector_for,
    register_detector,
    registered_detectors,
    tissue_mask_from_image,
)

SLIDES = Path(__file__).parent / "data" / "slides"
GLASS_RGB = (241, 240, 243)
GREEN_PEN_RGB = (24, 96, 64)
BLUE_PEN_RGB = (30, 60, 190)
BLACK_INK_RGB = (20, 20, 22)
# The detector smooths by 4 um and closes by 8 um, so the outline of a blob moves by about a pixel
# at 4 um/px: on a blob of ~50,000 px that costs ~1% of IoU. 0.95 leaves room for that and fails on
# a missed blob, a kept pen stroke or kept debris (each several % of the union here).
BRIGHTFIELD_MIN_IOU = 0.95
# Fluorescence: nuclei are closed into regions (25 um), which rounds the outline by ~one nucleus
# spacing (measured 0.98 here); 0.9 still fails when the region is missed or the background taken.
FLUORESCENCE_MIN_IOU = 0.9


@dataclass
class Scene:
    image: np.ndarray  # (h, w, 3) uint8 RGB
    tissue: np.ndarray  # (h, w) bool, the known tissue mask
    pen: np.ndarray  # (h, w) bool, ink pixels
    debris: np.ndarray  # (h, w) bool, specks too small to be tissue


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def glass(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 1.5, (*shape, 3))
    return np.clip(np.array(GLASS_RGB) + noise, 0, 255).astype(np.uint8)


def he_scene(seed: int = 0) -> Scene:
    """512 x 512 px at 4 um/px: an H&E blob with a small and a large hole, pen, ink and debris."""
    rng = np.random.default_rng(seed)
    img = glass((512, 512), rng)
    blob = np.zeros((512, 512), np.uint8)
    cv2.ellipse(blob, (200, 260), (150, 110), 20, 0, 360, 1, -1)
    small_hole = np.zeros_like(blob)
    cv2.circle(small_hole, (150, 230), 6, 1, -1)  # 113 px x 16 um2 = 1,800 um2: filled
    big_hole = np.zeros_like(blob)
    cv2.circle(big_hole, (250, 290), 30, 1, -1)  # 2,800 px x 16 um2 = 45,000 um2: stays a hole
    tissue = blob.astype(bool) & ~big_hole.astype(bool)
    pink = np.array([225, 140, 185]) + rng.normal(0, 6, (512, 512, 3))
    img[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    for _ in range(600):  # hematoxylin nuclei
        x, y = rng.integers(0, 512, 2)
        if tissue[y, x]:
            cv2.circle(img, (int(x), int(y)), 2, (95, 60, 140), -1)
    img[small_hole.astype(bool)] = GLASS_RGB
    pen = np.zeros_like(blob)
    cv2.polylines(pen, [np.array([[400, 30], [440, 200], [470, 480]])], False, 1, 12)
    img[pen.astype(bool)] = GREEN_PEN_RGB
    blue = np.zeros_like(blob)
    cv2.line(blue, (30, 470), (250, 495), 1, 10)
    img[blue.astype(bool)] = BLUE_PEN_RGB
    black = np.zeros_like(blob)
    cv2.line(black, (20, 20), (120, 40), 1, 9)
    img[black.astype(bool)] = BLACK_INK_RGB
    debris = np.zeros_like(blob)
    for x, y in [(60, 120), (380, 360), (330, 60), (90, 400), (480, 20)]:
        cv2.circle(debris, (x, y), 3, 1, -1)  # ~29 px x 16 um2 = 460 um2, below MIN_TISSUE_UM2
    img[debris.astype(bool)] = (120, 60, 110)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)  # a scanner's soft edges
    ink = pen.astype(bool) | blue.astype(bool) | black.astype(bool)
    return Scene(img, tissue, ink, debris.astype(bool))


def ihc_scene(seed: int = 1) -> Scene:
    """800 x 800 px at 1 um/px: hematoxylin-blue tissue with brown and dark DAB nuclei, blue pen."""
    rng = np.random.default_rng(seed)
    img = glass((800, 800), rng)
    blob = np.zeros((800, 800), np.uint8)
    cv2.rectangle(blob, (100, 150), (560, 650), 1, -1)
    tissue = blob.astype(bool)
    base = np.array([190, 205, 225]) + rng.normal(0, 5, (800, 800, 3))
    img[tissue] = np.clip(base[tissue], 0, 255).astype(np.uint8)
    nuclei = np.zeros_like(blob)
    colours = [(70, 100, 160), (40, 60, 150), (120, 75, 40), (50, 35, 25)]  # H, deep H, DAB x2
    for _ in range(900):
        x, y = int(rng.integers(110, 550)), int(rng.integers(160, 640))
        colour = colours[int(rng.integers(len(colours)))]
        cv2.circle(img, (x, y), 5, colour, -1)
        cv2.circle(nuclei, (x, y), 5, 1, -1)
    pen = np.zeros_like(blob)
    cv2.line(pen, (650, 50), (700, 750), 1, 60)
    img[pen.astype(bool)] = BLUE_PEN_RGB
    return Scene(img, tissue, pen.astype(bool), nuclei.astype(bool))


def fluorescence_scene(seed: int = 2) -> Scene:
    """600 x 600 px at 2 um/px: DAPI-like nuclei (as RGB) filling a region on black."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(6, 2, (600, 600, 3)), 0, 255).astype(np.uint8)
    region = np.zeros((600, 600), np.uint8)
    cv2.ellipse(region, (300, 280), (200, 150), -15, 0, 360, 1, -1)
    ys, xs = np.nonzero(region)
    for i in rng.choice(len(xs), 2500, replace=False):
        level = int(rng.integers(140, 255))
        cv2.circle(img, (int(xs[i]), int(ys[i])), 2, (0, 0, level), -1)
    empty = np.zeros((600, 600), bool)
    return Scene(img, region.astype(bool), empty, empty)


# -- synthetic brightfield -------------------------------------------------------------------------
def test_an_he_blob_is_found_with_pen_ink_and_debris_left_out() -> None:
    scene = he_scene()
    mask, method = tissue_mask_from_image(scene.image, um_per_px=4.0)
    assert method == "brightfield"
    assert iou(mask, scene.tissue) > BRIGHTFIELD_MIN_IOU
    assert not (mask & scene.pen).any()
    assert not (mask & scene.debris).any()


def test_small_holes_are_filled_and_large_ones_stay_background() -> None:
    scene = he_scene()
    mask, _ = tissue_mask_from_image(scene.image, um_per_px=4.0)
    assert mask[230, 150]  # centre of the 1,800 um2 hole: filled
    assert not mask[290, 250]  # centre of the 45,000 um2 hole: background
    assert 1_800 < MAX_HOLE_UM2 < 45_000


def test_debris_size_is_in_square_microns_so_it_scales_with_the_pixel_size() -> None:
    scene = he_scene()
    # The same 29-px specks are 460 um2 at 4 um/px (debris) and 7,400 um2 at 16 um/px (tissue).
    fine, _ = tissue_mask_from_image(scene.image, um_per_px=4.0)
    coarse, _ = tissue_mask_from_image(scene.image, um_per_px=16.0)
    assert not (fine & scene.debris).any()
    assert (coarse & scene.debris).sum() > 0.8 * scene.debris.sum()
    assert 29 * 4.0**2 < MIN_TISSUE_UM2 < 29 * 16.0**2


def test_ihc_tissue_keeps_its_dark_nuclei_while_a_wide_blue_pen_stroke_is_removed() -> None:
    scene = ihc_scene()
    mask, method = tissue_mask_from_image(scene.image, um_per_px=1.0)
    assert method == "brightfield"
    assert iou(mask, scene.tissue) > BRIGHTFIELD_MIN_IOU
    assert mask[scene.debris].mean() > 0.99  # nuclei (recorded in .debris) are tissue
    assert not (mask & scene.pen).any()
    # Colour alone flags the deep blue and dark brown nuclei as ink; only their size spares them.
    assert (ink_colour(scene.image) & scene.debris).sum() > 1000


def test_a_blank_white_slide_gives_an_empty_mask_not_noise() -> None:
    rng = np.random.default_rng(3)
    blank = glass((700, 900), rng)
    blank[::37] = np.clip(blank[::37].astype(int) - 8, 0, 255).astype(np.uint8)  # scan lines
    mask, method = tissue_mask_from_image(blank, um_per_px=2.0)
    assert method == "brightfield"
    assert not mask.any()


def test_a_blank_black_fluorescence_slide_gives_an_empty_mask() -> None:
    rng = np.random.default_rng(4)
    black = np.clip(rng.normal(5, 2, (600, 800, 3)), 0, 255).astype(np.uint8)
    mask, method = tissue_mask_from_image(black, um_per_px=2.0)
    assert method == "fluorescence"
    assert not mask.any()


# -- synthetic fluorescence ------------------------------------------------------------------------
def test_fluorescence_nuclei_are_closed_into_their_region_by_the_auto_method() -> None:
    scene = fluorescence_scene()
    mask, method = tissue_mask_from_image(scene.image, um_per_px=2.0)
    assert method == "fluorescence"
    assert iou(mask, scene.tissue) > FLUORESCENCE_MIN_IOU
    # The bright-field detector on the same image would take the black background for tissue.
    wrong, _ = tissue_mask_from_image(scene.image, um_per_px=2.0, method="brightfield")
    assert iou(wrong, scene.tissue) < 0.6


def test_a_fine_thumbnail_is_detected_at_working_resolution_and_scaled_back() -> None:
    scene = he_scene()
    # The 4 um/px scene enlarged 5x: 0.8 um/px, finer than WORK_UM_PER_PX (1 um/px).
    big = cv2.resize(scene.image, (2560, 2560), interpolation=cv2.INTER_LINEAR)
    truth = (
        cv2.resize(scene.tissue.astype(np.uint8), (2560, 2560), interpolation=cv2.INTER_NEAREST) > 0
    )
    mask, _ = tissue_mask_from_image(big, um_per_px=0.8)
    assert mask.shape == (2560, 2560)
    assert iou(mask, truth) > BRIGHTFIELD_MIN_IOU


# -- registry --------------------------------------------------------------------------------------
def test_the_registry_holds_both_detectors_and_refuses_a_duplicate_name() -> None:
    assert {"brightfield", "fluorescence"} <= set(registered_detectors())
    for name in ("brightfield", "auto"):
        with pytest.raises(XmagUsageError, match="already registered"):
            register_detector(name)(lambda rgb, um: np.zeros(rgb.shape[:2], bool))


def test_a_registered_detector_is_used_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tissue_module, "_DETECTORS", dict(tissue_module._DETECTORS))

    @register_detector("everything")
    def everything(rgb: np.ndarray, um_per_px: float) -> np.ndarray:
        return np.ones(rgb.shape[:2], bool)

    mask, method = tissue_mask_from_image(he_scene().image, um_per_px=4.0, method="everything")
    assert method == "everything" and mask.all()


def test_an_unknown_method_is_refused_with_the_known_names() -> None:
    with pytest.raises(XmagUsageError, match="brightfield"):
        tissue_mask_from_image(he_scene().image, um_per_px=4.0, method="otsu-magic")


def test_tissue_area_in_mm2_follows_the_downsample_and_mpp() -> None:
    mask = np.zeros((100, 100), bool)
    mask[:50, :40] = True  # 2,000 mask px
    tm = TissueMask(
        mask=mask, downsample=8.0, method="brightfield", thumbnail=np.zeros((100, 100, 3), np.uint8)
    )
    assert tm.tissue_area_mm2(0.5) == pytest.approx(2_000 * 16.0 / 1e6)


# -- real slides -----------------------------------------------------------------------------------
# name: (method, tissue fraction range of the thumbnail, modality). Ranges are what a person sees on
# the thumbnails (tests/data/slides/PROVENANCE.md): CMU-1 a strip of skin on a third of the field,
# the OS crops inside tissue (OS-2 with a few gaps), the TCGA section filling two thirds, the DAPI
# section over about half, BPAEC cells scattered over a fifth.
REAL: dict[str, tuple[str, tuple[float, float], Modality]] = {
    "CMU-1-Small-Region.svs": ("brightfield", (0.25, 0.55), Modality.HE),
    "tcga-cr-7395-01a-01-ts1.svs": ("brightfield", (0.5, 0.8), Modality.HE),
    "OS-1-detail.ome.tif": ("brightfield", (0.95, 1.0), Modality.HE),
    "OS-2-ndpi.ome.tif": ("brightfield", (0.65, 0.95), Modality.IHC),
    "kidney-48-5.tif": ("brightfield", (0.0, 0.0), Modality.IHC),
    "test3-DAPI-2-387.ndpi": ("fluorescence", (0.4, 0.8), Modality.FLUORESCENCE),
    "BPAEC-dicom": ("fluorescence", (0.1, 0.4), Modality.FLUORESCENCE),
}


@pytest.fixture(scope="module")
def real_masks() -> dict[str, TissueMask]:
    out = {}
    for name in REAL:
        with open_slide(SLIDES / name) as reader:
            out[name] = detect_tissue(reader)
    return out


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_slides_give_a_plausible_tissue_fraction_with_the_right_detector(
    name: str, real_masks: dict[str, TissueMask]
) -> None:
    method, (lo, hi), _ = REAL[name]
    tm = real_masks[name]
    assert tm.method == method
    assert lo <= tm.mask.mean() <= hi
    assert tm.mask.shape == tm.thumbnail.shape[:2] and max(tm.mask.shape) <= 2048


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_slides_are_classified_by_modality(
    name: str, real_masks: dict[str, TissueMask]
) -> None:
    expected = REAL[name][2]
    tm = real_masks[name]
    modality, scores = guess_modality(tm.thumbnail, tm.mask)
    assert modality is expected, scores
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_the_kidney_fragment_is_debris_sized_at_0_5_um_per_px_but_tissue_at_a_coarser_scale() -> (
    None
):
    # kidney-48-5.tif states no mpp; its one fragment is ~4,000 px. At the 0.5 um/px fallback that
    # is ~1,000 um2 (below MIN_TISSUE_UM2: treated as debris); at 4 um/px it is 64,000 um2.
    with open_slide(SLIDES / "kidney-48-5.tif") as reader:
        fine = detect_tissue(reader)
        coarse = detect_tissue(reader, level0_mpp=4.0)
    assert not fine.mask.any()
    assert 0 < coarse.mask.mean() < 0.01
    area_px = coarse.mask.sum() * coarse.downsample**2
    assert 3_000 < area_px < 6_000


def test_the_modality_of_a_slide_without_tissue_pixels_in_the_mask_comes_from_its_stained_pixels(
    real_masks: dict[str, TissueMask],
) -> None:
    tm = real_masks["kidney-48-5.tif"]  # empty mask
    modality, scores = guess_modality(tm.thumbnail, tm.mask)
    assert modality is Modality.IHC and scores["eosin_fraction"] < 0.2


def test_a_blank_bright_image_has_unknown_modality_and_a_black_one_is_fluorescence() -> None:
    rng = np.random.default_rng(5)
    modality, _ = guess_modality(glass((300, 300), rng))
    assert modality is Modality.UNKNOWN
    black = np.full((300, 300, 3), 4, np.uint8)
    assert guess_modality(black)[0] is Modality.FLUORESCENCE


def test_synthetic_he_and_ihc_scenes_are_told_apart() -> None:
    he = he_scene()
    ihc = ihc_scene()
    assert guess_modality(he.image, he.tissue)[0] is Modality.HE
    assert guess_modality(ihc.image, ihc.tissue)[0] is Modality.IHC
    assert guess_modality(fluorescence_scene().image)[0] is Modality.FLUORESCENCE


def test_guess_modality_refuses_a_mask_of_another_shape() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        guess_modality(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5), bool))


# -- one modality guess per slide ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL))
def test_the_mask_carries_the_modality_that_chose_its_detector(
    name: str, real_masks: dict[str, TissueMask]
) -> None:
    tm = real_masks[name]
    assert tm.modality is REAL[name][2], tm.modality_scores
    assert tm.method == detector_for(tm.modality)
    # The guess is the one guess_modality gives on the thumbnail and its mask.
    assert guess_modality(tm.thumbnail, tm.mask) == (tm.modality, tm.modality_scores)


@pytest.mark.parametrize("name", ["test3-DAPI-2-387.ndpi", "CMU-1-Small-Region.svs"])
def test_the_qc_names_the_modality_of_the_tissue_stage_and_cannot_disagree_with_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(SLIDES / name) as reader:
        plan = plan_slide(reader, TilingParams(default_mpp=0.5, tissue_threshold=0.1))
    assert plan.qc.modality == str(plan.tissue.modality)
    assert plan.qc.modality_scores == dict(plan.tissue.modality_scores)
    assert plan.tissue.method == detector_for(plan.tissue.modality)
    assert not any("tissue was detected with" in w for w in plan.qc.warnings)

    # The QC takes the tissue stage's guess as it is: a forged one comes out unchanged, which a
    # second guess of its own would have replaced.
    def forged(*args: Any, **kwargs: Any) -> TissueMask:
        tm = detect_tissue(*args, **kwargs)
        return dataclasses.replace(tm, modality=Modality.UNKNOWN, modality_scores={"forged": 1.0})

    monkeypatch.setattr("xmag.plan.detect_tissue", forged)
    with open_slide(SLIDES / name) as reader:
        plan = plan_slide(reader, TilingParams(default_mpp=0.5, tissue_threshold=0.1))
    assert (plan.qc.modality, plan.qc.modality_scores) == ("unknown", {"forged": 1.0})


def test_a_detector_chosen_by_name_reaches_the_tissue_stage_and_the_qc_says_it_does_not_fit() -> (
    None
):
    with open_slide(SLIDES / "test3-DAPI-2-387.ndpi") as reader:
        params = TilingParams(default_mpp=0.5, tissue_detector="brightfield")
        plan = plan_slide(reader, params)
    assert plan.tissue.method == "brightfield"
    assert plan.qc.modality == "fluorescence"
    assert any("'brightfield' on a slide that looks fluorescence" in w for w in plan.qc.warnings)


def test_the_tissue_detector_option_accepts_registered_names_and_refuses_others() -> None:
    assert TilingParams().tissue_detector == "auto"
    for name in ("auto", *registered_detectors()):
        assert TilingParams(tissue_detector=name).tissue_detector == name
        assert SlideOptions(tissue_detector=name).tissue_detector == name
    with pytest.raises(ValueError, match="choose one of auto, brightfield, fluorescence"):
        TilingParams(tissue_detector="otsu-magic")
    with pytest.raises(ValueError, match="choose one of auto"):
        SlideOptions(tissue_detector="otsu-magic")


def test_a_newly_registered_detector_is_a_valid_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tissue_module, "_DETECTORS", dict(tissue_module._DETECTORS))
    register_detector("everything")(lambda rgb, um: np.ones(rgb.shape[:2], bool))
    assert TilingParams(tissue_detector="everything").tissue_detector == "everything"
