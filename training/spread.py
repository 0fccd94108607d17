"""How spread out a set of embeddings is: the check that a model did not collapse.

A student that outputs (nearly) the same vector for every tile scores a high *uncentred* cosine
with a teacher or a reference whose embeddings share a large common direction, which most do.
What tells a useful encoder from a constant one is the variation around the mean:

- ``effective_rank``: exp of the entropy of the normalised singular values of the centred
  embeddings (Roy & Vetterli 2007); 0 for a constant output, up to min(n, D).
- ``mean_pairwise_centred_cosine``: mean cosine between distinct rows after subtracting a centre
  (the reference's mean when one is given, else their own mean): near 0 for spread-out rows,
  1 when every row is the same point away from the centre.
- ``mean_pairwise_cosine``: the same without centring (what an uncentred check sees).
- ``relative_spread``: RMS distance to the own mean over the norm of the mean.

Numpy only: the training reports and the export's parity report both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "COLLAPSE_EFFECTIVE_RANK",
    "COLLAPSE_RELATIVE_SPREAD",
    "centred_cosine_rows",
    "embedding_spread",
]

#: Below this effective rank an embedding set is flagged as collapsed (near one direction).
COLLAPSE_EFFECTIVE_RANK = 1.5
#: Below this RMS-distance-to-mean / norm-of-mean the outputs are flagged as (near) constant.
COLLAPSE_RELATIVE_SPREAD = 1e-3
_EPS = 1e-30


def centred_cosine_rows(a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Cosine of matching rows of (n, D) ``a`` and ``b`` after subtracting ``centre`` (D,).

    A row equal to the centre has no direction: its cosine is 0 (never a pass).
    """
    a64 = a.astype(np.float64) - centre
    b64 = b.astype(np.float64) - centre
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.where(den > _EPS, num / np.maximum(den, _EPS), 0.0)


def _pairwise_mean_cosine(x: np.ndarray) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.all(norms <= _EPS):
        return 1.0  # every row is the centre: one point
    u = x / np.maximum(norms, _EPS)
    u[norms[:, 0] <= _EPS] = u[np.argmax(norms[:, 0])]  # rows at the centre count as identical
    sims = u @ u.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def embedding_spread(x: np.ndarray, *, centre: np.ndarray | None = None) -> dict[str, Any]:
    """Spread statistics of (n, D) embeddings; ``collapsed`` flags a (near) constant output.

    Args:
        x: one embedding per row.
        centre: (D,) vector subtracted before the pairwise centred cosine (a reference's mean
            embedding); the rows' own mean when None.
    """
    x64 = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    mean = x64.mean(0)
    dev = x64 - mean
    s = np.linalg.svd(dev, compute_uv=False) if len(x64) > 1 else np.zeros(1)
    total = float(s.sum())
    if total <= _EPS * max(1.0, float(np.abs(x64).max(initial=0.0))):
        eff_rank = 0.0
    else:
        p = s[s > 0] / total
        eff_rank = float(np.exp(-(p * np.log(p)).sum()))
    rms = float(np.sqrt((dev**2).sum(1).mean()))
    rel = rms / max(float(np.linalg.norm(mean)), _EPS)
    c = mean if centre is None else np.asarray(centre, dtype=np.float64)
    collapsed = eff_rank < COLLAPSE_EFFECTIVE_RANK or rel < COLLAPSE_RELATIVE_SPREAD
    return {
        "n": len(x64),
        "dim": int(x64.shape[1]),
        "effective_rank": eff_rank,
        "mean_pairwise_centred_cosine": _pairwise_mean_cosine(x64 - c),
        "mean_pairwise_cosine": _pairwise_mean_cosine(x64),
        "relative_spread": rel,
        "collapsed": bool(collapsed),
    }
