"""Parity of every exported variant with the PyTorch model, on real tiles read from slides.

For each variant (fp32, fp16, int8) the tile embeddings of ONNX Runtime are compared with the
PyTorch model's, tile by tile, on what a user of the embeddings relies on:

- cosine (the minimum over tiles must reach ``THRESHOLDS``: fp32 0.9999, fp16 0.999, int8 0.98);
- *centred* cosine, after subtracting the PyTorch mean embedding of the parity tiles
  (``CENTRED_THRESHOLDS``): embeddings share a large common direction, so a variant that outputs
  one constant vector can pass the plain cosine; it cannot pass this one;
- relative error: ``|variant - torch|`` over the RMS distance of the PyTorch embeddings to their
  mean (``MAX_RELATIVE_ERROR``, the worst tile);
- nearest-neighbour agreement: the fraction of tiles whose nearest other tile (centred cosine)
  is the same as PyTorch's (``MIN_NN_AGREEMENT``);
- the spread of each variant's embeddings (``training.spread``), which flags a collapsed output.

Any miss fails the export. Slide heads are run on each slide's bag of embeddings: their prediction
(arg-max class) must agree with the PyTorch head on the PyTorch embeddings for the share of bags
in ``MIN_HEAD_AGREEMENT``, and the fp32 head graph must reproduce PyTorch on the same bag. The
spread of the PyTorch embeddings themselves is reported (``reference_spread``): a collapsed
student exports faithfully, and the report says it is collapsed.

Tiles are collected by ``model_export.parity_tiles`` (the core's tile reads, as the engine sees
them); this module only compares. Model input is made by the core's ``Preprocessor`` built from the
package card's input spec, the very preprocessing the engine runs.
"""

from __future__ import annotations

import importlib
import math
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model_export.errors import ParityError
from model_export.onnx_export import (
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_INPUT,
    EncoderForExport,
)
from model_export.parity_tiles import ParityTiles
from training.spread import centred_cosine_rows, embedding_spread
from xmag.preprocess import Preprocessor

__all__ = [
    "CENTRED_THRESHOLDS",
    "MAX_RELATIVE_ERROR",
    "MIN_HEAD_AGREEMENT",
    "MIN_NN_AGREEMENT",
    "PARITY_REPORT_FORMAT",
    "THRESHOLDS",
    "HeadParity",
    "HeadUnderTest",
    "ParityReport",
    "VariantParity",
    "cosine_rows",
    "make_session",
    "onnx_embeddings",
    "raise_on_failure",
    "run_parity",
    "torch_embeddings",
]

PARITY_REPORT_FORMAT = "xmag-parity-report/2"
# Minimum per-tile cosine to PyTorch for each variant (issue 6).
THRESHOLDS: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
# Minimum per-tile cosine after subtracting the PyTorch mean embedding (issue 15).
CENTRED_THRESHOLDS: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "int8": 0.9}
# Largest per-tile |variant - torch| / RMS |torch - mean torch| (issue 15).
MAX_RELATIVE_ERROR: dict[str, float] = {"fp32": 0.02, "fp16": 0.1, "int8": 0.5}
# Smallest share of tiles whose nearest neighbour (centred cosine) matches PyTorch's.
MIN_NN_AGREEMENT: dict[str, float] = {"fp32": 0.9, "fp16": 0.8, "int8": 0.5}
# Smallest share of parity bags whose head prediction matches PyTorch's.
MIN_HEAD_AGREEMENT: dict[str, float] = {"fp32": 1.0, "fp16": 1.0, "int8": 0.5}
HEAD_FP32_ATOL = 1e-4  # the fp32 head graph vs PyTorch on the same bag (probabilities)
_PARITY_BATCH = 8
# Names that moved to model_export.parity_tiles (collection is split from comparison).
_MOVED_TO_PARITY_TILES = ("DEFAULT_TILES_PER_SLIDE", "collect_parity_tiles")


def __getattr__(name: str) -> Any:
    """Warning shims for the names that moved out of this module."""
    if name in _MOVED_TO_PARITY_TILES:
        warnings.warn(
            f"model_export.parity.{name} moved to model_export.parity_tiles.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("model_export.parity_tiles"), name)
    if name == "normalise_tiles":
        warnings.warn(
            "model_export.parity.normalise_tiles is replaced by the core's "
            "xmag.preprocess.Preprocessor (Preprocessor.from_spec(card.input)(pixels))",
            DeprecationWarning,
            stacklevel=2,
        )
        return lambda pixels, mean, std: Preprocessor(mean=tuple(mean), std=tuple(std))(pixels)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    centred_threshold: float
    centred_min_cosine: float = Field(
        description="per-tile cosine after subtracting the PyTorch mean embedding, minimum"
    )
    centred_mean_cosine: float
    max_relative_error: float = Field(
        description="worst |variant - torch| / RMS |torch - mean torch| over tiles"
    )
    relative_error_limit: float
    nn_agreement: float = Field(
        description="share of tiles whose nearest other tile (centred cosine) matches PyTorch's"
    )
    nn_agreement_limit: float
    spread: dict[str, Any] = Field(
        description="training.spread.embedding_spread of this variant (centred on PyTorch's mean)"
    )
    collapsed_unlike_reference: bool = Field(
        False, description="this variant's embeddings are collapsed and PyTorch's are not"
    )
    passed: bool

    def failures(self) -> list[str]:
        """One clause per check this variant missed."""
        out = []
        if not (math.isfinite(self.min_cosine) and self.min_cosine >= self.threshold):
            out.append(
                f"min cosine {self.min_cosine:.6f} < {self.threshold} (worst tile "
                f"{self.worst_tile})"
            )
        if not self.centred_min_cosine >= self.centred_threshold:
            out.append(
                f"min centred cosine {self.centred_min_cosine:.4f} < {self.centred_threshold}"
            )
        if not self.max_relative_error <= self.relative_error_limit:
            out.append(
                f"relative error {self.max_relative_error:.4f} > {self.relative_error_limit}"
            )
        if not self.nn_agreement >= self.nn_agreement_limit:
            out.append(
                f"nearest-neighbour agreement {self.nn_agreement:.3f} < {self.nn_agreement_limit}"
            )
        if self.collapsed_unlike_reference:
            out.append("its embeddings are collapsed (near one vector), PyTorch's are not")
        return out


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
    agreement_limit: dict[str, float] = Field(default_factory=dict)
    passed: bool


class ParityReport(BaseModel):
    """``parity.json`` in the package: the evidence that the export reproduces PyTorch."""

    model_config = ConfigDict(extra="forbid")

    format: str = PARITY_REPORT_FORMAT
    created: str | None = Field(
        None,
        description="no longer written: a timestamp made the package's bytes differ on every "
        "rebuild (kept so older reports still load)",
    )
    torch_version: str
    onnxruntime_version: str
    machine: str
    n_tiles: int
    preprocessing: dict[str, Any] | None = Field(
        None,
        description="the core Preprocessor the tiles went through (the card's input spec): "
        "mean, std, channel_order, dtype",
    )
    tile_px: int
    target_mpp: float
    sources: list[str]
    skipped: dict[str, str]
    reference_spread: dict[str, Any] = Field(
        description="spread of the PyTorch embeddings of the parity tiles; collapsed = True "
        "means the model itself outputs (nearly) one vector, however faithful the export"
    )
    variants: list[VariantParity]
    heads: list[HeadParity]
    passed: bool

    def failures(self) -> list[str]:
        """One sentence per failed check."""
        out = [
            f"{v.variant} ({v.file}): " + ", ".join(v.failures())
            for v in self.variants
            if not v.passed
        ]
        for h in self.heads:
            if h.passed:
                continue
            if h.fp32_graph_max_abs_diff > HEAD_FP32_ATOL:
                out.append(
                    f"head {h.head}: fp32 graph differs from PyTorch by "
                    f"{h.fp32_graph_max_abs_diff:.2e}"
                )
            low = {v: a for v, a in h.agreement.items() if a < h.agreement_limit.get(v, 0.0)}
            if low:
                out.append(f"head {h.head}: predictions agree with PyTorch on too few bags {low}")
        return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of (n, ..., D) arrays, over the last axis, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def _nearest_other(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by centred cosine (rows at the centre: index 0)."""
    c = x.astype(np.float64) - centre
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    u = np.where(norms > 1e-30, c / np.maximum(norms, 1e-30), 0.0)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=1)


def _relative_error(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ref64 = ref.astype(np.float64)
    scale = float(np.sqrt(((ref64 - ref64.mean(0)) ** 2).sum(1).mean()))
    return np.linalg.norm(x.astype(np.float64) - ref64, axis=1) / max(scale, 1e-30)


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
    preprocessor: Preprocessor,
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
        tiles: real tiles (see ``model_export.parity_tiles.collect_parity_tiles``).
        preprocessor: the card's preprocessing (``Preprocessor.from_spec(card.input)``), what
            the engine runs before the graph.
        target_mpp: recorded in the report.
        heads: slide heads to check on each bag.
        with_patch_tokens: the graphs output patch tokens (compared too, reported only).
        thresholds: per-variant minimum cosine (default ``THRESHOLDS``); the centred,
            relative-error and neighbour limits are the module's constants.
        provider: ONNX Runtime provider to run the variants on.
        embed_fn: replaces ``onnx_embeddings`` (the TensorRT bench passes its own sessions).
    """
    limits = {**THRESHOLDS, **(thresholds or {})}
    x = preprocessor(tiles.pixels)
    ref_cls, ref_patch = torch_embeddings(model, x, with_patch_tokens=with_patch_tokens)
    results: list[VariantParity] = []
    outputs: dict[str, np.ndarray] = {}
    centre = ref_cls.astype(np.float64).mean(0)
    ref_spread = embedding_spread(ref_cls)
    ref_nn = _nearest_other(ref_cls, centre) if len(ref_cls) > 2 else None
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
        centred = centred_cosine_rows(cls, ref_cls, centre)
        rel = _relative_error(cls, ref_cls)
        nn_agree = (
            float(np.mean(_nearest_other(cls, centre) == ref_nn)) if ref_nn is not None else 1.0
        )
        spread = embedding_spread(cls, centre=centre)
        vp = VariantParity(
            variant=name,
            file=path.name,
            provider=provider,
            threshold=limit,
            min_cosine=float(cos.min()),
            mean_cosine=float(cos.mean()),
            worst_tile=tiles.sources[worst],
            patch_tokens_min_cosine=patch_min,
            max_abs_diff=float(np.abs(cls - ref_cls).max()),
            centred_threshold=CENTRED_THRESHOLDS.get(name, max(CENTRED_THRESHOLDS.values())),
            centred_min_cosine=float(centred.min()),
            centred_mean_cosine=float(centred.mean()),
            max_relative_error=float(rel.max()),
            relative_error_limit=MAX_RELATIVE_ERROR.get(name, min(MAX_RELATIVE_ERROR.values())),
            nn_agreement=nn_agree,
            nn_agreement_limit=MIN_NN_AGREEMENT.get(name, max(MIN_NN_AGREEMENT.values())),
            spread=spread,
            collapsed_unlike_reference=bool(spread["collapsed"] and not ref_spread["collapsed"]),
            passed=False,
        )
        results.append(vp.model_copy(update={"passed": not vp.failures()}))
    head_results = [_head_parity(h, tiles, ref_cls, outputs) for h in heads]
    return ParityReport(
        torch_version=torch.__version__,
        onnxruntime_version=ort.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
        n_tiles=len(tiles),
        preprocessing={
            "mean": list(preprocessor.mean),
            "std": list(preprocessor.std),
            "channel_order": preprocessor.channel_order,
            "dtype": preprocessor.dtype,
        },
        tile_px=int(tiles.pixels.shape[1]),
        target_mpp=target_mpp,
        sources=list(tiles.sources),
        skipped=dict(tiles.skipped),
        reference_spread=ref_spread,
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
    agreement = {name: float(np.mean(v)) if v else 1.0 for name, v in agree.items()}
    limits = {name: MIN_HEAD_AGREEMENT.get(name, 1.0) for name in outputs}
    return HeadParity(
        head=head.name,
        file=head.path.name,
        n_bags=len(tiles.bags),
        fp32_graph_max_abs_diff=graph_diff,
        agreement=agreement,
        max_prob_diff=prob_diff,
        agreement_limit=limits,
        passed=graph_diff <= HEAD_FP32_ATOL and all(agreement[n] >= limits[n] for n in agreement),
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
