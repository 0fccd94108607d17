"""Parity of every exported variant with the PyTorch model, on real tiles read from slides.

For each variant (fp32, fp16, int8) the tile embeddings of ONNX Runtime are compared with the
PyTorch model's by cosine similarity, tile by tile; the minimum over tiles must reach the
variant's threshold (fp32 0.9999, fp16 0.999, int8 0.98) or the export fails. Slide heads are run
on each slide's bag of embeddings: their prediction (arg-max class) must agree with the PyTorch
head on the PyTorch embeddings, and the fp32 head graph must reproduce PyTorch on the same bag.

Tiles come from the core exactly as the engine will see them: ``plan_slide`` at the card's tile
size and mpp, then ``read_tile`` of kept tiles; plus single tile images (e.g. NCT-CRC-HE patches)
area-resized to the tile size. Preprocessing follows the card: RGB, /255, (x - mean) / std, NCHW.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model_export.errors import ExportError, ParityError
from model_export.onnx_export import (
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_INPUT,
    EncoderForExport,
)
from xmag.errors import SlideError
from xmag.params import TilingParams
from xmag.plan import plan_slide
from xmag.readers import open_slide
from xmag.tiles import read_tile

__all__ = [
    "PARITY_REPORT_FORMAT",
    "THRESHOLDS",
    "HeadParity",
    "HeadUnderTest",
    "ParityReport",
    "ParityTiles",
    "VariantParity",
    "collect_parity_tiles",
    "cosine_rows",
    "make_session",
    "normalise_tiles",
    "onnx_embeddings",
    "raise_on_failure",
    "run_parity",
    "torch_embeddings",
]

PARITY_REPORT_FORMAT = "xmag-parity-report/1"
# Minimum per-tile cosine to PyTorch for each variant (issue 6).
THRESHOLDS: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
HEAD_FP32_ATOL = 1e-4  # the fp32 head graph vs PyTorch on the same bag (probabilities)
DEFAULT_TILES_PER_SLIDE = 16
_PARITY_BATCH = 8
_PATCH_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ParityTiles:
    """Real tiles for parity checks.

    Attributes:
        pixels: (n, tile_px, tile_px, 3) uint8 RGB at the target mpp.
        sources: n labels, ``<file name>#<grid index>`` or ``<file name>`` for patch images.
        bags: bag name (slide file name) -> row indices into ``pixels``; heads run per bag.
        skipped: file -> why it gave no tile (error code and message, or "no tissue").
    """

    pixels: np.ndarray
    sources: tuple[str, ...]
    bags: dict[str, list[int]]
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


class VariantParity(BaseModel):
    """One variant against PyTorch."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    file: str
    provider: str = Field(description="ONNX Runtime provider the check ran on")
    threshold: float
    min_cosine: float
    mean_cosine: float
    worst_tile: str
    patch_tokens_min_cosine: float | None = None
    max_abs_diff: float
    passed: bool


class HeadParity(BaseModel):
    """One slide head: agreement of its predictions per variant, over the parity bags."""

    model_config = ConfigDict(extra="forbid")

    head: str
    file: str
    n_bags: int
    fp32_graph_max_abs_diff: float = Field(
        description="ONNX head vs PyTorch head on the same (PyTorch) bag, probabilities"
    )
    agreement: dict[str, float] = Field(
        description="variant -> fraction of bags whose predicted class matches PyTorch's"
    )
    max_prob_diff: dict[str, float]
    passed: bool


class ParityReport(BaseModel):
    """``parity.json`` in the package: the evidence that the export reproduces PyTorch."""

    model_config = ConfigDict(extra="forbid")

    format: str = PARITY_REPORT_FORMAT
    created: str
    torch_version: str
    onnxruntime_version: str
    machine: str
    n_tiles: int
    tile_px: int
    target_mpp: float
    sources: list[str]
    skipped: dict[str, str]
    variants: list[VariantParity]
    heads: list[HeadParity]
    passed: bool

    def failures(self) -> list[str]:
        """One sentence per failed check."""
        out = [
            f"{v.variant} ({v.file}): min cosine {v.min_cosine:.6f} < {v.threshold} "
            f"(worst tile {v.worst_tile})"
            for v in self.variants
            if not v.passed
        ]
        out += [
            f"head {h.head}: fp32 graph differs from PyTorch by {h.fp32_graph_max_abs_diff:.2e}"
            for h in self.heads
            if not h.passed
        ]
        return out


def collect_parity_tiles(
    slides: Sequence[Path],
    *,
    tile_px: int,
    target_mpp: float,
    patches: Sequence[Path] = (),
    tiles_per_slide: int = DEFAULT_TILES_PER_SLIDE,
    default_mpp: float | None = None,
) -> ParityTiles:
    """Read real tiles as the engine will: plan at the card's mpp, ``read_tile`` of kept tiles.

    Args:
        slides: slide files (or DICOM folders); slides the core refuses are listed in
            ``skipped`` with their error code, since a parity set only needs some real tissue.
        tile_px: the model's tile side in pixels.
        target_mpp: the model's um/px.
        patches: single tile images (any size, area-resized to ``tile_px``); a folder means
            every image in it.
        tiles_per_slide: at most this many kept tiles per slide, spread evenly over the grid.
        default_mpp: level-0 um/px assumed for slides that state none (else they are skipped).

    Raises:
        ExportError: no tile at all could be read (the parity check would prove nothing).
    """
    pixels: list[np.ndarray] = []
    sources: list[str] = []
    bags: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    params = TilingParams(tile_px=tile_px, target_mpp=target_mpp, default_mpp=default_mpp)
    for slide in slides:
        try:
            tiles = _slide_tiles(Path(slide), params, tiles_per_slide)
        except SlideError as exc:  # recorded in the report, never hidden
            skipped[Path(slide).name] = f"{exc.code}: {exc.message}"
            continue
        if not tiles:
            skipped[Path(slide).name] = "no tissue tile at this mpp"
            continue
        rows = bags.setdefault(Path(slide).name, [])
        for label, tile in tiles:
            rows.append(len(pixels))
            pixels.append(tile)
            sources.append(label)
    patch_files = _expand_patches(patches)
    if patch_files:
        rows = bags.setdefault("patches", [])
        for path in patch_files:
            rows.append(len(pixels))
            pixels.append(_load_patch(path, tile_px))
            sources.append(path.name)
    if not pixels:
        raise ExportError(
            "no tile could be read for the parity check (slides: "
            f"{', '.join(map(str, slides)) or 'none'}; skipped: {skipped}); give slides with "
            "tissue and a known mpp, or --parity-patches.",
            reason="parity_tiles",
        )
    return ParityTiles(np.stack(pixels), tuple(sources), bags, skipped)


def _slide_tiles(
    path: Path, params: TilingParams, tiles_per_slide: int
) -> list[tuple[str, np.ndarray]]:
    with open_slide(path) as reader:
        plan = plan_slide(reader, params)
        kept = plan.grid.kept_indices()
        if len(kept) > tiles_per_slide:  # evenly spread, deterministic
            kept = kept[np.linspace(0, len(kept) - 1, tiles_per_slide).round().astype(int)]
        return [
            (f"{path.name}#{int(i)}", read_tile(reader, plan.grid, plan.level, int(i)))
            for i in kept
        ]


def _expand_patches(patches: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, patches):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in _PATCH_SUFFIXES))
        else:
            out.append(p)
    return out


def _load_patch(path: Path, tile_px: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"parity patch {path} is not a readable image ({exc}).",
            reason="parity_tiles",
            path=path,
        ) from exc
    if rgb.shape[:2] != (tile_px, tile_px):
        rgb = cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def normalise_tiles(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB (n, H, W, 3) -> float32 (n, 3, H, W): /255, minus mean, over std (per channel)."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    x = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of (n, ..., D) arrays, over the last axis, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def torch_embeddings(
    model: nn.Module, x: np.ndarray, *, with_patch_tokens: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The PyTorch reference: (embeddings [n, D], patch tokens [n, T, D] or None), fp32."""
    wrapper = EncoderForExport(model.eval(), with_patch_tokens=with_patch_tokens).eval()
    cls_parts, patch_parts = [], []
    with torch.inference_mode():
        for i in range(0, len(x), _PARITY_BATCH):
            out = wrapper(torch.from_numpy(x[i : i + _PARITY_BATCH]))
            if isinstance(out, tuple):
                cls_parts.append(out[0].numpy())
                patch_parts.append(out[1].numpy())
            else:
                cls_parts.append(out.numpy())
    patches = np.concatenate(patch_parts) if patch_parts else None
    return np.concatenate(cls_parts), patches


def onnx_embeddings(
    path: Path, x: np.ndarray, *, provider: str = "CPUExecutionProvider", threads: int = 2
) -> tuple[np.ndarray, np.ndarray | None]:
    """An ONNX encoder's (embeddings, patch tokens or None) on ``provider``."""
    session = make_session(path, provider=provider, threads=threads)
    names = [o.name for o in session.get_outputs()]
    cls_parts, patch_parts = [], []
    for i in range(0, len(x), _PARITY_BATCH):
        outs = session.run(None, {ENCODER_INPUT: x[i : i + _PARITY_BATCH]})
        by_name = dict(zip(names, outs, strict=True))
        cls_parts.append(by_name[ENCODER_OUTPUT])
        if len(outs) > 1:
            patch_parts.append(next(o for n, o in by_name.items() if n != ENCODER_OUTPUT))
    patches = np.concatenate(patch_parts) if patch_parts else None
    return np.concatenate(cls_parts), patches


def make_session(
    path: Path, *, provider: str = "CPUExecutionProvider", threads: int = 2
) -> ort.InferenceSession:
    """A session on one provider with explicit CPU threads (never the host's core count)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT's "removing initializer" notes are not for users
    return ort.InferenceSession(str(path), options, providers=[provider])


@dataclass(frozen=True)
class HeadUnderTest:
    """A slide head for the parity check: its PyTorch module and its exported graph."""

    name: str
    module: nn.Module
    path: Path


def run_parity(
    model: nn.Module,
    variants: dict[str, Path],
    tiles: ParityTiles,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    target_mpp: float,
    heads: Sequence[HeadUnderTest] = (),
    with_patch_tokens: bool = True,
    thresholds: dict[str, float] | None = None,
    provider: str = "CPUExecutionProvider",
    embed_fn: Callable[[Path, np.ndarray], tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> ParityReport:
    """Compare each variant with ``model`` on ``tiles``; return the report (does not raise).

    Args:
        model: the PyTorch encoder in eval mode (fp32).
        variants: variant name (``fp32``, ``fp16``, ``int8``) -> its ONNX file.
        tiles: real tiles (see ``collect_parity_tiles``).
        mean, std: the card's normalisation.
        target_mpp: recorded in the report.
        heads: slide heads to check on each bag.
        with_patch_tokens: the graphs output patch tokens (compared too, reported only).
        thresholds: per-variant minimum cosine (default ``THRESHOLDS``).
        provider: ONNX Runtime provider to run the variants on.
        embed_fn: replaces ``onnx_embeddings`` (the TensorRT bench passes its own sessions).
    """
    limits = {**THRESHOLDS, **(thresholds or {})}
    x = normalise_tiles(tiles.pixels, mean, std)
    ref_cls, ref_patch = torch_embeddings(model, x, with_patch_tokens=with_patch_tokens)
    results: list[VariantParity] = []
    outputs: dict[str, np.ndarray] = {}
    for name, path in variants.items():
        if embed_fn is not None:
            cls, patch = embed_fn(path, x)
        else:
            cls, patch = onnx_embeddings(path, x, provider=provider)
        outputs[name] = cls
        cos = cosine_rows(cls, ref_cls)
        worst = int(np.argmin(cos))
        patch_min = None
        if patch is not None and ref_patch is not None:
            patch_min = float(cosine_rows(patch, ref_patch).min())
        limit = limits[name]
        results.append(
            VariantParity(
                variant=name,
                file=path.name,
                provider=provider,
                threshold=limit,
                min_cosine=float(cos.min()),
                mean_cosine=float(cos.mean()),
                worst_tile=tiles.sources[worst],
                patch_tokens_min_cosine=patch_min,
                max_abs_diff=float(np.abs(cls - ref_cls).max()),
                passed=bool(math.isfinite(cos.min()) and cos.min() >= limit),
            )
        )
    head_results = [_head_parity(h, tiles, ref_cls, outputs) for h in heads]
    return ParityReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
        onnxruntime_version=ort.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
        n_tiles=len(tiles),
        tile_px=int(tiles.pixels.shape[1]),
        target_mpp=target_mpp,
        sources=list(tiles.sources),
        skipped=dict(tiles.skipped),
        variants=results,
        heads=head_results,
        passed=all(r.passed for r in results) and all(h.passed for h in head_results),
    )


def _head_parity(
    head: HeadUnderTest,
    tiles: ParityTiles,
    ref_cls: np.ndarray,
    outputs: dict[str, np.ndarray],
) -> HeadParity:
    session = make_session(head.path)
    graph_diff = 0.0
    agree: dict[str, list[bool]] = {name: [] for name in outputs}
    prob_diff: dict[str, float] = dict.fromkeys(outputs, 0.0)
    for rows in tiles.bags.values():
        with torch.inference_mode():
            ref_prob = head.module.eval()(torch.from_numpy(ref_cls[rows]))[0].numpy()
        onnx_prob = session.run(None, {HEAD_INPUT: ref_cls[rows]})[0]
        graph_diff = max(graph_diff, float(np.abs(onnx_prob - ref_prob).max()))
        for name, cls in outputs.items():
            prob = session.run(None, {HEAD_INPUT: np.ascontiguousarray(cls[rows])})[0]
            agree[name].append(int(prob.argmax()) == int(ref_prob.argmax()))
            prob_diff[name] = max(prob_diff[name], float(np.abs(prob - ref_prob).max()))
    return HeadParity(
        head=head.name,
        file=head.path.name,
        n_bags=len(tiles.bags),
        fp32_graph_max_abs_diff=graph_diff,
        agreement={name: float(np.mean(v)) if v else 1.0 for name, v in agree.items()},
        max_prob_diff=prob_diff,
        passed=graph_diff <= HEAD_FP32_ATOL,
    )


def raise_on_failure(report: ParityReport, report_path: Path) -> None:
    """Raise ``ParityError`` naming each failed check when the report did not pass."""
    if report.passed:
        return
    raise ParityError(
        "the exported model does not reproduce PyTorch: "
        + "; ".join(report.failures())
        + f". Report: {report_path}. Drop the failing variant or fix the model before shipping.",
        report=str(report_path),
    )
