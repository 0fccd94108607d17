"""Sentences: a slide's cells cut into square regions of ``region_um`` with a fixed number of slots.

A region is a sentence of at most ``max_cells`` words (cells past that are subsampled at random,
seeded); regions with fewer than ``min_cells`` are dropped; a slide keeps at most
``max_regions`` regions, the most populated (ties broken by position). Positions are in um
relative to the region's centre, so a sentence reads the same wherever it lies on the slide.
Phrases (``neighbour_graph``) are computed among the cells kept in the region, so indices are
local to the sentence.

Arrays are padded to fixed shapes with masks: (R, M) cells and (R,) regions. That is what lets the
model keep fixed shapes for export; ``stack_slides`` pads slides to a common R for a batch.

Replaceable: tissue-aware regions (tumour bed only), overlapping windows, or graph partitions
fit the same ``SlideSentences`` contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xmag.cells.table import CellTable

from .config import SentenceConfig
from .phrases import neighbour_graph

__all__ = ["SlideSentences", "build_sentences", "stack_slides"]


@dataclass(frozen=True)
class SlideSentences:
    """One slide as R sentences of M slots (geometry only; words come from a codebook)."""

    cell_index: np.ndarray  # (R, M) int64 row in the slide's CellTable (0 where padded)
    cell_mask: np.ndarray  # (R, M) bool
    xy_um: np.ndarray  # (R, M, 2) float32 relative to the region centre
    types: np.ndarray  # (R, M) int64 CELL_TYPES codes
    nbr_index: np.ndarray  # (R, M, K) int64 slot of each neighbour in the same region
    nbr_mask: np.ndarray  # (R, M, K) bool
    region_centre_um: np.ndarray  # (R, 2) float32 in the table's frame

    @property
    def n_regions(self) -> int:
        return int(self.cell_index.shape[0])

    def words(self, table_words: np.ndarray) -> np.ndarray:
        """(R, M) int64 words of the slots from the slide's (N,) words (0 where padded)."""
        return np.where(self.cell_mask, np.asarray(table_words)[self.cell_index], 0)

    def gather(self, per_cell: np.ndarray) -> np.ndarray:
        """(R, M, ...) values of the slots from a per-cell (N, ...) array, zero where padded."""
        out = np.asarray(per_cell)[self.cell_index]
        return np.where(
            self.cell_mask.reshape(self.cell_mask.shape + (1,) * (out.ndim - 2)), out, 0
        )


def build_sentences(table: CellTable, cfg: SentenceConfig) -> SlideSentences:
    """Cut ``table`` into sentences (see the module docstring).

    Raises:
        ValueError: no region holds ``min_cells`` cells.
    """
    xy = table.xy_um.astype(np.float64)
    rng = np.random.default_rng(cfg.seed)
    m, k = cfg.max_cells, cfg.k_neighbours
    if len(table) == 0:
        raise ValueError("the slide has no cells")
    origin = np.floor(xy.min(0) / cfg.region_um) * cfg.region_um
    cell_ij = np.floor((xy - origin) / cfg.region_um).astype(np.int64)
    keys, inverse, counts = np.unique(cell_ij, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    ranked = np.lexsort((keys[:, 0], keys[:, 1], -counts))  # most cells first, then row-major
    order = [int(r) for r in ranked if counts[r] >= cfg.min_cells][: cfg.max_regions]
    if not order:
        raise ValueError(
            f"no {cfg.region_um} um region holds {cfg.min_cells} cells (most: {counts.max()}); "
            "lower min_cells or enlarge region_um"
        )
    n_r = len(order)
    out: dict[str, np.ndarray] = {
        "cell_index": np.zeros((n_r, m), np.int64),
        "cell_mask": np.zeros((n_r, m), bool),
        "xy_um": np.zeros((n_r, m, 2), np.float32),
        "types": np.zeros((n_r, m), np.int64),
        "nbr_index": np.zeros((n_r, m, k), np.int64),
        "nbr_mask": np.zeros((n_r, m, k), bool),
        "region_centre_um": np.zeros((n_r, 2), np.float32),
    }
    for r, key in enumerate(order):
        members = np.flatnonzero(inverse == key)
        if members.size > m:
            members = np.sort(rng.choice(members, m, replace=False))
        n = members.size
        centre = origin + (keys[key] + 0.5) * cfg.region_um
        local = xy[members] - centre
        nbr, ok = neighbour_graph(local, k, cfg.radius_um)
        out["cell_index"][r, :n] = members
        out["cell_mask"][r, :n] = True
        out["xy_um"][r, :n] = local
        out["types"][r, :n] = table.types[members]
        out["nbr_index"][r, :n] = nbr
        out["nbr_mask"][r, :n] = ok
        out["region_centre_um"][r] = centre
    return SlideSentences(**out)


def stack_slides(
    slides: Sequence[SlideSentences], words: Sequence[np.ndarray], max_regions: int | None = None
) -> dict[str, np.ndarray]:
    """Pad slides to one (B, R, M) batch of numpy arrays (the model's inputs).

    Args:
        slides: sentences per slide.
        words: (N,) word of every cell of each slide's table (``Codebook.assign``).
        max_regions: R; the largest slide's region count when None.

    M is the largest number of cells in one region of the batch (at most the sentences' slots):
    cells fill slots from the first, so later slots past it are padding everywhere.

    Returns:
        ``words``, ``types``, ``xy_um``, ``nbr_index``, ``nbr_mask``, ``cell_mask`` (B, R, M[, .])
        and ``region_mask`` (B, R).
    """
    r_max = max_regions or max(s.n_regions for s in slides)
    # slots past the fullest region of the batch hold only padding: drop them
    m = max(int(s.cell_mask.sum(1).max()) for s in slides)
    k = slides[0].nbr_index.shape[2]
    b = len(slides)
    out: dict[str, np.ndarray] = {
        "words": np.zeros((b, r_max, m), np.int64),
        "types": np.zeros((b, r_max, m), np.int64),
        "xy_um": np.zeros((b, r_max, m, 2), np.float32),
        "nbr_index": np.zeros((b, r_max, m, k), np.int64),
        "nbr_mask": np.zeros((b, r_max, m, k), bool),
        "cell_mask": np.zeros((b, r_max, m), bool),
        "region_mask": np.zeros((b, r_max), bool),
    }
    for i, (s, w) in enumerate(zip(slides, words, strict=True)):
        r = min(s.n_regions, r_max)
        out["words"][i, :r] = s.words(w)[:r, :m]
        out["types"][i, :r] = s.types[:r, :m]
        out["xy_um"][i, :r] = s.xy_um[:r, :m]
        out["nbr_index"][i, :r] = s.nbr_index[:r, :m]
        out["nbr_mask"][i, :r] = s.nbr_mask[:r, :m]
        out["cell_mask"][i, :r] = s.cell_mask[:r, :m]
        out["region_mask"][i, :r] = True
    return out
