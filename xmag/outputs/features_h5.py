"""features.h5 in the layout CLAM and TRIDENT read.

    /features   [N, D] float32   tile embeddings, kept tiles in grid order
    /coords     [N, 2] int64     top-left (x, y) of each tile in level-0 pixels
    /grid_index [N]    int64     index of each tile in the slide's full grid (xmag extra)
    /scores/<head>     [N, C] float32  per-tile probabilities of a tile head (xmag extra)
    /attention/<head>  [N]    float32  per-tile attention of a slide head (xmag extra)

Attributes (on ``coords`` and on the file root, as TRIDENT sets them): ``patch_size`` (tile side
in pixels at the target mpp, the model input), ``patch_size_level0`` (tile side in level-0
pixels), ``patch_level`` (pyramid level read), ``mpp`` (level-0 um/px), ``target_mpp`` (um/px of
the tiles), ``level0_width``/``level0_height``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xmag.outputs._atomic import atomic_write

__all__ = ["read_features", "write_features"]


def write_features(
    path: str | Path,
    *,
    features: np.ndarray,
    coords: np.ndarray,
    grid_index: np.ndarray,
    tile_px: int,
    level0_tile_px: float,
    patch_level: int,
    mpp: float,
    target_mpp: float,
    level0_size: tuple[int, int],
    scores: Mapping[str, np.ndarray] | None = None,
    attention: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write tile embeddings and level-0 coordinates atomically.

    Args:
        features: (N, D) tile embeddings (stored float32).
        coords: (N, 2) top-left (x, y) of each tile in level-0 pixels.
        grid_index: (N,) index of each tile in the grid arrays.
        tile_px: tile side in pixels at ``target_mpp``.
        level0_tile_px: tile side in level-0 pixels (stored rounded).
        patch_level: pyramid level read.
        mpp: level-0 um/px; target_mpp: um/px of the tiles.
        level0_size: slide (width, height) in level-0 pixels.
        scores: tile head name -> (N, C) probabilities.
        attention: slide head name -> (N,) attention weights.
    """
    n = features.shape[0]
    if coords.shape != (n, 2) or grid_index.shape != (n,):
        raise ValueError(
            f"features {features.shape}, coords {coords.shape} and grid_index "
            f"{grid_index.shape} disagree on N"
        )
    attrs: dict[str, Any] = {
        "patch_size": int(tile_px),
        "patch_size_level0": round(level0_tile_px),
        "patch_level": int(patch_level),
        "mpp": float(mpp),
        "target_mpp": float(target_mpp),
        "level0_width": int(level0_size[0]),
        "level0_height": int(level0_size[1]),
    }
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        f.create_dataset("grid_index", data=np.asarray(grid_index, dtype=np.int64))
        for key, value in attrs.items():
            ds.attrs[key] = value
            f.attrs[key] = value
        for name, arr in (scores or {}).items():
            f.create_dataset(f"scores/{name}", data=np.asarray(arr, dtype=np.float32))
        for name, arr in (attention or {}).items():
            f.create_dataset(f"attention/{name}", data=np.asarray(arr, dtype=np.float32))
    return Path(path)


def read_features(path: str | Path) -> dict[str, Any]:
    """Load features.h5 into memory: arrays by dataset path plus ``attrs`` (root attributes)."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(visit)
        out["attrs"] = dict(f.attrs)
    return out
