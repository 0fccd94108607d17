"""Phrases: each cell with its spatial neighbours, in micrometres.

``neighbour_graph`` gives every cell its ``k`` nearest other cells no further than ``radius_um``
(a k-NN graph cut by a radius: dense tissue gets k neighbours, a lone cell gets fewer, never a
far one). Indices are padded with the cell itself and a False mask, so arrays stay rectangular
(what a fixed-shape exported model needs).

Replaceable: a Delaunay graph or a pure radius graph fit the same (indices, mask) contract.
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighbour_graph"]


def neighbour_graph(xy_um: np.ndarray, k: int, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) int64, valid (N, k) bool) of each cell's nearest neighbours.

    Args:
        xy_um: (N, 2) centroids in micrometres.
        k: neighbours per cell (fewer are valid when the cell has fewer within the radius).
        radius_um: a neighbour further than this is not part of the phrase.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    n = xy.shape[0]
    idx = np.tile(np.arange(n, dtype=np.int64)[:, None], (1, k))
    valid = np.zeros((n, k), bool)
    if n < 2:
        return idx, valid
    kk = min(k + 1, n)
    dist, nn = cKDTree(xy).query(xy, k=kk)
    dist, nn = dist.reshape(n, kk)[:, 1:], nn.reshape(n, kk)[:, 1:]  # drop the cell itself
    ok = dist <= radius_um
    idx[:, : kk - 1] = np.where(ok, nn, idx[:, : kk - 1])
    valid[:, : kk - 1] = ok
    return idx, valid
