"""Real tiles for the parity checks, collected exactly as the engine reads them.

Slides go through the core's one tile path, ``xmag.tiles.SlideTiles`` (``plan_slide`` at the
card's tile size and mpp, then ``iter_tile_batches`` of kept tiles, spread evenly over the grid);
single tile images (e.g. NCT-CRC-HE patches) are area-resized to the tile size. Comparing the
variants on them is ``model_export.parity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model_export.errors import ExportError
from xmag.errors import SlideError
from xmag.params import SlideOptions, TilingParams
from xmag.tiles import SlideTiles

__all__ = ["DEFAULT_TILES_PER_SLIDE", "ParityTiles", "collect_parity_tiles"]

DEFAULT_TILES_PER_SLIDE = 16
_PATCH_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ParityTiles:
    """Real tiles for parity checks.

    Attributes:
        pixels: (n, tile_px, tile_px, 3) uint8 RGB at the target mpp.
        sources: n labels, ``<file name>#<grid index>`` or ``<file name>`` for patch images.
        bags: bag name (slide file name) -> row indices into ``pixels``; heads run per bag.
        skipped: file -> why it gave no tile (error code and message, or "no tissue").
    """

    pixels: np.ndarray
    sources: tuple[str, ...]
    bags: dict[str, list[int]]
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def collect_parity_tiles(
    slides: Sequence[Path],
    *,
    tile_px: int,
    target_mpp: float,
    patches: Sequence[Path] = (),
    tiles_per_slide: int = DEFAULT_TILES_PER_SLIDE,
    options: SlideOptions | None = None,
) -> ParityTiles:
    """Read real tiles as the engine does: the core's ``SlideTiles`` at the card's tile size and
    mpp (``plan_slide``, then ``iter_tile_batches`` of kept tiles).

    Args:
        slides: slide files (or DICOM folders); slides the core refuses are listed in
            ``skipped`` with their error code, since a parity set only needs some real tissue.
        tile_px: the model's tile side in pixels.
        target_mpp: the model's um/px.
        patches: single tile images (any size, area-resized to ``tile_px``); a folder means
            every image in it.
        tiles_per_slide: at most this many kept tiles per slide, spread evenly over the grid.
        options: per-slide options of the core (e.g. ``default_mpp`` for slides that state no
            mpp, which are skipped otherwise).

    Raises:
        ExportError: no tile at all could be read (the parity check would prove nothing).
    """
    pixels: list[np.ndarray] = []
    sources: list[str] = []
    bags: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    chosen = (options or SlideOptions()).model_dump(exclude_none=True)
    params = TilingParams(tile_px=tile_px, target_mpp=target_mpp, **chosen)
    for slide in slides:
        try:
            tiles = _slide_tiles(Path(slide), params, tiles_per_slide)
        except SlideError as exc:  # recorded in the report, never hidden
            skipped[Path(slide).name] = f"{exc.code}: {exc.message}"
            continue
        if not tiles:
            skipped[Path(slide).name] = "no tissue tile at this mpp"
            continue
        rows = bags.setdefault(Path(slide).name, [])
        for label, tile in tiles:
            rows.append(len(pixels))
            pixels.append(tile)
            sources.append(label)
    patch_files = _expand_patches(patches)
    if patch_files:
        rows = bags.setdefault("patches", [])
        for path in patch_files:
            rows.append(len(pixels))
            pixels.append(_load_patch(path, tile_px))
            sources.append(path.name)
    if not pixels:
        raise ExportError(
            "no tile could be read for the parity check (slides: "
            f"{', '.join(map(str, slides)) or 'none'}; skipped: {skipped}); give slides with "
            "tissue and a known mpp, or --parity-patches.",
            reason="parity_tiles",
        )
    return ParityTiles(np.stack(pixels), tuple(sources), bags, skipped)


def _slide_tiles(
    path: Path, params: TilingParams, tiles_per_slide: int
) -> list[tuple[str, np.ndarray]]:
    """Up to ``tiles_per_slide`` kept tiles, evenly spread over the grid (deterministic)."""
    with SlideTiles.open(path, params) as slide:
        kept = slide.plan.grid.kept_indices()
        if len(kept) > tiles_per_slide:
            kept = kept[np.linspace(0, len(kept) - 1, tiles_per_slide).round().astype(int)]
        pixels = slide.pixels(kept)
    return [(f"{path.name}#{int(i)}", tile) for i, tile in zip(kept, pixels, strict=True)]


def _expand_patches(patches: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, patches):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in _PATCH_SUFFIXES))
        else:
            out.append(p)
    return out


def _load_patch(path: Path, tile_px: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"parity patch {path} is not a readable image ({exc}).",
            reason="parity_tiles",
            path=path,
        ) from exc
    if rgb.shape[:2] != (tile_px, tile_px):
        rgb = cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)
