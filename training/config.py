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

from xmag.params import SlideOptions, TilingParams
from xmag.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor

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
    kind: TeacherKind = Field(
        TeacherKind.TIMM,
        description="'timm': a timm model with local weights (UNI2-h by default, weights required);"
        " 'handcrafted': stain and texture statistics, no weights (to try the pipeline)",
    )
    arch: str = Field("uni2-h", description="'uni2-h' or any timm model name")
    weights: Path | None = Field(None, description="local state-dict file; required for timm")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments of the teacher"
    )
    tile_px: int = Field(224, ge=16, description="teacher tile side, pixels at mpp")
    mpp: float = Field(TEACHER_MPP, gt=0, description="um/px of the teacher's tiles")
    embed_dim: int | None = Field(None, description="output dim; read from the model when None")
    projection_dim: int = Field(64, ge=1, description="handcrafted: random-projection width")
    seed: int = Field(0, description="handcrafted: seed of its fixed random projection")


class StudentConfig(_Cfg):
    arch: str = Field(
        "vit_base_patch14_dinov2",
        description="timm ViT of the student (ViT-B/14 DINOv2 layout, the XMAG paper's)",
    )
    img_size: int = Field(224, ge=28, description="student input side, pixels at mpp")
    mpp: float = Field(STUDENT_MPP, gt=0, description="um/px of the student's input")
    weights: Path | None = Field(None, description="local DINOv2 weights; None = random init")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra timm.create_model arguments (e.g. embed_dim, depth for a small student)",
    )
    mean: tuple[float, float, float] = Field(
        IMAGENET_MEAN, description="per-channel mean of RGB in [0, 1], written to the card"
    )
    std: tuple[float, float, float] = Field(
        IMAGENET_STD, description="per-channel std of RGB in [0, 1], written to the card"
    )

    def preprocessor(self) -> Preprocessor:
        """The core's preprocessing of the student's input (what the exported card states)."""
        return Preprocessor(mean=self.mean, std=self.std)


class LossConfig(_Cfg):
    global_weight: float = Field(
        1.0, ge=0, description="weight of student CLS vs mean teacher tile embedding"
    )
    local_weight: float = Field(
        0.5, ge=0, description="weight of pooled patch tokens vs each 20x teacher tile"
    )
    head_hidden: int | None = Field(
        None, description="projection hidden width; teacher dim if None"
    )
    grid: int = Field(GRID, ge=1, description="teacher tiles per field side")


class AugmentConfig(_Cfg):
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.5, ge=0, le=1, description="probability of a vertical flip")
    brightness: float = Field(0.2, ge=0, description="colour jitter: brightness range")
    contrast: float = Field(0.2, ge=0, description="colour jitter: contrast range")
    saturation: float = Field(0.2, ge=0, description="colour jitter: saturation range")
    hue: float = Field(0.02, ge=0, le=0.5, description="colour jitter: hue range (turns)")
    views: int = Field(2, ge=1, description="augmented views per field")


class SlideEntry(SlideOptions):
    """A training slide: its path, its label, and the core's per-slide options (``mpp_override``,
    ``default_mpp``, ``tissue_threshold``, ``tissue_detector``: ``xmag.params.SlideOptions``)."""

    path: Path = Field(description="slide file or DICOM folder")
    label: str | None = Field(None, description="class label (unused by distillation)")

    def tiling_params(self, *, tile_px: int, target_mpp: float, **extra: Any) -> TilingParams:
        """The core's tiling of this slide at ``tile_px`` / ``target_mpp``: its options (those
        set) under ``extra`` (e.g. ``overlap_px``, or a run's ``tissue_threshold``)."""
        options = self.model_dump(include=set(SlideOptions.model_fields), exclude_none=True)
        return TilingParams(tile_px=tile_px, target_mpp=target_mpp, **{**options, **extra})


class DataConfig(_Cfg):
    slides: tuple[SlideEntry, ...] = Field(
        (), description="slides to sample tissue fields from (SlideEntry list)"
    )
    crops_dir: Path | None = Field(None, description="folder-of-crops mode (written by extract)")
    student_view: StudentView = Field(
        StudentView.PYRAMID,
        description="'pyramid': 5x view read from the slide's pyramid (as served); 'resize': "
        "area-resized 20x crop (as the paper)",
    )
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
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms/biases)")
    clip_grad: float = Field(1.0, gt=0, description="gradient norm clip")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    steps: int = Field(1000, ge=1, description="schedule length: cosine decay ends here")
    batch_size: int = Field(32, ge=1, description="fields per process per step")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final lr / peak lr")


class DistillConfig(_Cfg):
    teacher: TeacherConfig = Field(TeacherConfig(), description="the 20x teacher (TeacherConfig)")
    student: StudentConfig = Field(StudentConfig(), description="the 5x student (StudentConfig)")
    loss: LossConfig = Field(LossConfig(), description="distillation loss (LossConfig)")
    augment: AugmentConfig = Field(AugmentConfig(), description="paired augmentation")
    data: DataConfig = Field(description="where fields come from (DataConfig); required")
    optim: OptimConfig = Field(OptimConfig(), description="optimiser and schedule (OptimConfig)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the student (exported)")
    amp: str = Field(
        "auto",
        pattern="^(auto|off|bf16|fp16)$",
        description="mixed precision: auto (fp16 on CUDA, off on CPU), off, bf16, fp16",
    )
    seed: int = Field(0, description="seeds weights, fields and augmentations")
    out_dir: Path = Field(
        Path("runs/distill"), description="run folder: checkpoint.pt, metrics.jsonl"
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between loss lines")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0'...")

    @property
    def field_px(self) -> int:
        """Side of the 20x field in teacher pixels (896 for 4 x 224)."""
        return self.loss.grid * self.teacher.tile_px


class MilConfig(_Cfg):
    hidden: int = Field(128, ge=1, description="attention and classifier hidden width")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the head")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    epochs: int = Field(20, ge=1, description="passes over the bags (one bag per step)")
    folds: int = Field(5, ge=2, description="stratified cross-validation folds")
    seed: int = Field(0, description="seeds the head and the folds")
