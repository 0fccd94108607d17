"""The planted cohorts: the contextual model finds risk in composition and in arrangement, the
bag of cells cannot see arrangement, and shuffled labels give chance.

Cohorts are built from the real CoNSeP nuclei of tests/data/nuclei/consep (measured with
``measure_nuclei``); see ``training.celleconet.planted``. 60 slides, 3 folds by patient and half
the default pretraining; the benchmark runs the full-size version (benchmarks/bench_celleconet.py).
Each slow test is a few cross-validations of a small transformer on CPU: about 4 minutes each
on the shared 2-core machine at a load average of 20, hence their own timeout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from training.celleconet.config import CelleconetConfig, TrainConfig  # noqa: E402
from training.celleconet.cv import Cohort, cross_validate, load_cohort  # noqa: E402
from training.celleconet.io import load_slide_cells  # noqa: E402
from training.celleconet.planted import (  # noqa: E402
    NucleusPool,
    build_planted_cohort,
    load_consep_pool,
)
from xmag.cells.table import type_code  # noqa: E402

CONSEP = Path(__file__).parent / "data" / "nuclei" / "consep"
SLIDES = 60
CFG = CelleconetConfig(train=TrainConfig(folds=3, pretrain_steps=50))
SLOW_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def pool() -> NucleusPool:
    return load_consep_pool(CONSEP)


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on shared cores; restored after the module
    yield
    torch.set_num_threads(before)


def _cohort(tmp_path_factory, pool: NucleusPool, signal: str) -> Cohort:
    out = tmp_path_factory.mktemp(signal)
    build_planted_cohort(out, signal, SLIDES, seed=1, pool=pool)
    return load_cohort(out / "cells", out / "labels.csv", CFG)


@pytest.fixture(scope="module")
def composition(tmp_path_factory, pool) -> Cohort:
    return _cohort(tmp_path_factory, pool, "composition")


@pytest.fixture(scope="module")
def arrangement(tmp_path_factory, pool) -> Cohort:
    return _cohort(tmp_path_factory, pool, "arrangement")


def test_the_pool_holds_real_measured_nuclei_of_each_type(pool: NucleusPool) -> None:
    counts = pool.counts()
    assert min(counts.values()) >= 50
    area = {t: np.median(pool.features[type_code(t)][:, 0]) for t in counts}
    assert area["tumour"] > area["lymphocyte"]  # epithelial nuclei are bigger than immune ones


def test_arrangement_slides_keep_the_same_cells_per_region_whatever_the_risk(
    tmp_path: Path, pool: NucleusPool
) -> None:
    build_planted_cohort(tmp_path, "arrangement", 4, seed=3, pool=pool)
    for slide in sorted((tmp_path / "cells").iterdir()):
        t = load_slide_cells(slide)
        region = (t.xy_um[:, 0] // 100).astype(int) + 4 * (t.xy_um[:, 1] // 100).astype(int)
        for r in range(8):
            counts = np.bincount(t.types[region == r], minlength=4)
            assert counts.tolist() == [0, 16, 24, 16]


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_the_contextual_model_learns_risk_from_composition(composition, threads) -> None:
    res = cross_validate(composition, CFG, ["celleconet"])
    assert res.methods["celleconet"]["pooled"]["c_index"] >= 0.75


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_the_contextual_model_learns_risk_from_arrangement_the_bag_of_cells_cannot(
    arrangement, threads
) -> None:
    res = cross_validate(arrangement, CFG, ["celleconet", "bag_of_cells"])
    assert res.methods["celleconet"]["pooled"]["c_index"] >= 0.75
    assert res.methods["bag_of_cells"]["pooled"]["c_index"] <= 0.62
    report = res.methods["celleconet"]["pooled"]
    assert report["hr"] > 1 and report["logrank_p"] < 0.05


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_shuffled_labels_give_chance(arrangement, threads) -> None:
    # two permutations (and fold draws), averaged: one C-index on 60 patients spreads by about
    # +-0.05 around chance, and cross-validation under no signal leans below 0.5
    c = [
        cross_validate(
            arrangement,
            CFG.model_copy(update={"train": CFG.train.model_copy(update={"seed": seed})}),
            ["celleconet"],
            shuffle_labels=True,
        ).methods["celleconet"]["pooled"]["c_index"]
        for seed in (0, 1)
    ]
    assert 0.4 <= float(np.mean(c)) <= 0.6
