"""Student and teacher construction from local weights files, the UNI2-h config, the MIL head."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torch_required import require_torch

torch = require_torch()

from training.config import TeacherConfig  # noqa: E402
from training.models import GatedAttentionMIL, build_student, student_tokens  # noqa: E402
from training.teachers import build_teacher, build_timm_teacher_model  # noqa: E402
from xmag.errors import ModelPackageError  # noqa: E402

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def test_a_timm_teacher_loads_from_a_local_state_dict_and_matches_the_saved_model(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    src = build_student("vit_small_patch14_dinov2", **TINY).eval()
    path = tmp_path / "teacher.pth"
    torch.save(src.state_dict(), path)
    cfg = TeacherConfig(
        arch="vit_small_patch14_dinov2", weights=path, timm_kwargs={**TINY, "img_size": 224}
    )
    teacher = build_teacher(cfg)
    x = torch.rand(3, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(x), src((x - mean) / std), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # frozen: stays in eval mode


def test_a_mismatched_weights_file_fails_with_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(build_student("vit_small_patch14_dinov2", **TINY).state_dict(), path)
    cfg = TeacherConfig(
        arch="vit_small_patch14_dinov2",
        weights=path,
        timm_kwargs={**TINY, "depth": 3, "img_size": 224},
    )
    with pytest.raises(ModelPackageError) as err:
        build_teacher(cfg)
    assert str(path) in err.value.message
    assert "missing keys: blocks.2." in err.value.message
    assert err.value.code == "MODEL_PACKAGE_INVALID"


def test_a_timm_teacher_without_weights_or_with_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="nothing is downloaded"):
        build_teacher(TeacherConfig())
    with pytest.raises(ModelPackageError, match="does not exist"):
        build_teacher(TeacherConfig(weights=tmp_path / "absent.bin"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelPackageError, match="could not be read"):
        build_teacher(TeacherConfig(weights=junk))


def test_the_uni2h_config_builds_a_vit_giant_with_8_registers_and_1536_d_output_on_meta() -> None:
    model = build_timm_teacher_model(TeacherConfig(), device="meta")
    assert len(model.blocks) == 24
    assert model.embed_dim == 1536 and model.num_features == 1536
    assert model.reg_token.shape == (1, 8, 1536)
    assert model.num_prefix_tokens == 9  # CLS + 8 registers
    assert model.patch_embed.proj.kernel_size == (14, 14)
    assert model.pos_embed.shape == (1, 256, 1536)  # 16x16 patches, no embedding on prefix tokens
    n = sum(p.numel() for p in model.parameters())
    assert 670e6 < n < 690e6  # UNI2-h has about 681M parameters
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_dinov2_layout_student_file_loads_with_prefix_mask_token_and_518px_positions(
    tmp_path: Path,
) -> None:
    torch.manual_seed(1)
    big = build_student("vit_small_patch14_dinov2", img_size=518, **TINY)
    sd = {f"model.{k}": v for k, v in big.state_dict().items()}
    sd["model.mask_token"] = torch.zeros(1, 48)
    assert sd["model.pos_embed"].shape == (1, 1 + 37 * 37, 48)
    path = tmp_path / "dinov2.pth"
    torch.save({"state_dict": sd}, path)
    student = build_student("vit_small_patch14_dinov2", img_size=224, weights=path, **TINY)
    assert student.pos_embed.shape == (1, 1 + 16 * 16, 48)
    assert torch.equal(student.blocks[1].mlp.fc2.weight, big.blocks[1].mlp.fc2.weight)
    cls, patches = student_tokens(student.eval(), torch.rand(2, 3, 224, 224))
    assert cls.shape == (2, 48) and patches.shape == (2, 256, 48)


def test_gated_attention_mil_returns_class_probabilities_and_attention_over_the_bag() -> None:
    head = GatedAttentionMIL(16, hidden=8, n_classes=3).eval()
    with torch.no_grad():
        probs, attn = head(torch.randn(7, 16))
    assert probs.shape == (3,) and attn.shape == (7,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(attn.sum()) == pytest.approx(1.0, abs=1e-6)
