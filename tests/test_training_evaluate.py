"""evaluate names the model behind each number, gives the baselines, and survives small cohorts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from tests.test_training_interrupt import _crops  # noqa: E402
from tests.training_helpers import fitted_teacher, real_pairs, tiny_config  # noqa: E402
from training.data import CropFolder  # noqa: E402
from training.distill import Distiller  # noqa: E402


def test_evaluate_reports_baselines_spread_and_provenance_and_exits_on_a_small_cohort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from training.cli import main

    pairs = real_pairs(3)
    d = Distiller(tiny_config(), fitted_teacher(pairs), CropFolder(pairs))
    d.run(1)
    d.save(tmp_path / "checkpoint.pt")
    rng = np.random.default_rng(0)
    labels = {"a": "x", "b": "x", "c": "y"}
    for sid in labels:
        with h5py.File(tmp_path / f"{sid}.h5", "w") as fh:
            fh["features"] = rng.normal(size=(5, 48)).astype(np.float32)
            fh["coords"] = np.zeros((5, 2), dtype=np.int64)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label\n" + "".join(f"{k}.svs,{v}\n" for k, v in labels.items()))
    out = tmp_path / "eval"
    argv = ["training", "evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt")]
    argv += ["--crops", str(_crops(tmp_path / "crops")), "--out", str(out)]
    argv += ["--features", str(tmp_path), "--labels", str(csv), "--folds", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--mil-epochs", "1"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 5
    assert "[COHORT_TOO_SMALL]" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    agreement = report["agreement"]
    assert "checkpoint.pt (step 1" in agreement["produced_by"]
    assert "handcrafted teacher" in report["models"]["teacher"]
    assert set(agreement["predict_the_mean_baseline"]) == {"global_cosine", "local_cosine"}
    assert "effective_rank" in agreement["student_spread"]
    mil = report["mil"]
    assert mil["skipped"]["code"] == "COHORT_TOO_SMALL" and mil["class_counts"] == {"x": 2, "y": 1}
    assert "features" in mil["produced_by"]
    assert (out / "report.md").is_file()
