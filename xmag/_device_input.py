"""uint8 tiles in, normalisation on the device: a lookup pre-graph fused before the encoder.

Uploading float32 NCHW tensors moves 4x the bytes of the uint8 tiles the readers produce, and the
host spends a pass per batch normalising them. On a GPU the encoder's input can instead be the
uint8 tiles themselves, (B, tile_px, tile_px, 3) NHWC, with the normalisation done first inside
the graph::

    pixels uint8 [B, H, W, 3] --Gather(axis 3, model channel order)--> Cast int32
        --Add([0, 256, 512])--> Gather(table [768]) --> [B, H, W, 3] in the encoder's dtype
        --Transpose(0, 3, 1, 2)--> the encoder's original input

The table is ``xmag.preprocess.Preprocessor``'s own (read through its public call on the 256 uint8
values), so the fused graph computes exactly what the reference computes on the host: the same
float64 arithmetic rounded once to the model's dtype, value for value. The fused model keeps the
encoder's input name; only its type and layout change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmag.errors import XmagUsageError
from xmag.preprocess import Preprocessor

__all__ = ["FUSED_PREFIX", "fuse_uint8_input", "uint8_tiles"]

#: Names of the tensors and nodes the pre-graph adds (they cannot clash with an exported graph's).
FUSED_PREFIX = "xmag_u8_"


def _table(pre: Preprocessor) -> np.ndarray:
    """(3 * 256,) model channel c, uint8 value v -> input value, in the model's dtype."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1).repeat(3, axis=3)
    out = pre(values)  # (1, 3, 1, 256): every source channel holds v, so out[c, v] = table_c(v)
    return np.ascontiguousarray(out[0, :, 0, :]).reshape(-1)


def _source_channels(pre: Preprocessor) -> list[int]:
    """Model channel c reads RGB channel [c] (checked against the reference by the tests)."""
    return [2, 1, 0] if pre.channel_order == "BGR" else [0, 1, 2]


def fuse_uint8_input(encoder: Path | bytes, pre: Preprocessor, input_name: str) -> bytes:
    """The encoder with the lookup pre-graph in front: serialized ONNX taking uint8 NHWC tiles.

    Args:
        encoder: the encoder's ONNX file (or its bytes); its input ``input_name`` is
            (B, 3, H, W) float32 or float16.
        pre: the reference preprocessing of the model card (mean, std, channel order, dtype).
        input_name: the encoder input to replace; the fused graph's input has the same name.

    Returns:
        The fused model, serialized (feed it to ``onnxruntime.InferenceSession``).

    Raises:
        ValueError: the encoder has no such input, or it is not a 4-D float tensor.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = (
        onnx.load_from_string(encoder) if isinstance(encoder, bytes) else onnx.load(str(encoder))
    )
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if input_name not in inputs:
        raise ValueError(f"the encoder has no input {input_name!r} (has {sorted(inputs)})")
    old = inputs[input_name]
    ttype = old.type.tensor_type
    dims = ttype.shape.dim
    if len(dims) != 4 or ttype.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ValueError(f"input {input_name!r} must be a 4-D float (B, 3, H, W) tensor")
    np_dtype = np.float16 if ttype.elem_type == TensorProto.FLOAT16 else np.float32
    if np.dtype(pre.np_dtype) != np.dtype(np_dtype):
        raise ValueError(
            f"the card's input dtype {pre.dtype} does not match the encoder's input "
            f"{np.dtype(np_dtype).name}"
        )

    normalized = f"{FUSED_PREFIX}normalized"
    for node in graph.node:  # the encoder now reads the pre-graph's output
        node.input[:] = [normalized if n == input_name else n for n in node.input]
    for out in graph.output:
        if out.name == input_name:
            raise ValueError(f"input {input_name!r} is also a graph output; cannot fuse")

    p = FUSED_PREFIX
    inits = [
        numpy_helper.from_array(np.asarray(_source_channels(pre), np.int64), f"{p}channels"),
        numpy_helper.from_array(np.asarray([0, 256, 512], np.int32), f"{p}offsets"),
        numpy_helper.from_array(_table(pre).astype(np_dtype), f"{p}table"),
    ]
    nodes = [
        helper.make_node(
            "Gather", [input_name, f"{p}channels"], [f"{p}ordered"], axis=3, name=f"{p}order"
        ),
        helper.make_node(
            "Cast", [f"{p}ordered"], [f"{p}index"], to=TensorProto.INT32, name=f"{p}cast"
        ),
        helper.make_node("Add", [f"{p}index", f"{p}offsets"], [f"{p}flat"], name=f"{p}offset"),
        helper.make_node("Gather", [f"{p}table", f"{p}flat"], [f"{p}nhwc"], axis=0, name=f"{p}lut"),
        helper.make_node(
            "Transpose", [f"{p}nhwc"], [normalized], perm=[0, 3, 1, 2], name=f"{p}nchw"
        ),
    ]
    new_input = helper.make_tensor_value_info(
        input_name,
        TensorProto.UINT8,
        [_dim(dims[0]), _dim(dims[2]), _dim(dims[3]), 3],
    )
    index = list(graph.input).index(old)
    graph.input.remove(old)
    graph.input.insert(index, new_input)
    graph.initializer.extend(inits)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *rest])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _dim(d: object) -> int | str:
    value = getattr(d, "dim_value", 0)
    return int(value) if value else str(getattr(d, "dim_param", "") or "batch")


def uint8_tiles(pixels: np.ndarray) -> np.ndarray:
    """The model input when the graph normalises: the tiles as they are, checked.

    Raises:
        XmagUsageError: not a uint8 (n, h, w, 3) array (as ``Preprocessor`` raises).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise XmagUsageError(f"expected (n, h, w, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}")
    return np.ascontiguousarray(pixels)
