"""The CoNSeP crops of tests/data/nuclei/consep (see its PROVENANCE.md), loaded for tests and
benchmarks/bench_cells.py."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CONSEP_DIR", "CONSEP_MPP", "CONSEP_TO_CELL_TYPE", "ConsepCrop", "load_consep"]

CONSEP_DIR = Path(__file__).resolve().parent / "data" / "nuclei" / "consep"
CONSEP_MPP = 0.25  # CoNSeP is scanned at 40x, about 0.25 um/px
#: CoNSeP type code -> CELL_TYPES code (other -> unknown, inflammatory -> lymphocyte,
#: epithelial -> tumour, spindle-shaped -> stromal).
CONSEP_TO_CELL_TYPE = {1: 0, 2: 1, 3: 2, 4: 3}


@dataclass(frozen=True)
class ConsepCrop:
    """One annotated crop: RGB, instance map, and per nucleus centroid (px), type, border flag."""

    name: str
    rgb: np.ndarray
    labels: np.ndarray
    inst_ids: np.ndarray
    xy_px: np.ndarray
    types: np.ndarray  # CELL_TYPES codes
    touches_border: np.ndarray


def load_consep() -> list[ConsepCrop]:
    """The six crops, sorted by name."""
    crops = []
    for jpg in sorted(CONSEP_DIR.glob("*.jpg")):
        name = jpg.stem
        bgr = cv2.imread(str(jpg), cv2.IMREAD_COLOR)
        labels = cv2.imread(str(CONSEP_DIR / f"{name}_inst.png"), cv2.IMREAD_UNCHANGED)
        with open(CONSEP_DIR / f"{name}_centroids.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        crops.append(
            ConsepCrop(
                name=name,
                rgb=np.ascontiguousarray(bgr[..., ::-1]),
                labels=labels.astype(np.int32),
                inst_ids=np.array([int(r["inst_id"]) for r in rows], np.int64),
                xy_px=np.array([[float(r["x"]), float(r["y"])] for r in rows], np.float64),
                types=np.array([CONSEP_TO_CELL_TYPE[int(r["type"])] for r in rows], np.int8),
                touches_border=np.array([r["touches_border"] == "1" for r in rows]),
            )
        )
    return crops
