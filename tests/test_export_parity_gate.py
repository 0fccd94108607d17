"""The parity gate measures what users of the embeddings rely on, so a broken variant cannot pass.

The reference model's embeddings share a large common direction (as real encoders' do) around
which they vary a little with the tile. A variant that outputs that common vector for every tile
scores a plain cosine above 0.9999 with it, the old gate; it must fail on the centred cosine,
the relative error and the neighbours. A graph computing the same function as the reference passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.torch_required import require_torch

torch = require_torch()

from model_export.errors import ParityError  # noqa: E402
from model_export.onnx_export import ENCODER_INPUT, ENCODER_OUTPUT  # noqa: E402
from model_export.parity import THRESHOLDS, raise_on_failure, run_parity  # noqa: E402
from model_export.parity_tiles import ParityTiles, collect_parity_tiles  # noqa: E402
from training.spread import embedding_spread  # noqa: E402
from xmag.preprocess import Preprocessor  # noqa: E402

SLIDES = Path(__file__).parent / "data" / "slides"
TILE_PX, DIM = 32, 16
rng = np.random.default_rng(0)
COMMON = np.full(DIM, 10.0, dtype=np.float32)  # the shared direction, norm 40
W = rng.normal(size=(3, DIM)).astype(np.float32)
B = rng.normal(size=DIM).astype(np.float32)
SCALE = 0.05  # variation per tile, far smaller than the common part


class _CommonModeEncoder(torch.nn.Module):
    """forward_features -> (B, 1, D): COMMON + SCALE * tanh(mean colour @ W + B)."""

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        colour = pixels.mean(dim=(2, 3))
        out = torch.from_numpy(COMMON) + SCALE * torch.tanh(colour @ torch.from_numpy(W) + B[None])
        return out[:, None, :]


def _graph(nodes: list, initialisers: dict[str, np.ndarray], path: Path) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, ["batch", 3, None, None])],
        [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(v, k) for k, v in initialisers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _constant_variant(path: Path) -> Path:
    """A graph that ignores its input: COMMON for every tile (batch size kept)."""
    nodes = [
        helper.make_node("ReduceMean", [ENCODER_INPUT, "axes"], ["m"], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),
        helper.make_node("Mul", ["m1", "zero"], ["z"]),
        helper.make_node("Add", ["z", "common"], [ENCODER_OUTPUT]),
    ]
    consts = {
        "axes": np.array([1, 2, 3], dtype=np.int64),
        "one": np.array([1], dtype=np.int64),
        "zero": np.zeros((1, 1), dtype=np.float32),
        "common": COMMON[None],
    }
    return _graph(nodes, consts, path)


def _faithful_variant(path: Path) -> Path:
    """The reference's own function as a graph."""
    nodes = [
        helper.make_node("ReduceMean", [ENCODER_INPUT, "axes"], ["colour"], keepdims=0),
        helper.make_node("MatMul", ["colour", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["t"]),
        helper.make_node("Mul", ["t", "scale"], ["ts"]),
        helper.make_node("Add", ["ts", "common"], [ENCODER_OUTPUT]),
    ]
    consts = {
        "axes": np.array([2, 3], dtype=np.int64),
        "w": W,
        "b": B,
        "scale": np.array(SCALE, dtype=np.float32),
        "common": COMMON,
    }
    return _graph(nodes, consts, path)


@pytest.fixture(scope="module")
def tiles() -> ParityTiles:
    return collect_parity_tiles(
        [SLIDES / "CMU-1-Small-Region.svs"], tile_px=TILE_PX, target_mpp=2.0, tiles_per_slide=12
    )


def _parity(variant: Path, tiles: ParityTiles):
    return run_parity(
        _CommonModeEncoder(),
        {"fp32": variant},
        tiles,
        preprocessor=Preprocessor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        target_mpp=2.0,
        with_patch_tokens=False,
    )


def test_a_constant_output_variant_passes_the_plain_cosine_but_fails_the_gate(
    tiles: ParityTiles, tmp_path: Path
) -> None:
    assert len(tiles) >= 8
    report = _parity(_constant_variant(tmp_path / "constant.onnx"), tiles)
    (v,) = report.variants
    assert v.min_cosine >= THRESHOLDS["fp32"]  # what fooled the uncentred gate
    assert not report.passed and not v.passed
    assert v.centred_min_cosine < 0.5
    assert v.max_relative_error > 0.5
    assert v.spread["collapsed"] and v.spread["effective_rank"] == 0.0
    assert v.collapsed_unlike_reference
    path = tmp_path / "parity.json"
    with pytest.raises(ParityError, match="centred cosine"):
        raise_on_failure(report, path)


def test_a_variant_computing_the_reference_function_passes_every_check(
    tiles: ParityTiles, tmp_path: Path
) -> None:
    report = _parity(_faithful_variant(tmp_path / "faithful.onnx"), tiles)
    (v,) = report.variants
    assert report.passed, report.failures()
    assert v.centred_min_cosine > 0.999 and v.nn_agreement == 1.0
    assert not report.reference_spread["collapsed"]
    assert not v.spread["collapsed"]


def test_embedding_spread_tells_a_collapsed_set_from_a_spread_one() -> None:
    spread = np.random.default_rng(1).normal(size=(20, 8)) + 5.0
    constant = np.tile(np.arange(8.0), (20, 1))
    assert not embedding_spread(spread)["collapsed"]
    assert embedding_spread(spread)["effective_rank"] > 4
    assert embedding_spread(constant)["collapsed"]
    centred = embedding_spread(constant, centre=spread.mean(0))
    assert centred["mean_pairwise_centred_cosine"] == pytest.approx(1.0)
