"""Stage 2b: which pyramid level to read for a target mpp, and how much to resample it.

Reads the level closest to the target from above (finer or equal), never level 0 when a closer
level exists, so a 40x slide at 2.0 um/px reads its 1.0 um/px level and halves it instead of
decoding 64x the pixels at level 0.
"""

from __future__ import annotations

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from xmag.readers.base import SlideReader

__all__ = ["LEVEL_MATCH_TOLERANCE", "LevelChoice", "choose_level"]

LEVEL_MATCH_TOLERANCE = 0.02  # a level within 2% of the target is read as-is (no resampling)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class LevelChoice:
    """The level read for a target mpp (also result.json's ``level``).

    Attributes:
        level: pyramid level index read.
        level_downsample: level-0 pixels per pixel of that level.
        level_mpp: um/px of that level.
        resample_factor: level pixels per target pixel (>= 1 means downsample; 1.0 means none).
    """

    level: int
    level_downsample: float
    level_mpp: float
    target_mpp: float
    resample_factor: float

    def read_px(self, target_px: int) -> int:
        """Pixels to read at the chosen level to produce ``target_px`` pixels at the target."""
        return max(1, round(target_px * self.resample_factor))


def choose_level(reader: SlideReader, level0_mpp: float, target_mpp: float) -> LevelChoice:
    """Pick the coarsest level whose mpp is at or below ``target_mpp`` (within tolerance).

    When even level 0 is coarser than the target (a 10x scan read at 5x is fine, a 2.5x scan read
    at 5x is not), level 0 is returned with ``resample_factor`` < 1: the caller upsamples and the
    QC records it.
    """
    best = reader.levels[0]
    for lv in reader.levels:
        lv_mpp = level0_mpp * lv.downsample
        if lv_mpp <= target_mpp * (1 + LEVEL_MATCH_TOLERANCE) and lv.downsample >= best.downsample:
            best = lv
    lv_mpp = level0_mpp * best.downsample
    factor = target_mpp / lv_mpp
    if abs(factor - 1.0) <= LEVEL_MATCH_TOLERANCE:
        factor = 1.0
    return LevelChoice(best.index, best.downsample, lv_mpp, target_mpp, factor)
