"""Importing the official XMAG checkpoint (DINOv2 reference layout) into an ONNX encoder.

The checkpoint is made here with exactly the release's key layout and shapes (random values);
the exported graph is checked against a ViT forward written from the raw tensors in this file
(not timm), so a wrong key mapping or a wrong position-embedding resize cannot pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

import onnx  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from model_export.errors import CheckpointError  # noqa: E402
from model_export.onnx_export import ENCODER_OUTPUT, export_encoder  # noqa: E402
from model_export.parity import cosine_rows, make_session  # noqa: E402
from model_export.xmag_checkpoint import (  # noqa: E402
    build_xmag_student,
    dinov2_interpolate_pos_embed,
    expected_xmag_shapes,
    read_xmag_state_dict,
)

PATCHES = Path(__file__).parent / "data" / "patches" / "nct-crc-he"
SLIDE = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
DIM, HEADS, DEPTH = 768, 12, 12


def _random_release_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the release under ``model.``, with values that make each block matter."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_xmag_shapes().items():
        if key.endswith("gamma"):
            value = 0.5 + 0.5 * torch.rand(shape, generator=g)  # layer scale: blocks contribute
        elif ("norm" in key) and key.endswith("weight"):
            value = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key in ("cls_token", "pos_embed", "mask_token"):
            value = torch.randn(shape, generator=g)
        elif key.endswith("weight"):
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        sd["model." + key] = value
    return sd


@pytest.fixture(scope="module")
def release_sd() -> dict[str, torch.Tensor]:
    return _random_release_state_dict()


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory, release_sd) -> Path:
    path = tmp_path_factory.mktemp("xmag") / "xmag_student.pth"
    torch.save({"state_dict": release_sd, "epoch": 10, "args": {"arch": "vit_base"}}, path)
    return path


def _reference_pos_embed(pe: torch.Tensor, grid: int, *, antialias: bool, offset: float):
    """DINOv2's interpolate_pos_encoding for a square image, from its published semantics."""
    m = math.isqrt(pe.shape[1] - 1)
    patch = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        s = (grid + offset) / m
        patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic", antialias=antialias)
    else:
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=antialias)
    return torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _reference_forward(sd64: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor):
    """DINOv2 ViT-B/14 forward from raw float64 tensors (``model.`` keys): x_norm_clstoken."""

    def p(name: str) -> torch.Tensor:
        return sd64["model." + name]

    x = x.double()
    b = x.shape[0]
    h = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=14)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([p("cls_token").expand(b, -1, -1), h], dim=1) + pos.double()
    n = h.shape[1]
    for i in range(DEPTH):
        k = f"blocks.{i}."
        y = F.layer_norm(h, (DIM,), p(k + "norm1.weight"), p(k + "norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p(k + "attn.qkv.weight"), p(k + "attn.qkv.bias"))
        q, kk, v = qkv.reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ kk.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, DIM)
        h = h + p(k + "ls1.gamma") * F.linear(o, p(k + "attn.proj.weight"), p(k + "attn.proj.bias"))
        y = F.layer_norm(h, (DIM,), p(k + "norm2.weight"), p(k + "norm2.bias"), eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, p(k + "mlp.fc1.weight"), p(k + "mlp.fc1.bias"))),
            p(k + "mlp.fc2.weight"),
            p(k + "mlp.fc2.bias"),
        )
        h = h + p(k + "ls2.gamma") * y
    h = F.layer_norm(h, (DIM,), p("norm.weight"), p("norm.bias"), eps=1e-6)
    return h[:, 0]


def _real_tiles() -> np.ndarray:
    from model_export.parity_tiles import collect_parity_tiles
    from xmag.preprocess import Preprocessor

    tiles = collect_parity_tiles(
        [SLIDE], tile_px=224, target_mpp=2.0, patches=[PATCHES], tiles_per_slide=2
    )
    assert len(tiles) >= 4
    return Preprocessor()(tiles.pixels)  # the core's ImageNet preprocessing, XMAG's input


def test_xmag_release_exports_to_onnx_matching_an_independent_dinov2_forward(
    release_file: Path, release_sd, tmp_path: Path
) -> None:
    model, info = build_xmag_student(release_file)
    assert (info.source_grid, info.target_grid) == (37, 16)
    assert "mask_token" in info.ignored_keys
    graph = export_encoder(model, tmp_path / "model.onnx", img_px=224, with_patch_tokens=True)
    assert (graph.embed_dim, graph.n_patch_tokens, graph.opset) == (768, 256, 18)
    proto = onnx.load(str(graph.path), load_external_data=False)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"

    x = _real_tiles()
    got = make_session(graph.path).run([ENCODER_OUTPUT], {"pixels": x})[0]
    sd64 = {k: v.double() for k, v in release_sd.items()}
    pos = _reference_pos_embed(release_sd["model.pos_embed"], 16, antialias=False, offset=0.1)
    want = _reference_forward(sd64, torch.from_numpy(x), pos).numpy()
    assert got.shape == (len(x), 768)
    assert cosine_rows(got, want).min() >= 0.9999
    err = np.abs(got - want).max()
    assert err < 1e-3

    # The check is sharp enough to catch the usual mistake: timm's resize (antialiased, by size).
    timm_pos = _reference_pos_embed(release_sd["model.pos_embed"], 16, antialias=True, offset=0.0)
    wrong = _reference_forward(sd64, torch.from_numpy(x[:1]), timm_pos).numpy()
    assert np.abs(got[:1] - wrong).max() > 20 * err


def test_position_grid_is_resized_like_dinov2_with_the_class_token_kept_apart(release_sd) -> None:
    pe = release_sd["model.pos_embed"]
    out = dinov2_interpolate_pos_embed(pe, 16)
    assert out.shape == (1, 257, 768)
    torch.testing.assert_close(out[:, 0], pe[:, 0], rtol=0, atol=0)
    want = _reference_pos_embed(pe, 16, antialias=False, offset=0.1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    by_size = _reference_pos_embed(pe, 16, antialias=False, offset=0.0)
    assert (out - by_size).abs().max() > 1e-3  # the 0.1 offset matters


def _save(tmp_path: Path, state: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_truncated_release_file_fails_as_corrupt(release_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(release_file.read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as info:
        build_xmag_student(bad)
    assert info.value.reason == "corrupt"
    assert info.value.code == "MODEL_PACKAGE_INVALID"
    assert str(bad) in info.value.message


def test_file_that_is_not_torch_fails_as_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("these are not weights")
    with pytest.raises(CheckpointError) as info:
        read_xmag_state_dict(bad)
    assert info.value.reason == "corrupt"


def test_missing_block_tensor_is_named_in_the_error(release_sd, tmp_path: Path) -> None:
    sd = {k: v for k, v in release_sd.items() if k != "model.blocks.11.mlp.fc2.weight"}
    with pytest.raises(CheckpointError) as info:
        build_xmag_student(_save(tmp_path, {"state_dict": sd}))
    assert info.value.reason == "missing_keys"
    assert "blocks.11.mlp.fc2.weight" in info.value.message


def test_wrong_shape_fails_with_the_key_and_both_shapes(release_sd, tmp_path: Path) -> None:
    sd = dict(release_sd)
    sd["model.blocks.3.attn.qkv.weight"] = torch.zeros(3 * 384, 768)
    with pytest.raises(CheckpointError) as info:
        build_xmag_student(_save(tmp_path, {"state_dict": sd}))
    assert info.value.reason == "shape_mismatch"
    assert "blocks.3.attn.qkv.weight (1152, 768) (expected (2304, 768))" in info.value.message


def test_state_dict_without_model_prefix_is_not_the_release_layout(release_sd, tmp_path) -> None:
    sd = {k.removeprefix("model."): v for k, v in release_sd.items()}
    with pytest.raises(CheckpointError) as info:
        read_xmag_state_dict(_save(tmp_path, {"state_dict": sd}))
    assert info.value.reason == "layout"


def test_file_without_state_dict_is_not_the_release_layout(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        read_xmag_state_dict(_save(tmp_path, {"model": {"x": torch.zeros(1)}}))
    assert info.value.reason == "layout"
    assert "state_dict" in info.value.message


def test_extra_register_tokens_are_refused_as_another_architecture(release_sd, tmp_path) -> None:
    sd = dict(release_sd)
    sd["model.register_tokens"] = torch.zeros(1, 4, 768)
    with pytest.raises(CheckpointError) as info:
        build_xmag_student(_save(tmp_path, {"state_dict": sd}))
    assert info.value.reason == "unexpected_keys"
    assert "register_tokens" in info.value.message


def test_cli_import_xmag_reports_a_truncated_release_with_its_code_and_path(
    release_file: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from model_export.cli import app

    bad = tmp_path / "xmag_student.pth"
    bad.write_bytes(release_file.read_bytes()[:4096])
    args = ["import-xmag", str(bad), "--out", str(tmp_path / "pkg"), "--parity-slide", str(SLIDE)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "[MODEL_PACKAGE_INVALID] (corrupt)" in result.output and str(bad) in result.output
    assert not (tmp_path / "pkg").exists()
