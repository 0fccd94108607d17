"""End-to-end fine-tuning of the student with a MIL head on slide labels."""

from __future__ import annotations

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from tests.training_helpers import fitted_teacher, real_pairs, tiny_config  # noqa: E402
from training.data import CropFolder  # noqa: E402
from training.distill import Distiller  # noqa: E402


@pytest.fixture(scope="module")
def pairs():
    return real_pairs(4)


def test_finetuning_trains_a_slide_head_with_the_distillation_regulariser(pairs) -> None:
    from training.finetune import FinetuneConfig, finetune

    teacher = fitted_teacher(pairs)
    d = Distiller(tiny_config(), teacher, CropFolder(pairs))
    d.run(1)
    ckpt = d.checkpoint()
    # 5x tiles of two "slides": the CMU-1 fields' 5x views and their colour-inverted copies.
    lo = np.stack([p.lo for p in pairs])
    tiles = {"s1": lo, "s2": 255 - lo}
    cfg = FinetuneConfig(steps=2, tiles_per_slide=3, distill_batch=2, mil_hidden=8)
    new = finetune(
        ckpt, tiles, {"s1": "a", "s2": "b"}, cfg, teacher=teacher, fields=CropFolder(pairs)
    )
    head = new["heads"]["slide"]
    assert head["kind"] == "gated_attention_mil" and head["labels"] == ["a", "b"]
    assert head["in_dim"] == 48 and head["hidden"] == 8
    assert len(new["finetune"]["loss"]) == 2
    before = ckpt["student_ema"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(new["student"]["blocks.0.attn.qkv.weight"], before)
