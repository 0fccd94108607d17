"""Stage 2b: which pyramid level to read for a target mpp, and how much to resample it.

Reads the level closest to the target from above (finer or equal), never level 0 when a closer
level exists, so a 40x slide at 2.0 um/px reads its 1.0 um/px level and halves it instead of
decoding 64x the pixels at level 0.

``choose_decode`` then picks how that level's pixels are decoded for tiles: ``"region"`` (the
reader's ``read_region`` and an area resize, the exact reference) or ``"jpeg-dct-1/n"`` (the
level's JPEG tiles decoded straight from the file at 1/n scale by libjpeg's DCT-domain scaling,
which does most of the resize for a fraction of the decode; ``xmag.tiles`` says per tile).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from xmag.params import DecodeMode
from xmag.readers.base import SlideReader

__all__ = [
    "LEVEL_MATCH_TOLERANCE",
    "REGION_DECODE",
    "LevelChoice",
    "choose_decode",
    "choose_level",
    "decode_reduce",
]

REGION_DECODE = "region"  # LevelChoice.decode of the reference path (read_region + resize)
_JPEG_DCT = "jpeg-dct-1/"
DECODE_PATTERN = r"^(region|jpeg-dct-1/[1248])$"  # the values of LevelChoice.decode
_WHOLE_DOWNSAMPLE_TOL = 1e-9

LEVEL_MATCH_TOLERANCE = 0.02  # a level within 2% of the target is read as-is (no resampling)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class LevelChoice:
    """The level read for a target mpp (also result.json's ``level``).

    Attributes:
        level: pyramid level index read.
        level_downsample: level-0 pixels per pixel of that level.
        level_mpp: um/px of that level.
        resample_factor: level pixels per target pixel (>= 1 means downsample; 1.0 means none).
        decode: how tile pixels are decoded: ``"region"`` (``read_region`` then the resize: the
            reference), or ``"jpeg-dct-1/n"`` (the level's JPEG tiles decoded at 1/n scale,
            then the remaining resize; a tile whose read does not fall on whole pixels of that
            scale is decoded at the next finer scale that it does, one the reader cannot decode
            this way is read as ``"region"``). See ``choose_decode``.
    """

    level: int
    level_downsample: float
    level_mpp: float
    target_mpp: float
    resample_factor: float
    decode: Annotated[str, Field(pattern=DECODE_PATTERN)] = REGION_DECODE

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


def decode_reduce(level: LevelChoice) -> int:
    """The 1/n scale of ``level.decode`` ("jpeg-dct-1/n"); 0 for the ``"region"`` path."""
    if level.decode.startswith(_JPEG_DCT):
        return int(level.decode[len(_JPEG_DCT) :])
    return 0


def choose_decode(
    reader: SlideReader, level: LevelChoice, tile_px: int, mode: DecodeMode
) -> LevelChoice:
    """``level`` with the tile decode path chosen (``LevelChoice.decode``).

    ``mode="exact"`` keeps ``"region"``. ``mode="auto"`` asks the reader which 1/n scales it
    decodes the level at (``SlideReader.decode_scales``) and takes the coarsest n that divides a
    tile's read (``level.read_px(tile_px)``) and still leaves at least ``tile_px`` pixels, so
    the remaining resize is a small area resize or none (a 40x slide read at 5x from its 1 um/px
    level: n = 2, no resize; a native 5x level: n = 1, the JPEG tiles decoded whole, the same
    pixels as ``read_region`` without the adapter's ARGB conversion and copies). A level the
    reader cannot decode directly, or one whose downsample is not a whole number, keeps
    ``"region"``.

    Args:
        reader: the open slide.
        level: the level chosen for the target (``choose_level``).
        tile_px: side of a tile at the target mpp, pixels.
        mode: ``TilingParams.decode``.
    """
    ds = level.level_downsample
    if mode == "exact" or abs(ds - round(ds)) > _WHOLE_DOWNSAMPLE_TOL:
        # A fractional downsample puts most tile origins between two pixels of the level, where
        # libraries interpolate: only read_region gives the reference there.
        return dataclasses.replace(level, decode=REGION_DECODE)
    scales = reader.decode_scales(level.level)
    read_px = level.read_px(tile_px)
    # Scale 1 pays too: on a native 5x level of a generated 20x slide a whole-tile decode gives
    # read_region's pixels at 2.3-2.6x its tiles/s (benchmarks/bench_decode.py).
    usable = [n for n in scales if read_px % n == 0 and read_px // n >= tile_px]
    if not usable:
        return dataclasses.replace(level, decode=REGION_DECODE)
    return dataclasses.replace(level, decode=f"{_JPEG_DCT}{max(usable)}")
