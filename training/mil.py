"""Slide heads: gated attention MIL on bags of tile embeddings, stratified k-fold CV, AUC.

Bags come from ``features.h5`` files in the layout the engine writes (datasets ``features``
[N, D] and ``coords`` [N, 2] in level-0 px), labels from a CSV with columns ``slide_id,label``.

Slide identifiers: one convention for every command (``train-mil``, ``finetune``, ``evaluate``):
a slide's id is its file or folder name up to the first dot (``CMU-1-Small-Region.svs`` ->
``CMU-1-Small-Region``), the folder name ``xmag embed --out`` gives each slide. A CSV may name the
file (``CMU-1-Small-Region.svs``); it is read as the same id (``slide_id_of``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from training.config import MilConfig
from training.errors import CohortTooSmallError, LabelsError
from training.models import GatedAttentionMIL

__all__ = [
    "Bag",
    "CvResult",
    "cross_validate",
    "head_entry",
    "load_bags",
    "predict",
    "read_features_h5",
    "read_labels_csv",
    "resolve_slide",
    "roc_auc",
    "slide_id_of",
    "stratified_kfold",
    "train_mil",
]


@dataclass(frozen=True)
class Bag:
    slide_id: str
    features: np.ndarray  # (N, D) float32 tile embeddings
    label: int


def read_features_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, coords [N, 2] int64 level-0 px) from a features.h5 file."""
    with h5py.File(path, "r") as fh:
        for name in ("features", "coords"):
            if name not in fh:
                raise KeyError(f"{path} has no dataset {name!r} (expected features [N, D], coords)")
        feats = np.asarray(fh["features"], dtype=np.float32)
        coords = np.asarray(fh["coords"], dtype=np.int64)
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(f"{path}: features {feats.shape} and coords {coords.shape} do not match")
    return feats, coords


def slide_id_of(name: str | Path) -> str:
    """The slide id of a file or folder name: the name up to its first dot (see module doc)."""
    base = Path(str(name).strip()).name
    return base.split(".")[0] or base


def read_labels_csv(path: Path) -> dict[str, str]:
    """``slide_id -> label`` from a CSV with a header ``slide_id,label`` (ids as ``slide_id_of``).

    Raises:
        LabelsError: unreadable file, missing columns, an empty label, or one id twice.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"slide_id", "label"} <= set(reader.fieldnames):
                raise LabelsError(
                    f"{path} needs the columns slide_id,label (got {reader.fieldnames}).",
                    path=path,
                )
            rows = [(row["slide_id"] or "", row["label"] or "") for row in reader]
    except OSError as exc:
        raise LabelsError(f"labels file {path} cannot be read ({exc}).", path=path) from exc
    out: dict[str, str] = {}
    for raw, label in rows:
        sid = slide_id_of(raw)
        if not sid or not label.strip():
            raise LabelsError(f"{path}: row {raw!r},{label!r} has an empty id or label.", path=path)
        if sid in out:
            raise LabelsError(f"{path} names slide {sid!r} twice; keep one row.", path=path)
        out[sid] = label.strip()
    if not out:
        raise LabelsError(f"{path} has no rows.", path=path)
    return out


def resolve_slide(slides_dir: Path, slide_id: str) -> Path:
    """The file or folder in ``slides_dir`` whose id (``slide_id_of``) is ``slide_id``.

    Raises:
        LabelsError: none, or several, match.
    """
    slides_dir = Path(slides_dir)
    try:
        matches = sorted(p for p in slides_dir.iterdir() if slide_id_of(p.name) == slide_id)
    except OSError as exc:
        raise LabelsError(f"slides folder {slides_dir} cannot be listed ({exc}).") from exc
    if len(matches) != 1:
        found = "no file" if not matches else f"{len(matches)} files ({[m.name for m in matches]})"
        raise LabelsError(
            f"{found} in {slides_dir} has the slide id {slide_id!r} (the name up to its first "
            "dot); rename the slide or fix the labels CSV.",
            slide_id=slide_id,
        )
    return matches[0]


def _features_path(root: Path, slide_id: str) -> Path:
    for cand in (root / f"{slide_id}.h5", root / slide_id / "features.h5"):
        if cand.is_file():
            return cand
    raise LabelsError(
        f"no features for slide {slide_id!r} under {root} (looked for {slide_id}.h5 and "
        f"{slide_id}/features.h5); embed it (xmag embed --out {root}) or drop its row.",
        slide_id=slide_id,
    )


def load_bags(features_dir: Path, labels_csv: Path) -> tuple[list[Bag], list[str]]:
    """Bags of every slide in the labels CSV and the sorted label names (class order)."""
    labels = read_labels_csv(labels_csv)
    names = sorted(set(labels.values()))
    bags = []
    for slide_id, label in sorted(labels.items()):
        feats, _ = read_features_h5(_features_path(Path(features_dir), slide_id))
        bags.append(Bag(slide_id, feats, names.index(label)))
    return bags, names


def stratified_kfold(
    labels: Sequence[int], k: int, seed: int, *, names: Sequence[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) per fold; each class is dealt round-robin over the folds.

    Raises:
        CohortTooSmallError: a class has fewer than ``k`` members (a fold would miss it).
    """
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) and counts.min() < k:
        tag = (lambda c: names[int(c)]) if names is not None else int
        small = {tag(c): int(n) for c, n in zip(classes, counts, strict=True) if n < k}
        raise CohortTooSmallError(
            f"class(es) {small} (class: slides) have fewer slides than the {k} folds asked; "
            f"use --folds {max(2, int(counts.min()))} or fewer, or add slides"
            + (" (2 folds need 2 slides per class)." if counts.min() < 2 else "."),
            folds=k,
            class_counts={str(tag(c)): int(n) for c, n in zip(classes, counts, strict=True)},
        )
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # spreads remainders of successive classes over different folds
    all_idx = np.arange(len(y))
    return [(all_idx[fold_of != f], all_idx[fold_of == f]) for f in range(k)]


def roc_auc(y_true: Sequence[int], scores: np.ndarray) -> float:
    """ROC AUC; binary ``scores`` (N,) for class 1, or (N, C) for macro one-vs-rest.

    Computed as the Mann-Whitney statistic with average ranks for ties.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        if s.shape[1] == 2:
            return roc_auc(y, s[:, 1])
        aucs = [
            roc_auc((y == c).astype(int), s[:, c])
            for c in range(s.shape[1])
            if 0 < (y == c).sum() < len(y)
        ]
        return float(np.mean(aucs))
    pos, neg = (y == 1).sum(), (y != 1).sum()
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both classes present")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def train_mil(
    bags: Sequence[np.ndarray], labels: Sequence[int], n_classes: int, cfg: MilConfig
) -> GatedAttentionMIL:
    """Train a gated attention MIL head, one bag per step, classes weighted by frequency."""
    torch.manual_seed(cfg.seed)
    head = GatedAttentionMIL(bags[0].shape[1], cfg.hidden, n_classes, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    y = np.asarray(labels)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    tensors = [torch.as_tensor(b, dtype=torch.float32) for b in bags]
    rng = np.random.default_rng(cfg.seed)
    head.train()
    for _ in range(cfg.epochs):
        for i in rng.permutation(len(tensors)):
            logits, _ = head.forward_logits(tensors[i])
            loss = F.cross_entropy(logits[None], torch.tensor([int(y[i])]), weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def predict(head: GatedAttentionMIL, bags: Sequence[np.ndarray]) -> np.ndarray:
    """(n_bags, C) class probabilities."""
    head.eval()
    return np.stack([head(torch.as_tensor(b, dtype=torch.float32))[0].numpy() for b in bags])


@dataclass
class CvResult:
    fold_auc: list[float]
    oof_probabilities: np.ndarray  # (n_bags, C), each bag predicted by the fold that held it out
    labels: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_auc(self) -> float:
        return float(np.mean(self.fold_auc))

    @property
    def pooled_auc(self) -> float:
        return roc_auc(self.labels, self.oof_probabilities)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold_auc": self.fold_auc,
            "mean_auc": self.mean_auc,
            "std_auc": float(np.std(self.fold_auc)),
            "pooled_auc": self.pooled_auc,
            **self.extra,
        }


def cross_validate(
    bags: Sequence[np.ndarray],
    labels: Sequence[int],
    n_classes: int,
    cfg: MilConfig,
    *,
    names: Sequence[str] | None = None,
) -> CvResult:
    """Stratified k-fold CV of ``train_mil``: AUC per held-out fold, out-of-fold probabilities.

    Raises:
        CohortTooSmallError: a class has fewer bags than ``cfg.folds`` (``names`` label it).
    """
    oof = np.zeros((len(bags), n_classes))
    aucs = []
    for train_idx, test_idx in stratified_kfold(labels, cfg.folds, cfg.seed, names=names):
        head = train_mil(
            [bags[i] for i in train_idx], [labels[i] for i in train_idx], n_classes, cfg
        )
        probs = predict(head, [bags[i] for i in test_idx])
        oof[test_idx] = probs
        aucs.append(roc_auc([labels[i] for i in test_idx], probs))
    return CvResult(aucs, oof, list(labels))


def head_entry(head: GatedAttentionMIL, labels: Sequence[str]) -> dict[str, Any]:
    """The checkpoint ``heads[name]`` entry (BRIEF.md layout) for a trained MIL head."""
    return {
        "kind": "gated_attention_mil",
        "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "in_dim": head.in_dim,
        "hidden": head.hidden,
        "labels": list(labels),
    }
