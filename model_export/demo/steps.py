"""The demo's training steps: fields from the slides, the teacher bank, distillation on it.

slides -> core tissue mask -> 20x/5x fields (train: top of each slide, held out: bottom band)
       -> augmented-view bank (teacher run once per view) -> ``BankDistiller`` -> EMA student
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model_export.demo.config import DemoConfig, Progress, slide_entries
from training.augment import cut_tiles, paired_augment, to_float
from training.config import AugmentConfig, DistillConfig, StudentView
from training.data import CropFolder, FieldGeometry, FieldPair, SlideFields
from training.distill import Distiller
from training.teachers import HandcraftedTeacher
from xmag.errors import XmagError

__all__ = ["BankDistiller", "FieldBank", "build_bank", "draw_fields", "mean_direction"]

_TEACHER_CHUNK = 64  # 20x tiles per teacher call (bounds memory: 64 x 3 x 224 x 224 floats)
_BANK_CHUNK = 4  # fields per augmentation call: 4 x 896^2 x 3 floats
_MIN_TISSUE = 0.3  # tissue fraction of a demo field: the small test slides have little to spare


def _split_positions(
    fields: SlideFields, n_train: int, n_held: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 corners of training fields (entirely above the bottom band) and held-out fields
    (touching the slide's bottom edge), so no training field overlaps a held-out one.

    Training corners are tissue candidates jittered by up to half a lattice step, so the fields
    are many distinct views rather than the lattice alone.
    """
    w0, h0 = fields.reader.dimensions
    side = fields.level0_side
    y_split = h0 - side
    step = side / 4
    cand = fields.candidates
    tr = cand[cand[:, 1] + side <= y_split]
    ho = cand[cand[:, 1] >= y_split - step].copy()
    ho[:, 1] = int(max(y_split, 0))
    ho = np.unique(ho, axis=0)
    if len(tr) == 0 or len(ho) == 0:  # the slide is one field tall: everything trains
        tr, ho = cand, cand[:0]
    n_train = min(n_train, 8 * len(tr))  # a one-position slide gives a few jittered copies
    base = tr[rng.integers(len(tr), size=n_train)].astype(np.float64)
    base += rng.uniform(-step / 2, step / 2, size=base.shape)
    base[:, 0] = np.clip(base[:, 0], 0, max(w0 - side, 0))
    base[:, 1] = np.clip(base[:, 1], 0, max(min(y_split - side, h0 - side), 0))
    held = ho[rng.choice(len(ho), size=min(n_held, len(ho)), replace=False)] if len(ho) else ho
    return np.round(base).astype(np.int64), held


def draw_fields(
    cfg: DemoConfig, geometry: FieldGeometry, rng: np.random.Generator
) -> tuple[list[FieldPair], list[FieldPair], dict[str, Any]]:
    """Training and held-out fields of every slide the teacher can see (core tissue detection),
    and a note per slide: its field counts, or why it gave none."""
    train: list[FieldPair] = []
    held: list[FieldPair] = []
    notes: dict[str, Any] = {}
    for slide, entry in slide_entries(cfg):
        try:
            fields = SlideFields(
                entry, geometry, student_view=StudentView.PYRAMID, min_tissue=_MIN_TISSUE
            )
        except XmagError as exc:  # coarser than 20x, smaller than a field, no tissue, no mpp
            notes[slide.name] = f"not used for distillation: [{exc.code}] {exc.message}"
            continue
        try:
            tr, ho = _split_positions(fields, cfg.fields_per_slide, cfg.heldout_per_slide, rng)
            train += [fields.read((int(x), int(y))) for x, y in tr]
            held += [fields.read((int(x), int(y))) for x, y in ho]
            notes[slide.name] = {
                "train_fields": len(tr),
                "heldout_fields": len(ho),
                "candidate_positions": len(fields.candidates),
            }
        finally:
            fields.close()
    return train, held, notes


@dataclass(frozen=True)
class FieldBank:
    """Augmented 5x views and their teacher targets, computed once.

    The handcrafted teacher costs about 20x the tiny student per field, so running it once per
    view (instead of once per step) is what makes the demo take minutes. ``lo`` (N, 3, S, S)
    uint8, ``targets`` (N, grid*grid, Dt) float32, ``field`` (N,) index of the source field.
    """

    lo: torch.Tensor
    targets: torch.Tensor
    field: np.ndarray

    def __len__(self) -> int:
        return int(self.lo.shape[0])


@torch.no_grad()
def _teacher_tiles(teacher: HandcraftedTeacher, hi: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid*grid, Dt) teacher embeddings of the row-major tiles of (B, 3, F, F) fields."""
    tiles = cut_tiles(hi, grid)
    flat = tiles.flatten(0, 1)
    out = torch.cat([teacher(c) for c in flat.split(_TEACHER_CHUNK)])
    return out.view(tiles.shape[0], tiles.shape[1], -1)


def build_bank(
    pairs: list[FieldPair],
    teacher: HandcraftedTeacher,
    *,
    views: int,
    augment: AugmentConfig,
    grid: int,
    seed: int,
    progress: Progress | None = None,
) -> FieldBank:
    """View 0 of each field is the field itself; views 1.. the paired flips and colour jitter."""
    gen = torch.Generator().manual_seed(seed)
    lo_all, tgt_all, idx_all = [], [], []
    total = len(pairs) * views
    for v in range(views):
        for i in range(0, len(pairs), _BANK_CHUNK):
            hi = to_float(np.stack([p.hi for p in pairs[i : i + _BANK_CHUNK]]))
            lo = to_float(np.stack([p.lo for p in pairs[i : i + _BANK_CHUNK]]))
            if v > 0:
                hi, lo = paired_augment(hi, lo, augment, gen)
            tgt_all.append(_teacher_tiles(teacher, hi, grid))
            lo_all.append(lo.mul(255).round().to(torch.uint8))
            idx_all.append(np.arange(i, i + len(lo)))
            if progress is not None:
                progress("teacher bank", v * len(pairs) + i + len(lo), total)
    return FieldBank(torch.cat(lo_all), torch.cat(tgt_all), np.concatenate(idx_all))


class BankDistiller(Distiller):
    """The run of ``Distiller`` (loss, EMA, schedule, checkpoint) on a precomputed bank."""

    def __init__(self, cfg: DistillConfig, teacher: HandcraftedTeacher, bank: FieldBank):
        # The field source is never drawn from: batches come from the bank.
        super().__init__(cfg, teacher, CropFolder([_placeholder_pair()]))
        self.bank = bank

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step, self.rank])
        idx = torch.as_tensor(rng.integers(len(self.bank), size=self.cfg.optim.batch_size))
        lo = self.bank.lo[idx].float().div_(255.0)
        return lo.to(self.device), self.bank.targets[idx].to(self.device)


def _placeholder_pair() -> FieldPair:
    z = np.zeros((1, 1, 3), np.uint8)
    return FieldPair(z, z, "bank", (-1, -1), "bank")


def mean_direction(x: torch.Tensor) -> torch.Tensor:
    """The best constant prediction under cosine: the mean of the unit vectors of ``x`` rows."""
    return F.normalize(F.normalize(x, dim=-1).mean(0), dim=0)
