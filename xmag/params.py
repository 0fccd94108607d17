"""Per-slide options and tiling parameters: what a caller and a model ask of the slide.

``SlideOptions`` is the one options model: the CLI builds it from its flags, the REST API takes
it as a job's ``options`` (it is the OpenAPI schema), and the engine merges it with the package
card's input into ``TilingParams`` (``ModelCard.tiling_params``), which is part of every result's
provenance and identity. The option fields' types and bounds are defined once below and shared by
both models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_TARGET_MPP",
    "DEFAULT_TILE_PX",
    "DEFAULT_TISSUE_THRESHOLD",
    "DecodeMode",
    "SlideOptions",
    "TilingParams",
]

DEFAULT_TILE_PX = 224  # XMAG student input, pixels at the target mpp
DEFAULT_TARGET_MPP = 2.0  # um/px, "5x"
DEFAULT_TISSUE_THRESHOLD = 0.25  # fraction of a tile that must be tissue to keep it
MAX_MPP_UM = 100.0  # um/px: coarser than any slide scanner (a 0.1x overview)

#: Level-0 microns per pixel given by a caller.
MppUm = Annotated[float, Field(gt=0, le=MAX_MPP_UM)]
#: Fraction of a tile's area that must be tissue to keep the tile.
TissueFraction = Annotated[float, Field(ge=0.0, le=1.0)]
_MPP_OVERRIDE = "level-0 um/px to use instead of the slide's metadata"
_DEFAULT_MPP = "level-0 um/px to assume when the slide states none (else UNKNOWN_MPP)"
_TISSUE_DETECTOR = "tissue detector by name (xmag.tissue.registered_detectors()), or auto"
_DECODE = (
    "how tile pixels are decoded: auto (when a tile's read is downsampled, JPEG tiles decoded "
    "straight from the file at 1/2, 1/4 or 1/8 scale: within about 1 grey level of exact on "
    "average, 5x faster from a 40x slide) or exact (the reader's read_region and an area resize)"
)

#: Tile decode path: "auto" lets the reader decode JPEG tiles at a reduced scale (xmag.level
#: ``choose_decode``), "exact" always reads regions and resizes them.
DecodeMode = Literal["auto", "exact"]


def _registered_detector(name: str) -> str:
    from xmag.tissue import registered_detectors  # here, not above: xmag.tissue imports OpenCV

    if name != "auto" and name not in registered_detectors():
        raise ValueError(f"choose one of {', '.join(('auto', *registered_detectors()))}")
    return name


def _detector_enum(schema: dict[str, Any]) -> None:
    from xmag.tissue import registered_detectors

    schema["enum"] = ["auto", *registered_detectors()]  # docs and the API list the registry


#: A tissue detector's registry name, or "auto" (by the slide's guessed modality).
TissueDetectorName = Annotated[
    str, AfterValidator(_registered_detector), Field(json_schema_extra=_detector_enum)
]


class SlideOptions(BaseModel):
    """Per-slide options a caller may set (CLI flags, a job's ``options``); None: the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mpp_override: MppUm | None = Field(default=None, description=_MPP_OVERRIDE)
    default_mpp: MppUm | None = Field(default=None, description=_DEFAULT_MPP)
    tissue_threshold: TissueFraction | None = Field(
        default=None,
        description="fraction of a tile that must be tissue to keep it (default: the model's)",
    )
    tissue_detector: TissueDetectorName | None = Field(default=None, description=_TISSUE_DETECTOR)
    decode: DecodeMode | None = Field(default=None, description=_DECODE)


class TilingParams(BaseModel):
    """How a slide is cut into model inputs. Usually derived from a model card's input spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tile_px: int = Field(
        DEFAULT_TILE_PX, ge=16, le=4096, description="tile side in pixels at target_mpp"
    )
    target_mpp: float = Field(DEFAULT_TARGET_MPP, gt=0, le=100, description="um/px the model reads")
    overlap_px: int = Field(
        0, ge=0, description="overlap between neighbouring tiles, pixels at target_mpp"
    )
    tissue_threshold: TissueFraction = Field(
        DEFAULT_TISSUE_THRESHOLD, description="minimum tissue fraction to keep a tile"
    )
    tissue_detector: TissueDetectorName = Field("auto", description=_TISSUE_DETECTOR)
    mpp_override: MppUm | None = Field(None, description=_MPP_OVERRIDE)
    default_mpp: MppUm | None = Field(None, description=_DEFAULT_MPP)
    decode: DecodeMode = Field("auto", description=_DECODE)

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingParams:
        # A tile overlapping its neighbour by its whole size would give a stride of 0 (or less).
        if self.overlap_px >= self.tile_px:
            raise ValueError(
                f"overlap_px ({self.overlap_px}) must be smaller than tile_px ({self.tile_px})"
            )
        return self

    @property
    def stride_px(self) -> int:
        """Distance between tile origins, pixels at target_mpp (always >= 1)."""
        return self.tile_px - self.overlap_px
