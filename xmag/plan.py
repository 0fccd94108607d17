"""The slide plan: every decision made before a tile is read, composed from the core's stages.

    reader -> resolve_mpp -> choose_level (+ choose_decode) -> detect_tissue (+ modality)
           -> build_grid -> QC

``plan_slide`` reads only a thumbnail; the tile reads (``xmag.tiles``) follow the plan. A slide
with no tissue is planned like any other (``plan.qc.zero_tissue`` says so): the caller decides
whether that is an error.

Planning is bounded by the pixels it needs, not by what the file declares: the thumbnail is a few
megapixels decoded from the smallest level that covers it (``SlideReader.thumbnail``), a slide
whose declared size would need more is refused with ``SLIDE_TOO_LARGE`` before any read, the
thumbnail has a wall-time budget (``READ_BUDGET_EXCEEDED``), and ``should_cancel`` is asked
between stages and between the thumbnail's reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from xmag.errors import JobCanceledError
from xmag.grid import TileGrid, build_grid
from xmag.level import LevelChoice, choose_decode, choose_level
from xmag.mpp import MppInfo, resolve_mpp
from xmag.params import TilingParams
from xmag.qc import SlideQC, build_qc
from xmag.readers.base import DEFAULT_THUMBNAIL_TIMEOUT_S, LevelInfo, SlideReader
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


def plan_slide(
    reader: SlideReader,
    params: TilingParams,
    *,
    should_cancel: Callable[[], bool] | None = None,
    timeout_s: float | None = DEFAULT_THUMBNAIL_TIMEOUT_S,
) -> SlidePlan:
    """Plan the tiles of one slide at ``params.target_mpp``.

    Args:
        reader: an open slide (``xmag.readers.open_slide``).
        params: tile size, target mpp, overlap, keep threshold, mpp override or default.
        should_cancel: asked between stages and between the thumbnail's reads; True stops
            planning with ``JobCanceledError`` (the engine passes the job's cancel check).
        timeout_s: wall-time budget of the thumbnail read (None: no limit).

    Returns:
        The plan. Never raises ``NoTissueError``: ``plan.qc.zero_tissue`` is True when no tile is
        kept.

    Raises:
        UnknownMppError: the slide states no mpp and ``params`` gives no override or default.
        InvalidMppError: the override or default is not a positive number.
        SlideTooLargeError: the slide declares internal tiles, a thumbnail level or a grid larger
            than xmag reads (checked before reading them).
        ReadBudgetError: the thumbnail took longer than ``timeout_s``.
        JobCanceledError: ``should_cancel()`` returned True.
        RegionReadError: the thumbnail could not be decoded.
    """

    def check(stage: str) -> None:
        if should_cancel is not None and should_cancel():
            raise JobCanceledError(
                f"{reader.path}: canceled before the {stage}.", path=reader.path, stage=stage
            )

    check("plan")
    reader.check_segment_sizes()
    mpp = resolve_mpp(reader, override=params.mpp_override, default=params.default_mpp)
    level = choose_level(reader, mpp.mpp, params.target_mpp)
    level = choose_decode(reader, level, params.tile_px, params.decode)
    tissue = detect_tissue(
        reader,
        method=params.tissue_detector,
        level0_mpp=mpp.mpp,
        should_cancel=should_cancel,
        timeout_s=timeout_s,
    )
    check("grid")
    grid = build_grid(reader.dimensions, mpp.mpp, tissue, params)
    qc = build_qc(
        mpp=mpp, level=level, tissue=tissue, grid=grid, colour_correction=reader.colour_correction
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
