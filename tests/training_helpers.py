"""Shared helpers of the training tests: real 20x/5x crops and a tiny distillation config.

Crops are read with openslide directly from the real CMU-1 H&E slide (0.499 um/px, 20x), so these
tests do not depend on the core's tissue detection.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SLIDES = Path(__file__).parent / "data" / "slides"
CMU1 = SLIDES / "CMU-1-Small-Region.svs"
# Level-0 corners of 896-px fields inside CMU-1's tissue (2220 x 2967 px).
CMU1_FIELDS = ((0, 0), (600, 800), (1200, 1500), (1300, 2000), (400, 1800), (900, 300))


def real_pairs(n: int = 6):  # -> list[FieldPair]
    import openslide

    from training.data import FieldPair

    out = []
    with openslide.OpenSlide(str(CMU1)) as slide:
        for x, y in CMU1_FIELDS[:n]:
            hi = np.asarray(slide.read_region((x, y), 0, (896, 896)).convert("RGB"))
            lo = cv2.resize(hi, (224, 224), interpolation=cv2.INTER_AREA)
            out.append(FieldPair(hi, lo, str(CMU1), (x, y), "resize"))
    return out


def tiny_config(**over):  # -> DistillConfig
    from training.config import (
        DataConfig,
        DistillConfig,
        LossConfig,
        OptimConfig,
        StudentConfig,
        TeacherConfig,
    )

    base = {
        "teacher": TeacherConfig(kind="handcrafted", arch="handcrafted", projection_dim=16),
        "student": StudentConfig(
            arch="vit_small_patch14_dinov2",
            timm_kwargs={"embed_dim": 48, "depth": 1, "num_heads": 2},
        ),
        "loss": LossConfig(head_hidden=64),
        "data": DataConfig(crops_dir=Path("unused")),
        "optim": OptimConfig(batch_size=2, steps=20, lr=1e-3),
        "ema_decay": 0.9,
        "device": "cpu",
    }
    base.update(over)
    return DistillConfig(**base)


def fitted_teacher(pairs):
    from training.augment import cut_tiles, to_float
    from training.teachers import HandcraftedTeacher

    t = HandcraftedTeacher(projection_dim=16)
    return t.fit(cut_tiles(to_float(np.stack([p.hi for p in pairs])), 4).flatten(0, 1))
