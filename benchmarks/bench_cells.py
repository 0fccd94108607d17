"""Nucleus detector benchmark (a script, not a test): xmag.cells against CoNSeP's annotations.

On the six 256 x 256 CoNSeP crops of tests/data/nuclei/consep (570 annotated nuclei, 0.25 um/px,
colorectal adenocarcinoma; see its PROVENANCE.md), at the crops' own 0.25 um/px and at 0.5 um/px
(area-downsampled by 2, the resolution ``xmag cells`` reads slides at), it prints:

* detection precision, recall and F1: centroids matched one-to-one within 6 um (greedy, closest
  first);
* Dice of the nucleus foreground (at 0.25 um/px only: the annotation's resolution);
* count error: detected minus annotated nuclei, per crop and in all;
* type agreement on matched nuclei: inflammatory -> lymphocyte, epithelial -> tumour, spindle ->
  stromal ("other" left out), with the accuracy expected by chance and Cohen's kappa, and the
  same rules applied to the *annotated* outlines (the rules' own ceiling, detection aside);
* cells/s of ``detect_nuclei`` (detection + measurement) on this CPU, one thread of OpenCV, by
  the process's CPU time (other jobs on the machine slow the wall clock, not that).

The detector's defaults were chosen on these same crops (there is no held-out set here): read the
figures as what it does on this tissue, not as a generalisation estimate.

    python benchmarks/bench_cells.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

# A script of the repository: its data loader lives beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cells_data import CONSEP_MPP, ConsepCrop, load_consep
from xmag.cells.detect import detect_nuclei, nucleus_labels
from xmag.cells.evaluate import (
    MATCH_RADIUS_UM,
    DetectionScores,
    TypeAgreement,
    detection_scores,
    foreground_dice,
    type_agreement,
)
from xmag.cells.measure import measure_nuclei
from xmag.cells.table import CELL_TYPES


def _half(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def _centre_of_half_px(xy_um: np.ndarray) -> np.ndarray:
    """Centroids of a 2x-downsampled frame in the original frame's um (pixel centres)."""
    return xy_um + 0.5 * CONSEP_MPP


def evaluate(crops: list[ConsepCrop], factor: int) -> None:
    mpp = CONSEP_MPP * factor
    total = DetectionScores(0, 0, 0)
    pred_types, true_types = [], []
    print(f"\n## at {mpp} um/px" + (" (area-downsampled x2)" if factor == 2 else ""))
    head = f"{'crop':<12} {'true':>5} {'found':>5} {'count err':>9} {'P':>6} {'R':>6} {'F1':>6}"
    print(head + (f" {'Dice':>6}" if factor == 1 else ""))
    dice_all = []
    for c in crops:
        rgb = c.rgb if factor == 1 else _half(c.rgb)
        labels = nucleus_labels(rgb, mpp)
        table = measure_nuclei(rgb, labels, mpp)
        xy = table.xy_um if factor == 1 else _centre_of_half_px(table.xy_um)
        s, pi, ti = detection_scores(xy, c.xy_px * CONSEP_MPP, MATCH_RADIUS_UM)
        total = total + s
        pred_types.append(table.types[pi])
        true_types.append(c.types[ti])
        line = (
            f"{c.name:<12} {len(c.xy_px):>5} {len(table):>5} {len(table) - len(c.xy_px):>+9} "
            f"{s.precision:>6.3f} {s.recall:>6.3f} {s.f1:>6.3f}"
        )
        if factor == 1:
            dice_all.append(foreground_dice(labels, c.labels))
            line += f" {dice_all[-1]:>6.3f}"
        print(line)
    n_true = sum(len(c.xy_px) for c in crops)
    n_found = total.tp + total.fp
    line = (
        f"{'all':<12} {n_true:>5} {n_found:>5} {n_found - n_true:>+9} "
        f"{total.precision:>6.3f} {total.recall:>6.3f} {total.f1:>6.3f}"
    )
    if factor == 1:
        line += f" {float(np.mean(dice_all)):>6.3f}"
    print(line)
    print(f"count error: {n_found - n_true:+d} ({(n_found - n_true) / n_true:+.1%})")
    _print_types(
        "types of matched detections",
        type_agreement(*map(np.concatenate, (pred_types, true_types))),
    )


def _print_types(title: str, a: TypeAgreement) -> None:
    print(f"{title}: n={a.n} accuracy {a.accuracy:.3f}, chance {a.chance:.3f}, kappa {a.kappa:.3f}")
    print("  confusion (rows annotated, columns predicted): " + ", ".join(CELL_TYPES))
    for name, row in zip(CELL_TYPES, a.confusion, strict=True):
        if row.sum():
            print(f"  {name:<11} " + " ".join(f"{int(v):>5}" for v in row))


def rules_ceiling(crops: list[ConsepCrop]) -> None:
    pred, true = [], []
    for c in crops:
        t = measure_nuclei(c.rgb, c.labels, CONSEP_MPP, source="consep")
        order = np.searchsorted(t.meta["label_ids"], c.inst_ids)
        pred.append(t.types[order])
        true.append(c.types)
    print()
    _print_types(
        "types by the rules on the annotated outlines",
        type_agreement(*map(np.concatenate, (pred, true))),
    )


def speed(crops: list[ConsepCrop], repeats: int) -> None:
    """cells/s by CPU time of this process (one OpenCV thread), robust to other jobs on the
    machine; wall-clock cells/s beside it."""
    cv2.setNumThreads(1)
    print("\n## speed (detect_nuclei: detection + measurement, one OpenCV thread)")
    for factor in (1, 2):
        mpp = CONSEP_MPP * factor
        images = [c.rgb if factor == 1 else _half(c.rgb) for c in crops]
        best_cpu = best_wall = float("inf")
        n = 0
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            n = sum(len(detect_nuclei(im, mpp)) for im in images)
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - w0)
        mm2 = sum(im.shape[0] * im.shape[1] for im in images) * mpp * mpp / 1e6
        print(
            f"at {mpp} um/px: {n} cells, CPU {best_cpu * 1e3:.0f} ms -> {n / best_cpu:,.0f} "
            f"cells/s ({mm2 / best_cpu:.3f} mm2/s); wall {n / best_wall:,.0f} cells/s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    args = parser.parse_args(argv)
    crops = load_consep()
    print(
        f"CoNSeP: {len(crops)} crops, {sum(len(c.xy_px) for c in crops)} annotated nuclei; "
        f"match radius {MATCH_RADIUS_UM} um"
    )
    evaluate(crops, 1)
    evaluate(crops, 2)
    rules_ceiling(crops)
    speed(crops, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
