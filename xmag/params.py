"""Tiling parameters: what a model asks of the slide. Part of every result's provenance."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_TARGET_MPP", "DEFAULT_TILE_PX", "TilingParams"]

DEFAULT_TILE_PX = 224  # XMAG student input, pixels at the target mpp
DEFAULT_TARGET_MPP = 2.0  # um/px, "5x"
DEFAULT_TISSUE_THRESHOLD = 0.25  # fraction of a tile that must be tissue to keep it


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
    tissue_threshold: float = Field(
        DEFAULT_TISSUE_THRESHOLD,
        ge=0.0,
        le=1.0,
        description="minimum tissue fraction to keep a tile",
    )
    mpp_override: float | None = Field(
        None, gt=0, description="level-0 um/px to use instead of metadata"
    )
    default_mpp: float | None = Field(
        None,
        gt=0,
        description="level-0 um/px to assume when the slide states none (else UNKNOWN_MPP)",
    )

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
