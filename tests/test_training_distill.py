"""Distillation steps on real slide crops: the loss goes down, resume continues the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from tests.training_helpers import fitted_teacher, real_pairs, tiny_config  # noqa: E402
from training.data import CropFolder  # noqa: E402
from training.distill import Distiller  # noqa: E402
from training.models import CHECKPOINT_FORMAT, load_checkpoint, student_from_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def pairs():
    return real_pairs(6)


def test_one_optimisation_step_lowers_the_loss_on_real_slide_crops(pairs) -> None:
    d = Distiller(tiny_config(), fitted_teacher(pairs), CropFolder(pairs))
    lo, targets = d.batch(0)
    with torch.no_grad():
        before = float(d.model(lo, targets)["loss"])
    rec = d.train_step()  # step 0 trains on exactly this batch
    assert rec.loss == pytest.approx(before, abs=1e-5)
    with torch.no_grad():
        after = float(d.model(lo, targets)["loss"])
    assert after < before - 1e-3


def test_resume_from_a_checkpoint_gives_the_same_losses_as_an_uninterrupted_run(
    pairs, tmp_path: Path
) -> None:
    teacher = fitted_teacher(pairs)
    full = Distiller(tiny_config(), teacher, CropFolder(pairs))
    losses_full = [r.loss for r in full.run(4)]

    first = Distiller(tiny_config(), fitted_teacher(pairs), CropFolder(pairs))
    first.run(2)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    first.save(ckpt)
    resumed = Distiller(tiny_config(seed=123), fitted_teacher(pairs), CropFolder(pairs))
    resumed.cfg = tiny_config()  # the seed comes from the run being continued
    resumed.resume(ckpt)
    assert resumed.step == 2
    losses_resumed = [r.loss for r in resumed.run(2)]
    np.testing.assert_allclose(losses_resumed, losses_full[2:], rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.ema.parameters(), full.ema.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_checkpoint_has_the_shared_format_and_rebuilds_the_ema_student(
    pairs, tmp_path: Path
) -> None:
    d = Distiller(tiny_config(), fitted_teacher(pairs), CropFolder(pairs))
    d.run(1)
    path = tmp_path / "c.pt"
    d.save(path)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    for key in (
        "arch",
        "img_size",
        "embed_dim",
        "student",
        "student_ema",
        "heads",
        "config",
        "step",
        "optimizer",
        "scheduler",
        "ema_decay",
    ):
        assert key in ckpt, key
    assert ckpt["embed_dim"] == 48 and ckpt["step"] == 1 and ckpt["ema_decay"] == 0.9
    student = student_from_checkpoint(ckpt)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(student.forward_features(x), d.ema.forward_features(x), atol=1e-6)
