"""What the demo is built from: its slides, its settings and the distillation config they imply.

Slides are named, not located: ``DemoConfig.slides_dir`` (required) says where they are; the CLI
(``python -m model_export demo``) resolves its default, ``tests/data/slides``, from the current
directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.config import (
    AugmentConfig,
    DataConfig,
    DistillConfig,
    LossConfig,
    OptimConfig,
    SlideEntry,
    StudentConfig,
    StudentView,
    TeacherConfig,
    TeacherKind,
)
from xmag.params import SlideOptions

__all__ = [
    "DEMO_DESCRIPTION",
    "DEMO_PACKAGE_NAME",
    "DEMO_SLIDES",
    "MODALITIES",
    "DemoConfig",
    "DemoSlide",
    "Progress",
    "demo_slide",
    "distill_config",
    "slide_entries",
]

DEMO_PACKAGE_NAME = "xmag-demo"
DEMO_DESCRIPTION = (
    "DEMONSTRATION MODEL, NOT A DIAGNOSTIC MODEL. A tiny ViT (patch 14, 224 px at 2.0 um/px) "
    "distilled on a CPU in minutes from a handcrafted 20x teacher (stain densities and texture "
    "statistics) on 7 small public test slides, plus a slide head guessing the stain/modality "
    "(H&E, IHC, fluorescence). It shows that the pipeline runs end to end; its embeddings and "
    "predictions carry no clinical meaning. Training report: training/report.md."
)
MODALITIES = ("fluorescence", "he", "ihc")

#: ``progress(stage, done, total)``, called as a stage advances.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoSlide:
    """A real slide of the test-slide folder with its modality from PROVENANCE.md.

    ``options`` states the assumptions for files that give no mpp (``default_mpp``).
    """

    name: str
    modality: str
    options: SlideOptions = field(default_factory=SlideOptions)
    note: str = ""


DEMO_SLIDES: tuple[DemoSlide, ...] = (
    DemoSlide("CMU-1-Small-Region.svs", "he"),
    DemoSlide(
        "tcga-cr-7395-01a-01-ts1.svs",
        "he",
        SlideOptions(default_mpp=1.0),
        "no mpp in file; 1.0 um/px assumed from lymphocyte nuclei of about 7 px",
    ),
    DemoSlide("OS-1-detail.ome.tif", "he"),
    DemoSlide("OS-2-ndpi.ome.tif", "ihc"),
    DemoSlide(
        "kidney-48-5.tif", "ihc", SlideOptions(default_mpp=0.5), "no mpp in file; 0.5 um/px assumed"
    ),
    DemoSlide("test3-DAPI-2-387.ndpi", "fluorescence"),
    DemoSlide("BPAEC-dicom", "fluorescence"),
)
_BY_NAME = {s.name: s for s in DEMO_SLIDES}


def demo_slide(name: str) -> DemoSlide:
    """The ``DEMO_SLIDES`` entry of a file name (KeyError when unknown)."""
    return _BY_NAME[name]


class DemoConfig(BaseModel):
    """Settings of the demo build (defaults: the ``make demo-model`` run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slides_dir: Path = Field(description="folder holding the DEMO_SLIDES files")
    slides: tuple[str, ...] = Field(
        tuple(s.name for s in DEMO_SLIDES), description="subset of DEMO_SLIDES by file name"
    )
    out: Path = Field(description="run folder: checkpoint, report, loss curve")
    package: Path | None = Field(None, description="model package folder to export to")
    steps: int = Field(250, ge=1)
    batch_size: int = Field(12, ge=1)
    lr: float = Field(1e-3, gt=0, description="a tiny student from scratch takes a larger step")
    fields_per_slide: int = Field(
        24, ge=1, description="training fields per slide (at most 8 per tissue position)"
    )
    heldout_per_slide: int = Field(12, ge=1, description="held-out fields per slide (at most)")
    views: int = Field(2, ge=1, description="bank views per field: the field + views-1 augmented")
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    ema_decay: float = Field(0.98, description="short run: 0.999 would keep the EMA near init")
    mil_epochs: int = Field(40, ge=1)
    seed: int = 0
    torch_threads: int = Field(
        2,
        ge=1,
        description="torch CPU threads of the build: fixed, since the thread count changes the "
        "order of float sums and so the weights (the package is rebuilt byte for byte)",
    )
    tile_overlap_px: int = Field(112, description="5x tiles for the modality head overlap by this")
    tile_options: SlideOptions = Field(
        SlideOptions(tissue_threshold=0.1),
        description="core options of the 5x tiles the modality head reads (over each slide's)",
    )
    variants: tuple[str, ...] = ("fp32", "int8")
    parity_tiles_per_slide: int = Field(8, ge=1)

    @field_validator("slides")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(names) - set(_BY_NAME))
        if unknown or not names:
            raise ValueError(f"unknown demo slides {unknown}; choose among {sorted(_BY_NAME)}")
        return names


def slide_entries(cfg: DemoConfig) -> list[tuple[DemoSlide, SlideEntry]]:
    """The configured slides with their training entries (path, assumed mpp, modality label)."""
    return [
        (
            _BY_NAME[n],
            SlideEntry(
                path=cfg.slides_dir / n,
                label=_BY_NAME[n].modality,
                **_BY_NAME[n].options.model_dump(exclude_none=True),
            ),
        )
        for n in cfg.slides
    ]


def distill_config(cfg: DemoConfig) -> DistillConfig:
    """The ``DistillConfig`` of the demo: handcrafted teacher, tiny ViT student, CPU."""
    return DistillConfig(
        teacher=TeacherConfig(kind=TeacherKind.HANDCRAFTED, arch="handcrafted", seed=cfg.seed),
        student=StudentConfig(
            arch="vit_small_patch14_dinov2",
            timm_kwargs={
                "embed_dim": cfg.embed_dim,
                "depth": cfg.depth,
                "num_heads": cfg.num_heads,
            },
        ),
        loss=LossConfig(head_hidden=256),
        augment=AugmentConfig(views=1),
        data=DataConfig(
            slides=tuple(e for _, e in slide_entries(cfg)), student_view=StudentView.PYRAMID
        ),
        optim=OptimConfig(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            warmup_steps=min(20, max(1, cfg.steps // 10)),
        ),
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        out_dir=Path(cfg.out),
        checkpoint_every=max(cfg.steps, 1),
        device="cpu",
    )
