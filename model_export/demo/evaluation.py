"""The demo's evaluation: the modality head on slide bags, the loss curve and the honest limits.

core SlideTiles (5x, as the engine reads) -> student embeddings -> slide bags
    -> modality head (leave-one-slide-out, with two baselines) -> report pieces
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from model_export.demo.config import MODALITIES, DemoConfig
from training.config import MilConfig, SlideEntry, StudentConfig
from training.mil import head_entry, predict, train_mil
from training.models import student_tokens
from training.normalise import preprocess_tiles
from xmag.errors import NoTissueError
from xmag.tiles import SlideTiles

__all__ = [
    "SlideBag",
    "limits",
    "loss_curve_png",
    "loss_curve_summary",
    "modality_head",
    "slide_bag",
]

_EMBED_CHUNK = 32  # 5x tiles per student call when embedding slides


@dataclass(frozen=True)
class SlideBag:
    """A slide's kept 5x tiles embedded by the student, and the core's own stain guess."""

    features: np.ndarray  # (N, D) float32
    core_modality: str


def slide_bag(
    entry: SlideEntry, cfg: DemoConfig, student: torch.nn.Module, student_cfg: StudentConfig
) -> SlideBag:
    """Embed the kept tiles of a slide as the engine would: the core's ``SlideTiles`` at the
    student's tile size and mpp, then the core's preprocessing of the student config.

    Raises:
        XmagError: the core's typed errors; NoTissueError when no tile is kept.
    """
    params = entry.tiling_params(
        tile_px=student_cfg.img_size,
        target_mpp=student_cfg.mpp,
        overlap_px=cfg.tile_overlap_px,
        **cfg.tile_options.model_dump(exclude_none=True),
    )
    preprocessor = student_cfg.preprocessor()
    feats = []
    with SlideTiles.open(entry.path, params) as slide:
        plan = slide.plan
        for b in slide.batches(batch_size=_EMBED_CHUNK):
            with torch.no_grad():
                x = preprocess_tiles(preprocessor, b.pixels)
                feats.append(student_tokens(student, x)[0].numpy())
    if not feats:
        raise NoTissueError(
            f"{entry.path} has no tile kept at {student_cfg.mpp} um/px (tissue threshold "
            f"{params.tissue_threshold}, {plan.qc.tiles_total} tiles in the grid).",
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


def loss_curve_summary(hist: list[dict[str, float]]) -> dict[str, Any]:
    """First/last 10% mean loss and about 30 points of each loss series for the report."""
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


def limits(
    field_notes: dict[str, Any], tile_notes: dict[str, Any], loso: dict[str, Any]
) -> list[str]:
    """The report's honest limits, in sentences."""
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
