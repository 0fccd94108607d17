"""Precision variants of an exported fp32 encoder: fp16 (GPU) and int8 (CPU).

- fp16: every float tensor and weight in half precision, with the graph's inputs and outputs kept
  float32 (a Cast after the input, one before each output) so the engine feeds and reads the same
  arrays for every variant. Made with ONNX Runtime's own float16 converter
  (``onnxruntime.transformers.float16``, the code onnxconverter-common ships; that package is not
  installed here), whose inserted casts are then put back in topological order so ``onnx.checker``
  accepts the graph.
- int8 dynamic (default for ViTs): weights of every MatMul quantized per output channel ahead of
  time, activations quantized per batch at run time (MatMulInteger); on a graph exported with
  ONNX Runtime's fused attention (``export_encoder(..., ort_fused=True)``, what
  ``model_export.export`` feeds it) each attention block becomes one ``QAttention`` (int8 QKV
  projection inside ORT's attention kernel), and each LayerScale is folded into the int8 weights
  before it (exact; per-channel scales keep its precision). Softmax and LayerNorm keep fp32,
  which is why it holds accuracy on ViTs where static quantization's fixed activation ranges do
  not. Demo student, 2 cores, batch 32 (``benchmarks/bench_int8_demo.py``): see issue 13's note;
  the fused graph is what lets int8 pay on a student this small, where MatMulInteger alone
  gained 1.3x.
- int8 static (optional): QDQ with activation ranges calibrated on real tiles read from slides.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from model_export.errors import ExportError
from model_export.onnx_export import ENCODER_INPUT, check_onnx, strip_build_metadata

__all__ = [
    "Int8Mode",
    "TileCalibrationReader",
    "quantize_int8",
    "to_fp16",
    "topological_sort",
]

# Ops whose weights int8 quantizes: the ViT's linear layers (qkv, proj, fc1, fc2), and ORT's fused
# Attention where the graph has it (dynamic only: QAttention). The patch embedding Conv stays
# fp32: it is ~1% of the compute and its input is raw pixels.
_INT8_OPS = ["MatMul", "Gemm"]
_INT8_DYNAMIC_OPS = [*_INT8_OPS, "Attention"]
# ORT's histogram calibrator stacks each tensor's outputs across calls and fails on a ragged
# last batch, so calibration feeds one tile per call.
_CALIBRATION_BATCH = 1


class Int8Mode(StrEnum):
    """How int8 activations get their ranges."""

    DYNAMIC = "dynamic"  # per batch at run time (recommended for ViTs on CPU)
    STATIC = "static"  # calibrated once on real tiles (QDQ)


def to_fp16(src: Path, dst: Path) -> Path:
    """Write a float16 copy of ``src`` whose inputs and outputs stay float32.

    Raises:
        ExportError: the converted graph fails ``onnx.checker``.
    """
    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    topological_sort(half.graph)
    onnx.save(half, str(dst))
    strip_build_metadata(dst)
    check_onnx(dst)
    return dst


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    mode: Int8Mode = Int8Mode.DYNAMIC,
    calibration_tiles: np.ndarray | None = None,
) -> Path:
    """Write an int8 copy of ``src`` for the CPU provider.

    Args:
        src: the fp32 encoder.
        dst: the int8 file to write.
        mode: dynamic (no data needed) or static (needs ``calibration_tiles``).
        calibration_tiles: (n, 3, H, W) float32 normalised tiles for static calibration.

    Raises:
        ExportError: static mode without tiles, or a quantized graph that fails the checker.
    """
    with _quiet_quantizer():
        _quantize(src, dst, mode, calibration_tiles)
    strip_build_metadata(dst)  # the quantizer may record its own build details
    check_onnx(dst)
    return dst


def _quantize(src: Path, dst: Path, mode: Int8Mode, calibration_tiles: np.ndarray | None) -> None:
    if mode is Int8Mode.DYNAMIC:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=_INT8_DYNAMIC_OPS,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    else:
        if calibration_tiles is None or len(calibration_tiles) == 0:
            raise ExportError(
                "static int8 quantization needs calibration tiles; give slides to read them "
                "from, or use the dynamic mode.",
                reason="calibration",
            )
        with tempfile.TemporaryDirectory(prefix="xmag-calib-") as tmp:
            quantize_static(
                src,
                dst,
                TileCalibrationReader(calibration_tiles),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_INT8_OPS,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibTensorRangeSymmetric": True},
                calibration_cache_path=Path(tmp) / "ranges.json",
            )


class _DropPreprocessHint(logging.Filter):
    """Drops ORT's "Please consider to run pre-processing" hint: measured on these ViT graphs,
    ``quant_pre_process`` changed neither speed nor accuracy, so the hint is noise for users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Keep the quantizer's hint and the calibrator's progress prints out of the CLI output."""
    hint = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(hint)


class TileCalibrationReader(CalibrationDataReader):
    """Feeds normalised tiles to ORT's calibrator, ``_CALIBRATION_BATCH`` at a time."""

    def __init__(self, tiles: np.ndarray, input_name: str = ENCODER_INPUT) -> None:
        self._batches: Iterator[np.ndarray] = (
            np.ascontiguousarray(tiles[i : i + _CALIBRATION_BATCH], dtype=np.float32)
            for i in range(0, len(tiles), _CALIBRATION_BATCH)
        )
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs.

    Raises:
        ExportError: the graph has a cycle or reads a value nothing produces.
    """
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            names = sorted({n for node in waiting for n in node.input} - available)[:5]
            raise ExportError(
                f"the converted graph reads values nothing produces ({', '.join(names)}).",
                reason="graph_order",
            )
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
