"""The export pipeline: PyTorch encoder + heads -> verified model package with a parity report.

    encoder (nn.Module)  -> model.onnx (fp32)  -> model.fp16.onnx, model.int8.onnx
    heads (nn.Module)    -> heads/<name>.onnx
    real tiles (slides)  -> parity.json: every variant vs PyTorch (fails the export if short)
    all of the above     -> model.json (sha256 of each file) -> load_package -> out_dir

Sources of the encoder: an xmag training checkpoint (its EMA student, ``from_training``) or the
official XMAG release (``from_xmag_release``). Everything is built in a staging folder beside
``out_dir`` and moved into place only when the package loads and parity passes; when parity
fails, the report is kept beside ``out_dir`` as ``<name>.parity-failed.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_export.errors import CheckpointError, ExportError
from model_export.onnx_export import DEFAULT_OPSET, export_encoder, export_mil_head
from model_export.package_writer import (
    PARITY_FILE,
    VARIANT_FILES,
    CardInfo,
    HeadEntry,
    build_card,
    finalise_package,
    input_spec,
    staging_dir,
)
from model_export.parity import HeadUnderTest, ParityReport, raise_on_failure, run_parity
from model_export.parity_tiles import ParityTiles
from model_export.quantize import Int8Mode, quantize_int8, to_fp16
from xmag.errors import ModelPackageError
from xmag.package import ModelPackage
from xmag.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor

__all__ = [
    "DEFAULT_VARIANTS",
    "ExportResult",
    "ExportSource",
    "SlideHead",
    "export_int8_encoder",
    "export_package",
    "from_training",
    "from_xmag_release",
    "lineage_text",
    "load_head_file",
]

DEFAULT_VARIANTS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class SlideHead:
    """A slide head to export: its module and the card entry."""

    entry: HeadEntry
    module: nn.Module


@dataclass(frozen=True)
class ExportSource:
    """A PyTorch encoder and what the card needs to know about it."""

    model: nn.Module
    arch_tag: str
    tile_px: int
    target_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    heads: tuple[SlideHead, ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class ExportResult:
    """The written package, its parity report and how long each stage took (seconds)."""

    package: ModelPackage
    report: ParityReport
    timings_s: dict[str, float] = field(default_factory=dict)


def from_training(
    path: Path, *, ema: bool = True, extra_heads: Sequence[Path] = ()
) -> ExportSource:
    """The student of an xmag training checkpoint (EMA weights by default) and its MIL heads.

    Args:
        path: a checkpoint written by ``training`` (format ``xmag-train-checkpoint/1``).
        ema: export the EMA student (what XMAG evaluates and ships) rather than the raw one.
        extra_heads: files holding one head entry each (``training.mil.head_entry`` layout,
            saved with ``torch.save``), added to the checkpoint's own ``heads``.

    Raises:
        CheckpointError: the file is not a readable training checkpoint or does not fit its arch.
    """
    from training.models import load_checkpoint, mil_from_checkpoint, student_from_checkpoint

    path = Path(path)
    try:
        ckpt = load_checkpoint(path)
        model = student_from_checkpoint(ckpt, ema=ema)
        heads = [
            SlideHead(HeadEntry(name, labels), module)
            for name in sorted(ckpt.get("heads") or {})
            for module, labels in [mil_from_checkpoint(ckpt, name)]
        ]
    except CheckpointError:
        raise
    except ModelPackageError as exc:
        raise CheckpointError(exc.message, reason="training_checkpoint", path=path) from exc
    except (KeyError, TypeError, RuntimeError) as exc:  # a key or tensor of the layout is off
        raise CheckpointError(
            f"training checkpoint {path} does not have the xmag layout ({type(exc).__name__}: "
            f"{exc}); re-save it with this version of training/.",
            reason="layout",
            path=path,
        ) from exc
    heads += [load_head_file(p) for p in extra_heads]
    cfg_student = (ckpt.get("config") or {}).get("student") or {}
    return ExportSource(
        model=model,
        arch_tag=str(ckpt["arch"]),
        tile_px=int(ckpt["img_size"]),
        target_mpp=float(ckpt.get("mpp") or cfg_student.get("mpp") or 2.0),
        mean=_triple(ckpt.get("mean") or cfg_student.get("mean") or IMAGENET_MEAN),
        std=_triple(ckpt.get("std") or cfg_student.get("std") or IMAGENET_STD),
        heads=tuple(heads),
        notes=f"exported from {path.name} ({'EMA' if ema else 'raw'} student); lineage: "
        + lineage_text(ckpt),
    )


def lineage_text(ckpt: Mapping[str, Any]) -> str:
    """The checkpoint's history in one line: ``distill (250 of 250 steps, handcrafted teacher)
    -> mil head 'slide' (7 slides, 2-fold AUC 0.81) -> finetune (200 steps, head carried)``.

    Checkpoints without a ``lineage`` (older ones) are described by their distillation step.
    """
    stages = ckpt.get("lineage") or [{"stage": "distill", "step": ckpt.get("step", "?")}]
    parts = []
    for st in stages:
        kind = st.get("stage")
        if kind == "distill":
            extra = f" of {st['steps']}" if "steps" in st else ""
            teacher = f", teacher {st['teacher']}" if st.get("teacher") else ""
            parts.append(f"distill ({st.get('step', '?')}{extra} steps{teacher})")
        elif kind == "mil":
            auc = st.get("mean_auc")
            cv = f", {st.get('folds')}-fold AUC {auc:.3f}" if isinstance(auc, float) else ""
            parts.append(f"mil head {st.get('head')!r} ({st.get('slides')} slides{cv})")
        elif kind == "finetune":
            dropped = st.get("dropped_heads") or []
            note = f", dropped stale heads {dropped}" if dropped else ""
            parts.append(
                f"finetune ({st.get('step')} steps, head {st.get('head')!r} "
                f"{st.get('head_start', '')}{note})"
            )
        else:
            parts.append(str(kind))
    return " -> ".join(parts)


def from_xmag_release(path: Path, *, extra_heads: Sequence[Path] = ()) -> ExportSource:
    """The official XMAG student (DINOv2 ViT-B/14 at 224 px, 2.0 um/px, ImageNet mean/std).

    Raises:
        CheckpointError: see ``model_export.xmag_checkpoint``.
    """
    from model_export.xmag_checkpoint import XMAG_ARCH, XMAG_IMG_PX, build_xmag_student

    model, info = build_xmag_student(path, img_size=XMAG_IMG_PX)
    return ExportSource(
        model=model,
        arch_tag=XMAG_ARCH,
        tile_px=XMAG_IMG_PX,
        target_mpp=2.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        heads=tuple(load_head_file(p) for p in extra_heads),
        notes=(
            f"XMAG release {Path(path).name}: DINOv2 ViT-B/14, position grid "
            f"{info.source_grid}x{info.source_grid} resized to {info.target_grid}x"
            f"{info.target_grid} (DINOv2 bicubic, offset 0.1); output x_norm_clstoken"
        ),
    )


def load_head_file(path: Path) -> SlideHead:
    """A slide head saved on its own: ``torch.save({"name"?, "kind", "state_dict", "in_dim",
    "hidden", "labels"})``; the name defaults to the file stem.

    Raises:
        CheckpointError: unreadable file, unknown kind or weights that do not fit.
    """
    from training.models import GatedAttentionMIL

    path = Path(path)
    try:
        entry: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decode failure of a user file is the same input error
        raise CheckpointError(
            f"head file {path} could not be read ({type(exc).__name__}); it is corrupt or not a "
            "torch file.",
            reason="corrupt",
            path=path,
        ) from exc
    if not isinstance(entry, Mapping) or entry.get("kind") != "gated_attention_mil":
        kind = entry.get("kind") if isinstance(entry, Mapping) else type(entry).__name__
        raise CheckpointError(
            f"head file {path} holds kind {kind!r}; only gated_attention_mil heads are exported.",
            reason="head_kind",
            path=path,
        )
    try:
        labels = [str(x) for x in entry["labels"]]
        head = GatedAttentionMIL(int(entry["in_dim"]), int(entry["hidden"]), len(labels))
        head.load_state_dict(entry["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"head file {path} does not fit a gated attention MIL head ({exc}).",
            reason="layout",
            path=path,
        ) from exc
    name = str(entry.get("name") or path.stem)
    return SlideHead(HeadEntry(name, labels), head.eval())


def export_package(
    source: ExportSource,
    out_dir: Path,
    tiles: ParityTiles,
    *,
    name: str,
    version: str,
    trained: bool,
    description: str,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    with_patch_tokens: bool = True,
    int8_mode: Int8Mode = Int8Mode.DYNAMIC,
    calibration_tiles: ParityTiles | None = None,
    opset: int = DEFAULT_OPSET,
    card_extra: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, Path] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExportResult:
    """Export ``source`` with every variant, check parity on ``tiles``, write the package.

    Args:
        source: the encoder and its heads.
        out_dir: the package folder to create.
        tiles: real tiles for the parity check (and, by default, int8 static calibration).
        name, version, trained, description: the card's identity.
        variants: among ``fp32`` (always written: it is the reference), ``fp16``, ``int8``.
        with_patch_tokens: export the patch tokens as a second output.
        int8_mode: dynamic (default) or static (calibrated on ``calibration_tiles``).
        calibration_tiles: tiles for static calibration (default: ``tiles``).
        opset: ONNX opset (17 or 18).
        card_extra: other ``CardInfo`` fields (batch profile, workspace, license...).
        thresholds: per-variant minimum cosine replacing ``parity.THRESHOLDS`` entries.
        overwrite: replace an existing ``out_dir``.
        extra_files: package-relative path -> file to copy in (e.g. ``training/report.json``);
            each is listed in the card with its sha256.
        log: receives one line per stage.

    Raises:
        ExportError: an export step failed or the package does not load.
        ParityError: a variant (or a head) falls short of PyTorch; the report is kept beside
            ``out_dir``.
    """
    unknown = sorted(set(variants) - set(VARIANT_FILES))
    if unknown:
        raise ExportError(
            f"unknown variant(s) {unknown}; choose among {sorted(VARIANT_FILES)}.",
            reason="variant",
        )
    chosen = ["fp32", *[v for v in variants if v != "fp32"]]
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # fail before minutes of work, not after
        raise ExportError(
            f"{out_dir} already exists; pass --overwrite or choose another --out.",
            reason="exists",
            path=out_dir,
        )
    info = CardInfo(
        name=name,
        version=version,
        trained=trained,
        description=description,
        arch_tag=source.arch_tag,
        params_m=round(sum(p.numel() for p in source.model.parameters()) / 1e6, 2),
        tile_px=source.tile_px,
        target_mpp=source.target_mpp,
        mean=source.mean,
        std=source.std,
        notes=source.notes,
        **dict(card_extra or {}),
    )
    # The engine's preprocessing of this card: parity and int8 calibration see what it serves.
    preprocessor = Preprocessor.from_spec(input_spec(info))
    calibration = None
    if "int8" in chosen and int8_mode is Int8Mode.STATIC:
        calibration = preprocessor((calibration_tiles or tiles).pixels)
    timings: dict[str, float] = {}
    stage = staging_dir(out_dir)
    try:
        files = _export_graphs(
            source,
            stage,
            chosen,
            with_patch_tokens,
            int8_mode,
            calibration,
            opset,
            timings,
            log,
        )
        t0 = time.perf_counter()
        report = run_parity(
            source.model,
            {v: stage / VARIANT_FILES[v] for v in chosen},
            tiles,
            preprocessor=preprocessor,
            target_mpp=source.target_mpp,
            heads=[
                HeadUnderTest(h.entry.name, h.module, stage / h.entry.file) for h in source.heads
            ],
            with_patch_tokens=with_patch_tokens,
            thresholds=dict(thresholds or {}),
        )
        timings["parity"] = time.perf_counter() - t0
        report_path = stage / PARITY_FILE
        # No timestamp (``created``): a rebuild from the same sources writes the same bytes.
        report_path.write_text(
            report.model_dump_json(indent=2, exclude={"created"}) + "\n", encoding="utf-8"
        )
        log(_parity_line(report))
        if not report.passed:
            kept = out_dir.parent / f"{out_dir.name}.parity-failed.json"
            shutil.copyfile(report_path, kept)
            raise_on_failure(report, kept)
        extra = _copy_extra_files(stage, extra_files or {})
        card = build_card(
            stage,
            dataclasses.replace(info, notes=_with_spread(info.notes, report)),
            embed_dim=files["embed_dim"],
            with_patch_tokens=with_patch_tokens,
            variants=chosen,
            heads=[h.entry for h in source.heads],
            extra_files=extra,
        )
        package = finalise_package(stage, card, out_dir, overwrite=overwrite)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log(f"package written to {out_dir}")
    return ExportResult(package, report, timings)


def _export_graphs(
    source: ExportSource,
    stage: Path,
    variants: Sequence[str],
    with_patch_tokens: bool,
    int8_mode: Int8Mode,
    calibration: np.ndarray | None,
    opset: int,
    timings: dict[str, float],
    log: Callable[[str], None],
) -> dict[str, int]:
    t0 = time.perf_counter()
    graph = export_encoder(
        source.model,
        stage / VARIANT_FILES["fp32"],
        img_px=source.tile_px,
        with_patch_tokens=with_patch_tokens,
        opset=opset,
    )
    timings["export_fp32"] = time.perf_counter() - t0
    log(f"fp32 encoder: {graph.embed_dim}-d, {graph.n_patch_tokens} patch tokens, opset {opset}")
    for head in source.heads:
        t0 = time.perf_counter()
        export_mil_head(head.module, stage / head.entry.file, in_dim=graph.embed_dim, opset=opset)
        timings[f"export_head_{head.entry.name}"] = time.perf_counter() - t0
        log(f"slide head {head.entry.name}: {len(head.entry.labels)} labels")
    if "fp16" in variants:
        t0 = time.perf_counter()
        to_fp16(stage / VARIANT_FILES["fp32"], stage / VARIANT_FILES["fp16"])
        timings["export_fp16"] = time.perf_counter() - t0
        log("fp16 variant written")
    if "int8" in variants:
        t0 = time.perf_counter()
        export_int8_encoder(
            source.model,
            stage / VARIANT_FILES["int8"],
            img_px=source.tile_px,
            with_patch_tokens=with_patch_tokens,
            opset=opset,
            mode=int8_mode,
            calibration_tiles=calibration,
            fp32_graph=stage / VARIANT_FILES["fp32"],
        )
        timings["export_int8"] = time.perf_counter() - t0
        log(f"int8 variant written ({int8_mode.value})")
    return {"embed_dim": graph.embed_dim}


def export_int8_encoder(
    model: nn.Module,
    dst: Path,
    *,
    img_px: int,
    with_patch_tokens: bool = True,
    opset: int = DEFAULT_OPSET,
    mode: Int8Mode = Int8Mode.DYNAMIC,
    calibration_tiles: np.ndarray | None = None,
    fp32_graph: Path | None = None,
) -> Path:
    """The CPU int8 encoder of ``model``, as every package's ``model.int8.onnx`` is made.

    Dynamic mode quantizes a graph exported with ONNX Runtime's fused attention and GELU
    (``export_encoder(..., ort_fused=True)``: QAttention, fused GELU), written beside ``dst``
    and removed; static QDQ quantizes the plain fp32 graph (``fp32_graph`` when given, else one
    exported here), the graph its calibration ranges are measured on.

    Raises:
        ExportError: an export or quantization step failed.
    """
    if mode is Int8Mode.STATIC and fp32_graph is not None:
        return quantize_int8(fp32_graph, dst, mode=mode, calibration_tiles=calibration_tiles)
    source_graph = dst.with_name(f"{dst.stem}.source.onnx")
    try:
        export_encoder(
            model,
            source_graph,
            img_px=img_px,
            with_patch_tokens=with_patch_tokens,
            opset=opset,
            ort_fused=mode is Int8Mode.DYNAMIC,
        )
        return quantize_int8(source_graph, dst, mode=mode, calibration_tiles=calibration_tiles)
    finally:
        source_graph.unlink(missing_ok=True)


def _copy_extra_files(stage: Path, files: Mapping[str, Path]) -> list[str]:
    """Copy ``files`` (package-relative path -> source) into ``stage``; the relative paths.

    Raises:
        ExportError: a source is missing or a path would leave the package or replace a graph.
    """
    out = []
    for rel, src in files.items():
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or (stage / rel_path).exists():
            raise ExportError(
                f"extra file path {rel!r} must be relative, inside the package and not one of "
                "its own files; choose another name.",
                reason="extra_file",
            )
        if not Path(src).is_file():
            raise ExportError(
                f"extra file {src} does not exist; write it before exporting.",
                reason="extra_file",
                path=Path(src),
            )
        (stage / rel_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, stage / rel_path)
        out.append(rel_path.as_posix())
    return out


def _parity_line(report: ParityReport) -> str:
    parts = [
        f"{v.variant} min cos {v.min_cosine:.6f}, centred {v.centred_min_cosine:.4f}, rel err "
        f"{v.max_relative_error:.4f}, nn {v.nn_agreement:.2f} ({'ok' if v.passed else 'FAIL'})"
        for v in report.variants
    ]
    if report.reference_spread.get("collapsed"):
        parts.append(
            "WARNING the PyTorch model itself is collapsed (effective rank "
            f"{report.reference_spread['effective_rank']:.2f}): its embeddings are near one vector"
        )
    parts += [f"head {h.head} agreement {json.dumps(h.agreement)}" for h in report.heads]
    return f"parity on {report.n_tiles} tiles: " + "; ".join(parts)


def _with_spread(notes: str, report: ParityReport) -> str:
    """The card's notes plus the spread of the encoder's embeddings on the parity tiles."""
    sp = report.reference_spread
    text = (
        f"embedding spread on {report.n_tiles} parity tiles: effective rank "
        f"{sp['effective_rank']:.2f}, mean pairwise cosine {sp['mean_pairwise_cosine']:.3f}"
    )
    if sp.get("collapsed"):
        text += " - COLLAPSED: the encoder outputs nearly one vector, its embeddings carry little"
    return f"{notes}; {text}" if notes else text


def _triple(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
