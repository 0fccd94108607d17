"""End-to-end fine-tuning: the student and a MIL head on slide labels, distillation as regulariser.

Each step takes one slide (classes drawn uniformly), a random subset of its 5x tiles (gradients
flow through the student for those tiles only, bounding memory), and the MIL cross-entropy; when a
teacher and a field source are given, the distillation loss on a batch of fields is added with
weight ``distill_weight`` so the student keeps what it learned from the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from training.augment import to_float
from training.config import DistillConfig, SlideEntry
from training.data import FieldSource
from training.distill import Distiller
from training.mil import head_entry
from training.models import GatedAttentionMIL, load_checkpoint, student_tokens
from training.teachers import Teacher

__all__ = ["FinetuneConfig", "finetune", "read_slide_tiles"]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1)
    tiles_per_slide: int = Field(16, ge=1, description="tiles with gradients per step")
    student_lr: float = Field(1e-5, gt=0)
    head_lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    clip_grad: float = Field(1.0, gt=0)
    mil_hidden: int = Field(128, ge=1)
    distill_weight: float = Field(0.5, ge=0)
    distill_batch: int = Field(4, ge=1)
    head_name: str = "slide"
    seed: int = 0


def read_slide_tiles(
    entry: SlideEntry,
    *,
    tile_px: int = 224,
    mpp: float = 2.0,
    overlap_px: int = 0,
    tissue_threshold: float | None = None,
) -> np.ndarray:
    """(N, tile_px, tile_px, 3) uint8 kept tiles of a slide, read by the core as the service does.

    Raises:
        XmagError: the core's typed errors (unknown mpp, no tissue, unreadable slide).
    """
    from xmag.errors import NoTissueError
    from xmag.params import TilingParams
    from xmag.plan import plan_slide
    from xmag.readers import open_slide
    from xmag.tiles import iter_tile_batches

    extra = {} if tissue_threshold is None else {"tissue_threshold": tissue_threshold}
    params = TilingParams(
        tile_px=tile_px,
        target_mpp=mpp,
        overlap_px=overlap_px,
        mpp_override=entry.mpp_override,
        default_mpp=entry.default_mpp,
        **extra,
    )
    with open_slide(entry.path) as reader:
        plan = plan_slide(reader, params)
        chunks = [b.pixels for b in iter_tile_batches(reader, plan.grid, plan.level)]
    if not chunks:
        raise NoTissueError(f"{entry.path} has no tile kept at {mpp} um/px.", path=entry.path)
    return np.concatenate(chunks)


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
    names = sorted(set(labels.values()))
    head = GatedAttentionMIL(int(ckpt["embed_dim"]), cfg.mil_hidden, len(names))
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
        x = (to_float(bank[pick]) - d.model.mean) / d.model.std
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
    out["heads"] = {**dict(ckpt.get("heads") or {}), cfg.head_name: head_entry(head, names)}
    out["finetune"] = {"config": cfg.model_dump(mode="json"), "loss": history}
    return out


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
