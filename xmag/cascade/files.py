"""The cascade's files: cells.geojson (QuPath detections) and cascade_heatmap.png.

cells.geojson: every nucleus of the regions read, level-0 pixel coordinates, QuPath classes and
``FEATURE_NAMES`` measurements (``CellTable.to_geojson``), plus the model's reading of it:
``CellEcoNet: word``, ``CellEcoNet: cell attention`` (within its sentence, sums to 1 per
sentence), ``CellEcoNet: slide attention`` (region attention x cell attention: how much the
cell weighs in the slide's risk) and ``CellEcoNet: region rank`` (which region it was read in).
Cells left out of every sentence (beyond ``max_cells``, or in a square with too few cells) have
no attention measurements. QuPath can colour detections by any of them.

cascade_heatmap.png: the slide thumbnail with each sentence square coloured by its region
attention and the regions read outlined (red), drawn by ``xmag.outputs.heatmap``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from xmag.outputs.geojson import write_geojson
from xmag.outputs.heatmap import render_heatmap, write_heatmap
from xmag.plan import SlidePlan

if TYPE_CHECKING:
    from xmag.cascade.runner import CascadeOutcome

__all__ = ["CELLS_FILE", "HEATMAP_FILE", "write_cascade_files"]

CELLS_FILE = "cells.geojson"
HEATMAP_FILE = "cascade_heatmap.png"
_REGION_RGB = (230, 30, 30)


def cells_geojson(outcome: CascadeOutcome) -> dict:
    """The FeatureCollection of cells.geojson (see the module docstring)."""
    table = outcome.cells
    collection = table.to_geojson(outcome.level0_mpp)
    # each cell's region: its centre inside a region box (level-0 px)
    centres = table.level0_xy_px(outcome.level0_mpp)
    rank = np.zeros(len(table), np.int64)
    for r in outcome.result.regions:
        x, y, w, h = r.level0_box
        inside = (
            (centres[:, 0] >= x)
            & (centres[:, 0] < x + w)
            & (centres[:, 1] >= y)
            & (centres[:, 1] < y + h)
        )
        rank[inside & (rank == 0)] = r.rank
    for i, feature in enumerate(collection["features"]):
        m = feature["properties"]["measurements"]
        m["CellEcoNet: word"] = int(outcome.words[i])
        m["CellEcoNet: region rank"] = int(rank[i])
        for name, values in (
            ("CellEcoNet: cell attention", outcome.cell_attention),
            ("CellEcoNet: slide attention", outcome.slide_attention),
        ):
            v = float(values[i])
            if math.isfinite(v):
                m[name] = v
    return collection


def cascade_heatmap(plan: SlidePlan, outcome: CascadeOutcome) -> np.ndarray:
    """(h, w, 3) uint8 RGB: sentences by region attention, regions read outlined."""
    thumb = np.ascontiguousarray(plan.tissue.thumbnail).copy()
    ds = float(plan.tissue.downsample)
    for r in outcome.result.regions:
        x, y, w, h = r.level0_box
        p0 = (round(x / ds), round(y / ds))
        p1 = (round((x + w) / ds), round((y + h) / ds))
        cv2.rectangle(thumb, p0, p1, _REGION_RGB, thickness=max(1, round(max(thumb.shape) / 400)))
    sent = outcome.sentences
    side_um = float(sent.side_um.max()) if sent.n_regions else float(outcome.result.size_um)
    coords = (sent.centre_um.astype(np.float64) - side_um / 2.0) / outcome.level0_mpp
    return render_heatmap(
        thumb,
        ds,
        plan.tissue.mask,
        coords,
        side_um / outcome.level0_mpp,
        outcome.region_attention,
        f"{outcome.result.task}: region attention ({outcome.sentences.n_regions} sentences, "
        f"{len(outcome.result.regions)} regions read)",
    )


def write_cascade_files(out_dir: Path, plan: SlidePlan, outcome: CascadeOutcome) -> dict[str, str]:
    """Write cells.geojson and cascade_heatmap.png into ``out_dir``; returns the artifacts'
    fields (``Artifacts.cells``, ``Artifacts.cascade_heatmap``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_geojson(out_dir / CELLS_FILE, cells_geojson(outcome))
    write_heatmap(out_dir / HEATMAP_FILE, cascade_heatmap(plan, outcome))
    return {"cells": CELLS_FILE, "cascade_heatmap": HEATMAP_FILE}
