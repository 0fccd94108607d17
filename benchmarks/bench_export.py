"""Benchmark (not a test): CPU tiles/s of fp32 vs int8 exports, and what int8 costs in cosine.

For the demo-sized student (ViT-S/14 layout, 192-d, 4 blocks) and for a ViT-B/14 (the XMAG
student's shape, random weights: speed does not depend on them), each exported with
``model_export`` exactly as a package would be (the fp32 graph; the dynamic int8 graph from
``export_int8_encoder``: ORT's fused attention as QAttention), prints:

    tiles/s on this CPU for fp32 and int8 (ONNX Runtime CPU provider, explicit threads; each
    graph in a process of its own, in rounds whose order alternates, medians reported: see
    ``session_timing``)
    int8 / fp32 speed ratio (aim: >= 1.8x)
    cosine of int8 to the PyTorch model on real tiles read from the test slides (min, mean)

Run: ``python benchmarks/bench_export.py [--threads N] [--batch B] [--seconds S] [--rounds R]``.
The committed demo package itself (shipped fp32 vs shipped int8 at batch 1 and the engine's
batch, plus the other int8 recipes evaluated for it) is ``benchmarks/bench_int8_demo.py``.
Random weights get DINOv2-like layer scales (0.1-0.5) so every block shapes the output; timm's
1e-5 init would make int8 errors vanish and the cosine meaningless.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from session_timing import child_args, time_variants

from model_export.export import export_int8_encoder
from model_export.onnx_export import ENCODER_INPUT, ENCODER_OUTPUT, export_encoder
from model_export.parity import cosine_rows, make_session, torch_embeddings
from model_export.parity_tiles import collect_parity_tiles
from xmag.preprocess import Preprocessor
from xmag.settings import available_cpus

ROOT = Path(__file__).resolve().parents[1]
SLIDES = [
    ROOT / "tests/data/slides/CMU-1-Small-Region.svs",
    ROOT / "tests/data/slides/OS-2-ndpi.ome.tif",
    ROOT / "tests/data/slides/test3-DAPI-2-387.ndpi",
]
PATCHES = ROOT / "tests/data/patches/nct-crc-he"
MODELS = {
    "demo student (ViT-S/14 layout, 192-d, 4 blocks)": (
        "vit_small_patch14_dinov2",
        {"embed_dim": 192, "depth": 4, "num_heads": 3},
    ),
    "ViT-B/14 (XMAG student shape, 768-d, 12 blocks)": ("vit_base_patch14_dinov2", {}),
}


def _model(arch: str, kwargs: dict[str, int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 0.5)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each variant in its process")
    args = parser.parse_args()

    tiles = collect_parity_tiles(
        SLIDES, tile_px=224, target_mpp=2.0, patches=[PATCHES], tiles_per_slide=8
    )
    x = Preprocessor()(tiles.pixels)  # the core's ImageNet preprocessing, as a card states it
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores on the host, "
        f"{args.threads} ORT threads; onnxruntime {ort.__version__}, torch {torch.__version__}"
    )
    print(f"tiles: {len(tiles)} real tiles at 2.0 um/px, 224 px; batch {args.batch}")
    for label, (arch, kwargs) in MODELS.items():
        model = _model(arch, kwargs)
        with tempfile.TemporaryDirectory(prefix="xmag-bench-export-") as tmp:
            fp32 = export_encoder(model, Path(tmp) / "model.onnx", img_px=224).path
            int8 = export_int8_encoder(model, Path(tmp) / "model.int8.onnx", img_px=224)
            want, _ = torch_embeddings(model, x, with_patch_tokens=False)
            got = make_session(int8, threads=args.threads).run([ENCODER_OUTPUT], {ENCODER_INPUT: x})
            cos = cosine_rows(got[0], want)
            batch = np.ascontiguousarray(np.resize(x, (args.batch, *x.shape[1:])))
            rates = time_variants(
                {
                    k: child_args(f, threads=args.threads)
                    for k, f in (("fp32", fp32), ("int8", int8))
                },
                batch,
                seconds=args.seconds,
                rounds=args.rounds,
            )
            rate32, rate8 = rates["fp32"].wall, rates["int8"].wall
            mb32, mb8 = fp32.stat().st_size / 2**20, int8.stat().st_size / 2**20
        print(f"\n{label}")
        print(f"  fp32: {rate32:8.2f} tiles/s   ({mb32:6.1f} MB)")
        print(f"  int8: {rate8:8.2f} tiles/s   ({mb8:6.1f} MB, dynamic, per-channel weights)")
        print(f"  int8/fp32 speed: {rate8 / rate32:.2f}x   (aim >= 1.8x)")
        print(
            f"  int8 cosine to PyTorch on {len(x)} tiles: min {cos.min():.5f}, "
            f"mean {cos.mean():.5f}   (aim >= 0.98)"
        )


if __name__ == "__main__":
    main()
