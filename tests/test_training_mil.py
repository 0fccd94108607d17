"""The gated attention MIL head, stratified folds, AUC and features.h5 bags."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.torch_required import require_torch

require_torch()

from training.config import MilConfig  # noqa: E402
from training.mil import cross_validate, load_bags, roc_auc, stratified_kfold  # noqa: E402


def _planted_bags(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Positive bags hide 3 signal tiles (shifted in 4 of 32 dims) among 20-60 noise tiles."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n):
        y = i % 2
        x = rng.normal(size=(int(rng.integers(20, 60)), 32)).astype(np.float32)
        if y:
            x[rng.choice(len(x), 3, replace=False), :4] += 3.0
        bags.append(x)
        labels.append(y)
    return bags, labels


def test_the_mil_head_learns_a_planted_signal_of_a_few_instances_per_bag() -> None:
    bags, labels = _planted_bags(36, seed=0)
    cv = cross_validate(bags, labels, 2, MilConfig(epochs=12, folds=3, lr=1e-3, hidden=32))
    assert cv.pooled_auc > 0.9
    assert min(cv.fold_auc) > 0.8


def test_the_mil_head_finds_nothing_when_no_signal_is_planted() -> None:
    bags, _ = _planted_bags(36, seed=1)
    labels = [i % 2 for i in range(36)]
    bags = [b[:, 4:] for b in bags]  # drop the signal dimensions entirely
    cv = cross_validate(bags, labels, 2, MilConfig(epochs=6, folds=3, lr=1e-3, hidden=32))
    assert cv.pooled_auc < 0.8


def test_stratified_folds_partition_the_bags_and_keep_class_proportions() -> None:
    labels = [0] * 12 + [1] * 6
    folds = stratified_kfold(labels, 3, seed=0)
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests.tolist()) == list(range(18))
    for train, test in folds:
        assert set(train).isdisjoint(test)
        assert sorted(np.asarray(labels)[test].tolist()) == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="fewer than"):
        stratified_kfold([0, 0, 0, 1], 2, seed=0)


def test_roc_auc_counts_ties_as_half_and_handles_multiclass() -> None:
    assert roc_auc([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc([0, 1], np.array([0.5, 0.5])) == 0.5
    probs = np.eye(3)[[0, 1, 2, 0]]
    assert roc_auc([0, 1, 2, 0], probs) == 1.0


def test_bags_load_from_features_h5_files_and_a_labels_csv(tmp_path: Path) -> None:
    for sid, n in (("a", 5), ("b", 7)):
        with h5py.File(tmp_path / f"{sid}.h5", "w") as fh:
            fh["features"] = np.full((n, 8), n, dtype=np.float32)
            fh["coords"] = np.zeros((n, 2), dtype=np.int64)
    (tmp_path / "labels.csv").write_text("slide_id,label\nb,tumour\na,normal\n")
    bags, names = load_bags(tmp_path, tmp_path / "labels.csv")
    assert names == ["normal", "tumour"]
    assert [(b.slide_id, b.features.shape, b.label) for b in bags] == [
        ("a", (5, 8), 0),
        ("b", (7, 8), 1),
    ]
    (tmp_path / "labels.csv").write_text("slide_id,label\nc,normal\n")
    with pytest.raises(FileNotFoundError, match="no features for slide 'c'"):
        load_bags(tmp_path, tmp_path / "labels.csv")
