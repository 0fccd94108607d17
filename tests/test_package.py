"""Model packages: the default package builds deterministically and loads; every way a package can
be broken fails at load with a typed error naming the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_export.default_package import build_default_package
from xmag.errors import ChecksumMismatchError, ModelPackageError
from xmag.package import CARD_FILENAME, ModelCard, load_package, sha256_file
from xmag.runtime import ModelSession, choose_providers
from xmag.settings import EngineSettings, available_cpus


@pytest.fixture
def package_copy(default_package: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(default_package, dst)
    return dst


def _edit_card(pkg: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    card = json.loads((pkg / CARD_FILENAME).read_text())
    edit(card)
    (pkg / CARD_FILENAME).write_text(json.dumps(card))


def _replace_onnx(pkg: Path, rel: str, model: onnx.ModelProto) -> None:
    """Write another graph at ``rel`` and fix its checksum, so only the shape check can catch it."""
    path = pkg / rel
    path.write_bytes(model.SerializeToString())
    digest = sha256_file(path)

    def fix(card: dict[str, Any]) -> None:
        for f in card["files"]:
            if f["path"] == rel:
                f["sha256"] = digest
                f["size_bytes"] = path.stat().st_size

    _edit_card(pkg, fix)


def _linear_encoder(tile_px: int, dim: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((3, dim), np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["pixels"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, tile_px, tile_px])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_default_package_builds_the_same_bytes_twice(default_package: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_default_package(again)
    for rel in ("model.onnx", "heads/stain.onnx", "heads/tissue.onnx", CARD_FILENAME):
        assert sha256_file(again / rel) == sha256_file(default_package / rel), rel


def test_default_package_loads_and_says_it_is_untrained(default_package: Path) -> None:
    pkg = load_package(default_package)
    card = pkg.card
    assert card.trained is False
    assert "untrained" in card.description.lower()
    assert card.input.tile_px == 224 and card.input.target_mpp == 2.0
    assert card.outputs.embedding.dim == 384
    assert {h.name: h.level for h in card.heads} == {"stain": "slide", "tissue": "tile"}
    assert card.heads[0].labels == ["he", "ihc", "fluorescence"]
    assert set(pkg.checksums()) == {"model.onnx", "heads/stain.onnx", "heads/tissue.onnx"}


def test_default_heads_return_probabilities_and_attention_of_the_card_shapes(
    default_package: Path,
) -> None:
    settings = EngineSettings(providers=["cpu"], intra_op_threads=1)
    pkg = load_package(default_package)
    bag = np.random.default_rng(0).standard_normal((7, 384)).astype(np.float32)
    stain = ModelSession(pkg.root / "heads/stain.onnx", settings).run({"embeddings": bag})
    assert stain["probabilities"].shape == (3,)
    assert stain["attention"].shape == (7,)
    assert np.isclose(stain["probabilities"].sum(), 1.0, atol=1e-5)
    assert np.isclose(stain["attention"].sum(), 1.0, atol=1e-5)
    tissue = ModelSession(pkg.root / "heads/tissue.onnx", settings).run({"embeddings": bag})
    assert tissue["probabilities"].shape == (7, 2)


def test_card_schema_refuses_a_head_file_not_listed_with_a_checksum() -> None:
    card = json.loads(json.dumps(_card_dict()))
    card["heads"][0]["file"] = "heads/other.onnx"
    with pytest.raises(ValueError, match="missing"):
        ModelCard.model_validate(card)


def test_card_schema_refuses_attention_on_a_tile_head() -> None:
    card = _card_dict()
    card["heads"][1]["attention"] = "attention"
    with pytest.raises(ValueError, match="only slide heads"):
        ModelCard.model_validate(card)


def test_card_schema_refuses_a_file_path_outside_the_package() -> None:
    card = _card_dict()
    card["files"][0]["path"] = "../model.onnx"
    with pytest.raises(ValueError, match="inside the package"):
        ModelCard.model_validate(card)


def _card_dict() -> dict[str, Any]:
    files = [
        {"path": p, "sha256": "0" * 64}
        for p in ("model.onnx", "heads/stain.onnx", "heads/tissue.onnx")
    ]
    return {
        "schema_version": 1,
        "name": "m",
        "version": "1",
        "trained": False,
        "description": "d",
        "architecture": {"tag": "cnn"},
        "input": {"tile_px": 224, "target_mpp": 2.0},
        "outputs": {"embedding": {"name": "embedding", "dim": 384}},
        "files": files,
        "heads": [
            {
                "name": "stain",
                "level": "slide",
                "labels": ["a", "b"],
                "file": "heads/stain.onnx",
                "attention": "attention",
            },
            {"name": "tissue", "level": "tile", "labels": ["x"], "file": "heads/tissue.onnx"},
        ],
    }


def test_a_corrupted_onnx_file_fails_with_checksum_mismatch_naming_it(package_copy: Path) -> None:
    target = package_copy / "heads" / "stain.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as info:
        load_package(package_copy)
    assert info.value.code == "MODEL_CHECKSUM_MISMATCH"
    assert "stain.onnx" in info.value.message
    assert info.value.fields["expected"] != info.value.fields["actual"]


def test_a_missing_listed_file_fails_naming_it(package_copy: Path) -> None:
    (package_copy / "heads" / "tissue.onnx").unlink()
    with pytest.raises(ModelPackageError, match=r"tissue\.onnx.*missing") as info:
        load_package(package_copy)
    assert info.value.code == "MODEL_PACKAGE_INVALID"


def test_a_folder_without_a_card_fails_saying_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="make model"):
        load_package(tmp_path)


def test_a_missing_folder_fails_as_a_package_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="not a folder"):
        load_package(tmp_path / "nope")


def test_an_unknown_card_schema_version_fails_naming_the_versions_read(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c.update(schema_version=99))
    with pytest.raises(ModelPackageError, match=r"schema_version 99.*supported: \[1\]"):
        load_package(package_copy)


def test_a_card_that_is_not_json_fails_naming_the_card(package_copy: Path) -> None:
    (package_copy / CARD_FILENAME).write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_package(package_copy)


def test_a_card_missing_a_field_fails_naming_the_field(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c.pop("trained"))
    with pytest.raises(ModelPackageError, match="trained"):
        load_package(package_copy)


def test_an_embedding_dim_that_disagrees_with_the_graph_fails(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c["outputs"]["embedding"].update(dim=768))
    with pytest.raises(ModelPackageError, match=r"model\.onnx.*\[B, 768\]"):
        load_package(package_copy)


def test_a_tile_size_that_disagrees_with_the_graph_fails(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c["input"].update(tile_px=256))
    with pytest.raises(ModelPackageError, match=r"\[B, 3, 256, 256\]"):
        load_package(package_copy)


def test_a_wrong_input_name_fails(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c["input"].update(name="images"))
    with pytest.raises(ModelPackageError, match="'images'"):
        load_package(package_copy)


def test_an_encoder_with_a_fixed_batch_axis_fails(package_copy: Path) -> None:
    model = _linear_encoder(224, 384)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    _replace_onnx(package_copy, "model.onnx", model)
    with pytest.raises(ModelPackageError, match="batch axis"):
        load_package(package_copy)


def test_an_encoder_with_another_tile_size_fails_even_with_a_good_checksum(
    package_copy: Path,
) -> None:
    _replace_onnx(package_copy, "model.onnx", _linear_encoder(256, 384))
    with pytest.raises(ModelPackageError, match=r"\[B, 3, 224, 224\]"):
        load_package(package_copy)


def test_a_slide_head_with_more_labels_than_outputs_fails(package_copy: Path) -> None:
    _edit_card(package_copy, lambda c: c["heads"][0].update(labels=["a", "b", "c", "d"]))
    with pytest.raises(ModelPackageError, match=r"stain\.onnx.*\[4\]"):
        load_package(package_copy)


def test_a_head_expecting_another_embedding_dim_fails(package_copy: Path) -> None:
    head = onnx.load(str(package_copy / "heads" / "tissue.onnx"))
    head.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 768
    _replace_onnx(package_copy, "heads/tissue.onnx", head)
    with pytest.raises(ModelPackageError, match=r"tissue\.onnx.*\[B, 384\]"):
        load_package(package_copy)


def test_a_file_that_is_not_onnx_fails_as_unreadable(package_copy: Path) -> None:
    (package_copy / "heads" / "stain.onnx").write_bytes(b"\x00garbage" * 10)
    digest = sha256_file(package_copy / "heads" / "stain.onnx")

    def fix(card: dict[str, Any]) -> None:
        for f in card["files"]:
            if f["path"] == "heads/stain.onnx":
                f["sha256"] = digest

    _edit_card(package_copy, fix)
    with pytest.raises(ModelPackageError, match="not a readable ONNX"):
        load_package(package_copy)


def test_cpu_is_chosen_when_no_gpu_provider_is_offered() -> None:
    settings = EngineSettings(providers=["tensorrt", "cuda", "cpu"])
    chosen = choose_providers(settings, ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert [name for name, _ in chosen] == ["CPUExecutionProvider"]


def test_tensorrt_gets_fp16_caches_and_the_batch_profile_when_offered(tmp_path: Path) -> None:
    settings = EngineSettings(trt_cache_dir=tmp_path / "trt", trt_fp16=True, cuda_device_id=1)
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = dict(
        choose_providers(settings, offered, trt_profile={"pixels": (1, 32, 64, 3, 224, 224)})
    )
    assert list(chosen) == offered
    trt = chosen["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt["trt_timing_cache_enable"] is True
    assert trt["trt_profile_min_shapes"] == "pixels:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == "pixels:32x3x224x224"
    assert trt["trt_profile_max_shapes"] == "pixels:64x3x224x224"
    assert chosen["CUDAExecutionProvider"] == {"device_id": 1}


def test_heads_never_get_tensorrt(tmp_path: Path) -> None:
    settings = EngineSettings(trt_cache_dir=tmp_path)
    offered = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    chosen = choose_providers(settings, offered, allow_tensorrt=False)
    assert [name for name, _ in chosen] == ["CPUExecutionProvider"]


def test_settings_read_xmag_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMAG_PROVIDERS", "cuda,cpu")
    monkeypatch.setenv("XMAG_BATCH_SIZE", "8")
    monkeypatch.setenv("XMAG_INTRA_OP_THREADS", "3")
    s = EngineSettings()
    assert s.providers == ["cuda", "cpu"]
    assert s.batch_size == 8
    assert s.intra_op_threads == 3


def test_default_thread_count_is_what_this_process_may_use() -> None:
    import os

    assert EngineSettings().intra_op_threads == available_cpus()
    assert available_cpus() <= len(os.sched_getaffinity(0))


def test_the_session_records_the_provider_it_runs_on(default_package: Path) -> None:
    session = ModelSession(default_package / "model.onnx", EngineSettings(providers=["cpu"]))
    assert session.provider == "cpu"
    out = session.run({"pixels": np.zeros((2, 3, 224, 224), np.float32)})
    assert out["embedding"].shape == (2, 384)


def test_runtime_failures_become_inference_errors(default_package: Path) -> None:
    from xmag.errors import InferenceError

    session = ModelSession(default_package / "model.onnx", EngineSettings(providers=["cpu"]))
    with pytest.raises(InferenceError) as info:
        session.run({"pixels": np.zeros((2, 3, 100, 100), np.float32)})
    assert info.value.code == "INFERENCE_FAILED"
    assert "model.onnx" in info.value.message
