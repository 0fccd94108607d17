"""The typed outputs: ``result.json`` (``SlideResult``), the CLI's ``--json`` reports, and the
JSON Schemas published from them (``docs/result.schema.json``, ``docs/inspect.schema.json``,
``docs/embed.schema.json``).

Writer (engine, CLI) and readers (service, scripts) share these models; a test checks that the
committed schema files equal the generated ones, so the documentation cannot drift.
Regenerate with ``python -m xmag.results docs``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xmag.params import TilingParams

if TYPE_CHECKING:  # xmag.plan pulls in the whole pipeline; results only needs its type
    from xmag.plan import SlidePlan

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "SCHEMA_FILES",
    "Artifacts",
    "EmbedOutcome",
    "EmbedReport",
    "ErrorInfo",
    "HeadPrediction",
    "InspectReport",
    "LevelOut",
    "LevelRead",
    "ModelRef",
    "MppOut",
    "QCOut",
    "SlideIdentity",
    "SlideOptions",
    "SlideResult",
    "TilesOut",
    "TissueOut",
    "describe_plan",
    "levels_out",
    "slide_identity",
    "write_schemas",
]

RESULT_SCHEMA_VERSION = 1  # bump on any incompatible change of SlideResult


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlideOptions(BaseModel):
    """Per-slide options a caller may set (CLI flags, the service's job options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mpp_override: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="level-0 um/px to use instead of the slide's metadata",
    )
    default_mpp: float | None = Field(
        default=None, gt=0, le=100, description="level-0 um/px to assume when the slide states none"
    )
    tissue_threshold: float | None = Field(
        default=None, ge=0, le=1, description="fraction of a tile that must be tissue to keep it"
    )


class LevelOut(_Out):
    index: int
    width: int = Field(description="pixels of this level")
    height: int
    downsample: float = Field(description="level-0 pixels per pixel of this level")


class SlideIdentity(_Out):
    path: str = Field(description="where the slide was read (not part of its identity)")
    name: str
    size_bytes: int = Field(description="bytes of the file, or of every file of a folder")
    sha256: str = Field(description="sha256 of the bytes (a folder: its files in name order)")
    reader: str = Field(description="xmag reader that opened it (openslide, tiffslide...)")
    vendor: str | None
    format: str
    dimensions: tuple[int, int] = Field(description="level-0 (width, height) in pixels")
    levels: list[LevelOut]


class MppOut(_Out):
    mpp_x: float = Field(description="level-0 um/px along x")
    mpp_y: float
    mpp: float = Field(description="the isotropic level-0 um/px used for tiling")
    source: Literal["override", "metadata", "objective_power", "default"]
    detail: str = Field(description="the metadata field or the flag it came from")
    warnings: list[str] = Field(default_factory=list)


class LevelRead(_Out):
    level: int = Field(description="pyramid level read")
    level_downsample: float
    level_mpp: float = Field(description="um/px of the level read")
    target_mpp: float
    resample_factor: float = Field(description="level pixels per target pixel (1 = no resize)")


class TissueOut(_Out):
    method: str
    downsample: float = Field(description="level-0 pixels per mask pixel")
    mask_shape: tuple[int, int] = Field(description="(height, width) of the mask")
    area_mm2: float


class QCOut(_Out):
    """Quality control from the core (``xmag.qc.SlideQC``)."""

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
    modality: str = Field(description="he, ihc, fluorescence or unknown (a guess from colour)")
    modality_scores: dict[str, float]
    warnings: list[str] = Field(default_factory=list)


class TilesOut(_Out):
    kept: int
    total: int
    tile_px: int = Field(description="tile side in pixels at target_mpp")
    stride_px: int = Field(description="distance between tile origins at target_mpp")
    target_mpp: float
    level0_tile_px: float = Field(description="tile side in level-0 pixels")


class ModelRef(_Out):
    name: str
    version: str
    trained: bool
    architecture: str
    embedding_dim: int
    variant: str | None = None
    checksums: dict[str, str] = Field(description="sha256 of every package file by path")
    card_sha256: str


class HeadPrediction(_Out):
    """One head's output. Slide heads: probabilities of the slide. Tile heads: the mean of the
    tile probabilities and how many tiles each label won (per-tile values are in features.h5 and
    tiles.geojson)."""

    name: str
    level: Literal["tile", "slide"]
    kind: str
    labels: list[str]
    probabilities: dict[str, float]
    top_label: str
    tile_label_counts: dict[str, int] | None = None
    attention: bool = Field(
        default=False, description="the head returned per-tile attention weights"
    )


class Artifacts(_Out):
    features: str = "features.h5"
    heatmap: str = "heatmap.png"
    geojson: str = "tiles.geojson"
    heatmap_values: str = Field(description="what the heatmap colours: 'attention:<head>' ...")


class SlideResult(_Out):
    """``result.json``: one slide through one model."""

    schema_version: Literal[1] = 1  # RESULT_SCHEMA_VERSION
    code_version: str
    created_at: datetime
    duration_s: float = Field(description="wall time of the call that produced this result")
    cache_hit: bool = Field(
        default=False, description="returned from the result cache, not recomputed"
    )
    cache_key: str | None = None
    slide: SlideIdentity
    mpp: MppOut
    level: LevelRead
    params: TilingParams
    options: SlideOptions
    tissue: TissueOut
    qc: QCOut
    tiles: TilesOut
    model: ModelRef
    provider: str = Field(description="execution provider that ran the encoder (cpu, cuda...)")
    providers: list[str] = Field(description="providers the session held, in order")
    slide_embedding: list[float] = Field(description="mean of the tile embeddings, [dim]")
    predictions: list[HeadPrediction]
    artifacts: Artifacts
    timings: dict[str, float] = Field(description="seconds per stage (stages do not overlap)")


class ErrorInfo(_Out):
    code: str
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


class InspectReport(_Out):
    """``xmag inspect --json``: what the core sees, without running a model."""

    schema_version: Literal[1] = 1
    path: str
    ok: bool
    error: ErrorInfo | None = None
    reader: str | None = None
    vendor: str | None = None
    format: str | None = None
    dimensions: tuple[int, int] | None = None
    levels: list[LevelOut] = Field(default_factory=list)
    mpp: MppOut | None = None
    level: LevelRead | None = None
    params: TilingParams | None = None
    tissue: TissueOut | None = None
    tiles: TilesOut | None = None
    qc: QCOut | None = None


class EmbedOutcome(_Out):
    slide: str
    ok: bool
    out_dir: str | None = None
    result: SlideResult | None = None
    error: ErrorInfo | None = None


class EmbedReport(_Out):
    """``xmag embed --json``: one outcome per slide, in the order given."""

    schema_version: Literal[1] = 1
    model: str
    outcomes: list[EmbedOutcome]


# -- from the core's plan (duck-typed: xmag.plan.SlidePlan and its parts) ---------------------
def slide_identity(path: Path, info: Any, sha256: str, size_bytes: int) -> SlideIdentity:
    """``SlideIdentity`` from a ``SlideInfo`` plus the bytes' hash and size."""
    return SlideIdentity(
        path=str(path),
        name=Path(path).name,
        size_bytes=size_bytes,
        sha256=sha256,
        reader=info.reader,
        vendor=info.vendor,
        format=info.format,
        dimensions=(int(info.dimensions[0]), int(info.dimensions[1])),
        levels=levels_out(info.levels),
    )


def levels_out(levels: Any) -> list[LevelOut]:
    return [
        LevelOut(index=lv.index, width=lv.width, height=lv.height, downsample=float(lv.downsample))
        for lv in levels
    ]


def describe_plan(plan: SlidePlan) -> dict[str, Any]:
    """The ``mpp``, ``level``, ``tissue``, ``qc`` and ``tiles`` fields from a ``SlidePlan``."""
    m, c, g = plan.mpp, plan.level, plan.grid
    qc = plan.qc.to_dict()
    return {
        "mpp": MppOut(
            mpp_x=float(m.mpp_x),
            mpp_y=float(m.mpp_y),
            mpp=float(m.mpp),
            source=str(m.source),
            detail=m.detail,
            warnings=list(m.warnings),
        ),
        "level": LevelRead(
            level=c.level,
            level_downsample=float(c.level_downsample),
            level_mpp=float(c.level_mpp),
            target_mpp=float(c.target_mpp),
            resample_factor=float(c.resample_factor),
        ),
        "tissue": TissueOut(
            method=plan.tissue.method,
            downsample=float(plan.tissue.downsample),
            mask_shape=(int(plan.tissue.mask.shape[0]), int(plan.tissue.mask.shape[1])),
            area_mm2=float(plan.qc.tissue_area_mm2),
        ),
        "qc": QCOut.model_validate({k: qc[k] for k in QCOut.model_fields if k in qc}),
        "tiles": TilesOut(
            kept=g.n_kept,
            total=g.n_total,
            tile_px=g.tile_px,
            stride_px=g.stride_px,
            target_mpp=g.target_mpp,
            level0_tile_px=float(g.level0_tile),
        ),
    }


SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "result.schema.json": SlideResult,
    "inspect.schema.json": InspectReport,
    "embed.schema.json": EmbedReport,
}


def schema_text(model: type[BaseModel]) -> str:
    """The JSON Schema of ``model`` as committed (sorted keys, 2-space indent, final newline)."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schemas(out_dir: str | Path) -> list[Path]:
    """Write every published schema into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in SCHEMA_FILES.items():
        path = out / name
        path.write_text(schema_text(model), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_schemas(sys.argv[1] if len(sys.argv) > 1 else "docs"):
        print(p)
