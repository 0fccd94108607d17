"""Stage 5: quality control of one slide's plan, in numbers a caller can check and refuse on.

Every result carries a ``SlideQC``: how much tissue was found, how many tiles were kept, which
level was read and how much it was resampled, the mpp and where it came from, the guessed stain or
modality, and warnings a person should read (doubtful mpp, upsampling, very little tissue,
implausible colours: a bright-field background far from near-white glass, or a colour correction
the reader applied).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass

from xmag.grid import TileGrid
from xmag.level import LevelChoice
from xmag.mpp import MppInfo, MppSource
from xmag.stain import Modality, background_colour, colour_doubt
from xmag.tissue import TissueMask, detector_for

__all__ = ["TINY_TISSUE_MM2", "SlideQC", "build_qc"]

TINY_TISSUE_MM2 = (
    0.5  # less tissue than this is a fragment, or a detection that missed faint tissue
)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SlideQC:
    """What the core saw on a slide, for the result and for a caller's accept/refuse decision
    (also result.json's ``qc``).

    Attributes:
        tissue_area_mm2: area of the tissue mask in mm2 (at the resolved level-0 mpp).
        tiles_kept: tiles whose tissue fraction passes the threshold.
        tiles_total: tiles in the grid (kept or not).
        zero_tissue: no tile is kept (the engine refuses such a slide with ``NO_TISSUE``).
        level_read: pyramid level the tiles are read from.
        level_mpp: um/px of that level.
        resample_factor: level pixels per target pixel (> 1 downsample, < 1 upsample).
        mpp: level-0 um/px used (mean of x and y).
        mpp_source: where it came from (``override``, ``metadata``, ``objective_power``,
            ``default``).
        mpp_detail: the metadata field or the rule used.
        modality: guessed ``he``, ``ihc``, ``fluorescence`` or ``unknown``.
        modality_scores: the evidence behind the guess (see ``xmag.stain.guess_modality``).
        warnings: sentences for a person.
    """

    tissue_area_mm2: float
    tiles_kept: int
    tiles_total: int
    zero_tissue: bool
    level_read: int
    level_mpp: float
    resample_factor: float
    mpp: float
    mpp_source: str
    mpp_detail: str
    modality: str
    modality_scores: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain floats, ints, strings and lists), as in result.json."""
        return _QC_ADAPTER.dump_python(self, mode="json")


_QC_ADAPTER = TypeAdapter(SlideQC)


def build_qc(
    *,
    mpp: MppInfo,
    level: LevelChoice,
    tissue: TissueMask,
    grid: TileGrid,
    colour_correction: str | None = None,
) -> SlideQC:
    """Gather the QC of a planned slide from the outputs of each stage.

    ``colour_correction`` is the reader's (``SlideReader.colour_correction``): a correction it
    applies to every read, reported as a warning.

    The modality is the tissue stage's (``tissue.modality``), the guess that chose its detector:
    the QC never guesses again, so it cannot name a modality the mask was not detected for.
    """
    area = tissue.tissue_area_mm2(mpp.mpp)
    kept, total = grid.n_kept, grid.n_total
    warnings = [
        *mpp.warnings,
        *_mpp_source_warnings(mpp),
        *_resample_warnings(level),
        *_tissue_warnings(area, kept, total, grid),
        *_modality_warnings(tissue),
        *_colour_warnings(tissue, colour_correction),
    ]
    return SlideQC(
        tissue_area_mm2=area,
        tiles_kept=kept,
        tiles_total=total,
        zero_tissue=kept == 0,
        level_read=level.level,
        level_mpp=level.level_mpp,
        resample_factor=level.resample_factor,
        mpp=mpp.mpp,
        mpp_source=str(mpp.source),
        mpp_detail=mpp.detail,
        modality=str(tissue.modality),
        modality_scores=dict(tissue.modality_scores),
        warnings=tuple(warnings),
    )


def _modality_warnings(tissue: TissueMask) -> list[str]:
    if tissue.modality is Modality.UNKNOWN:
        return ["the stain or modality could not be guessed (too few stained pixels)"]
    expected = detector_for(tissue.modality)
    # Only the modality detectors are compared; a detector registered for something else is not.
    if tissue.method in {detector_for(m) for m in Modality} and tissue.method != expected:
        return [
            f"tissue was detected with {tissue.method!r} on a slide that looks {tissue.modality}; "
            f"the {expected!r} detector (tissue_detector auto) is made for it"
        ]
    return []


_CORRECTIONS = {
    "ycbcr-labelled-rgb": (
        "the slide's JPEG tiles are coded as YCbCr but the file labels them RGB (wrong "
        "photometric interpretation); xmag converts them to RGB on every read"
    ),
}


def _colour_warnings(tissue: TissueMask, colour_correction: str | None) -> list[str]:
    out = []
    if colour_correction is not None:
        out.append(_CORRECTIONS.get(colour_correction, f"colours corrected: {colour_correction}"))
    if tissue.modality is not Modality.FLUORESCENCE:  # dark glass is right for fluorescence
        doubt = colour_doubt(background_colour(tissue.thumbnail, tissue.mask))
        if doubt is not None:
            out.append(doubt)
    return out


def _mpp_source_warnings(mpp: MppInfo) -> list[str]:
    if mpp.source is MppSource.DEFAULT:
        return [f"the slide states no mpp; assumed the caller's default {mpp.mpp:.4g} um/px"]
    if mpp.source is MppSource.OBJECTIVE_POWER:
        return [f"mpp estimated from the {mpp.detail} as {mpp.mpp:.4g} um/px, not measured"]
    return []


def _resample_warnings(level: LevelChoice) -> list[str]:
    if level.resample_factor < 1.0:
        return [
            f"upsampling: the finest level is {level.level_mpp:.4g} um/px, coarser than the "
            f"target {level.target_mpp:.4g} um/px; tiles are enlarged "
            f"{1.0 / level.resample_factor:.2f}x and carry less detail than the model expects"
        ]
    return []


def _tissue_warnings(area_mm2: float, kept: int, total: int, grid: TileGrid) -> list[str]:
    if total == 0:
        return [
            f"the slide is smaller than one tile ({grid.tile_px} px at {grid.target_mpp:.4g} "
            "um/px); no tile can be read"
        ]
    out = []
    if kept == 0:
        out.append(
            f"no tile has at least {grid.tissue_threshold:.0%} tissue ({area_mm2:.3g} mm2 of "
            "tissue found); lower tissue_threshold if the slide does hold tissue"
        )
    elif area_mm2 < TINY_TISSUE_MM2:
        out.append(f"little tissue: {area_mm2:.3g} mm2 (under {TINY_TISSUE_MM2} mm2)")
    return out
