"""Write a model package folder: ONNX files, ``parity.json``, ``model.json`` with checksums.

The card is built with the engine's own schema (``xmag.package.ModelCard``), so a package this
module writes is valid by construction; ``finalise_package`` then loads it back with
``xmag.package.load_package`` (checksums, graph names and shapes) before moving the staging
folder into place, so a half-written or inconsistent package is never left at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model_export.errors import ExportError
from model_export.onnx_export import (
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_INPUT,
    HEAD_OUTPUTS,
    PATCH_OUTPUT,
)
from xmag.errors import ModelPackageError
from xmag.package import (
    CARD_FILENAME,
    Architecture,
    BatchProfile,
    EmbeddingOutput,
    FileEntry,
    HeadSpec,
    InputSpec,
    ModelCard,
    ModelPackage,
    OutputSpec,
    RuntimeHints,
    Variant,
    load_package,
    sha256_file,
)

__all__ = [
    "ENCODER_FILE",
    "PARITY_FILE",
    "PROVIDERS_BY_PRECISION",
    "VARIANT_FILES",
    "CardInfo",
    "HeadEntry",
    "build_card",
    "finalise_package",
    "input_spec",
    "staging_dir",
]

ENCODER_FILE = "model.onnx"
PARITY_FILE = "parity.json"
VARIANT_FILES = {"fp32": ENCODER_FILE, "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# Which ONNX Runtime providers each precision is meant for, best first. The fp32 graph is what
# TensorRT builds its (fp16, per RuntimeHints.trt_fp16) engine from; the fp16 graph is for the
# CUDA provider; int8 (MatMulInteger) is fast only on CPUs with VNNI/AVX2 integer dot products.
PROVIDERS_BY_PRECISION: dict[str, list[str]] = {
    "fp32": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "fp16": ["CUDAExecutionProvider"],
    "int8": ["CPUExecutionProvider"],
}
DEFAULT_TRT_WORKSPACE_MB = 4096


@dataclass(frozen=True)
class HeadEntry:
    """A slide head written to ``heads/<name>.onnx``."""

    name: str
    labels: list[str]
    kind: str = "gated_attention_mil"
    description: str = ""

    @property
    def file(self) -> str:
        return f"heads/{self.name}.onnx"


@dataclass(frozen=True)
class CardInfo:
    """What the card says beyond the graphs: identity, preprocessing and runtime hints.

    Attributes:
        name, version: package identity (``name`` matches ``[A-Za-z0-9][A-Za-z0-9_.-]*``).
        trained: False for placeholders whose outputs mean nothing.
        description: one paragraph for people.
        arch_tag: timm architecture name.
        params_m: encoder parameters in millions.
        tile_px, target_mpp: the input tile side (px) and its um/px.
        mean, std: per-channel normalisation of RGB values in [0, 1].
        batch: TensorRT optimisation profile (min/opt/max batch).
        trt_fp16: let TensorRT build fp16 kernels from the fp32 graph.
        trt_workspace_mb: TensorRT builder workspace.
        notes, license, intended_use: free text for the card.
    """

    name: str
    version: str
    trained: bool
    description: str
    arch_tag: str
    params_m: float | None
    tile_px: int
    target_mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batch: BatchProfile = field(default_factory=BatchProfile)
    trt_fp16: bool = True
    trt_workspace_mb: int = DEFAULT_TRT_WORKSPACE_MB
    notes: str = ""
    license: str = ""
    intended_use: str = ""


def input_spec(info: CardInfo) -> InputSpec:
    """The card's input section: what the engine's ``Preprocessor`` (and parity) is built from."""
    return InputSpec(
        name=ENCODER_INPUT,
        tile_px=info.tile_px,
        target_mpp=info.target_mpp,
        channel_order="RGB",
        mean=info.mean,
        std=info.std,
        dtype="float32",  # every variant keeps float32 input and output
    )


def staging_dir(out_dir: Path) -> Path:
    """A fresh sibling folder to build the package in (same filesystem, so the move is atomic)."""
    out_dir = Path(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def build_card(
    root: Path,
    info: CardInfo,
    *,
    embed_dim: int,
    with_patch_tokens: bool,
    variants: Sequence[str],
    heads: Sequence[HeadEntry],
    extra_files: Sequence[str] = (),
) -> ModelCard:
    """The card for the files under ``root``, sha256 computed from the written bytes.

    Raises:
        ExportError: a file the card names is missing, or the card fails the engine's schema.
    """
    files = [VARIANT_FILES[v] for v in variants] + [h.file for h in heads]
    if (root / PARITY_FILE).is_file():
        files.append(PARITY_FILE)
    files += list(extra_files)  # e.g. the training report: checksummed like the graphs
    entries = []
    for rel in dict.fromkeys(files):  # fp32 is both the encoder and a variant: list it once
        path = root / rel
        if not path.is_file():
            raise ExportError(f"{path} was not written; the export is incomplete.", path=path)
        entries.append(
            FileEntry(path=rel, sha256=sha256_file(path), size_bytes=path.stat().st_size)
        )
    try:
        return ModelCard(
            name=info.name,
            version=info.version,
            trained=info.trained,
            description=info.description,
            architecture=Architecture(tag=info.arch_tag, params_m=info.params_m, notes=info.notes),
            input=input_spec(info),
            outputs=OutputSpec(
                embedding=EmbeddingOutput(name=ENCODER_OUTPUT, dim=embed_dim),
                patch_tokens=PATCH_OUTPUT if with_patch_tokens else None,
            ),
            encoder=ENCODER_FILE,
            files=entries,
            heads=[
                HeadSpec(
                    name=h.name,
                    level="slide",
                    labels=list(h.labels),
                    file=h.file,
                    kind=h.kind,
                    input=HEAD_INPUT,
                    probabilities=HEAD_OUTPUTS[0],
                    attention=HEAD_OUTPUTS[1],
                    description=h.description,
                )
                for h in heads
            ],
            variants=[
                Variant(
                    name=v,
                    file=VARIANT_FILES[v],
                    precision=v,
                    providers=list(PROVIDERS_BY_PRECISION[v]),
                )
                for v in variants
            ],
            runtime=RuntimeHints(
                batch=info.batch, trt_fp16=info.trt_fp16, trt_workspace_mb=info.trt_workspace_mb
            ),
            license=info.license,
            intended_use=info.intended_use,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ExportError(
            f"the card for {info.name} fails the engine's schema: {exc}", reason="card"
        ) from exc


def finalise_package(
    stage: Path, card: ModelCard, out_dir: Path, *, overwrite: bool
) -> ModelPackage:
    """Write ``model.json``, verify the folder with ``load_package``, move it to ``out_dir``.

    Raises:
        ExportError: ``out_dir`` exists and ``overwrite`` is False, or the written package does
            not load.
    """
    out_dir = Path(out_dir)
    (stage / CARD_FILENAME).write_text(
        json.dumps(card.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
    )
    try:
        load_package(stage)
    except ModelPackageError as exc:
        raise ExportError(
            f"the package written in {stage} does not load: {exc.message}",
            reason="package_invalid",
            path=stage,
        ) from exc
    if out_dir.exists():
        if not overwrite:
            raise ExportError(
                f"{out_dir} already exists; pass --overwrite or choose another --out.",
                reason="exists",
                path=out_dir,
            )
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(trash)  # rename first, so out_dir is never a half-deleted mix
        stage.rename(out_dir)
        shutil.rmtree(trash)
    else:
        stage.rename(out_dir)
    return ModelPackage(out_dir.resolve(), card)  # verified above; the move changed no byte
