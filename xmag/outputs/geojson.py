"""tiles.geojson: a FeatureCollection QuPath imports (File > Import objects).

One Polygon ``Feature`` per kept tile, in level-0 pixels (QuPath's image frame), its ring closed
and clipped to the slide. Properties: ``objectType: "tile"`` (QuPath creates tile objects),
``tile_index`` (row in features.h5), ``grid_index``, ``measurements`` (a flat name -> number map
QuPath shows in its measurement table: every head score and attention weight), and a
``classification`` (``{"name", "color"}``) from the first tile head that has labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmag.outputs._atomic import atomic_write

__all__ = ["LABEL_COLORS", "tile_features_geojson", "write_geojson"]

# QuPath classification colours (RGB), cycled over a head's labels.
LABEL_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def tile_features_geojson(
    coords: np.ndarray,
    level0_tile_px: float,
    level0_size: tuple[int, int],
    *,
    grid_index: np.ndarray,
    scores: Mapping[str, tuple[Sequence[str], np.ndarray]] | None = None,
    attention: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Build the FeatureCollection.

    Args:
        coords: (N, 2) top-left (x, y) of each tile in level-0 pixels.
        level0_tile_px: tile side in level-0 pixels.
        level0_size: slide (width, height) in level-0 pixels; rings are clipped to it.
        grid_index: (N,) index of each tile in the full grid.
        scores: tile head -> (labels, (N, C) probabilities); the first one classifies tiles.
        attention: slide head -> (N,) attention weights.
    """
    w0, h0 = level0_size
    side = float(level0_tile_px)
    scores = scores or {}
    attention = attention or {}
    first_head = next(iter(scores.items()), None)
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, dtype=np.float64)):
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(w0), x + side), min(float(h0), y + side)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        measurements: dict[str, float] = {}
        for head, (labels, probs) in scores.items():
            for j, label in enumerate(labels):
                measurements[f"{head}: {label}"] = round(float(probs[i, j]), 6)
        for head, att in attention.items():
            measurements[f"{head}: attention"] = float(att[i])
        props: dict[str, Any] = {
            "objectType": "tile",
            "tile_index": i,
            "grid_index": int(grid_index[i]),
            "measurements": measurements,
        }
        if first_head is not None:
            labels, probs = first_head[1]
            k = int(np.argmax(probs[i]))
            props["classification"] = {
                "name": str(labels[k]),
                "color": list(LABEL_COLORS[k % len(LABEL_COLORS)]),
            }
        features.append(
            {
                "type": "Feature",
                "id": f"tile-{i}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically (compact JSON: a slide can have thousands of tiles)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")), encoding="utf-8")
    return Path(path)
