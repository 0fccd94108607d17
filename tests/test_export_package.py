"""Exporting a training checkpoint to a model package the engine runs, with its parity report.

A small DINOv2-style student (the demo's size) and a gated attention MIL head are saved in the
training checkpoint layout; the export must give a package that ``load_package`` accepts and
whose embeddings, through the engine on real slide tiles, match the PyTorch EMA student.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from typer.testing import CliRunner  # noqa: E402

from model_export.cli import app  # noqa: E402
from model_export.errors import CheckpointError, ExportError  # noqa: E402
from model_export.export import ExportResult, export_package, from_training  # noqa: E402
from model_export.parity import (  # noqa: E402
    THRESHOLDS,
    cosine_rows,
    make_session,
    torch_embeddings,
)
from model_export.parity_tiles import ParityTiles, collect_parity_tiles  # noqa: E402
from model_export.trt_bench import run_bench  # noqa: E402
from training.models import CHECKPOINT_FORMAT, GatedAttentionMIL, build_student  # noqa: E402
from xmag.engine import Engine  # noqa: E402
from xmag.package import load_package  # noqa: E402
from xmag.plan import plan_slide  # noqa: E402
from xmag.preprocess import IMAGENET_MEAN as MEAN  # noqa: E402
from xmag.preprocess import IMAGENET_STD as STD  # noqa: E402
from xmag.preprocess import Preprocessor  # noqa: E402
from xmag.readers import open_slide  # noqa: E402
from xmag.settings import EngineSettings  # noqa: E402
from xmag.tiles import read_tile  # noqa: E402

DATA = Path(__file__).parent / "data"
SLIDES = DATA / "slides"
PARITY_SLIDES = [
    SLIDES / "CMU-1-Small-Region.svs",  # H&E
    SLIDES / "OS-2-ndpi.ome.tif",  # IHC
    SLIDES / "test3-DAPI-2-387.ndpi",  # fluorescence
    SLIDES / "tcga-cr-7395-01a-01-ts1.svs",  # no mpp in the file: reported as skipped
]
PATCHES = DATA / "patches" / "nct-crc-he"
ARCH = "vit_small_patch14_dinov2"
TIMM_KWARGS = {"embed_dim": 192, "depth": 4, "num_heads": 3}
LABELS = ["he", "ihc", "fluorescence"]


def _student(seed: int) -> torch.nn.Module:
    """A demo-sized student whose blocks matter (timm layer-scale init 1e-5 would hide them)."""
    torch.manual_seed(seed)
    model = build_student(ARCH, img_size=224, **TIMM_KWARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.3, 1.0)
            elif name in ("cls_token", "pos_embed"):
                p.normal_(0.0, 0.5)
    return model.eval()


def _checkpoint(tmp: Path) -> Path:
    ema, raw = _student(0), _student(1)
    torch.manual_seed(2)
    head = GatedAttentionMIL(192, hidden=32, n_classes=len(LABELS))
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": ARCH,
        "img_size": 224,
        "embed_dim": 192,
        "timm_kwargs": TIMM_KWARGS,
        "mean": list(MEAN),
        "std": list(STD),
        "mpp": 2.0,
        "student": raw.state_dict(),
        "student_ema": ema.state_dict(),
        "heads": {
            "modality": {
                "kind": "gated_attention_mil",
                "state_dict": head.state_dict(),
                "in_dim": 192,
                "hidden": 32,
                "labels": LABELS,
            }
        },
        "config": {},
        "step": 150,
        "optimizer": {},
        "scheduler": {},
        "ema_decay": 0.98,
    }
    path = tmp / "student.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tiles() -> ParityTiles:
    return collect_parity_tiles(
        PARITY_SLIDES, tile_px=224, target_mpp=2.0, patches=[PATCHES], tiles_per_slide=6
    )


@pytest.fixture(scope="module")
def exported(
    checkpoint: Path, tiles: ParityTiles, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    out = tmp_path_factory.mktemp("pkg") / "demo"
    return export_package(
        from_training(checkpoint),
        out,
        tiles,
        name="demo-student",
        version="0.0.1",
        trained=False,
        description="test export",
    )


def _settings(**kw: object) -> EngineSettings:
    return EngineSettings(
        providers=["cpu"], intra_op_threads=2, reader_workers=2, cache_dir=None, **kw
    )


def test_parity_tiles_come_from_real_slides_of_each_modality(tiles: ParityTiles) -> None:
    names = {s.split("#")[0] for s in tiles.sources}
    assert {"CMU-1-Small-Region.svs", "OS-2-ndpi.ome.tif", "test3-DAPI-2-387.ndpi"} <= names
    assert {"kather1.tif", "kather2.tif"} <= names
    assert tiles.pixels.shape[1:] == (224, 224, 3) and tiles.pixels.dtype == np.uint8
    assert tiles.skipped["tcga-cr-7395-01a-01-ts1.svs"].startswith("UNKNOWN_MPP")


def test_parity_checked_the_preprocessing_the_engine_builds_from_the_card(
    exported: ExportResult,
) -> None:
    card = exported.package.card
    report = json.loads((exported.package.root / "parity.json").read_text())
    want = card.input.model_dump(include={"mean", "std", "channel_order", "dtype"}, mode="json")
    assert report["preprocessing"] == want
    engine = Engine.from_dir(exported.package.root, _settings())
    assert engine.preprocess == Preprocessor.from_spec(card.input)


def test_engine_embeds_a_real_slide_like_the_pytorch_ema_student(
    exported: ExportResult, checkpoint: Path, tmp_path: Path
) -> None:
    slide = SLIDES / "CMU-1-Small-Region.svs"
    engine = Engine.from_dir(exported.package.root, _settings())
    engine.embed_slide(slide, tmp_path)
    with h5py.File(tmp_path / "features.h5", "r") as f:
        features, coords = f["features"][:], f["coords"][:]

    with open_slide(slide) as reader:
        plan = plan_slide(reader, exported.package.card.tiling_params())
        kept = plan.grid.kept_indices()
        pixels = np.stack([read_tile(reader, plan.grid, plan.level, int(i)) for i in kept])
    np.testing.assert_array_equal(coords, plan.grid.level0_xy[kept])
    x = Preprocessor.from_spec(exported.package.card.input)(pixels)  # the engine's own
    ckpt = torch.load(checkpoint, weights_only=False)
    ema = build_student(ARCH, img_size=224, **TIMM_KWARGS)
    ema.load_state_dict(ckpt["student_ema"])
    want, _ = torch_embeddings(ema, x, with_patch_tokens=False)
    assert features.shape == want.shape == (len(kept), 192)
    assert cosine_rows(features, want).min() >= THRESHOLDS["fp32"]

    raw = build_student(ARCH, img_size=224, **TIMM_KWARGS)
    raw.load_state_dict(ckpt["student"])
    other, _ = torch_embeddings(raw, x, with_patch_tokens=False)
    assert cosine_rows(features, other).mean() < 0.99  # the EMA weights were exported, not raw


def test_slide_head_runs_in_the_engine_like_pytorch_on_the_same_bag(
    exported: ExportResult, checkpoint: Path, tiles: ParityTiles
) -> None:
    engine = Engine.from_dir(exported.package.root, _settings())
    bag = engine.embed_tiles(tiles.pixels)
    spec, session = engine.heads["modality"]
    assert (spec.level, spec.labels, spec.kind) == ("slide", LABELS, "gated_attention_mil")
    got = session.run({spec.input: bag}, [spec.probabilities, spec.attention])
    entry = torch.load(checkpoint, weights_only=False)["heads"]["modality"]
    head = GatedAttentionMIL(192, hidden=32, n_classes=3)
    head.load_state_dict(entry["state_dict"])
    with torch.no_grad():
        probs, attention = head.eval()(torch.from_numpy(bag))
    np.testing.assert_allclose(got[spec.probabilities], probs.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[spec.attention], attention.numpy(), atol=1e-5)
    assert got[spec.attention].shape == (len(tiles),)


def test_package_lists_every_variant_with_its_provider_and_the_runtime_hints(
    exported: ExportResult,
) -> None:
    package = load_package(exported.package.root)  # checksums and graph shapes verified again
    card = package.card
    by_name = {v.name: v for v in card.variants}
    assert set(by_name) == {"fp32", "fp16", "int8"}
    assert by_name["fp32"].file == card.encoder == "model.onnx"
    assert by_name["fp32"].providers[0] == "TensorrtExecutionProvider"
    assert by_name["fp16"].providers == ["CUDAExecutionProvider"]
    assert by_name["int8"].providers == ["CPUExecutionProvider"]
    assert card.outputs.embedding.dim == 192 and card.outputs.patch_tokens == "patch_tokens"
    assert (card.input.tile_px, card.input.target_mpp) == (224, 2.0)
    assert (card.input.mean, card.input.std) == (MEAN, STD)
    assert card.runtime.trt_fp16 and card.runtime.trt_workspace_mb
    assert card.runtime.batch.min <= card.runtime.batch.opt <= card.runtime.batch.max
    assert not card.trained
    listed = {f.path for f in card.files}
    assert {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "heads/modality.onnx"} <= listed
    assert "parity.json" in listed


def test_parity_report_covers_every_variant_and_the_head_on_real_tiles(
    exported: ExportResult, tiles: ParityTiles
) -> None:
    report = json.loads((exported.package.root / "parity.json").read_text())
    assert report["passed"] and report["n_tiles"] == len(tiles)
    assert any(s.startswith("CMU-1-Small-Region.svs#") for s in report["sources"])
    variants = {v["variant"]: v for v in report["variants"]}
    for name, limit in THRESHOLDS.items():
        assert variants[name]["threshold"] == limit
        assert variants[name]["min_cosine"] >= limit
        assert variants[name]["patch_tokens_min_cosine"] is not None
    # fp32 is a faithful export; int8 is allowed to differ, and does, measurably.
    assert variants["fp32"]["min_cosine"] > variants["int8"]["min_cosine"]
    (head,) = report["heads"]
    assert head["head"] == "modality" and head["fp32_graph_max_abs_diff"] <= 1e-4
    assert set(head["agreement"]) == {"fp32", "fp16", "int8"}
    assert head["agreement"]["fp32"] == 1.0


def test_int8_variant_meets_its_threshold_through_the_engine(
    exported: ExportResult, checkpoint: Path, tiles: ParityTiles
) -> None:
    engine = Engine.from_dir(exported.package.root, _settings(variant="int8"))
    got = engine.embed_tiles(tiles.pixels)
    model = from_training(checkpoint).model
    want, _ = torch_embeddings(
        model,
        Preprocessor.from_spec(engine.package.card.input)(tiles.pixels),
        with_patch_tokens=False,
    )
    assert cosine_rows(got, want).min() >= THRESHOLDS["int8"]


def test_export_fails_when_a_variant_falls_short_and_leaves_only_the_report(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "strict"
    args = ["export", str(checkpoint), "--out", str(out), "--name", "strict", "--untrained"]
    args += ["--parity-slide", str(PARITY_SLIDES[0]), "--variants", "fp32,int8"]
    result = CliRunner().invoke(app, [*args, "--threshold", "int8=0.9999999"])
    assert result.exit_code == 1, result.output
    assert "[MODEL_PACKAGE_INVALID] (parity)" in result.output and "int8" in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["strict.parity-failed.json"]
    report = json.loads((tmp_path / "strict.parity-failed.json").read_text())
    assert not report["passed"]
    assert {v["variant"]: v["passed"] for v in report["variants"]} == {"fp32": True, "int8": False}


def test_cli_refuses_a_threshold_looser_than_the_required_minimum(checkpoint: Path) -> None:
    args = ["export", str(checkpoint), "--out", "unused", "--name", "x", "--parity-slide", "s"]
    result = CliRunner().invoke(app, [*args, "--threshold", "int8=0.5"])
    assert result.exit_code == 2
    assert "only be tightened" in result.output


def test_truncated_training_checkpoint_fails_with_a_checkpoint_error(
    checkpoint: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "half.pt"
    bad.write_bytes(checkpoint.read_bytes()[:50_000])
    with pytest.raises(CheckpointError) as info:
        from_training(bad)
    assert str(bad) in info.value.message
    assert info.value.code == "MODEL_PACKAGE_INVALID"


def test_checkpoint_whose_weights_do_not_fit_its_arch_fails_naming_the_tensor(
    checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["timm_kwargs"] = {**TIMM_KWARGS, "depth": 5}  # the file has 4 blocks
    path = tmp_path / "mismatch.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        from_training(path)
    assert "blocks.4" in info.value.message


def test_existing_output_folder_is_refused_before_any_work(
    checkpoint: Path, tiles: ParityTiles, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError) as info:
        export_package(
            from_training(checkpoint),
            tmp_path / "taken",
            tiles,
            name="x",
            version="1",
            trained=False,
            description="",
        )
    assert info.value.reason == "exists" and "--overwrite" in info.value.message


def test_cli_reports_a_corrupt_checkpoint_with_its_code_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    args = ["export", str(bad), "--out", str(tmp_path / "x"), "--name", "x"]
    result = CliRunner().invoke(app, [*args, "--parity-slide", str(PARITY_SLIDES[0])])
    assert result.exit_code == 1
    assert "[MODEL_PACKAGE_INVALID]" in result.output and str(bad) in result.output
    assert not (tmp_path / "x").exists()


def test_trt_bench_runs_its_cpu_path_and_says_which_gpu_providers_are_missing(
    exported: ExportResult,
) -> None:
    import onnxruntime as ort

    stream = io.StringIO()
    rows = run_bench(
        exported.package.root,
        slides=[PARITY_SLIDES[0]],
        batches=[1, 4],
        iters=2,
        engine_cache=exported.package.root.parent / "trt-cache",
        out=stream,
    )
    text = stream.getvalue()
    for gpu in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if gpu not in ort.get_available_providers():
            assert f"{gpu}: unavailable" in text
    cpu = {(r.variant, r.batch) for r in rows if r.provider == "CPUExecutionProvider"}
    assert cpu == {("fp32", 1), ("fp32", 4), ("int8", 1), ("int8", 4)}
    assert all(r.parity_ok and r.tiles_per_s > 0 for r in rows)


def test_static_int8_calibrated_on_slide_tiles_meets_its_threshold(
    exported: ExportResult, checkpoint: Path, tiles: ParityTiles, tmp_path: Path
) -> None:
    import onnx

    from model_export.quantize import Int8Mode, quantize_int8

    x = Preprocessor.from_spec(exported.package.card.input)(tiles.pixels)
    out = quantize_int8(
        exported.package.encoder_path,
        tmp_path / "model.int8-static.onnx",
        mode=Int8Mode.STATIC,
        calibration_tiles=x,
    )
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    got = make_session(out).run(["embedding"], {"pixels": x})[0]
    want, _ = torch_embeddings(from_training(checkpoint).model, x, with_patch_tokens=False)
    assert cosine_rows(got, want).min() >= THRESHOLDS["int8"]


def test_static_int8_without_calibration_tiles_is_refused(
    exported: ExportResult, tmp_path: Path
) -> None:
    from model_export.quantize import Int8Mode, quantize_int8

    with pytest.raises(ExportError) as info:
        quantize_int8(exported.package.encoder_path, tmp_path / "x.onnx", mode=Int8Mode.STATIC)
    assert info.value.reason == "calibration"


def _op_domains(path: Path) -> dict[str, set[str]]:
    domains: dict[str, set[str]] = {}
    for node in onnx.load(str(path)).graph.node:
        domains.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return domains


def _per_channel_muls(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    vectors = {i.name for i in graph.initializer if len(i.dims) == 1 and i.dims[0] > 1}
    return sum(n.op_type == "Mul" and bool(vectors & set(n.input)) for n in graph.node)


def test_int8_runs_ort_fused_attention_while_the_fp32_graph_stays_standard_onnx(
    exported: ExportResult,
) -> None:
    root = exported.package.root
    # model.onnx is what TensorRT parses: only default-domain operators.
    assert set(_op_domains(root / "model.onnx")) == {"ai.onnx"}
    assert set(_op_domains(root / "model.fp16.onnx")) == {"ai.onnx"}
    int8 = _op_domains(root / "model.int8.onnx")
    # Every block's attention is one QAttention (int8 QKV inside ORT's kernel), GELU fused.
    assert {"QAttention", "Gelu"} <= int8["com.microsoft"]
    assert "Softmax" not in int8["ai.onnx"] and "Erf" not in int8["ai.onnx"]


def test_ort_fused_export_computes_the_plain_graph_and_leaves_the_model_as_it_was(
    tmp_path: Path,
) -> None:
    from model_export.onnx_export import export_encoder

    model = _student(3)
    with torch.no_grad():  # peaked attention, so a wrong scale or Q/K/V layout shows
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
            for linear in (block.attn.proj, block.mlp.fc2):  # biases the LayerScale fold scales
                linear.bias.normal_(0.0, 0.5)
    # One block whose attention ORT's op cannot compute (a q/k norm): it must stay plain.
    qk_norm = torch.nn.LayerNorm(64)
    model.blocks[1].attn.q_norm = qk_norm
    before = [type(m) for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = export_encoder(model, tmp_path / "plain.onnx", img_px=224)
    fused = export_encoder(model, tmp_path / "fused.onnx", img_px=224, ort_fused=True)
    assert [type(m) for m in model.modules()] == before  # swapped modules put back
    assert model.blocks[1].attn.q_norm is qk_norm
    for k, v in model.state_dict().items():  # the LayerScale fold scaled copies, not weights
        assert torch.equal(v, weights[k]), k
    ops = _op_domains(fused.path)
    n_attention = sum(n.op_type == "Attention" for n in onnx.load(str(fused.path)).graph.node)
    assert n_attention == len(model.blocks) - 1 and "Softmax" in ops["ai.onnx"]
    assert "Gelu" in ops["com.microsoft"]
    # Every block's two LayerScales (the q-normed block's too) are folded into the Linear before
    # them: no Mul by a per-channel [192] weight is left.
    assert _per_channel_muls(plain.path) == 2 * len(model.blocks)
    assert _per_channel_muls(fused.path) == 0
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    outputs = {
        name: make_session(graph.path).run(None, {"pixels": x})
        for name, graph in (("plain", plain), ("fused", fused))
    }
    for got, ref in zip(outputs["fused"], outputs["plain"], strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
