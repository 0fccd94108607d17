"""The project's demo model, built offline in minutes on a CPU from the real test slides.

What it is: a tiny ViT student (patch 14, 224 px at 2.0 um/px) distilled from the deterministic
handcrafted 20x teacher (stain densities and texture statistics of each 20x tile), so it learns
20x-level statistics from 5x pixels, plus a slide-level modality head (H&E / IHC / fluorescence)
trained on its embeddings, exported through ``model_export`` into a model package. A
demonstration of the pipeline, not a diagnostic model.

    slides -> core tissue mask -> 20x/5x fields (train: top of each slide, held out: bottom band)
           -> augmented-view bank (teacher run once per view) -> distillation -> EMA student
           -> core plan + tile reads (5x) -> slide bags -> modality head (leave-one-slide-out)
           -> checkpoint -> model_export -> package (card, report, parity)

Honest limits, also written into the report: 7 slides, of which only those scanned at 20x or
finer and larger than one 448-um field give distillation fields, and only those with a kept 5x tile
give the modality head a bag; each slide's modality is predicted by a head trained on the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.augment import cut_tiles, paired_augment, to_float
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
from training.data import CropFolder, FieldGeometry, FieldPair, SlideFields
from training.distill import Distiller
from training.evaluate import field_agreement, write_report
from training.mil import head_entry, predict, train_mil
from training.models import student_tokens
from training.teachers import HandcraftedTeacher
from xmag.errors import XmagError

__all__ = [
    "DEMO_PACKAGE_NAME",
    "DEMO_SLIDES",
    "BankDistiller",
    "DemoConfig",
    "DemoSlide",
    "FieldBank",
    "build_bank",
    "run_demo",
]

DEMO_PACKAGE_NAME = "xmag-demo"
DEMO_DESCRIPTION = (
    "DEMONSTRATION MODEL, NOT A DIAGNOSTIC MODEL. A tiny ViT (patch 14, 224 px at 2.0 um/px) "
    "distilled on a CPU in minutes from a handcrafted 20x teacher (stain densities and texture "
    "statistics) on 7 small public test slides, plus a slide head guessing the stain/modality "
    "(H&E, IHC, fluorescence). It shows that the pipeline runs end to end; its embeddings and "
    "predictions carry no clinical meaning. Training report: training/report.md."
)
MODALITIES = ("fluorescence", "he", "ihc")
_TEACHER_CHUNK = 64  # 20x tiles per teacher call (bounds memory: 64 x 3 x 224 x 224 floats)
_EMBED_CHUNK = 32  # 5x tiles per student call when embedding slides


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
_BY_NAME = {s.name: s for s in DEMO_SLIDES}


class DemoConfig(BaseModel):
    """Settings of the demo build (defaults: the ``make demo-model`` run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slides_dir: Path = Path("tests/data/slides")
    slides: tuple[str, ...] = Field(
        tuple(s.name for s in DEMO_SLIDES), description="subset of DEMO_SLIDES by file name"
    )
    out: Path = Path("runs/demo")
    package: Path | None = Field(None, description="model package folder to export to")
    steps: int = Field(250, ge=1)
    batch_size: int = Field(12, ge=1)
    lr: float = Field(1e-3, gt=0, description="a tiny student from scratch takes a larger step")
    fields_per_slide: int = Field(
        24, ge=1, description="training fields per slide (at most 8 per tissue position)"
    )
    heldout_per_slide: int = Field(12, ge=1, description="held-out fields per slide (at most)")
    views: int = Field(2, ge=1, description="bank views per field: the field + views-1 augmented")
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    ema_decay: float = Field(0.98, description="short run: 0.999 would keep the EMA near init")
    mil_epochs: int = Field(40, ge=1)
    seed: int = 0
    tile_overlap_px: int = Field(112, description="5x tiles for the modality head overlap by this")
    tissue_threshold: float = 0.1
    variants: tuple[str, ...] = ("fp32", "int8")
    parity_tiles_per_slide: int = Field(8, ge=1)

    @field_validator("slides")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(names) - set(_BY_NAME))
        if unknown or not names:
            raise ValueError(f"unknown demo slides {unknown}; choose among {sorted(_BY_NAME)}")
        return names


Progress = Callable[[str, int, int], None]


def _entries(cfg: DemoConfig) -> list[tuple[DemoSlide, SlideEntry]]:
    return [
        (
            _BY_NAME[n],
            SlideEntry(
                path=cfg.slides_dir / n,
                default_mpp=_BY_NAME[n].default_mpp,
                label=_BY_NAME[n].modality,
            ),
        )
        for n in cfg.slides
    ]


# -- fields ----------------------------------------------------------------------------------------
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


def _draw_fields(
    cfg: DemoConfig, geometry: FieldGeometry, rng: np.random.Generator
) -> tuple[list[FieldPair], list[FieldPair], dict[str, Any]]:
    """Training and held-out fields of every slide the teacher can see (core tissue detection)."""
    train: list[FieldPair] = []
    held: list[FieldPair] = []
    notes: dict[str, Any] = {}
    for slide, entry in _entries(cfg):
        try:
            fields = SlideFields(entry, geometry, student_view=StudentView.PYRAMID, min_tissue=0.3)
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


# -- the augmented-view bank -----------------------------------------------------------------------
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
    chunk = 4  # fields per augmentation call: 4 x 896^2 x 3 floats
    total = len(pairs) * views
    for v in range(views):
        for i in range(0, len(pairs), chunk):
            hi = to_float(np.stack([p.hi for p in pairs[i : i + chunk]]))
            lo = to_float(np.stack([p.lo for p in pairs[i : i + chunk]]))
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


def _mean_direction(x: torch.Tensor) -> torch.Tensor:
    """The best constant prediction under cosine: the mean of the unit vectors of ``x`` rows."""
    return F.normalize(F.normalize(x, dim=-1).mean(0), dim=0)


# -- the modality head -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideBag:
    """A slide's kept 5x tiles embedded by the student, and the core's own stain guess."""

    features: np.ndarray  # (N, D) float32
    core_modality: str


def _slide_bag(
    entry: SlideEntry,
    cfg: DemoConfig,
    student: torch.nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> SlideBag:
    """Plan and read the slide with the core at 2.0 um/px (as the engine does) and embed it.

    Raises:
        XmagError: the core's typed errors; NoTissueError when no tile is kept.
    """
    from xmag.errors import NoTissueError
    from xmag.params import TilingParams
    from xmag.plan import plan_slide
    from xmag.readers import open_slide
    from xmag.tiles import iter_tile_batches

    params = TilingParams(
        tile_px=224,
        target_mpp=2.0,
        overlap_px=cfg.tile_overlap_px,
        tissue_threshold=cfg.tissue_threshold,
        default_mpp=entry.default_mpp,
    )
    feats = []
    with open_slide(entry.path) as reader:
        plan = plan_slide(reader, params)
        for b in iter_tile_batches(reader, plan.grid, plan.level, batch_size=_EMBED_CHUNK):
            with torch.no_grad():
                x = (to_float(b.pixels) - mean) / std
                feats.append(student_tokens(student, x)[0].numpy())
    if not feats:
        raise NoTissueError(
            f"{entry.path} has no tile kept at 2.0 um/px (tissue threshold "
            f"{cfg.tissue_threshold}, {plan.qc.tiles_total} tiles in the grid).",
            path=entry.path,
        )
    return SlideBag(np.concatenate(feats), str(plan.qc.modality))


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
    bags: dict[str, SlideBag], labels: dict[str, str], *, epochs: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Leave-one-slide-out accuracy of the modality MIL head (with two baselines scored on the
    same held-out slides), then the head trained on every slide."""
    mil = MilConfig(hidden=64, dropout=0.0, lr=3e-3, epochs=epochs, seed=seed)
    names = sorted(bags)

    def fit(train_names: list[str]) -> Any:
        rng = np.random.default_rng(seed)
        x, y = [], []
        for n in train_names:
            subs = _sub_bags(bags[n].features, 8, rng)
            x += subs
            y += [MODALITIES.index(labels[n])] * len(subs)
        return train_mil(x, y, len(MODALITIES), mil)

    per_slide = {}
    for held in names:
        rest = [n for n in names if n != held]
        probs = predict(fit(rest), [bags[held].features])[0]
        seen = sorted({labels[n] for n in rest})
        majority = max(seen, key=lambda m: (sum(labels[n] == m for n in rest), m)) if seen else ""
        per_slide[held] = {
            "true": labels[held],
            "predicted": MODALITIES[int(probs.argmax())],
            "probabilities": {
                m: round(float(p), 4) for m, p in zip(MODALITIES, probs, strict=True)
            },
            "tiles": len(bags[held].features),
            "label_seen_in_training": labels[held] in seen,
            "majority_of_training_slides": majority,
            "core_guess_modality": bags[held].core_modality,
        }

    def acc(key: str) -> float:
        hits = [v[key] == v["true"] for v in per_slide.values()]
        return float(np.mean(hits)) if hits else float("nan")

    result = {
        "protocol": "leave-one-slide-out over the slides that gave 5x tiles: each slide is "
        "predicted by a head trained on the others only",
        "n_slides": len(names),
        "accuracy": acc("predicted"),
        "correct": sum(v["predicted"] == v["true"] for v in per_slide.values()),
        "baseline_majority_class_accuracy": acc("majority_of_training_slides"),
        "baseline_core_guess_modality_accuracy": acc("core_guess_modality"),
        "held_out_slides_whose_label_no_training_slide_has": sorted(
            n for n, v in per_slide.items() if not v["label_seen_in_training"]
        ),
        "per_slide": per_slide,
    }
    return result, head_entry(fit(names), list(MODALITIES))


# -- report pieces ---------------------------------------------------------------------------------
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


def _loss_curve(hist: list[dict[str, float]]) -> dict[str, Any]:
    k = max(1, len(hist) // 10)
    every = max(1, len(hist) // 30)
    return {
        "first_10pct_mean": float(np.mean([r["loss"] for r in hist[:k]])),
        "last_10pct_mean": float(np.mean([r["loss"] for r in hist[-k:]])),
        "every_nth_step": every,
        "loss": [round(r["loss"], 4) for r in hist[::every]],
        "global_loss": [round(r["global_loss"], 4) for r in hist[::every]],
        "local_loss": [round(r["local_loss"], 4) for r in hist[::every]],
        "png": "loss_curve.png",
    }


def _distill_config(cfg: DemoConfig) -> DistillConfig:
    return DistillConfig(
        teacher=TeacherConfig(kind=TeacherKind.HANDCRAFTED, arch="handcrafted", seed=cfg.seed),
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
        optim=OptimConfig(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            warmup_steps=min(20, max(1, cfg.steps // 10)),
        ),
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        out_dir=Path(cfg.out),
        checkpoint_every=max(cfg.steps, 1),
        device="cpu",
    )


# -- the build -------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Build the demo checkpoint, report and (when ``cfg.package``) model package.

    Writes ``cfg.out/{checkpoint.pt, report.json, report.md, loss_curve.png}``; the package gets
    the same report under ``training/``. Returns the report dict (plus ``package`` when exported).

    Raises:
        RuntimeError: too few fields or slides to train or evaluate.
        ExportError: the export or its parity check failed (see ``model_export``).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    train, held, field_notes = _draw_fields(cfg, FieldGeometry(), rng)
    if not train or not held:
        raise RuntimeError(
            f"demo found too few fields (train {len(train)}, held out {len(held)}) in "
            f"{cfg.slides_dir}; it needs slides at 20x or finer larger than one 448-um field."
        )
    lap("read_fields")

    dcfg = _distill_config(cfg)
    teacher = HandcraftedTeacher(dcfg.teacher.projection_dim, cfg.seed)
    teacher.fit(cut_tiles(to_float(np.stack([p.hi for p in train])), dcfg.loss.grid).flatten(0, 1))
    bank = build_bank(
        train,
        teacher,
        views=cfg.views,
        augment=AugmentConfig(),
        grid=dcfg.loss.grid,
        seed=cfg.seed,
        progress=progress,
    )
    lap("teacher_bank")

    d = BankDistiller(dcfg, teacher, bank)
    s = dcfg.student
    plain_targets = bank.targets[: len(train)]  # view 0: the fields themselves
    reference = _mean_direction(plain_targets.mean(1))
    local_reference = _mean_direction(plain_targets.flatten(0, 1))

    def agreement(pairs: list[FieldPair]) -> dict[str, Any]:
        return field_agreement(
            d.ema,
            d.model.loss,
            teacher,
            pairs,
            mean=s.mean,
            std=s.std,
            reference=reference,
            local_reference=local_reference,
        )

    before = agreement(held)
    lap("eval_before")

    def on_step(rec: Any) -> None:
        if progress is not None:
            progress("distill", rec.step + 1, cfg.steps)

    t_train = time.perf_counter()
    d.run(cfg.steps, on_step=on_step)
    train_s = time.perf_counter() - t_train
    lap("distill")
    after_held = agreement(held)
    after_train = agreement(train[:: max(1, len(train) // max(len(held), 1))][: len(held)])
    per_slide_held = {
        Path(name).name: agreement([p for p in held if p.slide == name])["global_cosine"]
        for name in sorted({p.slide for p in held})
    }
    hist = [r.__dict__ for r in d.history]
    loss_curve_png(hist, out / "loss_curve.png")
    lap("eval_after")

    if progress is not None:
        progress("modality head", 0, 1)
    mean = torch.tensor(s.mean).view(1, 3, 1, 1)
    std = torch.tensor(s.std).view(1, 3, 1, 1)
    bags: dict[str, SlideBag] = {}
    tile_notes: dict[str, Any] = {}
    for slide, entry in _entries(cfg):
        try:
            bags[slide.name] = _slide_bag(entry, cfg, d.ema, mean, std)
            tile_notes[slide.name] = {"tiles": len(bags[slide.name].features)}
        except XmagError as exc:
            tile_notes[slide.name] = f"no bag: [{exc.code}] {exc.message}"
    if not bags:
        raise RuntimeError("no slide gave a 5x tile; the modality head cannot be trained")
    labels = {n: _BY_NAME[n].modality for n in bags}
    loso, entry = modality_head(bags, labels, epochs=cfg.mil_epochs, seed=cfg.seed)
    if progress is not None:
        progress("modality head", 1, 1)
    lap("modality_head")

    ckpt = d.checkpoint()
    ckpt["heads"] = {"modality": entry}
    ckpt["card"] = {"name": DEMO_PACKAGE_NAME, "trained": True, "description": DEMO_DESCRIPTION}
    torch.save(ckpt, out / "checkpoint.pt")
    lap("checkpoint")

    report: dict[str, Any] = {
        "what": "xmag demo model: tiny ViT student distilled from the handcrafted 20x teacher, "
        "plus a slide-level stain/modality head. A demonstration, not a diagnostic model.",
        "not_diagnostic": True,
        "limits": _limits(field_notes, tile_notes, loso),
        "student": {**s.timm_kwargs, "arch": s.arch, "img_size": s.img_size, "mpp": s.mpp},
        "params_m": round(sum(p.numel() for p in d.ema.parameters()) / 1e6, 2),
        "teacher": {"kind": "handcrafted", "embed_dim": teacher.embed_dim, "mpp": 0.5},
        "training": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "ema_decay": cfg.ema_decay,
            "bank_views_per_field": cfg.views,
            "bank_size": len(bank),
            "steps_per_s": round(cfg.steps / train_s, 3),
        },
        "fields": field_notes,
        "loss_curve": _loss_curve(hist),
        "heldout_agreement_before": before,
        "heldout_agreement_after": after_held,
        "heldout_global_cosine_by_slide": per_slide_held,
        "train_agreement_after": after_train,
        "modality_tiles": tile_notes,
        "modality_head": loso,
        "seconds": {**timings, "total_before_export": round(time.perf_counter() - t_start, 1)},
        "torch_threads": torch.get_num_threads(),
        "config": json.loads(cfg.model_dump_json()),
    }
    write_report(report, out, title="xmag demo model report")
    if cfg.package is not None:
        report["package"] = _export(cfg, out, progress)
        report["seconds"]["export"] = round(time.perf_counter() - t0, 1)
        report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        (out / "export.json").write_text(json.dumps(report["package"], indent=2) + "\n")
    return report


def _limits(
    field_notes: dict[str, Any], tile_notes: dict[str, Any], loso: dict[str, Any]
) -> list[str]:
    distil = [n for n, v in field_notes.items() if isinstance(v, dict)]
    bagged = [n for n, v in tile_notes.items() if isinstance(v, dict)]
    return [
        f"{len(field_notes)} slides in all; {len(distil)} give distillation fields "
        f"({', '.join(distil)}): the others are coarser than 20x, smaller than one 448-um field "
        "or have no tissue field (see 'fields').",
        f"{len(bagged)} slides give 5x tiles for the modality head ({', '.join(bagged)}); "
        f"leave-one-slide-out accuracy is {loso['correct']} of {loso['n_slides']}: one slide "
        "more or less right moves it by 1/n. It says the pipeline works, not how a stain head "
        "would generalise.",
        "A held-out slide whose modality no other slide has cannot be predicted right by "
        "construction: "
        + (", ".join(loso["held_out_slides_whose_label_no_training_slide_has"]) or "none")
        + ".",
        "Held-out fields come from the bottom band of the same slides the student trained on "
        "(no training field overlaps them), not from unseen slides.",
    ]


def _export(cfg: DemoConfig, out: Path, progress: Progress | None) -> dict[str, Any]:
    """Export ``out/checkpoint.pt`` through model_export into ``cfg.package``."""
    from model_export.errors import ExportError
    from model_export.export import export_package, from_training
    from model_export.parity import collect_parity_tiles
    from xmag.package import CARD_FILENAME

    assert cfg.package is not None
    package = Path(cfg.package)
    if (package / CARD_FILENAME).is_file():
        existing = json.loads((package / CARD_FILENAME).read_text()).get("name")
        if existing != DEMO_PACKAGE_NAME:  # replace our own earlier build, nothing else
            raise ExportError(
                f"{package} holds the package {existing!r}, not a demo build; choose another "
                "--package folder.",
                reason="exists",
                path=package,
            )
    elif package.exists() and any(package.iterdir()):
        raise ExportError(
            f"{package} exists and is not a model package; choose another --package folder.",
            reason="exists",
            path=package,
        )
    if progress is not None:
        progress("export", 0, 1)
    source = from_training(out / "checkpoint.pt")
    slides = [cfg.slides_dir / n for n in cfg.slides]
    tiles = collect_parity_tiles(
        slides,
        tile_px=source.tile_px,
        target_mpp=source.target_mpp,
        tiles_per_slide=cfg.parity_tiles_per_slide,
    )
    lines: list[str] = []
    result = export_package(
        source,
        package,
        tiles,
        name=DEMO_PACKAGE_NAME,
        version="0.1.0",
        trained=True,
        description=DEMO_DESCRIPTION,
        variants=list(cfg.variants),
        card_extra={
            "intended_use": "Demonstration and testing of xmag-serve only. Not for diagnosis, "
            "research conclusions or any clinical use.",
            "license": "Demonstration weights trained on public test slides; see "
            "tests/data/slides/PROVENANCE.md for the slides' terms.",
        },
        overwrite=True,
        extra_files={
            "training/report.json": out / "report.json",
            "training/report.md": out / "report.md",
            "training/loss_curve.png": out / "loss_curve.png",
        },
        log=lines.append,
    )
    if progress is not None:
        progress("export", 1, 1)
    return {
        "path": str(result.package.root),
        "parity": next((line for line in lines if line.startswith("parity on")), ""),
        "parity_tiles": len(tiles),
        "parity_skipped": dict(tiles.skipped),
        "export_seconds": {k: round(v, 1) for k, v in result.timings_s.items()},
    }
