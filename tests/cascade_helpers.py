"""Torch-free cascade packages for tests: a hand-built ONNX graph with the cell model's I/O
contract (``xmag.package.CellModelIO``) and a random per-type vocabulary.

The graph is simple enough to recompute in numpy (``reference_outputs``), so a test can check
that the engine fed it the right words in the right slots:

    v = word_value[words]                                    # [B, R, M]
    cell_attention = softmax_M(v where cell_mask else -1e4) * cell_mask
    region_score = sum_M(cell_attention * v)                 # [B, R]
    region_attention = softmax_R(score where region_mask else -1e4) * region_mask
    risk = sum_R(region_attention * region_score);  p5y = sigmoid(risk)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xmag.cells.table import FEATURE_NAMES
from xmag.package import (
    CARD_FILENAME,
    CascadeSpec,
    FileEntry,
    ModelCard,
    sha256_file,
)

N_WORDS = 12  # 3 per cell type
K = 6


def word_values(n_words: int = N_WORDS) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n_words).astype(np.float32)


def build_contract_graph(n_words: int = N_WORDS, k: int = K) -> onnx.ModelProto:
    b, r, m = "slides", "regions", "cells"
    inputs = [
        helper.make_tensor_value_info("words", TensorProto.INT64, [b, r, m]),
        helper.make_tensor_value_info("types", TensorProto.INT64, [b, r, m]),
        helper.make_tensor_value_info("xy_um", TensorProto.FLOAT, [b, r, m, 2]),
        helper.make_tensor_value_info("nbr_index", TensorProto.INT64, [b, r, m, k]),
        helper.make_tensor_value_info("nbr_mask", TensorProto.BOOL, [b, r, m, k]),
        helper.make_tensor_value_info("cell_mask", TensorProto.BOOL, [b, r, m]),
        helper.make_tensor_value_info("region_mask", TensorProto.BOOL, [b, r]),
    ]
    outputs = [
        helper.make_tensor_value_info("risk", TensorProto.FLOAT, [b]),
        helper.make_tensor_value_info("p5y", TensorProto.FLOAT, [b]),
        helper.make_tensor_value_info("region_attention", TensorProto.FLOAT, [b, r]),
        helper.make_tensor_value_info("cell_attention", TensorProto.FLOAT, [b, r, m]),
    ]
    inits = [
        numpy_helper.from_array(word_values(n_words), "word_value"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["word_value", "words"], ["v"], axis=0),
        n("Where", ["cell_mask", "v", "neg"], ["v_masked"]),
        n("Softmax", ["v_masked"], ["ca_raw"], axis=-1),
        n("Cast", ["cell_mask"], ["cm"], to=TensorProto.FLOAT),
        n("Mul", ["ca_raw", "cm"], ["cell_attention"]),
        n("Mul", ["cell_attention", "v"], ["cv"]),
        n("ReduceSum", ["cv", "last"], ["score"], keepdims=0),
        n("Where", ["region_mask", "score", "neg"], ["s_masked"]),
        n("Softmax", ["s_masked"], ["ra_raw"], axis=-1),
        n("Cast", ["region_mask"], ["rm"], to=TensorProto.FLOAT),
        n("Mul", ["ra_raw", "rm"], ["region_attention"]),
        n("Mul", ["region_attention", "score"], ["rs"]),
        n("ReduceSum", ["rs", "last"], ["risk"], keepdims=0),
        n("Sigmoid", ["risk"], ["p5y"]),
    ]
    graph = helper.make_graph(nodes, "cell_contract", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_outputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The contract graph in numpy."""
    v = word_values()[inputs["words"]]
    cm = inputs["cell_mask"]
    z = np.where(cm, v, -1e4)
    ca = np.exp(z - z.max(-1, keepdims=True))
    ca = ca / ca.sum(-1, keepdims=True) * cm
    score = (ca * v).sum(-1)
    rm = inputs["region_mask"]
    s = np.where(rm, score, -1e4)
    ra = np.exp(s - s.max(-1, keepdims=True))
    ra = ra / ra.sum(-1, keepdims=True) * rm
    risk = (ra * score).sum(-1)
    return {
        "risk": risk,
        "p5y": 1 / (1 + np.exp(-risk)),
        "region_attention": ra,
        "cell_attention": ca,
    }


def random_vocabulary(n_per_type: int = 3, seed: int = 0) -> dict:
    names = [n for n in FEATURE_NAMES if n != "orientation_deg"]
    rng = np.random.default_rng(seed)
    mean = np.zeros(len(names))
    mean[names.index("area_um2")] = 30.0
    return {
        "format": "xmag.celleconet.codebook/1",
        "feature_names": names,
        "mean": mean.tolist(),
        "std": np.ones(len(names)).tolist(),
        "centroids": rng.normal(size=(4 * n_per_type, len(names))).tolist(),
        "word_types": [t for t in range(4) for _ in range(n_per_type)],
    }


def add_cascade(
    base: Path, out: Path, cascade: CascadeSpec | None = None, graph: onnx.ModelProto | None = None
) -> Path:
    """Copy package ``base`` to ``out`` and give it a cascade with the contract graph."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    cascade = cascade or CascadeSpec(k=4)
    (out / cascade.model.file).write_bytes((graph or build_contract_graph()).SerializeToString())
    (out / cascade.vocabulary).write_text(json.dumps(random_vocabulary()))
    card = ModelCard.model_validate_json((base / CARD_FILENAME).read_text())
    files = list(card.files)
    for rel in (cascade.model.file, cascade.vocabulary):
        p = out / rel
        files.append(FileEntry(path=rel, sha256=sha256_file(p), size_bytes=p.stat().st_size))
    card = ModelCard.model_validate(
        {
            **card.model_dump(),
            "files": [f.model_dump() for f in files],
            "cascade": cascade.model_dump(),
        }
    )
    (out / CARD_FILENAME).write_text(card.model_dump_json(indent=2))
    return out
