"""Exported ONNX files depend on the checkpoint only, not on the folder or machine of the build.

torch.export records, on every node, the stack trace that created it: absolute paths of the
build's source tree and environment. They changed the bytes (and the card's sha256) from one
machine to the next; the export strips them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.torch_required import require_torch

torch = require_torch()

import onnx  # noqa: E402

from model_export.export import from_training  # noqa: E402
from model_export.onnx_export import export_encoder, export_mil_head  # noqa: E402
from training.models import CHECKPOINT_FORMAT, GatedAttentionMIL, build_student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCH, KW = "vit_small_patch14_dinov2", {"embed_dim": 16, "depth": 1, "num_heads": 2}


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    student = build_student(ARCH, img_size=28, **KW)
    head = GatedAttentionMIL(16, hidden=4, n_classes=2)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": ARCH,
            "img_size": 28,
            "embed_dim": 16,
            "timm_kwargs": KW,
            "mpp": 2.0,
            "student": student.state_dict(),
            "student_ema": student.state_dict(),
            "heads": {
                "slide": {
                    "kind": "gated_attention_mil",
                    "state_dict": head.state_dict(),
                    "in_dim": 16,
                    "hidden": 4,
                    "labels": ["a", "b"],
                }
            },
            "config": {},
            "step": 3,
        },
        path,
    )
    return path


def _export_in(folder: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    folder.mkdir(parents=True)
    local = shutil.copy(ckpt, folder / "student.pt")
    monkeypatch.chdir(folder)
    source = from_training(Path(local))
    encoder = export_encoder(source.model, folder / "out" / "model.onnx", img_px=28)
    head = export_mil_head(source.heads[0].module, folder / "out" / "slide.onnx", in_dim=16)
    return [encoder.path, head.path]


@pytest.mark.timeout(900)  # four torch.export runs: minutes on a loaded machine
def test_exporting_one_checkpoint_from_two_folders_gives_byte_identical_onnx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _checkpoint(tmp_path / "student.pt")
    first = _export_in(tmp_path / "build-a", ckpt, monkeypatch)
    second = _export_in(tmp_path / "elsewhere" / "build-b", ckpt, monkeypatch)
    for a, b in zip(first, second, strict=True):
        data = a.read_bytes()
        for machine_path in {str(REPO), sys.prefix, str(tmp_path)}:
            assert machine_path.encode() not in data, (a.name, machine_path)
        assert data == b.read_bytes(), a.name
        model = onnx.load(str(a))
        assert not any(len(n.metadata_props) for n in model.graph.node)
        assert not len(model.graph.metadata_props)
