"""The card tells the whole lineage of a checkpoint: distill -> MIL head -> fine-tuning."""

from __future__ import annotations

from tests.torch_required import require_torch

require_torch()

from model_export.export import lineage_text  # noqa: E402


def test_the_card_notes_name_every_stage_of_a_finetuned_checkpoint() -> None:
    ckpt = {
        "step": 250,
        "lineage": [
            {"stage": "distill", "step": 250, "steps": 250, "teacher": "handcrafted:handcrafted"},
            {"stage": "mil", "head": "stain", "slides": 7, "mean_auc": 0.8125, "folds": 2},
            {
                "stage": "finetune",
                "step": 20,
                "head": "stain",
                "head_start": "carried from the checkpoint",
                "dropped_heads": ["old"],
            },
        ],
    }
    text = lineage_text(ckpt)
    assert text == (
        "distill (250 of 250 steps, teacher handcrafted:handcrafted) -> mil head 'stain' "
        "(7 slides, 2-fold AUC 0.812) -> finetune (20 steps, head 'stain' carried from the "
        "checkpoint, dropped stale heads ['old'])"
    )


def test_a_checkpoint_without_lineage_is_described_by_its_distillation_step() -> None:
    assert lineage_text({"step": 150}) == "distill (150 steps)"
