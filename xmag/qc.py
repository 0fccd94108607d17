"""Stage 5: quality control of one slide's plan, in numbers a caller can check and refuse on.

Every result carries a ``SlideQC``: how much tissue was found, how many tiles were kept, which
level was read and how much it was resampled, the mpp and where it came from, the guessed stain or
modality, and warnings a person should read (doubtful mpp, upsampling, very little tissue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmag.grid import TileGrid
from xmag.level import LevelChoice
from xmag.mpp import MppInfo, MppSource
from xmag.stain import Modality
from xmag.tissue import TissueMask

__all__ = ["TINY_TISSUE_MM2", "SlideQC", "build_qc"]

TINY_TISSUE_MM2 = (
    0.5  # less tissue than this is a fragment, or a detection that missed faint tissue
)


@dataclass(frozen=True)
class SlideQC:
    """What the core saw on a slide, for the result and for a caller's accept/refuse decision.

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
        """JSON-ready dict (plain floats, ints, strings and lists)."""
        return {
            "tissue_area_mm2": self.tissue_area_mm2,
            "tiles_kept": self.tiles_kept,
            "tiles_total": self.tiles_total,
            "zero_tissue": self.zero_tissue,
            "level_read": self.level_read,
            "level_mpp": self.level_mpp,
            "resample_factor": self.resample_factor,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "mpp_detail": self.mpp_detail,
            "modality": self.modality,
            "modality_scores": {k: float(v) for k, v in self.modality_scores.items()},
            "warnings": list(self.warnings),
        }


def build_qc(
    *,
    mpp: MppInfo,
    level: LevelChoice,
    tissue: TissueMask,
    grid: TileGrid,
    modality: Modality,
    modality_scores: dict[str, float],
) -> SlideQC:
    """Gather the QC of a planned slide from the outputs of each stage."""
    area = tissue.tissue_area_mm2(mpp.mpp)
    kept, total = grid.n_kept, grid.n_total
    warnings = [
        *mpp.warnings,
        *_mpp_source_warnings(mpp),
        *_resample_warnings(level),
        *_tissue_warnings(area, kept, total, grid),
    ]
    if modality is Modality.UNKNOWN:
        warnings.append("the stain or modality could not be guessed (too few stained pixels)")
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
        modality=str(modality),
        modality_scores=dict(modality_scores),
        warnings=tuple(warnings),
    )


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
