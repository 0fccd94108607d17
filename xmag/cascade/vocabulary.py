"""Cells -> words at serving time: a fitted codebook read from a package, numpy only.

The file is ``training.celleconet.vocab.Codebook.to_dict()`` (format ``CODEBOOK_FORMAT``):
feature names, their mean and std, k-means centroids in standardised units and, for a codebook
fitted per cell type, each word's type. ``Vocabulary.assign`` gives the same words as the
training ``Codebook.assign`` (a test checks it), without scikit-learn or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmag.cells.table import CELL_TYPES, FEATURE_NAMES

__all__ = ["CODEBOOK_FORMAT", "Vocabulary"]

CODEBOOK_FORMAT = "xmag.celleconet.codebook/1"


@dataclass(frozen=True)
class Vocabulary:
    """A feature standardiser plus centroids; a cell's word is its nearest centroid.

    Attributes:
        feature_names: columns of ``FEATURE_NAMES`` the words are built from.
        mean, std: (F,) per feature, in the features' units.
        centroids: (W, F) in standardised units.
        word_types: (W,) cell type code of each word, or None (type-blind words).
    """

    feature_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    centroids: np.ndarray
    word_types: np.ndarray | None = None

    @property
    def n_words(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        """Read a codebook dict; raises ``ValueError`` when it is not one or is inconsistent."""
        if not isinstance(d, dict) or d.get("format") != CODEBOOK_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"format is {got!r}, need {CODEBOOK_FORMAT!r}")
        names = tuple(str(n) for n in d["feature_names"])
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"features {unknown} are not in FEATURE_NAMES")
        mean = np.asarray(d["mean"], np.float64).reshape(-1)
        std = np.asarray(d["std"], np.float64).reshape(-1)
        cents = np.asarray(d["centroids"], np.float64)
        f = len(names)
        if mean.shape != (f,) or std.shape != (f,) or cents.ndim != 2 or cents.shape[1] != f:
            raise ValueError(
                f"{f} features but mean {mean.shape}, std {std.shape}, centroids {cents.shape}"
            )
        if cents.shape[0] < 1 or not np.all(np.isfinite(cents)) or np.any(std <= 0):
            raise ValueError("centroids must be finite and at least one; std positive")
        wt = d.get("word_types")
        types = None
        if wt is not None:
            types = np.asarray(wt, np.int64).reshape(-1)
            if (
                types.shape != (cents.shape[0],)
                or types.min() < 0
                or types.max() >= len(CELL_TYPES)
            ):
                raise ValueError(f"word_types must give one CELL_TYPES code per word, got {wt}")
        return cls(names, mean, std, cents, types)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def assign(self, features: np.ndarray, types: np.ndarray) -> np.ndarray:
        """(N,) int64 word of each cell: the nearest centroid among its type's words (all
        words for a type the codebook never saw, or for a type-blind codebook). An unmeasured
        feature (NaN) counts as the mean."""
        cols = [FEATURE_NAMES.index(n) for n in self.feature_names]
        x = np.asarray(features, np.float64)[:, cols]
        z = np.nan_to_num((x - self.mean) / self.std, nan=0.0).astype(np.float32)
        z64 = z.astype(np.float64)
        if z64.shape[0] == 0:
            return np.zeros(0, np.int64)
        c = self.centroids
        d = (z64**2).sum(1)[:, None] - 2 * z64 @ c.T + (c**2).sum(1)[None]
        if self.word_types is not None:
            t = np.asarray(types).astype(np.int64).reshape(-1, 1)
            own = self.word_types[None, :] == t
            own |= ~own.any(1, keepdims=True)
            d = np.where(own, d, np.inf)
        return d.argmin(1).astype(np.int64)
