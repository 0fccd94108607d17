"""End-to-end fine-tuning: the student and a MIL head on slide labels, distillation as regulariser.

Each step takes one slide (classes drawn uniformly), a random subset of its 5x tiles (gradients
flow through the student for those tiles only, bounding memory), and the MIL cross-entropy; when a
teacher and a field source are given, the distillation loss on a batch of fields is added with
weight ``distill_weight`` so the student keeps what it learned from the teacher.

Heads, on purpose: the head named ``head_name`` starts from the checkpoint's head of that name
(trained by ``train-mil`` on this student's embeddings) when ``head="carry"`` and one exists with
the same labels (other labels are refused); ``head="fresh"`` starts a new one. Every *other*
head was trained on the embeddings of the student before fine-tuning, which change: they are
dropped (``keep_other_heads=True`` keeps them, marked stale). The lineage (distill -> mil ->
finetune) and these choices are recorded in the checkpoint (``lineage``), which the export's card
repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from training.config import DistillConfig, SlideEntry
from training.data import FieldSource
from training.distill import Distiller
from training.errors import LabelsError
from training.mil import head_entry
from training.models import GatedAttentionMIL, load_checkpoint, student_tokens
from training.normalise import preprocess_tiles
from training.teachers import Teacher

__all__ = ["FinetuneConfig", "finetune", "read_slide_tiles"]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="optimiser steps, one slide each")
    tiles_per_slide: int = Field(16, ge=1, description="tiles with gradients per step")
    student_lr: float = Field(1e-5, gt=0, description="AdamW lr of the student")
    head_lr: float = Field(2e-4, gt=0, description="AdamW lr of the MIL head")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    clip_grad: float = Field(1.0, gt=0, description="gradient norm clip")
    mil_hidden: int = Field(128, ge=1, description="hidden width of a fresh head")
    distill_weight: float = Field(
        0.5, ge=0, description="weight of the distillation loss (needs --crops)"
    )
    distill_batch: int = Field(4, ge=1, description="fields per step for the distillation term")
    head_name: str = Field("slide", description="the head trained (card, heads/<name>.onnx)")
    head: str = Field(
        "carry",
        pattern="^(carry|fresh)$",
        description="'carry': start from the checkpoint's head of that name (train-mil's) when "
        "there is one; 'fresh': a new head",
    )
    keep_other_heads: bool = Field(
        False,
        description="keep the checkpoint's other heads (trained on the pre-finetune "
        "embeddings; marked stale) instead of dropping them",
    )
    log_every: int = Field(10, ge=1, description="steps between loss lines")
    seed: int = Field(0, description="seeds slide and tile draws")


def read_slide_tiles(
    entry: SlideEntry,
    *,
    tile_px: int = 224,
    mpp: float = 2.0,
    overlap_px: int = 0,
    tissue_threshold: float | None = None,
) -> np.ndarray:
    """(N, tile_px, tile_px, 3) uint8 kept tiles of a slide: the core's ``SlideTiles``, i.e. the
    plan and tile reads of the service.

    Raises:
        XmagError: the core's typed errors (unknown mpp, no tissue, unreadable slide).
    """
    from xmag.errors import NoTissueError
    from xmag.tiles import SlideTiles

    extra = {} if tissue_threshold is None else {"tissue_threshold": tissue_threshold}
    params = entry.tiling_params(tile_px=tile_px, target_mpp=mpp, overlap_px=overlap_px, **extra)
    with SlideTiles.open(entry.path, params) as slide:
        pixels = slide.pixels()
    if len(pixels) == 0:
        raise NoTissueError(f"{entry.path} has no tile kept at {mpp} um/px.", path=entry.path)
    return pixels


def finetune(
    checkpoint: Path | Mapping[str, Any],
    tiles: Mapping[str, np.ndarray],
    labels: Mapping[str, str],
    cfg: FinetuneConfig,
    *,
    teacher: Teacher | None = None,
    fields: FieldSource | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a distillation checkpoint on slide labels; returns the new checkpoint dict.

    Args:
        checkpoint: a distillation checkpoint (path or loaded dict).
        tiles: slide id -> (N, S, S, 3) uint8 5x tiles.
        labels: slide id -> label name.
        teacher, fields: both given = keep the distillation loss as a regulariser.
    """
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    dcfg = DistillConfig.model_validate(ckpt["config"])
    dcfg = dcfg.model_copy(
        update={"optim": dcfg.optim.model_copy(update={"batch_size": cfg.distill_batch})}
    )
    regularise = teacher is not None and fields is not None and cfg.distill_weight > 0
    if teacher is None:
        teacher = _NoTeacher(int(ckpt["distill_heads"]["global_head.fc2.weight"].shape[0]))
    d = Distiller(dcfg, teacher, fields or _NoFields())
    d.model.student.load_state_dict(ckpt["student_ema"])
    d.model.loss.load_state_dict(ckpt["distill_heads"])
    d.ema.load_state_dict(ckpt["student_ema"])
    d.step = int(ckpt.get("step", 0))  # the student's distillation step, not the finetune's
    names = sorted(set(labels.values()))
    head, carried = _start_head(ckpt, cfg, names)
    opt = torch.optim.AdamW(
        [
            {"params": d.model.parameters(), "lr": cfg.student_lr},
            {"params": head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    by_class: dict[int, list[str]] = {}
    for sid in tiles:
        by_class.setdefault(names.index(labels[sid]), []).append(sid)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    history = []
    for step in range(cfg.steps):
        cls_id = sorted(by_class)[rng.integers(len(by_class))]
        sid = by_class[cls_id][rng.integers(len(by_class[cls_id]))]
        bank = tiles[sid]
        pick = rng.choice(len(bank), size=min(cfg.tiles_per_slide, len(bank)), replace=False)
        d.model.train()
        x = preprocess_tiles(d.preprocessor, bank[pick], d.device)
        emb, _ = student_tokens(d.model.student, x)
        logits, _ = head.forward_logits(emb)
        loss = F.cross_entropy(logits[None], torch.tensor([cls_id]))
        if regularise:
            lo, targets = d.batch(step)
            loss = loss + cfg.distill_weight * d.model(lo, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*d.model.parameters(), *head.parameters()], cfg.clip_grad)
        opt.step()
        d._update_ema()
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, history[-1])
    out = d.checkpoint()
    others = {k: v for k, v in dict(ckpt.get("heads") or {}).items() if k != cfg.head_name}
    kept = {k: {**v, "stale": True} for k, v in others.items()} if cfg.keep_other_heads else {}
    entry = head_entry(head, names)
    entry["trained_on"] = {"stage": "finetune", "student_step": d.step}
    out["heads"] = {**kept, cfg.head_name: entry}
    out["history"] = list(ckpt.get("history") or [])
    out["run_log"] = list(ckpt.get("run_log") or [])
    out["lineage"] = [
        *(ckpt.get("lineage") or out["lineage"]),
        {
            "stage": "finetune",
            "step": cfg.steps,
            "head": cfg.head_name,
            "head_start": "carried from the checkpoint" if carried else "fresh",
            "dropped_heads": sorted(others) if not cfg.keep_other_heads else [],
            "stale_heads": sorted(others) if cfg.keep_other_heads else [],
            "distill_regulariser": regularise,
            "final_loss": history[-1] if history else None,
        },
    ]
    out["finetune"] = {"config": cfg.model_dump(mode="json"), "loss": history}
    return out


def _start_head(
    ckpt: Mapping[str, Any], cfg: FinetuneConfig, names: list[str]
) -> tuple[GatedAttentionMIL, bool]:
    """The head to fine-tune and whether it was carried from the checkpoint.

    Raises:
        LabelsError: ``head="carry"`` and the checkpoint's head has other labels.
    """
    entry = (ckpt.get("heads") or {}).get(cfg.head_name)
    if cfg.head == "fresh" or entry is None:
        return GatedAttentionMIL(int(ckpt["embed_dim"]), cfg.mil_hidden, len(names)), False
    if list(entry["labels"]) != names:
        raise LabelsError(
            f"the checkpoint's head {cfg.head_name!r} predicts {list(entry['labels'])} but the "
            f"labels CSV has {names}; use the labels it was trained on, --head fresh for a new "
            "head, or another --head-name.",
        )
    head = GatedAttentionMIL(int(entry["in_dim"]), int(entry["hidden"]), len(names))
    head.load_state_dict(entry["state_dict"])
    return head, True


class _NoTeacher(Teacher):
    """Stands in for a teacher when fine-tuning without the distillation regulariser."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("no teacher given")


class _NoFields:
    def draw(self, n: int, rng: np.random.Generator) -> Sequence[Any]:  # pragma: no cover
        raise RuntimeError("no field source given")
