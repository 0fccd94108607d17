"""One slide's result files from its plan, tile embeddings and head outputs.

    features.h5    embeddings, level-0 coordinates, per-tile scores and attention (CLAM/TRIDENT)
    heatmap.png    the thumbnail with a slide head's attention, a tile head's score, or the cosine
                   to the slide embedding coloured over the tissue
    tiles.geojson  one QuPath polygon per tile with its scores

(result.json is the engine's, written last.) Imported as ``xmag.outputs.slide_files``: the
writers below it know nothing of plans; this module ties them to the pipeline's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from xmag.heads import HeadOutputs
from xmag.outputs.features_h5 import write_features
from xmag.outputs.geojson import tile_features_geojson, write_geojson
from xmag.outputs.heatmap import render_heatmap, write_heatmap
from xmag.pipeline import PipelineRun
from xmag.plan import SlidePlan
from xmag.results import Artifacts

__all__ = ["TileLabels", "heatmap_values", "write_slide_files"]

#: tile head name -> its labels, in the order of its probability columns.
TileLabels = Mapping[str, Sequence[str]]


def write_slide_files(
    out_dir: Path, plan: SlidePlan, run: PipelineRun, heads: HeadOutputs, tile_labels: TileLabels
) -> Artifacts:
    """Write features.h5, heatmap.png and tiles.geojson of one slide into ``out_dir``.

    Args:
        tile_labels: tile head -> its labels (names the columns of ``heads.tile_probs``).

    Returns:
        The ``artifacts`` entry of result.json (what the heatmap colours).
    """
    tile_probs, attention = heads.tile_probs, heads.attention
    out_dir.mkdir(parents=True, exist_ok=True)
    level0_tile = float(plan.grid.level0_tile)
    dims = tuple(int(v) for v in plan.slide.dimensions)
    write_features(
        out_dir / "features.h5",
        features=run.embeddings,
        coords=run.level0_xy,
        grid_index=run.grid_index,
        tile_px=plan.grid.tile_px,
        level0_tile_px=level0_tile,
        patch_level=plan.level.level,
        mpp=plan.mpp.mpp,
        target_mpp=plan.grid.target_mpp,
        level0_size=(dims[0], dims[1]),
        scores=tile_probs,
        attention=attention,
    )
    values, what, title = heatmap_values(run.embeddings, heads, tile_labels)
    image = render_heatmap(
        plan.tissue.thumbnail,
        float(plan.tissue.downsample),
        plan.tissue.mask,
        run.level0_xy,
        level0_tile,
        values,
        title,
    )
    write_heatmap(out_dir / "heatmap.png", image)
    labelled = {n: (list(tile_labels[n]), p) for n, p in tile_probs.items()}
    collection = tile_features_geojson(
        run.level0_xy,
        level0_tile,
        (dims[0], dims[1]),
        grid_index=run.grid_index,
        scores=labelled,
        attention=attention,
    )
    write_geojson(out_dir / "tiles.geojson", collection)
    return Artifacts(heatmap_values=what)


def heatmap_values(
    embeddings: np.ndarray, heads: HeadOutputs, tile_labels: TileLabels
) -> tuple[np.ndarray, str, str]:
    """What the heatmap colours: a slide head's attention, else a tile head's last label,
    else each tile's cosine similarity to the slide embedding.

    Returns (values [N], machine name for result.json, title printed on the picture).
    """
    if heads.attention:
        name, att = next(iter(heads.attention.items()))
        return att, f"attention:{name}", f"attention of slide head '{name}'"
    if heads.tile_probs:
        name, p = next(iter(heads.tile_probs.items()))
        label = tile_labels[name][-1]
        return p[:, -1], f"{name}:{label}", f"tile head '{name}': p({label})"
    mean = embeddings.mean(axis=0)
    norms = np.linalg.norm(embeddings, axis=1) * max(float(np.linalg.norm(mean)), 1e-12)
    cos = embeddings @ mean / np.maximum(norms, 1e-12)
    return cos, "cosine:slide_embedding", "cosine similarity to the slide embedding"
