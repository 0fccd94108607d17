"""The slide plan: every decision made before a tile is read, composed from the core's stages.

    reader -> resolve_mpp -> choose_level -> detect_tissue -> guess_modality -> build_grid -> QC

``plan_slide`` reads only a thumbnail; the tile reads (``xmag.tiles``) follow the plan. A slide
with no tissue is planned like any other (``plan.qc.zero_tissue`` says so): the caller decides
whether that is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from xmag.grid import TileGrid, build_grid
from xmag.level import LevelChoice, choose_level
from xmag.mpp import MppInfo, resolve_mpp
from xmag.params import TilingParams
from xmag.qc import SlideQC, build_qc
from xmag.readers.base import LevelInfo, SlideReader
from xmag.stain import guess_modality
from xmag.tissue import TissueMask, detect_tissue

__all__ = ["SlideInfo", "SlidePlan", "plan_slide"]


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SlideInfo:
    """A slide as its reader sees it (the reader-side half of result.json's ``slide``; the
    bytes' half, sha256 and size, is ``xmag.results.SlideIdentity``).

    Attributes:
        path: the slide file, or the folder of a DICOM set, as opened (not part of any identity).
        reader: registry name of the reader that opened it.
        vendor: scanner vendor or format family, when known.
        format: container format ("svs", "ndpi", "ome-tiff", "dicom"...).
        dimensions: level-0 (width, height) in pixels.
        levels: the pyramid, level 0 first.
    """

    path: str
    reader: str
    vendor: str | None
    format: str
    dimensions: tuple[int, int]
    levels: tuple[LevelInfo, ...]

    @classmethod
    def from_reader(cls, reader: SlideReader) -> SlideInfo:
        w, h = reader.dimensions
        return cls(
            path=str(reader.path),
            reader=reader.name,
            vendor=reader.vendor,
            format=reader.format,
            dimensions=(int(w), int(h)),
            levels=tuple(reader.levels),
        )


@dataclass(frozen=True)
class SlidePlan:
    """Everything decided about a slide before reading tiles."""

    slide: SlideInfo
    params: TilingParams
    mpp: MppInfo
    level: LevelChoice
    tissue: TissueMask
    grid: TileGrid
    qc: SlideQC


def plan_slide(reader: SlideReader, params: TilingParams) -> SlidePlan:
    """Plan the tiles of one slide at ``params.target_mpp``.

    Args:
        reader: an open slide (``xmag.readers.open_slide``).
        params: tile size, target mpp, overlap, keep threshold, mpp override or default.

    Returns:
        The plan. Never raises ``NoTissueError``: ``plan.qc.zero_tissue`` is True when no tile is
        kept.

    Raises:
        UnknownMppError: the slide states no mpp and ``params`` gives no override or default.
        InvalidMppError: the override or default is not a positive number.
        RegionReadError: the thumbnail could not be decoded.
    """
    mpp = resolve_mpp(reader, override=params.mpp_override, default=params.default_mpp)
    level = choose_level(reader, mpp.mpp, params.target_mpp)
    tissue = detect_tissue(reader, level0_mpp=mpp.mpp)
    modality, scores = guess_modality(tissue.thumbnail, tissue.mask)
    grid = build_grid(reader.dimensions, mpp.mpp, tissue, params)
    qc = build_qc(
        mpp=mpp, level=level, tissue=tissue, grid=grid, modality=modality, modality_scores=scores
    )
    return SlidePlan(
        slide=SlideInfo.from_reader(reader),
        params=params,
        mpp=mpp,
        level=level,
        tissue=tissue,
        grid=grid,
        qc=qc,
    )
