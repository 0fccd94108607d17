"""``run_demo``: the demo recipe from slides to package, one step after another.

steps       fields -> teacher bank -> distillation (EMA student)
evaluation  held-out agreement, loss curve, slide bags -> modality head
package     checkpoint -> export_package -> model package (card, report, parity)
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.demo.config import (
    DEMO_DESCRIPTION,
    DEMO_PACKAGE_NAME,
    DemoConfig,
    Progress,
    demo_slide,
    distill_config,
    slide_entries,
)
from model_export.demo.evaluation import (
    SlideBag,
    limits,
    loss_curve_png,
    loss_curve_summary,
    modality_head,
    slide_bag,
)
from model_export.demo.package import export_demo
from model_export.demo.steps import BankDistiller, build_bank, draw_fields, mean_direction
from training.augment import cut_tiles, to_float
from training.config import AugmentConfig
from training.data import FieldGeometry, FieldPair
from training.evaluate import field_agreement, write_report
from training.teachers import HandcraftedTeacher
from xmag.errors import XmagError

__all__ = ["run_demo"]


class _Laps:
    """Seconds per named stage, each measured from the end of the previous one."""

    def __init__(self) -> None:
        self.start = self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t0, 1)
        self.t0 = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Build the demo checkpoint, report and (when ``cfg.package``) model package.

    Writes ``cfg.out/{checkpoint.pt, report.json, report.md, loss_curve.png, timings.json}``;
    the package gets the same report (not the timings) under ``training/``. Torch runs with
    ``cfg.torch_threads`` threads and deterministic kernels, so the same sources give the same
    bytes. Returns the report dict plus ``seconds`` and ``distill_steps_per_s`` (and ``package``
    when exported).

    Raises:
        RuntimeError: too few fields or slides to train or evaluate.
        ExportError: the export or its parity check failed (see ``model_export``).
    """
    with _deterministic_torch(cfg.torch_threads):
        return _run_demo(cfg, progress)


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels while the demo builds; restored after.

    The same sources then give the same weights on every run and in every folder, so the
    package's bytes (and ``make demo-model-check``) are reproducible.
    """
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # CPU kernels: none should warn
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def _run_demo(cfg: DemoConfig, progress: Progress | None) -> dict[str, Any]:
    lap = _Laps()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    train, held, field_notes = draw_fields(cfg, FieldGeometry(), rng)
    if not train or not held:
        raise RuntimeError(
            f"demo found too few fields (train {len(train)}, held out {len(held)}) in "
            f"{cfg.slides_dir}; it needs slides at 20x or finer larger than one 448-um field."
        )
    lap("read_fields")

    dcfg = distill_config(cfg)
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
    reference = mean_direction(plain_targets.mean(1))
    local_reference = mean_direction(plain_targets.flatten(0, 1))

    def agreement(pairs: list[FieldPair]) -> dict[str, Any]:
        return field_agreement(
            d.ema,
            d.model.loss,
            teacher,
            pairs,
            preprocessor=s.preprocessor(),
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
    bags: dict[str, SlideBag] = {}
    tile_notes: dict[str, Any] = {}
    for slide, entry in slide_entries(cfg):
        try:
            bags[slide.name] = slide_bag(entry, cfg, d.ema, s)
            tile_notes[slide.name] = {"tiles": len(bags[slide.name].features)}
        except XmagError as exc:
            tile_notes[slide.name] = f"no bag: [{exc.code}] {exc.message}"
    if not bags:
        raise RuntimeError("no slide gave a 5x tile; the modality head cannot be trained")
    labels = {n: demo_slide(n).modality for n in bags}
    loso, head = modality_head(bags, labels, epochs=cfg.mil_epochs, seed=cfg.seed)
    if progress is not None:
        progress("modality head", 1, 1)
    lap("modality_head")

    ckpt = d.checkpoint()
    ckpt["heads"] = {"modality": head}
    ckpt["card"] = {"name": DEMO_PACKAGE_NAME, "trained": True, "description": DEMO_DESCRIPTION}
    torch.save(ckpt, out / "checkpoint.pt")
    lap("checkpoint")

    report: dict[str, Any] = {
        "what": "xmag demo model: tiny ViT student distilled from the handcrafted 20x teacher, "
        "plus a slide-level stain/modality head. A demonstration, not a diagnostic model.",
        "not_diagnostic": True,
        "limits": limits(field_notes, tile_notes, loso),
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
        },
        "fields": field_notes,
        "loss_curve": loss_curve_summary(hist),
        "heldout_agreement_before": before,
        "heldout_agreement_after": after_held,
        "heldout_global_cosine_by_slide": per_slide_held,
        "train_agreement_after": after_train,
        "modality_tiles": tile_notes,
        "modality_head": loso,
        "torch_threads": torch.get_num_threads(),
        # Where this run wrote is not part of what it built (the package's bytes must not
        # depend on the folder): the output folders are left out, the slides are named above.
        "config": json.loads(cfg.model_dump_json(exclude={"out", "package", "slides_dir"})),
    }
    # Durations go to the run folder only (timings.json): they differ on every run.
    write_report(report, out, title="xmag demo model report")
    timings: dict[str, Any] = {
        "seconds": {**lap.seconds, "total_before_export": lap.total()},
        "distill_steps_per_s": round(cfg.steps / train_s, 3),
    }
    if cfg.package is not None:
        report["package"] = export_demo(cfg, out, progress)
        lap("export")
        timings["seconds"]["export"] = lap.seconds["export"]
        timings["seconds"]["total"] = lap.total()
        (out / "export.json").write_text(json.dumps(report["package"], indent=2) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return {**report, **timings}
