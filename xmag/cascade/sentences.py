"""Cells -> sentences at serving time: the context model's padded inputs, numpy only.

The serving counterpart of ``training.celleconet.sentences.build_sentences``: training cuts a
whole slide's cells into ``region_um`` squares on a grid anchored at its lowest cell; here only
the K regions read have cells, so each region is cut into n x n equal squares with n =
``round(size_um / region_um)`` (3 x 3 squares of 85.3 um for 256 um regions and 100 um
sentences): sentences never straddle two regions and tile each exactly. The rest is as in
training: at most ``max_cells`` cells per sentence (a seeded random subset past that), squares
with fewer than ``min_cells`` dropped, the ``max_regions`` most populated kept, positions in um
from the square's centre. Each cell's phrase is its ``k_neighbours`` nearest cells of the same
sentence within ``radius_um``, padded with the cell itself and a False mask
(``neighbour_graph`` gives the same arrays as ``training.celleconet.phrases.neighbour_graph``;
a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmag.package import SentenceSpec

__all__ = ["Sentences", "build_sentences", "neighbour_graph"]


@dataclass(frozen=True)
class Sentences:
    """One slide's sentences, R of M slots (arrays padded, masks say what is real).

    Attributes:
        cell_index: (R, M) int64 row of each slot in the slide's cell table (0 where padded).
        cell_mask: (R, M) bool.
        xy_um: (R, M, 2) float32 um from the sentence centre.
        types: (R, M) int64 cell type codes.
        nbr_index: (R, M, K) int64 slot of each neighbour.
        nbr_mask: (R, M, K) bool.
        centre_um: (R, 2) float32 sentence centres in the table's frame (um).
        side_um: (R,) float32 side of each sentence square (um).
    """

    cell_index: np.ndarray
    cell_mask: np.ndarray
    xy_um: np.ndarray
    types: np.ndarray
    nbr_index: np.ndarray
    nbr_mask: np.ndarray
    centre_um: np.ndarray
    side_um: np.ndarray

    @property
    def n_regions(self) -> int:
        return int(self.cell_index.shape[0])

    def model_inputs(self, words: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of one slide (B = 1) from each table cell's word, slots cut to the fullest
        sentence; keys are ``xmag.package.CELL_MODEL_INPUTS``."""
        m = max(1, int(self.cell_mask.sum(1).max())) if self.n_regions else 1
        w = np.where(self.cell_mask, np.asarray(words, np.int64)[self.cell_index], 0)
        return {
            "words": w[None, :, :m].astype(np.int64),
            "types": self.types[None, :, :m].astype(np.int64),
            "xy_um": self.xy_um[None, :, :m].astype(np.float32),
            "nbr_index": self.nbr_index[None, :, :m].astype(np.int64),
            "nbr_mask": self.nbr_mask[None, :, :m],
            "cell_mask": self.cell_mask[None, :, :m],
            "region_mask": np.ones((1, self.n_regions), bool),
        }


def neighbour_graph(xy_um: np.ndarray, k: int, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) int64, valid (N, k) bool): each cell's nearest other cells within
    ``radius_um``, nearest first; padded with the cell itself (invalid)."""
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    n = xy.shape[0]
    idx = np.tile(np.arange(n, dtype=np.int64)[:, None], (1, k))
    valid = np.zeros((n, k), bool)
    if n < 2:
        return idx, valid
    diff = xy[:, None, :] - xy[None, :, :]
    dist = np.sqrt((diff * diff).sum(-1))
    np.fill_diagonal(dist, np.inf)
    kk = min(k, n - 1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    near = np.take_along_axis(dist, order, 1)
    ok = near <= radius_um
    idx[:, :kk] = np.where(ok, order, idx[:, :kk])
    valid[:, :kk] = ok
    return idx, valid


def squares_per_side(size_um: float, spec: SentenceSpec) -> int:
    """How many sentence squares a region's side is cut into: ``round(size_um / region_um)``,
    at least 1 (a 256 um region with 100 um sentences: 3 x 3 squares of 85.3 um)."""
    return max(1, round(size_um / spec.region_um))


def build_sentences(
    xy_um: np.ndarray,
    types: np.ndarray,
    spec: SentenceSpec,
    regions_um: np.ndarray,
) -> Sentences:
    """Cut the cells of the regions read into sentences.

    Args:
        xy_um: (N, 2) cell positions in one frame (um).
        types: (N,) cell type codes.
        spec: the card's sentence settings.
        regions_um: (K, 3) each region's top-left x, y and side in the same frame (um), in
            rank order. A cell belongs to the first region holding its centre; cells in none
            are left out.

    Each region is cut into n x n equal squares (``squares_per_side``), so sentences never mix
    regions and tile each one exactly. Squares with fewer than ``min_cells`` cells are dropped;
    the ``max_regions`` most populated are kept (ties: region rank, then row-major); a square
    with more than ``max_cells`` cells keeps a seeded random subset. Returns R = 0 sentences
    when no square qualifies.
    """
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    cell_types = np.asarray(types, np.int64).reshape(-1)
    boxes = np.asarray(regions_um, np.float64).reshape(-1, 3)
    m, k = spec.max_cells, spec.k_neighbours
    rng = np.random.default_rng(spec.seed)
    owner = np.full(xy.shape[0], -1, np.int64)
    for r, (x0, y0, side) in enumerate(boxes):
        inside = (
            (xy[:, 0] >= x0) & (xy[:, 0] < x0 + side) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side)
        )
        owner[inside & (owner < 0)] = r
    squares: list[tuple[int, int, int, int, np.ndarray, np.ndarray]] = []
    for r, (x0, y0, side) in enumerate(boxes):
        n_side = squares_per_side(side, spec)
        step = side / n_side
        members = np.flatnonzero(owner == r)
        ij = np.clip(np.floor((xy[members] - [x0, y0]) / step).astype(np.int64), 0, n_side - 1)
        for row in range(n_side):
            for col in range(n_side):
                sel = members[(ij[:, 0] == col) & (ij[:, 1] == row)]
                if sel.size >= spec.min_cells:
                    centre = np.array([x0 + (col + 0.5) * step, y0 + (row + 0.5) * step])
                    squares.append((-sel.size, r, row, col, sel, centre))
    squares.sort(key=lambda q: q[:4])
    squares = squares[: spec.max_regions]
    n_r = len(squares)
    out = Sentences(
        cell_index=np.zeros((n_r, m), np.int64),
        cell_mask=np.zeros((n_r, m), bool),
        xy_um=np.zeros((n_r, m, 2), np.float32),
        types=np.zeros((n_r, m), np.int64),
        nbr_index=np.zeros((n_r, m, k), np.int64),
        nbr_mask=np.zeros((n_r, m, k), bool),
        centre_um=np.zeros((n_r, 2), np.float32),
        side_um=np.zeros(n_r, np.float32),
    )
    for s, (_, r, _, _, members, centre) in enumerate(squares):
        if members.size > m:
            members = np.sort(rng.choice(members, m, replace=False))
        n = members.size
        local = xy[members] - centre
        nbr, ok = neighbour_graph(local, k, spec.radius_um)
        out.cell_index[s, :n] = members
        out.cell_mask[s, :n] = True
        out.xy_um[s, :n] = local
        out.types[s, :n] = cell_types[members]
        out.nbr_index[s, :n] = nbr
        out.nbr_mask[s, :n] = ok
        out.centre_um[s] = centre
        out.side_um[s] = boxes[r, 2] / squares_per_side(boxes[r, 2], spec)
    return out
