"""The gated attention MIL head, stratified folds, AUC and features.h5 bags."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.torch_required import require_torch

require_torch()

from training.config import MilConfig  # noqa: E402
from training.errors import CohortTooSmallError, LabelsError  # noqa: E402
from training.mil import (  # noqa: E402
    cross_validate,
    load_bags,
    read_labels_csv,
    roc_auc,
    slide_id_of,
    stratified_kfold,
)


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
    with pytest.raises(CohortTooSmallError, match="--folds 3 or fewer") as info:
        stratified_kfold([0, 0, 0, 1, 1, 1, 1], 4, seed=0, names=["a", "b"])
    assert info.value.code == "COHORT_TOO_SMALL"
    assert info.value.fields["class_counts"] == {"a": 3, "b": 4}


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
    with pytest.raises(LabelsError, match="no features for slide 'c'"):
        load_bags(tmp_path, tmp_path / "labels.csv")


def test_one_slide_id_convention_reads_file_names_and_embed_folders_alike(
    tmp_path: Path,
) -> None:
    assert slide_id_of("CMU-1-Small-Region.svs") == "CMU-1-Small-Region"
    assert slide_id_of("OS-2-ndpi.ome.tif") == "OS-2-ndpi"
    assert slide_id_of("BPAEC-dicom") == "BPAEC-dicom"
    (tmp_path / "a.csv").write_text("slide_id,label\nCMU-1-Small-Region.svs,he\nOS-2-ndpi,ihc\n")
    assert read_labels_csv(tmp_path / "a.csv") == {"CMU-1-Small-Region": "he", "OS-2-ndpi": "ihc"}
    (tmp_path / "b.csv").write_text("slide_id,label\nx.svs,he\nx,ihc\n")
    with pytest.raises(LabelsError, match="twice"):
        read_labels_csv(tmp_path / "b.csv")


def _write_bags(root: Path, labels: dict[str, str]) -> Path:
    rng = np.random.default_rng(0)
    for sid in labels:
        (root / sid).mkdir(parents=True)
        with h5py.File(root / sid / "features.h5", "w") as fh:
            fh["features"] = rng.normal(size=(6, 8)).astype(np.float32)
            fh["coords"] = np.zeros((6, 2), dtype=np.int64)
    csv = root / "labels.csv"
    csv.write_text("slide_id,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    return csv


def test_train_mil_on_a_small_cohort_writes_what_it_can_and_exits_with_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import json
    import sys

    from training.cli import main

    csv = _write_bags(tmp_path / "features", {"a": "x", "b": "x", "c": "x", "d": "y"})
    out = tmp_path / "mil"
    argv = ["training", "train-mil", "--features", str(tmp_path / "features"), "--labels"]
    monkeypatch.setattr(sys, "argv", [*argv, str(csv), "--out", str(out), "--epochs", "1"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 5
    err = capsys.readouterr().err
    assert "[COHORT_TOO_SMALL]" in err and "Traceback" not in err
    report = json.loads((out / "cv.json").read_text())
    assert report["class_counts"] == {"x": 3, "y": 1}
    assert report["cross_validation"]["skipped"]["code"] == "COHORT_TOO_SMALL"
    assert report["head"]["trained_on_slides"] == 4
    assert report["predict_the_prior_baseline"] == {"auc": 0.5, "accuracy": 0.75}
