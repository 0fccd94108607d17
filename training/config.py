"""Run configurations as data (pydantic). Every run writes its config into its checkpoints.

Defaults follow the XMAG paper: a UNI2-h teacher at 0.5 um/px on 896-px fields cut into 4x4 tiles
of 224 px, a ViT-B/14 DINOv2-layout student at 2.0 um/px and 224 px, global + 0.5 x local loss,
AdamW 5e-4 / wd 0.05, clip 1.0, EMA 0.999.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DistillConfig",
    "LossConfig",
    "MilConfig",
    "OptimConfig",
    "SlideEntry",
    "StudentConfig",
    "StudentView",
    "TeacherConfig",
    "TeacherKind",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_MPP = 0.5  # um/px, "20x"
STUDENT_MPP = 2.0  # um/px, "5x"
GRID = 4  # the 20x field is GRID x GRID teacher tiles


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TeacherKind(StrEnum):
    TIMM = "timm"  # any timm model + a local weights file (UNI2-h by default)
    HANDCRAFTED = "handcrafted"  # stain + texture statistics, no weights (the demo's teacher)


class StudentView(StrEnum):
    PYRAMID = "pyramid"  # read the 5x view from the slide's own pyramid, as the service does
    RESIZE = "resize"  # area-resize the 20x crop to 5x, as the paper did


class TeacherConfig(_Cfg):
    kind: TeacherKind = TeacherKind.TIMM
    arch: str = Field("uni2-h", description="'uni2-h' or any timm model name")
    weights: Path | None = Field(None, description="local state-dict file; required for timm")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    tile_px: int = Field(224, ge=16, description="teacher tile side, pixels at mpp")
    mpp: float = Field(TEACHER_MPP, gt=0, description="um/px of the teacher's tiles")
    embed_dim: int | None = Field(None, description="output dim; read from the model when None")
    projection_dim: int = Field(64, ge=1, description="handcrafted: random-projection width")
    seed: int = Field(0, description="handcrafted: seed of its fixed random projection")


class StudentConfig(_Cfg):
    arch: str = "vit_base_patch14_dinov2"
    img_size: int = Field(224, ge=28, description="student input side, pixels at mpp")
    mpp: float = Field(STUDENT_MPP, gt=0, description="um/px of the student's input")
    weights: Path | None = Field(None, description="local DINOv2 weights; None = random init")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class LossConfig(_Cfg):
    global_weight: float = Field(1.0, ge=0)
    local_weight: float = Field(0.5, ge=0)
    head_hidden: int | None = Field(
        None, description="projection hidden width; teacher dim if None"
    )
    grid: int = Field(GRID, ge=1, description="teacher tiles per field side")


class AugmentConfig(_Cfg):
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.02, ge=0, le=0.5)
    views: int = Field(2, ge=1, description="augmented views per field")


class SlideEntry(_Cfg):
    path: Path
    mpp_override: float | None = Field(None, gt=0)
    default_mpp: float | None = Field(None, gt=0)
    label: str | None = None


class DataConfig(_Cfg):
    slides: tuple[SlideEntry, ...] = ()
    crops_dir: Path | None = Field(None, description="folder-of-crops mode (written by extract)")
    student_view: StudentView = StudentView.PYRAMID
    min_tissue: float = Field(0.5, ge=0, le=1, description="tissue fraction a field needs")
    allow_upsample: bool = Field(
        False, description="accept slides whose level-0 mpp is coarser than the teacher's"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if not self.slides and self.crops_dir is None:
            raise ValueError("give slides or crops_dir")
        return self


class OptimConfig(_Cfg):
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    clip_grad: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="fields per process per step")
    min_lr_ratio: float = Field(0.01, ge=0, le=1)


class DistillConfig(_Cfg):
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    ema_decay: float = Field(0.999, ge=0, lt=1)
    amp: str = Field("auto", pattern="^(auto|off|bf16|fp16)$")
    seed: int = 0
    out_dir: Path = Path("runs/distill")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    device: str = "auto"

    @property
    def field_px(self) -> int:
        """Side of the 20x field in teacher pixels (896 for 4 x 224)."""
        return self.loss.grid * self.teacher.tile_px


class MilConfig(_Cfg):
    hidden: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)
    folds: int = Field(5, ge=2)
    seed: int = 0
