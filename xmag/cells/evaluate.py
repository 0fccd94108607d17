"""Scores of detected nuclei against annotated ones: matching, detection, foreground, types.

A detection matches an annotation when their centroids lie within ``radius_um`` (6 um by
default, about a nucleus radius plus annotation jitter); pairs are taken greedily from the
closest, each nucleus used once. Greedy nearest matching equals the optimal assignment whenever
nuclei are further apart than twice the radius, and differs by a few pairs in crowds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmag.cells.table import CELL_TYPES
from xmag.errors import XmagUsageError

__all__ = [
    "MATCH_RADIUS_UM",
    "DetectionScores",
    "TypeAgreement",
    "detection_scores",
    "foreground_dice",
    "match_points",
    "type_agreement",
]

MATCH_RADIUS_UM = 6.0


def match_points(
    pred_xy: np.ndarray, true_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy nearest one-to-one matching of two point sets within ``radius``.

    Args:
        pred_xy: (N, 2) points; true_xy: (M, 2) points, same units as ``radius``.

    Returns:
        (pred_index, true_index): (K,) int64 arrays of matched pairs, closest first.
    """
    p = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    t = np.asarray(true_xy, np.float64).reshape(-1, 2)
    if p.shape[0] == 0 or t.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    pi, ti = np.nonzero(d <= radius)
    order = np.argsort(d[pi, ti], kind="stable")
    used_p = np.zeros(p.shape[0], bool)
    used_t = np.zeros(t.shape[0], bool)
    out_p: list[int] = []
    out_t: list[int] = []
    for a, b in zip(pi[order], ti[order], strict=True):
        if not used_p[a] and not used_t[b]:
            used_p[a] = used_t[b] = True
            out_p.append(int(a))
            out_t.append(int(b))
    return np.asarray(out_p, np.int64), np.asarray(out_t, np.int64)


@dataclass(frozen=True)
class DetectionScores:
    """Detection counts and scores (precision, recall, F1 in [0, 1])."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    def __add__(self, other: DetectionScores) -> DetectionScores:
        return DetectionScores(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def detection_scores(
    pred_xy_um: np.ndarray, true_xy_um: np.ndarray, radius_um: float = MATCH_RADIUS_UM
) -> tuple[DetectionScores, np.ndarray, np.ndarray]:
    """Counts of matched, extra and missed nuclei, and the matched pairs (``match_points``)."""
    pi, ti = match_points(pred_xy_um, true_xy_um, radius_um)
    n_pred = int(np.asarray(pred_xy_um).reshape(-1, 2).shape[0])
    n_true = int(np.asarray(true_xy_um).reshape(-1, 2).shape[0])
    tp = int(pi.size)
    return DetectionScores(tp, n_pred - tp, n_true - tp), pi, ti


def foreground_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two foreground masks (any nonzero pixel is foreground); 1 when both are empty."""
    if pred.shape != true.shape:
        raise XmagUsageError(f"masks differ in shape: {pred.shape} vs {true.shape}")
    a = np.asarray(pred) != 0
    b = np.asarray(true) != 0
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@dataclass(frozen=True)
class TypeAgreement:
    """Agreement of predicted and true types over cells whose true type is known.

    Attributes:
        n: cells compared.
        accuracy: share with the same type.
        chance: the accuracy expected if the two labellings were independent with the same
            type frequencies (sum over types of p_pred * p_true).
        kappa: Cohen's kappa, (accuracy - chance) / (1 - chance).
        confusion: (len(CELL_TYPES), len(CELL_TYPES)) counts, rows true, columns predicted.
    """

    n: int
    accuracy: float
    chance: float
    kappa: float
    confusion: np.ndarray


def type_agreement(pred_types: np.ndarray, true_types: np.ndarray) -> TypeAgreement:
    """Agreement of type codes (``CELL_TYPES``); cells whose true type is unknown (0) are
    left out."""
    p = np.asarray(pred_types, np.int64).reshape(-1)
    t = np.asarray(true_types, np.int64).reshape(-1)
    if p.shape != t.shape:
        raise XmagUsageError(f"{p.size} predicted types for {t.size} true ones")
    keep = t != 0
    p, t = p[keep], t[keep]
    k = len(CELL_TYPES)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (t, p), 1)
    n = int(keep.sum())
    if n == 0:
        return TypeAgreement(0, 0.0, 0.0, 0.0, confusion)
    accuracy = float(np.trace(confusion)) / n
    chance = float((confusion.sum(1) / n) @ (confusion.sum(0) / n))
    kappa = (accuracy - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return TypeAgreement(n, accuracy, chance, kappa, confusion)
