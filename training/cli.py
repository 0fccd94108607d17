"""``python -m training``: extract, distill, train-mil, finetune, evaluate.

The demo build, which ends in an export, is ``python -m model_export demo``.

Configs are data: ``distill --config run.json`` reads a ``DistillConfig`` as JSON; the flags
override a few fields. Every command exits non-zero with the error's code on bad input.
"""

from __future__ import annotations

import json
from enum import StrEnum
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


class OnError(StrEnum):
    """What a command does with a slide it cannot use."""

    SKIP = "skip"
    STOP = "stop"


def _bar(*, disable: bool = False) -> Progress:
    return Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for ``console.print`` on DDP ranks other than 0."""


@app.command()
def extract(
    slides: Annotated[list[Path], typer.Argument(help="slide files or DICOM folders")],
    out: Annotated[Path, typer.Option(help="output folder of crops")],
    n: Annotated[int, typer.Option(help="fields to write")] = 1000,
    view: Annotated[
        StudentView, typer.Option(help="how the 5x view is made")
    ] = StudentView.PYRAMID,
    default_mpp: Annotated[float | None, typer.Option(help="um/px for slides stating none")] = None,
    mpp: Annotated[
        float | None, typer.Option(help="um/px of level 0 for every slide, over the file's")
    ] = None,
    min_tissue: Annotated[float, typer.Option(help="tissue fraction a field needs")] = 0.5,
    on_error: Annotated[
        OnError, typer.Option(help="skip an unusable slide (reported) or stop at the first")
    ] = OnError.SKIP,
    seed: int = 0,
) -> None:
    """Write paired 20x/5x crops of tissue fields to OUT (with progress)."""
    from training.extract import extract_crops

    cfg = DataConfig(
        slides=tuple(SlideEntry(path=p, default_mpp=default_mpp, mpp_override=mpp) for p in slides),
        student_view=view,
        min_tissue=min_tissue,
    )
    manifest = extract_crops(cfg, out, n, seed=seed, on_error=on_error.value, on_skip=_report_skip)
    skipped = json.loads((out / "extract.json").read_text()).get("skipped", {})
    console.print(
        f"wrote {n} fields from {len(slides) - len(skipped)} of {len(slides)} slides "
        f"({len(skipped)} skipped); manifest {manifest}"
    )


def _report_skip(slide: str, exc: Any) -> None:
    """One typed line per skipped slide."""
    console.print(f"[yellow]skipped[/yellow] {slide}: [{exc.code}] {exc.message}", highlight=False)


def _fit_handcrafted(teacher: Any, source: Any, seed: int) -> None:
    from training.augment import cut_tiles, to_float
    from training.data import pairs_to_arrays

    hi, _ = pairs_to_arrays(source.draw(32, np.random.default_rng([seed, 10**6])))
    teacher.fit(cut_tiles(to_float(hi), 4).flatten(0, 1))


@app.command()
def distill(
    config: Annotated[
        Path, typer.Option(help="DistillConfig as JSON", exists=True, dir_okay=False)
    ],
    steps: Annotated[int | None, typer.Option(help="override optim.steps (a new run)")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue OUT_DIR/checkpoint.pt (the config must match it)")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="start over, replacing an existing OUT_DIR/checkpoint.pt")
    ] = False,
    extend_to: Annotated[
        int | None,
        typer.Option(
            min=1, help="with --resume: move the schedule's end to step N (recorded) and train on"
        ),
    ] = None,
) -> None:
    """Distil a 5x student from a 20x teacher (torchrun for several processes).

    Without flags the run starts and refuses to replace an existing checkpoint. Ctrl-C saves the
    last completed step and exits 130; --resume continues it.
    """
    from training.data import CropFolder, FieldGeometry, SlideFieldSampler
    from training.distill import Distiller, init_distributed
    from training.resume import plan_run
    from training.teachers import build_teacher

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    cfg = DistillConfig.model_validate_json(config.read_text())
    if steps is not None:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"steps": steps})})
    ckpt_path = cfg.out_dir / "checkpoint.pt"
    plan = plan_run(cfg, ckpt_path, resume=resume, overwrite=overwrite, extend_to=extend_to)
    cfg = plan.cfg
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
    say = console.print if rank == 0 else _quiet  # one voice under DDP: rank 0's
    if plan.checkpoint is not None:
        d.resume(plan.checkpoint)
        say(
            f"resuming {ckpt_path} at step {d.step} of {cfg.optim.steps} "
            f"({cfg.optim.steps - d.step} to go)"
        )
    else:
        say(f"starting a new run in {cfg.out_dir} ({cfg.optim.steps} steps)")
    d.run_log += [*plan.events, {"event": "run", "from_step": d.step, "to_step": cfg.optim.steps}]
    for event in plan.events:
        if event["event"] == "extend":
            say(f"schedule end moved from step {event['from_steps']} to {event['to_steps']}")
        elif event["event"] == "overwrite":
            say(f"replacing {event['replaced']} (--overwrite)")
    remaining = max(0, cfg.optim.steps - d.step)
    try:
        with _bar(disable=rank != 0) as bar:
            task = bar.add_task("distill", total=cfg.optim.steps, completed=d.step)

            def log(rec: Any) -> None:
                bar.update(task, completed=rec.step + 1)
                if (rec.step + 1) % cfg.log_every == 0:
                    say(
                        f"step {rec.step + 1} loss {rec.loss:.4f} global {rec.global_loss:.4f} "
                        f"local {rec.local_loss:.4f} lr {rec.lr:.2e}"
                    )

            d.run(remaining, on_step=log, checkpoint_path=ckpt_path)
    except KeyboardInterrupt:
        say(
            f"interrupted: checkpoint {ckpt_path} saved at step {d.step} of {cfg.optim.steps}; "
            "continue with --resume"
        )
        raise SystemExit(130) from None
    say(f"checkpoint {ckpt_path}")


@app.command("train-mil")
def train_mil_cmd(
    features: Annotated[
        Path, typer.Option(help="folder of <slide_id>.h5 or <slide_id>/features.h5")
    ],
    labels: Annotated[Path, typer.Option(help="CSV with slide_id,label")],
    out: Annotated[Path, typer.Option(help="folder for cv.json (and the checkpoint)")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="the checkpoint whose student embedded FEATURES: the head is added"),
    ] = None,
    name: Annotated[str, typer.Option(help="head name (card, heads/<name>.onnx)")] = "slide",
    folds: Annotated[int, typer.Option(min=2, help="cross-validation folds")] = 5,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    hidden: Annotated[int, typer.Option(min=1)] = 128,
    seed: int = 0,
) -> None:
    """Gated attention MIL on features.h5 bags: stratified k-fold AUC, then a head on all data.

    A class with fewer slides than --folds skips the cross-validation (COHORT_TOO_SMALL): the
    head and cv.json (saying why) are still written, and the command exits with that code.
    """
    from training.errors import CohortTooSmallError
    from training.mil import cross_validate, load_bags, train_mil
    from training.models import load_checkpoint

    cfg = MilConfig(folds=folds, epochs=epochs, hidden=hidden, seed=seed)
    bags, names = load_bags(features, labels)
    x, y = [b.features for b in bags], [b.label for b in bags]
    counts = {n: sum(1 for b in bags if b.label == i) for i, n in enumerate(names)}
    report: dict[str, Any] = {
        "labels": names,
        "class_counts": counts,
        "folds": folds,
        "features": str(features),
        "model": "gated attention MIL trained per fold on FEATURES (each slide scored by the "
        "fold that held it out)",
        "predict_the_prior_baseline": _prior_baseline(counts),
    }
    skipped: CohortTooSmallError | None = None
    try:
        cv = cross_validate(x, y, len(names), cfg, names=names)
    except CohortTooSmallError as exc:
        skipped = exc
        report["cross_validation"] = {"skipped": exc.to_dict()}
        console.print(f"[yellow]cross-validation skipped[/yellow] [{exc.code}] {exc.message}")
    else:
        report.update(cv.to_dict())
        console.print(f"MIL {folds}-fold AUC {cv.mean_auc:.4f} (pooled {cv.pooled_auc:.4f})")
    out.mkdir(parents=True, exist_ok=True)
    head = train_mil(x, y, len(names), cfg)
    report["head"] = {"name": name, "trained_on_slides": len(bags), "epochs": epochs}
    (out / "cv.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"cross-validation report {out / 'cv.json'}")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        _add_head(ckpt, name, head, names, report, features)
        _save_checkpoint(ckpt, out / "checkpoint.pt")
        console.print(f"checkpoint with head {name!r}: {out / 'checkpoint.pt'}")
    if skipped is not None:
        raise skipped


def _prior_baseline(counts: dict[str, int]) -> dict[str, float]:
    """What predicting the class prior for every slide scores: AUC 0.5, majority accuracy."""
    total = sum(counts.values())
    return {"auc": 0.5, "accuracy": max(counts.values()) / total if total else float("nan")}


def _add_head(
    ckpt: dict[str, Any], name: str, head: Any, names: list[str], report: Any, features: Path
) -> None:
    """Put a trained MIL head into ``ckpt`` and record it in the lineage."""
    from training.mil import head_entry

    entry = head_entry(head, names)
    entry["trained_on"] = {
        "features": str(features),
        "student_step": int(ckpt.get("step", 0)),
        "stage": (ckpt.get("lineage") or [{}])[-1].get("stage", "distill"),
    }
    ckpt["heads"] = {**(ckpt.get("heads") or {}), name: entry}
    ckpt["lineage"] = [
        *(ckpt.get("lineage") or []),
        {
            "stage": "mil",
            "head": name,
            "labels": list(names),
            "slides": int(report["head"]["trained_on_slides"]),
            "mean_auc": report.get("mean_auc"),
            "folds": report["folds"],
        },
    ]


def _save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    import os

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


@app.command()
def finetune(
    checkpoint: Annotated[Path, typer.Option(help="distillation checkpoint")],
    labels: Annotated[Path, typer.Option(help="CSV with slide_id,label")],
    slides_dir: Annotated[Path, typer.Option(help="slide_id is a path relative to this")],
    out: Annotated[Path, typer.Option(help="output checkpoint file")],
    crops: Annotated[Path | None, typer.Option(help="crops for the distillation term")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 200,
    tiles_per_slide: Annotated[int, typer.Option(min=1)] = 16,
    head_name: Annotated[str, typer.Option(help="the head to train")] = "slide",
    head: Annotated[
        str, typer.Option(help="carry: start from train-mil's head of that name; fresh: new")
    ] = "carry",
    keep_other_heads: Annotated[
        bool, typer.Option(help="keep other heads (trained before fine-tuning; marked stale)")
    ] = False,
    default_mpp: Annotated[float | None, typer.Option(help="um/px for slides stating none")] = None,
    mpp: Annotated[
        float | None, typer.Option(help="um/px of level 0 for every slide, over the file's")
    ] = None,
    tissue_threshold: Annotated[
        float | None, typer.Option(help="tissue fraction a 5x tile needs")
    ] = None,
    on_error: Annotated[
        OnError, typer.Option(help="skip an unusable slide (reported) or stop at the first")
    ] = OnError.SKIP,
    log_every: Annotated[int, typer.Option(min=1, help="steps between loss lines")] = 10,
) -> None:
    """Fine-tune student + MIL head on slide labels (distillation loss kept as regulariser).

    Slide ids in LABELS are file names up to the first dot, as for train-mil; unusable slides
    are skipped with a line each (--on-error stop to stop); nothing is written unless it ends.
    """
    from training.data import CropFolder
    from training.errors import SlidesFailedError
    from training.finetune import FinetuneConfig, read_slide_tiles
    from training.finetune import finetune as run
    from training.mil import read_labels_csv, resolve_slide
    from training.models import load_checkpoint
    from training.teachers import build_teacher
    from xmag.errors import XmagError

    ft = FinetuneConfig(
        steps=steps,
        tiles_per_slide=tiles_per_slide,
        head_name=head_name,
        head=head,
        keep_other_heads=keep_other_heads,
        log_every=log_every,
    )
    ckpt = load_checkpoint(checkpoint)
    table = read_labels_csv(labels)
    tiles, skipped = {}, {}
    for sid in table:
        try:
            entry = SlideEntry(
                path=resolve_slide(slides_dir, sid),
                default_mpp=default_mpp,
                mpp_override=mpp,
                tissue_threshold=tissue_threshold,
            )
            tiles[sid] = read_slide_tiles(entry)
        except XmagError as exc:
            if on_error is OnError.STOP:
                raise SlidesFailedError(
                    f"slide {sid!r}: [{exc.code}] {exc.message} (stopped: --on-error stop; "
                    "nothing written).",
                    slide_id=sid,
                    cause=exc.code,
                ) from exc
            skipped[sid] = f"[{exc.code}] {exc.message}"
            _report_skip(sid, exc)
    labels_left = {table[sid] for sid in tiles}
    if len(labels_left) < 2:
        raise SlidesFailedError(
            f"{len(tiles)} usable slide(s) with label(s) {sorted(labels_left)} after skipping "
            f"{sorted(skipped)}; fine-tuning needs slides of at least two labels.",
            skipped=skipped,
        )
    table = {sid: table[sid] for sid in tiles}
    console.print(
        f"fine-tuning on {len(tiles)} of {len(tiles) + len(skipped)} slides "
        f"({len(skipped)} skipped)"
    )
    teacher = fields = None
    if crops is not None:
        cfg = DistillConfig.model_validate(ckpt["config"])
        teacher = build_teacher(cfg.teacher)
        if ckpt.get("teacher_state") is not None:
            teacher.load_state_dict(ckpt["teacher_state"])
        fields = CropFolder.load(crops)
    with _bar() as bar:
        task = bar.add_task("finetune", total=steps)
        recent: list[float] = []

        def log(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1)
            recent.append(loss)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                console.print(
                    f"step {step + 1} loss {loss:.4f} (mean of last {len(recent)}: "
                    f"{sum(recent) / len(recent):.4f})"
                )
                recent.clear()

        new = run(ckpt, tiles, table, ft, teacher=teacher, fields=fields, on_step=log)
    new["finetune"]["skipped_slides"] = skipped
    _save_checkpoint(new, out)
    stage = new["lineage"][-1]
    console.print(
        f"checkpoint {out}: head {head_name!r} {stage['head_start']}"
        + (f"; dropped stale heads {stage['dropped_heads']}" if stage["dropped_heads"] else "")
    )


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
    folds: Annotated[int, typer.Option(min=2, help="MIL cross-validation folds")] = 5,
    mil_epochs: Annotated[int, typer.Option(min=1, help="MIL epochs per fold")] = 20,
) -> None:
    """Teacher-student agreement, probes and MIL AUC as report.json and report.md.

    Each section names the model that produced its numbers and the baseline a constant
    prediction reaches. A class with fewer slides than --folds skips the MIL section
    (COHORT_TOO_SMALL): the report is written with the rest, then the command exits with it.
    """
    from training.data import CropFolder
    from training.errors import CohortTooSmallError
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
    student_name = (
        f"EMA student of {checkpoint.name} (step {ckpt.get('step', '?')}; lineage "
        f"{_lineage_text(ckpt)})"
    )
    teacher_name = f"{cfg.teacher.kind.value} teacher {cfg.teacher.arch}"
    agreement = field_agreement(
        student, heads, teacher, pairs, preprocessor=cfg.student.preprocessor()
    )
    agreement["produced_by"] = f"{student_name} vs {teacher_name}, on {len(pairs)} fields"
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "models": {"student": student_name, "teacher": teacher_name},
        "agreement": agreement,
    }
    if agreement["student_spread"]["collapsed"]:
        console.print(
            "[yellow]warning[/yellow] the student's embeddings are collapsed (effective rank "
            f"{agreement['student_spread']['effective_rank']:.2f}): near one vector per field"
        )
    if tile_embeddings is not None:
        z = np.load(tile_embeddings)
        args = (z["train_x"], z["train_y"], z["test_x"], z["test_y"])
        majority = float(np.mean(z["test_y"] == np.bincount(z["train_y"]).argmax()))
        source = f"tile embeddings in {tile_embeddings.name} (whatever model wrote them)"
        report["linear_probe"] = {**linear_probe(*args), "produced_by": source}
        report["knn"] = {**knn_accuracy(*args), "produced_by": source}
        report["probe_baseline"] = {"majority_class_accuracy": majority}
    skipped: CohortTooSmallError | None = None
    if features is not None and labels is not None:
        bags, names = load_bags(features, labels)
        counts = {n: sum(1 for b in bags if b.label == i) for i, n in enumerate(names)}
        mil: dict[str, Any] = {
            "labels": names,
            "class_counts": counts,
            "folds": folds,
            "produced_by": f"gated attention MIL trained per fold on {features} (the features "
            "of whichever model embedded them, not necessarily this checkpoint)",
            "predict_the_prior_baseline": _prior_baseline(counts),
        }
        try:
            cv = cross_validate(
                [b.features for b in bags],
                [b.label for b in bags],
                len(names),
                MilConfig(folds=folds, epochs=mil_epochs),
                names=names,
            )
        except CohortTooSmallError as exc:
            skipped = exc
            mil["skipped"] = exc.to_dict()
        else:
            mil.update(cv.to_dict())
        report["mil"] = mil
    json_path, _ = write_report(report, out, title="xmag training evaluation")
    console.print(f"report {json_path}")
    if skipped is not None:
        raise skipped


def _lineage_text(ckpt: dict[str, Any]) -> str:
    """``distill (250 steps) -> mil slide -> finetune (200 steps)`` from a checkpoint."""
    parts = []
    for stage in ckpt.get("lineage") or [{"stage": "distill", "step": ckpt.get("step", "?")}]:
        kind = stage.get("stage", "?")
        if kind == "mil":
            parts.append(f"mil head {stage.get('head')}")
        else:
            parts.append(f"{kind} ({stage.get('step', '?')} steps)")
    return " -> ".join(parts)


@app.command()
def docs(
    check: Annotated[
        bool, typer.Option(help="exit 1 when the guide's config reference is stale")
    ] = False,
    guide: Annotated[Path | None, typer.Option(help="the guide (default docs/training.md)")] = None,
) -> None:
    """Write the config reference of docs/training.md from the config models."""
    from training.docs import GUIDE, render_guide

    path = guide or GUIDE
    text = path.read_text(encoding="utf-8")
    new = render_guide(text)
    if check:
        if new != text:
            console.print(f"{path} is stale: run `python -m training docs`")
            raise typer.Exit(1)
        console.print(f"{path} is up to date")
        return
    if new != text:
        path.write_text(new, encoding="utf-8")
    console.print(f"{path}: config reference {'rewritten' if new != text else 'up to date'}")


@app.command(
    hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def demo() -> None:
    """Moved to ``python -m model_export demo`` (the demo build ends in an export)."""
    console.print(
        "[red]error[/red] the demo build moved: run `python -m model_export demo` with the same "
        "options (training/ never calls model_export)."
    )
    raise typer.Exit(2)


# CellEcoNet (cells read as words): its own sub-app, importing nothing heavy at load.
from training.celleconet.cli import app as _celleconet_app  # noqa: E402

app.add_typer(_celleconet_app, name="celleconet")


def main() -> None:
    from training.errors import exit_code_for
    from xmag.errors import XmagError

    try:
        app(standalone_mode=True)
    except XmagError as exc:
        console.print(f"[red]error[/red] [{exc.code}] {exc.message}", highlight=False)
        raise SystemExit(exit_code_for(exc)) from exc
