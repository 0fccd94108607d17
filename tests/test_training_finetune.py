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


def test_finetuning_carries_train_mil_s_head_drops_stale_heads_and_records_the_lineage(
    pairs,
) -> None:
    from training.errors import LabelsError
    from training.finetune import FinetuneConfig, finetune
    from training.mil import head_entry
    from training.models import GatedAttentionMIL

    d = Distiller(tiny_config(), fitted_teacher(pairs), CropFolder(pairs))
    d.run(2)
    ckpt = d.checkpoint()
    torch.manual_seed(5)
    mil = GatedAttentionMIL(48, 8, 2)
    ckpt["heads"] = {
        "slide": head_entry(mil, ["a", "b"]),
        "stain": head_entry(GatedAttentionMIL(48, 8, 3), ["x", "y", "z"]),
    }
    ckpt["lineage"] = [*ckpt["lineage"], {"stage": "mil", "head": "slide", "slides": 2}]
    lo = np.stack([p.lo for p in pairs])
    tiles, labels = {"s1": lo, "s2": 255 - lo}, {"s1": "a", "s2": "b"}
    cfg = FinetuneConfig(steps=1, tiles_per_slide=2, student_lr=1e-12, head_lr=1e-12)
    new = finetune(ckpt, tiles, labels, cfg)
    assert set(new["heads"]) == {"slide"}  # "stain" saw the pre-finetune embeddings: dropped
    start = new["heads"]["slide"]["state_dict"]["classifier.weight"]
    assert torch.allclose(start, mil.state_dict()["classifier.weight"], atol=1e-6)  # carried
    assert new["step"] == 2  # the student's distillation step, not 0
    assert [s["stage"] for s in new["lineage"]] == ["distill", "mil", "finetune"]
    stage = new["lineage"][-1]
    assert stage["head_start"] == "carried from the checkpoint"
    assert stage["dropped_heads"] == ["stain"]

    kept = finetune(ckpt, tiles, labels, cfg.model_copy(update={"keep_other_heads": True}))
    assert kept["heads"]["stain"]["stale"] is True
    fresh = finetune(ckpt, tiles, labels, cfg.model_copy(update={"head": "fresh"}))
    assert fresh["lineage"][-1]["head_start"] == "fresh"
    with pytest.raises(LabelsError, match="predicts"):
        finetune(ckpt, tiles, {"s1": "a", "s2": "c"}, cfg)
