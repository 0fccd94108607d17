"""``python -m training``: extract, distill, train-mil, finetune, evaluate, demo.

Configs are data: ``distill --config run.json`` reads a ``DistillConfig`` as JSON; the flags
override a few fields. Every command exits non-zero with the error's code on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from training.config import (
    DataConfig,
    DistillConfig,
    MilConfig,
    SlideEntry,
    StudentView,
    TeacherKind,
)

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)
console = Console(stderr=True)


def _bar() -> Progress:
    return Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@app.command()
def extract(
    slides: Annotated[list[Path], typer.Argument(help="slide files or DICOM folders")],
    out: Annotated[Path, typer.Option(help="output folder of crops")],
    n: Annotated[int, typer.Option(help="fields to write")] = 1000,
    view: Annotated[
        StudentView, typer.Option(help="how the 5x view is made")
    ] = StudentView.PYRAMID,
    default_mpp: Annotated[float | None, typer.Option(help="um/px for slides stating none")] = None,
    min_tissue: Annotated[float, typer.Option(help="tissue fraction a field needs")] = 0.5,
    seed: int = 0,
) -> None:
    """Write paired 20x/5x crops of tissue fields to OUT (with progress)."""
    from training.extract import extract_crops

    cfg = DataConfig(
        slides=tuple(SlideEntry(path=p, default_mpp=default_mpp) for p in slides),
        student_view=view,
        min_tissue=min_tissue,
    )
    manifest = extract_crops(cfg, out, n, seed=seed)
    console.print(f"wrote {n} fields; manifest {manifest}")


def _fit_handcrafted(teacher: Any, source: Any, seed: int) -> None:
    from training.augment import cut_tiles, to_float
    from training.data import pairs_to_arrays

    hi, _ = pairs_to_arrays(source.draw(32, np.random.default_rng([seed, 10**6])))
    teacher.fit(cut_tiles(to_float(hi), 4).flatten(0, 1))


@app.command()
def distill(
    config: Annotated[Path, typer.Option(help="DistillConfig as JSON")],
    steps: Annotated[int | None, typer.Option(help="override optim.steps")] = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT_DIR/checkpoint.pt")] = False,
) -> None:
    """Distil a 5x student from a 20x teacher (torchrun for several processes)."""
    from training.data import CropFolder, FieldGeometry, SlideFieldSampler
    from training.distill import Distiller, init_distributed
    from training.teachers import build_teacher

    cfg = DistillConfig.model_validate_json(config.read_text())
    if steps is not None:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"steps": steps})})
    rank, world = init_distributed()
    geometry = FieldGeometry(
        hi_px=cfg.field_px,
        hi_mpp=cfg.teacher.mpp,
        lo_px=cfg.student.img_size,
        lo_mpp=cfg.student.mpp,
    )
    if cfg.data.crops_dir is not None:
        source: Any = CropFolder.load(cfg.data.crops_dir)
    else:
        source = SlideFieldSampler.from_config(cfg.data, geometry)
    teacher = build_teacher(cfg.teacher)
    if cfg.teacher.kind is TeacherKind.HANDCRAFTED:
        _fit_handcrafted(teacher, source, cfg.seed)
    d = Distiller(cfg, teacher, source, rank=rank, world_size=world)
    ckpt_path = cfg.out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        d.resume(ckpt_path)
    remaining = max(0, cfg.optim.steps - d.step)
    with _bar() as bar:
        task = bar.add_task("distill", total=cfg.optim.steps, completed=d.step)

        def log(rec: Any) -> None:
            bar.update(task, completed=rec.step + 1)
            if rank == 0 and (rec.step + 1) % cfg.log_every == 0:
                console.print(
                    f"step {rec.step + 1} loss {rec.loss:.4f} global {rec.global_loss:.4f} "
                    f"local {rec.local_loss:.4f} lr {rec.lr:.2e}"
                )

        d.run(remaining, on_step=log, checkpoint_path=ckpt_path)
    console.print(f"checkpoint {ckpt_path}")


@app.command("train-mil")
def train_mil_cmd(
    features: Annotated[
        Path, typer.Option(help="folder of <slide_id>.h5 or <slide_id>/features.h5")
    ],
    labels: Annotated[Path, typer.Option(help="CSV with slide_id,label")],
    out: Annotated[Path, typer.Option(help="folder for cv.json (and the checkpoint)")],
    checkpoint: Annotated[Path | None, typer.Option(help="add the head to this checkpoint")] = None,
    name: str = "slide",
    folds: int = 5,
    epochs: int = 20,
    hidden: int = 128,
    seed: int = 0,
) -> None:
    """Gated attention MIL on features.h5 bags: stratified k-fold AUC, then a head on all data."""
    import torch

    from training.mil import cross_validate, head_entry, load_bags, train_mil
    from training.models import load_checkpoint

    cfg = MilConfig(folds=folds, epochs=epochs, hidden=hidden, seed=seed)
    bags, names = load_bags(features, labels)
    x, y = [b.features for b in bags], [b.label for b in bags]
    cv = cross_validate(x, y, len(names), cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps({"labels": names, **cv.to_dict()}, indent=2))
    console.print(f"MIL {folds}-fold AUC {cv.mean_auc:.4f} (pooled {cv.pooled_auc:.4f})")
    head = train_mil(x, y, len(names), cfg)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        ckpt["heads"] = {**ckpt.get("heads", {}), name: head_entry(head, names)}
        torch.save(ckpt, out / "checkpoint.pt")
        console.print(f"checkpoint with head {name!r}: {out / 'checkpoint.pt'}")


@app.command()
def finetune(
    checkpoint: Annotated[Path, typer.Option(help="distillation checkpoint")],
    labels: Annotated[Path, typer.Option(help="CSV with slide_id,label")],
    slides_dir: Annotated[Path, typer.Option(help="slide_id is a path relative to this")],
    out: Annotated[Path, typer.Option(help="output checkpoint file")],
    crops: Annotated[Path | None, typer.Option(help="crops for the distillation term")] = None,
    steps: int = 200,
    tiles_per_slide: int = 16,
    default_mpp: float | None = None,
) -> None:
    """Fine-tune student + MIL head on slide labels (distillation loss kept as regulariser)."""
    import torch

    from training.data import CropFolder
    from training.finetune import FinetuneConfig, read_slide_tiles
    from training.finetune import finetune as run
    from training.mil import read_labels_csv
    from training.models import load_checkpoint
    from training.teachers import build_teacher

    ckpt = load_checkpoint(checkpoint)
    table = read_labels_csv(labels)
    tiles = {
        sid: read_slide_tiles(SlideEntry(path=slides_dir / sid, default_mpp=default_mpp))
        for sid in table
    }
    teacher = fields = None
    if crops is not None:
        cfg = DistillConfig.model_validate(ckpt["config"])
        teacher = build_teacher(cfg.teacher)
        if ckpt.get("teacher_state") is not None:
            teacher.load_state_dict(ckpt["teacher_state"])
        fields = CropFolder.load(crops)
    ft = FinetuneConfig(steps=steps, tiles_per_slide=tiles_per_slide)
    with _bar() as bar:
        task = bar.add_task("finetune", total=steps)
        new = run(
            ckpt,
            tiles,
            table,
            ft,
            teacher=teacher,
            fields=fields,
            on_step=lambda s, _l: bar.update(task, completed=s + 1),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(new, out)
    console.print(f"checkpoint {out}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="training checkpoint (EMA student is used)")],
    crops: Annotated[Path, typer.Option(help="held-out fields (extract output)")],
    out: Annotated[Path, typer.Option(help="report folder")],
    tile_embeddings: Annotated[
        Path | None, typer.Option(help="npz: train_x, train_y, test_x, test_y tile embeddings")
    ] = None,
    features: Annotated[Path | None, typer.Option(help="features.h5 folder for MIL AUC")] = None,
    labels: Annotated[Path | None, typer.Option(help="labels CSV for MIL AUC")] = None,
) -> None:
    """Teacher-student agreement, probes and MIL AUC as report.json and report.md."""
    from training.data import CropFolder
    from training.evaluate import field_agreement, knn_accuracy, linear_probe, write_report
    from training.losses import DistillLoss
    from training.mil import cross_validate, load_bags
    from training.models import load_checkpoint, student_from_checkpoint
    from training.teachers import build_teacher

    ckpt = load_checkpoint(checkpoint)
    cfg = DistillConfig.model_validate(ckpt["config"])
    teacher = build_teacher(cfg.teacher)
    if ckpt.get("teacher_state") is not None:
        teacher.load_state_dict(ckpt["teacher_state"])
    student = student_from_checkpoint(ckpt)
    hd = ckpt["distill_heads"]
    heads = DistillLoss(
        int(ckpt["embed_dim"]),
        int(hd["global_head.fc2.weight"].shape[0]),
        grid=cfg.loss.grid,
        hidden=int(hd["global_head.fc1.weight"].shape[0]),
    )
    heads.load_state_dict(hd)
    pairs = CropFolder.load(crops).pairs
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "agreement": field_agreement(
            student, heads, teacher, pairs, mean=cfg.student.mean, std=cfg.student.std
        ),
    }
    if tile_embeddings is not None:
        z = np.load(tile_embeddings)
        args = (z["train_x"], z["train_y"], z["test_x"], z["test_y"])
        report["linear_probe"] = linear_probe(*args)
        report["knn"] = knn_accuracy(*args)
    if features is not None and labels is not None:
        bags, names = load_bags(features, labels)
        cv = cross_validate(
            [b.features for b in bags], [b.label for b in bags], len(names), MilConfig()
        )
        report["mil"] = {"labels": names, **cv.to_dict()}
    json_path, _ = write_report(report, out, title="xmag training evaluation")
    console.print(f"report {json_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run folder: checkpoint, report")] = Path("runs/demo"),
    package: Annotated[
        Path | None, typer.Option(help="model package folder to export to (replaces a demo)")
    ] = None,
    steps: Annotated[int, typer.Option(help="distillation steps")] = 250,
    slides_dir: Annotated[Path, typer.Option(help="the real test slides")] = Path(
        "tests/data/slides"
    ),
    seed: int = 0,
) -> None:
    """Build the demo student and modality head offline from the real slides; export a package."""
    from training.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, package=package, steps=steps, slides_dir=slides_dir, seed=seed)
    with _bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        report = run_demo(cfg, progress)
    lc, ho = report["loss_curve"], report["heldout_agreement_after"]
    mh = report["modality_head"]
    console.print(
        f"loss {lc['first_10pct_mean']:.4f} -> {lc['last_10pct_mean']:.4f}; held-out global "
        f"cosine {ho['global_cosine']['mean']:.4f} (predict-the-mean baseline "
        f"{ho['constant_baseline_cosine']['mean']:.4f}); modality accuracy (leave-one-slide-out) "
        f"{mh['correct']}/{mh['n_slides']}; report {out / 'report.md'}"
    )
    if "package" in report:
        console.print(f"package {report['package']['path']}: {report['package']['parity']}")


def main() -> None:
    from xmag.errors import XmagError

    try:
        app(standalone_mode=True)
    except XmagError as exc:
        console.print(f"[red]error[/red] [{exc.code}] {exc.message}")
        raise SystemExit(2) from exc
