"""Which regions the cascade reads at cell resolution: K fields picked from the 5x pass.

Every kept 5x tile gets a value by the card's rule (``RegionSelection``): a tile head's
probability of a label, a slide head's attention weight, or the tile's tissue fraction. Fields of
``size_um`` are centred on the tiles with the highest values, skipping a field that would
overlap one already picked, until K are picked. Ties in value (common with tissue fractions:
most tiles are fully inside tissue) are broken by spreading the picks evenly over the tied
tiles in grid order, so K fields sample the whole section rather than its first rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmag.errors import XmagUsageError
from xmag.heads import HeadOutputs
from xmag.package import CascadeSpec, ModelCard
from xmag.plan import SlidePlan

__all__ = ["PickedRegion", "rule_name", "select_regions", "tile_values"]

_TIE_TOL = 1e-6


@dataclass(frozen=True)
class PickedRegion:
    """A field to read: its level-0 top-left and side, and why it was picked."""

    rank: int
    level0_xy: tuple[int, int]
    level0_side: int
    value: float
    grid_index: int


def rule_name(card: ModelCard, spec: CascadeSpec) -> str:
    """The selection rule as recorded in results: ``tile_head:<head>:<label>``,
    ``slide_attention:<head>`` or ``tissue``."""
    sel = spec.select
    if sel.rule == "tile_head":
        head = next(h for h in card.heads if h.name == sel.head)
        return f"tile_head:{sel.head}:{sel.label or head.labels[-1]}"
    if sel.rule == "slide_attention":
        return f"slide_attention:{sel.head}"
    return "tissue"


def tile_values(
    card: ModelCard, spec: CascadeSpec, plan: SlidePlan, grid_index: np.ndarray, heads: HeadOutputs
) -> np.ndarray:
    """(N,) float64 value of each embedded tile (``grid_index`` order) under the rule.

    Raises:
        XmagUsageError: the head the rule reads gave no output for this slide.
    """
    sel = spec.select
    if sel.rule == "tissue":
        return plan.grid.tissue_fraction[grid_index].astype(np.float64)
    if sel.rule == "tile_head":
        head = next(h for h in card.heads if h.name == sel.head)
        probs = heads.tile_probs.get(head.name)
        if probs is None:
            raise XmagUsageError(f"tile head {head.name!r} gave no probabilities")
        col = head.labels.index(sel.label) if sel.label is not None else len(head.labels) - 1
        return np.asarray(probs[:, col], np.float64)
    att = heads.attention.get(str(sel.head))
    if att is None:
        raise XmagUsageError(f"slide head {sel.head!r} gave no attention")
    return np.asarray(att, np.float64)


def _spread_order(values: np.ndarray) -> np.ndarray:
    """Indices by value, highest first; within a run of ties, evenly spread picks first."""
    order = np.argsort(-values, kind="stable")
    out: list[np.ndarray] = []
    i = 0
    while i < order.size:
        j = i
        while j + 1 < order.size and abs(values[order[j + 1]] - values[order[i]]) <= _TIE_TOL:
            j += 1
        run = order[i : j + 1]
        if run.size > 2:
            run = run[_spread(run.size)]
        out.append(run)
        i = j + 1
    return np.concatenate(out) if out else order


def _spread(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` visiting 0, n/2, n/4, 3n/4, ... (van der Corput order):
    any prefix of it is spread evenly over the range."""
    order: list[int] = []
    seen = np.zeros(n, bool)
    i = 0
    while len(order) < n and i < 4 * n:
        p = min(n - 1, int(_van_der_corput(i) * n))
        if not seen[p]:
            seen[p] = True
            order.append(p)
        i += 1
    order += np.flatnonzero(~seen).tolist()
    return np.asarray(order, np.int64)


def _van_der_corput(n: int) -> float:
    q, denom = 0.0, 1.0
    while n:
        denom *= 2
        n, bit = divmod(n, 2)
        q += bit / denom
    return q


def select_regions(
    values: np.ndarray,
    level0_xy: np.ndarray,
    grid_index: np.ndarray,
    *,
    level0_tile: float,
    level0_side: int,
    dimensions: tuple[int, int],
    k: int,
) -> list[PickedRegion]:
    """Pick at most ``k`` non-overlapping square fields of ``level0_side`` level-0 pixels.

    Args:
        values: (N,) value of each tile (higher is picked first).
        level0_xy: (N, 2) tile top-lefts in level-0 pixels.
        grid_index: (N,) the tiles' grid indices (recorded).
        level0_tile: tile side in level-0 pixels (fields are centred on tile centres).
        level0_side: field side in level-0 pixels.
        dimensions: the slide's level-0 (width, height); fields are moved inside it.
        k: fields wanted (fewer when fewer fit).
    """
    vals = np.asarray(values, np.float64)
    xy = np.asarray(level0_xy, np.float64).reshape(-1, 2)
    if vals.shape[0] != xy.shape[0]:
        raise XmagUsageError(f"{vals.shape[0]} values for {xy.shape[0]} tiles")
    width, height = dimensions
    picked: list[PickedRegion] = []
    boxes: list[tuple[int, int]] = []
    for i in _spread_order(np.nan_to_num(vals, nan=-np.inf)):
        if len(picked) == k:
            break
        cx, cy = xy[i] + level0_tile / 2.0
        x = int(min(max(0, round(cx - level0_side / 2.0)), max(0, width - level0_side)))
        y = int(min(max(0, round(cy - level0_side / 2.0)), max(0, height - level0_side)))
        if any(abs(x - bx) < level0_side and abs(y - by) < level0_side for bx, by in boxes):
            continue
        boxes.append((x, y))
        picked.append(
            PickedRegion(len(picked) + 1, (x, y), level0_side, float(vals[i]), int(grid_index[i]))
        )
    return picked
