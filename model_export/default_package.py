"""The default model package: a small untrained CNN written directly as ONNX graphs.

``python -m model_export.default_package --out models/default`` builds, without torch and without
network, in well under a second:

    model.onnx          tile encoder: 4 strided Conv+Relu, global average pool, Gemm -> 384-d
                        input "pixels" [B, 3, 224, 224] float32, output "embedding" [B, 384]
    heads/stain.onnx    slide head, gated attention MIL: "embeddings" [N, 384] ->
                        "probabilities" [3] (he, ihc, fluorescence), "attention" [N]
    heads/tissue.onnx   tile head, linear + softmax: "embeddings" [B, 384] -> "probabilities" [B, 2]
    model.json          the card, ``trained: false``

Weights come from a seeded generator, so the bytes (and the card's checksums) are the same on
every build. The package exists so the quick start and the tests run end to end before a trained
student is exported; its outputs mean nothing and the card and the CLI say so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xmag.package import (
    CARD_FILENAME,
    Architecture,
    BatchProfile,
    EmbeddingOutput,
    FileEntry,
    HeadSpec,
    InputSpec,
    ModelCard,
    OutputSpec,
    RuntimeHints,
    sha256_file,
)

__all__ = ["DEFAULT_SEED", "EMBED_DIM", "build_default_package", "main"]

DEFAULT_SEED = 20250923
EMBED_DIM = 384
TILE_PX = 224
TARGET_MPP = 2.0  # um/px, "5x"
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime >= 1.13 (CPU, CUDA and TensorRT builds)
CONV_CHANNELS = (3, 16, 32, 64, 128)
CONV_KERNELS = ((4, 4, 0), (3, 2, 1), (3, 2, 1), (3, 2, 1))  # (kernel, stride, pad) per conv
MIL_HIDDEN = 64
STAIN_LABELS = ["he", "ihc", "fluorescence"]
TISSUE_LABELS = ["background", "tissue"]


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="xmag.model_export.default_package",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_encoder(rng: np.random.Generator) -> onnx.ModelProto:
    """Strided convolutions to a 7x7 map, global average pool, linear to ``EMBED_DIM``."""
    nodes, inits = [], []
    x = "pixels"
    for i, ((k, s, p), (c_in, c_out)) in enumerate(
        zip(CONV_KERNELS, itertools.pairwise(CONV_CHANNELS), strict=True)
    ):
        w = _he(rng, (c_out, c_in, k, k), c_in * k * k)
        b = np.zeros(c_out, np.float32)
        inits += [
            numpy_helper.from_array(w, f"conv{i}.w"),
            numpy_helper.from_array(b, f"conv{i}.b"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.w", f"conv{i}.b"],
                [f"conv{i}"],
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p, p, p, p],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    c = CONV_CHANNELS[-1]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    inits += [
        numpy_helper.from_array(_he(rng, (c, EMBED_DIM), c), "proj.w"),
        numpy_helper.from_array(np.zeros(EMBED_DIM, np.float32), "proj.b"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "proj.w", "proj.b"], ["embedding"]))
    graph = helper.make_graph(
        nodes,
        "xmag_default_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, TILE_PX, TILE_PX])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", EMBED_DIM])],
        inits,
    )
    return _model(graph)


def build_gated_mil(rng: np.random.Generator, n_labels: int) -> onnx.ModelProto:
    """Gated attention MIL (Ilse et al. 2018) over a bag of tile embeddings.

    a = softmax_N(w^T (tanh(V h) * sigmoid(U h))); slide = sum_n a_n h_n; p = softmax(W slide).
    """
    d, h = EMBED_DIM, MIL_HIDDEN
    weights = {
        "V.w": _he(rng, (d, h), d),
        "V.b": np.zeros(h, np.float32),
        "U.w": _he(rng, (d, h), d),
        "U.b": np.zeros(h, np.float32),
        "w.w": _he(rng, (h, 1), h),
        "cls.w": _he(rng, (d, n_labels), d),
        "cls.b": np.zeros(n_labels, np.float32),
        "flat": np.array([-1], np.int64),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    n = helper.make_node
    nodes = [
        n("MatMul", ["embeddings", "V.w"], ["v0"]),
        n("Add", ["v0", "V.b"], ["v1"]),
        n("Tanh", ["v1"], ["v"]),
        n("MatMul", ["embeddings", "U.w"], ["u0"]),
        n("Add", ["u0", "U.b"], ["u1"]),
        n("Sigmoid", ["u1"], ["u"]),
        n("Mul", ["v", "u"], ["gated"]),
        n("MatMul", ["gated", "w.w"], ["scores"]),  # [N, 1]
        n("Softmax", ["scores"], ["att_col"], axis=0),  # over the tiles of the bag
        n("Reshape", ["att_col", "flat"], ["attention"]),  # [N]
        n("Transpose", ["att_col"], ["att_row"], perm=[1, 0]),  # [1, N]
        n("MatMul", ["att_row", "embeddings"], ["pooled"]),  # [1, D]
        n("MatMul", ["pooled", "cls.w"], ["l0"]),
        n("Add", ["l0", "cls.b"], ["logits"]),
        n("Softmax", ["logits"], ["p_row"], axis=1),
        n("Reshape", ["p_row", "flat"], ["probabilities"]),  # [C]
    ]
    graph = helper.make_graph(
        nodes,
        "xmag_default_gated_mil",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", d])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [n_labels]),
            helper.make_tensor_value_info("attention", TensorProto.FLOAT, ["N"]),
        ],
        inits,
    )
    return _model(graph)


def build_linear_tile_head(rng: np.random.Generator, n_labels: int) -> onnx.ModelProto:
    """Linear layer and softmax per tile: [B, D] -> [B, n_labels]."""
    d = EMBED_DIM
    inits = [
        numpy_helper.from_array(_he(rng, (d, n_labels), d), "fc.w"),
        numpy_helper.from_array(np.zeros(n_labels, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Gemm", ["embeddings", "fc.w", "fc.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "xmag_default_tile_head",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["B", d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", n_labels])],
        inits,
    )
    return _model(graph)


def build_default_package(out_dir: str | Path, *, seed: int = DEFAULT_SEED) -> ModelCard:
    """Write the default package into ``out_dir`` (created; existing files replaced).

    Returns the card written to ``out_dir/model.json``.
    """
    out = Path(out_dir)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    graphs = {
        "model.onnx": build_encoder(rng),
        "heads/stain.onnx": build_gated_mil(rng, len(STAIN_LABELS)),
        "heads/tissue.onnx": build_linear_tile_head(rng, len(TISSUE_LABELS)),
    }
    files = []
    for rel, model in graphs.items():
        path = out / rel
        path.write_bytes(model.SerializeToString())
        files.append(FileEntry(path=rel, sha256=sha256_file(path), size_bytes=path.stat().st_size))
    card = ModelCard(
        name="xmag-default-untrained",
        version=f"0.1.0+seed{seed}",
        trained=False,
        description=(
            "Untrained placeholder: a small random-weight CNN (seeded, deterministic) with random "
            "heads, so the pipeline runs end to end before a trained XMAG student is exported. "
            "Its embeddings and predictions carry no meaning; do not use them for anything."
        ),
        architecture=Architecture(
            tag="xmag_tiny_cnn", params_m=0.2, notes="4 strided Conv+Relu, GAP, Gemm to 384"
        ),
        input=InputSpec(tile_px=TILE_PX, target_mpp=TARGET_MPP),
        outputs=OutputSpec(embedding=EmbeddingOutput(name="embedding", dim=EMBED_DIM)),
        encoder="model.onnx",
        files=files,
        heads=[
            HeadSpec(
                name="stain",
                level="slide",
                labels=STAIN_LABELS,
                file="heads/stain.onnx",
                kind="gated_attention_mil",
                attention="attention",
                description="slide modality (untrained placeholder)",
            ),
            HeadSpec(
                name="tissue",
                level="tile",
                labels=TISSUE_LABELS,
                file="heads/tissue.onnx",
                kind="linear",
                description="per-tile tissue score (untrained placeholder)",
            ),
        ],
        runtime=RuntimeHints(batch=BatchProfile(min=1, opt=32, max=128)),
        license="Apache-2.0",
        intended_use="Demonstration and tests only; not a diagnostic model.",
    )
    text = json.dumps(card.model_dump(mode="json"), indent=2) + "\n"
    (out / CARD_FILENAME).write_text(text, encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="package folder to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    card = build_default_package(args.out, seed=args.seed)
    print(f"wrote {args.out / CARD_FILENAME} ({card.name} {card.version}, trained=false)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
