"""The project's demo model, built offline in minutes on a CPU from the real test slides.

What it is: a tiny ViT student (patch 14, 224 px at 2.0 um/px) distilled from the deterministic
handcrafted 20x teacher (stain densities and texture statistics of each 20x tile), so it learns
20x-level statistics from 5x pixels, plus a slide-level modality head (H&E / IHC / fluorescence)
trained on its embeddings. A demonstration of the pipeline, not a diagnostic model.

Honest limits, also written into the report: 7 slides; the modality head is evaluated by
leave-one-slide-out (each slide predicted by a head trained on the other six); held-out fields for
the teacher-student cosine come from a band of each slide that no training field overlaps.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from training.augment import cut_tiles, to_float
from training.config import (
    AugmentConfig,
    DataConfig,
    DistillConfig,
    LossConfig,
    MilConfig,
    OptimConfig,
    SlideEntry,
    StudentConfig,
    StudentView,
    TeacherConfig,
    TeacherKind,
)
from training.data import CropFolder, FieldGeometry, FieldPair, SlideFields, TissueFn
from training.distill import Distiller
from training.evaluate import field_agreement, write_report
from training.finetune import read_slide_tiles
from training.mil import head_entry, predict, train_mil
from training.models import student_tokens
from training.teachers import HandcraftedTeacher
from xmag.errors import XmagError

__all__ = ["DEMO_SLIDES", "DemoConfig", "DemoSlide", "run_demo"]


@dataclass(frozen=True)
class DemoSlide:
    """A real slide of tests/data/slides with its modality from PROVENANCE.md."""

    name: str
    modality: str
    default_mpp: float | None = None  # stated assumption for files that give no mpp
    note: str = ""


DEMO_SLIDES: tuple[DemoSlide, ...] = (
    DemoSlide("CMU-1-Small-Region.svs", "he"),
    DemoSlide(
        "tcga-cr-7395-01a-01-ts1.svs",
        "he",
        1.0,
        "no mpp in file; 1.0 um/px assumed from lymphocyte nuclei of about 7 px",
    ),
    DemoSlide("OS-1-detail.ome.tif", "he"),
    DemoSlide("OS-2-ndpi.ome.tif", "ihc"),
    DemoSlide("kidney-48-5.tif", "ihc", 0.5, "no mpp in file; 0.5 um/px assumed"),
    DemoSlide("test3-DAPI-2-387.ndpi", "fluorescence"),
    DemoSlide("BPAEC-dicom", "fluorescence"),
)
MODALITIES = ("fluorescence", "he", "ihc")


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slides_dir: Path = Path("tests/data/slides")
    out: Path = Path("runs/demo")
    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=1)
    fields_per_slide: int = Field(32, ge=1, description="training fields drawn per slide")
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    ema_decay: float = Field(0.98, description="short run: 0.999 would keep the EMA near init")
    seed: int = 0
    tile_overlap_px: int = Field(112, description="5x tiles for the modality head overlap by this")
    tissue_threshold: float = 0.1


Progress = Callable[[str, int, int], None]


def _entries(cfg: DemoConfig) -> list[tuple[DemoSlide, SlideEntry]]:
    return [
        (s, SlideEntry(path=cfg.slides_dir / s.name, default_mpp=s.default_mpp, label=s.modality))
        for s in DEMO_SLIDES
    ]


def _draw_fields(
    cfg: DemoConfig,
    geometry: FieldGeometry,
    rng: np.random.Generator,
    tissue_fn: TissueFn | None = None,
) -> tuple[list[FieldPair], list[FieldPair], dict[str, Any]]:
    """Train fields from the top of each usable slide, held-out fields from its bottom band."""
    train, held, used = [], [], {}
    for slide, entry in _entries(cfg):
        try:
            fields = SlideFields(entry, geometry, student_view=StudentView.PYRAMID, min_tissue=0.3)
        except XmagError as exc:  # too coarse for 20x, too small for one field, no tissue
            used[slide.name] = f"not used for distillation: [{exc.code}] {exc.message}"
            continue
        try:
            # Held-out fields touch the bottom edge; training fields lie entirely above them.
            h0, side = fields.reader.dimensions[1], fields.level0_side
            y_split = h0 - side
            step = side / 4
            ys = fields.candidates[:, 1]
            tr = fields.candidates[ys + side <= y_split]
            ho = fields.candidates[ys >= y_split - step].copy()
            ho[:, 1] = int(max(y_split, 0))
            ho = np.unique(ho, axis=0)
            if len(ho) == 0 or len(tr) == 0:
                tr, ho = fields.candidates, fields.candidates[:0]
            pick = rng.choice(len(tr), size=min(cfg.fields_per_slide, len(tr)), replace=False)
            train += [fields.read((int(x), int(y))) for x, y in tr[pick]]
            held_pick = rng.choice(len(ho), size=min(12, len(ho)), replace=False)
            held += [fields.read((int(x), int(y))) for x, y in ho[held_pick]]
            used[slide.name] = {"train_fields": len(pick), "heldout_fields": len(held_pick)}
        finally:
            fields.close()
    return train, held, used


def _slide_bags(
    cfg: DemoConfig, student: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """CLS embeddings of each slide's kept 5x tiles, read by the core as the service reads them."""
    bags, notes = {}, {}
    for slide, entry in _entries(cfg):
        try:
            tiles = read_slide_tiles(
                entry, overlap_px=cfg.tile_overlap_px, tissue_threshold=cfg.tissue_threshold
            )
        except XmagError as exc:
            notes[slide.name] = f"[{exc.code}] {exc.message}"
            continue
        feats = []
        for i in range(0, len(tiles), 32):
            with torch.no_grad():
                x = (to_float(tiles[i : i + 32]) - mean) / std
                feats.append(student_tokens(student, x)[0].numpy())
        bags[slide.name] = np.concatenate(feats)
        notes[slide.name] = {"tiles": len(tiles)}
    return bags, notes


def _sub_bags(
    bag: np.ndarray, n: int, rng: np.random.Generator, max_tiles: int = 16
) -> list[np.ndarray]:
    """``n`` random subsets of a slide's tiles: more training bags from few slides."""
    out = [bag]
    for _ in range(n - 1):
        k = int(rng.integers(1, min(max_tiles, len(bag)) + 1))
        out.append(bag[rng.choice(len(bag), size=k, replace=False)])
    return out


def modality_head(
    bags: dict[str, np.ndarray], labels: dict[str, str], seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Leave-one-slide-out accuracy of the modality MIL head, then the head trained on all."""
    cfg = MilConfig(hidden=64, dropout=0.0, lr=1e-3, epochs=30, seed=seed)
    names = sorted(bags)

    def fit(train_names: list[str]) -> Any:
        rng = np.random.default_rng(seed)
        x, y = [], []
        for n in train_names:
            subs = _sub_bags(bags[n], 8, rng)
            x += subs
            y += [MODALITIES.index(labels[n])] * len(subs)
        return train_mil(x, y, len(MODALITIES), cfg)

    per_slide = {}
    for held in names:
        head = fit([n for n in names if n != held])
        probs = predict(head, [bags[held]])[0]
        per_slide[held] = {
            "true": labels[held],
            "predicted": MODALITIES[int(probs.argmax())],
            "probabilities": {m: float(p) for m, p in zip(MODALITIES, probs, strict=True)},
        }
    correct = [v["true"] == v["predicted"] for v in per_slide.values()]
    result = {
        "protocol": "leave-one-slide-out over the slides that gave 5x tiles",
        "n_slides": len(names),
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "per_slide": per_slide,
    }
    return result, head_entry(fit(names), list(MODALITIES))


def loss_curve_png(history: list[dict[str, float]], path: Path) -> None:
    """Plot total, global and local loss per step (PIL; no plotting library needed)."""
    w, h, pad = 720, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    series = {"loss": (0, 0, 0), "global_loss": (200, 30, 30), "local_loss": (30, 90, 200)}
    vals = np.array([[r[k] for k in series] for r in history])
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1
    n = max(1, len(history) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * i / n, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    d.rectangle([pad, pad, w - pad, h - pad], outline=(160, 160, 160))
    for j, (name, colour) in enumerate(series.items()):
        pts = [xy(i, v) for i, v in enumerate(vals[:, j])]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((pad + 10 + 150 * j, 15), name, fill=colour)
    d.text((5, pad - 5), f"{hi:.3f}", fill=(0, 0, 0))
    d.text((5, h - pad - 5), f"{lo:.3f}", fill=(0, 0, 0))
    d.text((w - pad - 60, h - pad + 10), f"step {n}", fill=(0, 0, 0))
    img.save(path)


def run_demo(
    cfg: DemoConfig,
    progress: Progress | None = None,
    *,
    tissue_fn: TissueFn | None = None,
    modality: bool = True,
) -> dict[str, Any]:
    """Build the demo checkpoint and report under ``cfg.out``; returns the report dict.

    ``tissue_fn`` replaces the core's ``detect_tissue`` for field selection; ``modality=False``
    skips the slide-level head (which needs the core's planner and tile reader).
    """
    t0 = time.perf_counter()
    if modality:  # fail before minutes of training, not after, if the core's planner is absent
        for name in ("xmag.plan", "xmag.tiles"):
            importlib.import_module(name)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    geometry = FieldGeometry()
    train, held, field_notes = _draw_fields(cfg, geometry, rng, tissue_fn)
    if not train or not held:
        raise RuntimeError(f"demo found too few fields (train {len(train)}, held {len(held)})")

    teacher = HandcraftedTeacher(projection_dim=64, seed=cfg.seed)
    teacher.fit(cut_tiles(to_float(np.stack([p.hi for p in train])), 4).flatten(0, 1))
    dcfg = DistillConfig(
        teacher=TeacherConfig(kind=TeacherKind.HANDCRAFTED, arch="handcrafted"),
        student=StudentConfig(
            arch="vit_small_patch14_dinov2",
            timm_kwargs={
                "embed_dim": cfg.embed_dim,
                "depth": cfg.depth,
                "num_heads": cfg.num_heads,
            },
        ),
        loss=LossConfig(head_hidden=256),
        augment=AugmentConfig(views=1),
        data=DataConfig(
            slides=tuple(e for _, e in _entries(cfg)), student_view=StudentView.PYRAMID
        ),
        optim=OptimConfig(steps=cfg.steps, batch_size=cfg.batch_size, warmup_steps=10),
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        out_dir=out,
        checkpoint_every=max(cfg.steps, 1),
        device="cpu",
    )
    d = Distiller(dcfg, teacher, CropFolder(train))
    s = dcfg.student

    # Mean teacher field embedding of the training fields: the "always predict the average"
    # baseline the held-out cosine must beat to show the student reads each field.
    with torch.no_grad():
        reference = torch.cat(
            [
                d.teacher_targets(to_float(np.stack([p.hi for p in train[i : i + 8]]))).mean(1)
                for i in range(0, len(train), 8)
            ]
        ).mean(0)

    def agreement(pairs: list[FieldPair]) -> dict[str, Any]:
        return field_agreement(
            d.ema, d.model.loss, teacher, pairs, mean=s.mean, std=s.std, reference=reference
        )

    before = agreement(held)

    def on_step(rec: Any) -> None:
        if progress is not None:
            progress("distill", rec.step + 1, cfg.steps)

    d.run(cfg.steps, on_step=on_step)
    after_held, after_train = agreement(held), agreement(train[: len(held)])
    hist = [r.__dict__ for r in d.history]
    loss_curve_png(hist, out / "loss_curve.png")

    ckpt = d.checkpoint()
    loso: dict[str, Any] = {"skipped": True}
    tile_notes: dict[str, Any] = {}
    if modality:
        if progress is not None:
            progress("modality head", 0, 1)
        mean = torch.tensor(s.mean).view(1, 3, 1, 1)
        std = torch.tensor(s.std).view(1, 3, 1, 1)
        bags, tile_notes = _slide_bags(cfg, d.ema, mean, std)
        labels = {sl.name: sl.modality for sl in DEMO_SLIDES}
        loso, entry = modality_head(bags, labels, cfg.seed)
        ckpt["heads"] = {"modality": entry}
    ckpt["card"] = {
        "name": "xmag-demo-student",
        "trained": True,
        "description": "Demonstration model, not a diagnostic model: a tiny ViT distilled from "
        "handcrafted 20x stain/texture statistics on 7 public test slides.",
    }
    torch.save(ckpt, out / "checkpoint.pt")

    k = max(1, len(hist) // 10)
    report = {
        "what": "xmag demo: tiny ViT student distilled from the handcrafted 20x teacher",
        "not_diagnostic": True,
        "student": {**s.timm_kwargs, "arch": s.arch, "img_size": s.img_size, "mpp": s.mpp},
        "teacher": {"kind": "handcrafted", "embed_dim": teacher.embed_dim},
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "ema_decay": cfg.ema_decay,
        "fields": field_notes,
        "loss_curve": {
            "first_10pct_mean": float(np.mean([r["loss"] for r in hist[:k]])),
            "last_10pct_mean": float(np.mean([r["loss"] for r in hist[-k:]])),
            "every_10th_step": [round(r["loss"], 4) for r in hist[::10]],
            "png": "loss_curve.png",
        },
        "heldout_agreement_before": before,
        "heldout_agreement_after": after_held,
        "train_agreement_after": after_train,
        "modality_tiles": tile_notes,
        "modality_head": loso,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(report, out, title="xmag demo model report")
    return report
