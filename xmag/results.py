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
from pydantic.dataclasses import dataclass as pydantic_dataclass

from xmag.digest import SlideDigest
from xmag.level import LevelChoice
from xmag.mpp import MppInfo
from xmag.params import SlideOptions, TilingParams
from xmag.plan import SlideInfo
from xmag.qc import SlideQC
from xmag.readers.base import LevelInfo

if TYPE_CHECKING:
    from xmag.plan import SlidePlan

__all__ = [
    "CASCADE_FILES",
    "RESULT_FILES",
    "RESULT_SCHEMA_VERSION",
    "SCHEMA_FILES",
    "Artifacts",
    "CascadeOut",
    "CascadeRegion",
    "EmbedOutcome",
    "EmbedReport",
    "ErrorInfo",
    "HeadPrediction",
    "InspectReport",
    "ModelRef",
    "SlideIdentity",
    "SlideResult",
    "TilesOut",
    "TissueOut",
    "describe_plan",
    "slide_identity",
    "write_schemas",
]

RESULT_SCHEMA_VERSION = 1  # bump on any incompatible change of SlideResult


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SlideIdentity(SlideInfo):
    """result.json's ``slide``: the slide as its reader saw it, plus its bytes' digest.

    Attributes:
        name: the file name as the caller knows it (an upload's name, else the path's).
        size_bytes: bytes of the file, or of every file of a folder.
        sha256: sha256 of the bytes (a folder: its files in name order), what names the result.
    """

    name: str
    size_bytes: int
    sha256: str


class TissueOut(_Out):
    method: str
    downsample: float = Field(description="level-0 pixels per mask pixel")
    mask_shape: tuple[int, int] = Field(description="(height, width) of the mask")
    area_mm2: float


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


#: The files of one result and their media types (result.json is written last).
RESULT_FILES: dict[str, str] = {
    "features.h5": "application/x-hdf5",
    "heatmap.png": "image/png",
    "tiles.geojson": "application/geo+json",
    "cells.geojson": "application/geo+json",
    "cascade_heatmap.png": "image/png",
    "result.json": "application/json",
}
#: The files only a model with a cascade writes (``xmag.cascade``).
CASCADE_FILES: tuple[str, ...] = ("cells.geojson", "cascade_heatmap.png")


class Artifacts(_Out):
    features: str = "features.h5"
    heatmap: str = "heatmap.png"
    geojson: str = "tiles.geojson"
    heatmap_values: str = Field(description="what the heatmap colours: 'attention:<head>' ...")
    cells: str | None = Field(
        default=None,
        description="cells.geojson: nuclei of the regions read by the cascade (QuPath "
        "detections, level-0 pixels); None without a cascade",
    )
    cascade_heatmap: str | None = Field(
        default=None,
        description="cascade_heatmap.png: the cascade's sentences coloured by region attention, "
        "regions read outlined; None without a cascade",
    )


class CascadeRegion(_Out):
    """One region the cascade read at cell resolution, and why it was picked."""

    rank: int = Field(ge=1, description="1 = the highest value of the selection rule")
    level0_box: tuple[int, int, int, int] = Field(
        description="(x, y, width, height) in level-0 pixels, as read (origin on the level's grid)"
    )
    value: float = Field(description="the selection rule's value of the 5x tile it was centred on")
    grid_index: int = Field(description="that tile's index in the 5x grid")
    cells: int = Field(description="nuclei detected in it (after max_cells_per_region)")


class CascadeOut(_Out):
    """result.json's ``cascade``: the cell-level model run after the 5x pass."""

    kind: Literal["celleconet"] = "celleconet"
    task: str
    rule: str = Field(
        description="selection: 'tile_head:<head>:<label>', 'slide_attention:<head>' "
        "or 'tissue' (tile tissue fraction)"
    )
    k: int = Field(description="regions asked for (the card's K)")
    size_um: float = Field(description="side of a region in um")
    read_mpp: float = Field(description="um/px of the pixels the detector saw")
    level: LevelChoice = Field(description="the pyramid level the regions were read from")
    regions: list[CascadeRegion]
    cells: int = Field(description="nuclei detected in all regions")
    cell_types: dict[str, int] = Field(description="cells per coarse type")
    sentences: int = Field(description="sentences (squares of cells) the context model read")
    cells_in_sentences: int
    risk: float | None = Field(description="log relative hazard (None: no sentence to read)")
    probability: float | None = Field(
        description="probability of recurrence within horizon_years (None: no sentence)"
    )
    horizon_years: float
    warnings: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(
        description="seconds: read, detect (summed over workers), "
        "model, write; wall: the whole cascade"
    )


class SlideResult(_Out):
    """``result.json``: one slide through one model."""

    schema_version: Literal[1] = 1  # RESULT_SCHEMA_VERSION
    code_version: str
    created_at: datetime
    duration_s: float = Field(description="wall time of the call that produced this result")
    cache_hit: bool = Field(
        default=False,
        description="answered from the result store by this call, not computed (timings and "
        "duration_s are then those of the run that computed it)",
    )
    result_key: str = Field(
        description="the result's identity key (xmag.store.ResultIdentity): sha256 over the "
        "slide's sha256, the model's checksums and variant, the tiling parameters and the code "
        "version"
    )
    slide: SlideIdentity
    mpp: MppInfo
    level: LevelChoice
    params: TilingParams
    options: SlideOptions
    tissue: TissueOut
    qc: SlideQC
    tiles: TilesOut
    model: ModelRef
    provider: str = Field(description="execution provider that ran the encoder (cpu, cuda...)")
    providers: list[str] = Field(description="providers the session held, in order")
    slide_embedding: list[float] = Field(description="mean of the tile embeddings, [dim]")
    predictions: list[HeadPrediction]
    artifacts: Artifacts
    timings: dict[str, float] = Field(description="seconds per stage (stages do not overlap)")
    cascade: CascadeOut | None = Field(
        default=None, description="the cell-level cascade, for models that have one"
    )


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
    levels: list[LevelInfo] = Field(default_factory=list)
    mpp: MppInfo | None = None
    level: LevelChoice | None = None
    params: TilingParams | None = None
    tissue: TissueOut | None = None
    tiles: TilesOut | None = None
    qc: SlideQC | None = None


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


# -- from the core's plan ---------------------------------------------------------------------
def slide_identity(info: SlideInfo, digest: SlideDigest, name: str | None = None) -> SlideIdentity:
    """``SlideIdentity`` from what the reader saw and the bytes' digest."""
    fields = {f: getattr(info, f) for f in SlideInfo.__dataclass_fields__}
    return SlideIdentity(
        **fields,
        name=name or Path(info.path).name,
        size_bytes=digest.size_bytes,
        sha256=digest.sha256,
    )


def describe_plan(plan: SlidePlan) -> dict[str, Any]:
    """The ``mpp``, ``level``, ``tissue``, ``qc`` and ``tiles`` fields from a ``SlidePlan``."""
    g = plan.grid
    return {
        "mpp": plan.mpp,
        "level": plan.level,
        "tissue": TissueOut(
            method=plan.tissue.method,
            downsample=float(plan.tissue.downsample),
            mask_shape=(int(plan.tissue.mask.shape[0]), int(plan.tissue.mask.shape[1])),
            area_mm2=float(plan.qc.tissue_area_mm2),
        ),
        "qc": plan.qc,
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
    schema = model.model_json_schema(mode="serialization")
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


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
