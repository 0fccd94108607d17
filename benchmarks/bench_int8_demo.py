"""Benchmark (not a test): int8 recipes for the demo student on this CPU, speed and accuracy.

One command: ``.venv/bin/python benchmarks/bench_int8_demo.py [--package models/demo]``.

Variants:

    fp32            the shipped model.onnx (plain ONNX, what every provider reads), as the engine
                    runs it (ORT_ENABLE_ALL)
    int8            the shipped model.int8.onnx: dynamic int8 of the graph exported with ONNX
                    Runtime's fused attention and GELU and the LayerScales folded into the Linear
                    before them (``export_encoder(..., ort_fused=True)``): QAttention,
                    MatMulInteger, Gelu
    int8-matmul     the previous recipe: dynamic int8 of the plain graph (MatMulInteger only,
                    attention left to fp32 MatMul/Softmax nodes)
    fp32-ort-fused  the int8 variant's fp32 source (fused attention and GELU, LayerScales folded;
                    not shipped: TensorRT cannot parse these ops); built from ``--checkpoint``
                    (needs torch), so int8 is also compared with an fp32 graph of the same shape
    fp32-optimizer  model.onnx through onnxruntime.transformers.optimizer (model_type "vit",
                    opt_level 0): only SkipLayerNormalization and BiasGelu fuse on this graph
    int8-static     static QDQ of every MatMul, per-channel weights, ranges calibrated on real
                    tiles (percentile), as ``Int8Mode.STATIC``

Last, the same pair through the engine (``Engine.encode``, ``variant`` fp32 vs int8, the engine's
own session options): the ratio a user switching ``XMAG_VARIANT`` sees.

Speed: ONNX Runtime CPU provider, ``--threads`` intra-op threads (default 2), spinning off (as
the engine sets it), at batch 1 and the engine's batch (the card's ``runtime.batch.opt``, which
``apply_card_hints`` makes the CPU batch size). Each variant runs in a process of its own
(``session_timing``: sessions sharing a process run 10-15% apart on this VM), ``--rounds`` rounds
whose order rotates, medians over all rounds reported, with wall tiles/s and tiles per
CPU-second (process CPU time, less sensitive to other processes on a shared machine) and the
load average before and after. Accuracy: on real tiles read through the core's ``SlideTiles``
(``collect_parity_tiles``, the slides the demo is built from), each variant's embedding against
the shipped fp32 graph: cosine (min, mean) and centred cosine (after subtracting the fp32 mean
embedding; min).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from session_timing import child_args, cpu_session, time_variants

from model_export.parity import cosine_rows
from model_export.parity_tiles import collect_parity_tiles
from model_export.quantize import Int8Mode, quantize_int8
from xmag.package import load_package
from xmag.params import SlideOptions
from xmag.preprocess import Preprocessor
from xmag.runtime import ModelSession

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "tests/data/slides"
# Calibration: the demo's own parity set; evaluation: more tiles of the same slides, plus the two
# slides that need an assumed mpp.
CALIBRATION = [
    "CMU-1-Small-Region.svs",
    "OS-2-ndpi.ome.tif",
    "test3-DAPI-2-387.ndpi",
    "BPAEC-dicom",
]
ASSUMED_MPP = {"tcga-cr-7395-01a-01-ts1.svs": 1.0}


def _tiles(pre: Preprocessor, tile_px: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) preprocessed tiles, float32 (n, 3, H, W)."""
    calib = collect_parity_tiles(
        [SLIDES / n for n in CALIBRATION], tile_px=tile_px, target_mpp=mpp, tiles_per_slide=8
    )
    parts = [
        collect_parity_tiles(
            [SLIDES / n for n in CALIBRATION], tile_px=tile_px, target_mpp=mpp, tiles_per_slide=32
        ).pixels
    ]
    for name, assumed in ASSUMED_MPP.items():
        parts.append(
            collect_parity_tiles(
                [SLIDES / name],
                tile_px=tile_px,
                target_mpp=mpp,
                tiles_per_slide=32,
                options=SlideOptions(default_mpp=assumed),
            ).pixels
        )
    return pre(calib.pixels), pre(np.concatenate(parts))


def _fuse(src: Path, dst: Path, heads: int, dim: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(
        str(src), model_type="vit", num_heads=heads, hidden_size=dim, opt_level=0
    ).save_model_to_file(str(dst))
    return dst


def _ort_fused(checkpoint: Path, dst: Path, tile_px: int) -> Path | None:
    """The demo student exported with ORT's fused ops (the int8 source), or None without torch."""
    try:
        from model_export.onnx_export import export_encoder
        from training.models import load_checkpoint, student_from_checkpoint
    except ImportError:  # the service-only install: no torch
        return None
    model = student_from_checkpoint(load_checkpoint(checkpoint), ema=True)
    export_encoder(model, dst, img_px=tile_px, ort_fused=True)
    return dst


def _embed(s: ModelSession, x: np.ndarray, name: str, out: str) -> np.ndarray:
    return np.concatenate([s.run({name: x[i : i + 8]}, [out])[out] for i in range(0, len(x), 8)])


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load avg {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=ROOT / "models/demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="timing per variant, batch and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rotated rounds (medians over all)")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=ROOT / "runs/demo/checkpoint.pt",
        help="the demo's checkpoint (``make demo-model`` writes it), for fp32-ort-fused",
    )
    args = parser.parse_args()

    pkg = load_package(args.package)
    card = pkg.card
    pre = Preprocessor.from_spec(card.input)
    calib, x = _tiles(pre, card.input.tile_px, card.input.target_mpp)
    name, out = card.input.name, card.outputs.embedding.name
    dim = card.outputs.embedding.dim
    heads = max(1, dim // 64)
    batches = args.batches or [1, card.runtime.batch.opt]
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs")
    print(f"tiles: {len(calib)} calibration, {len(x)} evaluation (real, {card.input.tile_px} px)")
    print(f"start: {_load()}")
    with tempfile.TemporaryDirectory(prefix="xmag-bench-int8-") as tmp:
        t = Path(tmp)
        fp32 = pkg.root / card.encoder
        files = {"fp32": fp32, "int8": pkg.root / "model.int8.onnx"}
        # The plain graph has no Attention node: quantize_int8 gives the previous recipe.
        files["int8-matmul"] = quantize_int8(fp32, t / "int8-matmul.onnx")
        if args.checkpoint.exists():
            fused = _ort_fused(args.checkpoint, t / "ort-fused.onnx", card.input.tile_px)
            if fused is not None:
                files["fp32-ort-fused"] = fused
        files["fp32-optimizer"] = _fuse(fp32, t / "fused.onnx", heads, dim)
        files["int8-static"] = quantize_int8(
            fp32, t / "int8-static.onnx", mode=Int8Mode.STATIC, calibration_tiles=calib
        )
        if "fp32-ort-fused" not in files:
            print(f"fp32-ort-fused skipped: no {args.checkpoint} or no torch")
        sessions = {k: cpu_session(p, args.threads) for k, p in files.items()}
        ref = _embed(sessions["fp32"], x, name, out)
        centre = ref.astype(np.float64).mean(0)
        print("\naccuracy vs shipped fp32 on the evaluation tiles")
        for k, s in sessions.items():
            y = _embed(s, x, name, out)
            cos, cc = cosine_rows(y, ref), cosine_rows(y - centre, ref - centre)
            print(
                f"  {k:15s} cosine min {cos.min():.5f} mean {cos.mean():.5f}   "
                f"centred min {cc.min():.4f}   ({files[k].stat().st_size / 2**20:.1f} MB)"
            )

        def feed(b: int) -> np.ndarray:
            return np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))

        for b in batches:
            before = _load()
            variants = {k: child_args(f, threads=args.threads) for k, f in files.items()}
            rates = time_variants(variants, feed(b), seconds=args.seconds, rounds=args.rounds)
            r0, rf = rates["fp32"], rates.get("fp32-ort-fused", rates["fp32"])
            print(f"\nbatch {b}: {before} -> {_load()}")
            for k, r in rates.items():
                print(
                    f"  {k:15s} {r.wall:7.1f} tiles/s (x{r.wall / r0.wall:.2f} vs fp32, "
                    f"x{r.wall / rf.wall:.2f} vs fp32-ort-fused)   {r.cpu:7.1f} tiles/cpu-s "
                    f"(x{r.cpu / r0.cpu:.2f}, x{r.cpu / rf.cpu:.2f})"
                )
        # What a user gets: Engine.encode with XMAG_VARIANT fp32 vs int8 (the engine's own
        # session options, threads and output handling).
        b = card.runtime.batch.opt
        before = _load()
        engines = {v: child_args(package=args.package, variant=v) for v in ("fp32", "int8")}
        rates = time_variants(engines, feed(b), seconds=args.seconds, rounds=args.rounds)
        fp32, int8 = rates["fp32"].wall, rates["int8"].wall
        print(f"\nthrough the engine (Engine.encode, batch {b}): {before} -> {_load()}")
        print(
            f"  fp32 {fp32:7.1f} tiles/s   int8 {int8:7.1f} tiles/s   int8/fp32 x{int8 / fp32:.2f}"
        )


if __name__ == "__main__":
    main()
