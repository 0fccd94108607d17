"""Stage 8: files written from a slide's embeddings and scores.

    features_h5   features.h5 in the CLAM/TRIDENT layout (``features`` [N, D], ``coords`` [N, 2])
    heatmap       heatmap.png: thumbnail, tile values as colour overlay, colour bar, tissue outline
    geojson       tiles.geojson: one QuPath-importable Polygon per tile, in level-0 pixels

Every writer writes to a temporary file beside its target and renames it (``atomic_write``), so a
reader never sees a half-written file.
"""

from xmag.outputs._atomic import atomic_write
from xmag.outputs.features_h5 import read_features, write_features
from xmag.outputs.geojson import tile_features_geojson, write_geojson
from xmag.outputs.heatmap import render_heatmap, write_heatmap

__all__ = [
    "atomic_write",
    "read_features",
    "render_heatmap",
    "tile_features_geojson",
    "write_features",
    "write_geojson",
    "write_heatmap",
]
