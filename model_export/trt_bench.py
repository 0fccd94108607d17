"""TensorRT / CUDA / CPU bench of a model package: engine build, parity there, tiles/s per batch.

Run on a GPU machine with ``onnxruntime-gpu`` (the ``[gpu]`` extra)::

    python -m model_export.trt_bench models/xmag --parity-slide slides/CMU-1-Small-Region.svs

For each provider ONNX Runtime offers, and each variant meant for it in the card:

    TensorRT  fp32 graph, fp16 kernels per the card (``runtime.trt_fp16``), the card's batch
              profile (min/opt/max) and workspace, engine + timing caches in ``--engine-cache``
    CUDA      the fp16 variant (and the fp32 graph)
    CPU       the fp32 graph and the int8 variant

it builds the session (the TensorRT engine build is timed apart), checks parity against the fp32
graph on CPU (which the export proved against PyTorch, see the package's ``parity.json``) on
real tiles, and prints tiles/s for each batch size. Providers this onnxruntime lacks are printed
as unavailable, so the script also runs (CPU only) on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_export.parity import CENTRED_THRESHOLDS, cosine_rows
from model_export.parity_tiles import ParityTiles, collect_parity_tiles
from training.spread import centred_cosine_rows
from xmag.errors import InferenceError, XmagError
from xmag.package import ModelCard, ModelPackage, load_package
from xmag.preprocess import Preprocessor

__all__ = ["BenchRow", "main", "run_bench", "trt_provider_options"]

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Minimum per-tile cosine to the fp32 CPU reference, by the precision actually computed.
PARITY_MIN = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
_WARMUP = 2


@dataclass(frozen=True)
class BenchRow:
    """One provider x variant x batch size."""

    provider: str
    variant: str
    batch: int
    tiles_per_s: float
    min_cosine: float
    parity_ok: bool
    build_s: float


def trt_provider_options(card: ModelCard, cache_dir: Path, *, device_id: int = 0) -> dict[str, Any]:
    """ONNX Runtime TensorRT options from the card: fp16, workspace, batch profile, caches."""
    t = card.input.tile_px
    name = card.input.name
    rt = card.runtime

    def shape(b: int) -> str:
        return f"{name}:{b}x3x{t}x{t}"

    cache_dir.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": rt.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shape(rt.batch.min),
        "trt_profile_opt_shapes": shape(rt.batch.opt),
        "trt_profile_max_shapes": shape(rt.batch.max),
    }
    if rt.trt_workspace_mb:
        opts["trt_max_workspace_size"] = rt.trt_workspace_mb * 1024 * 1024
    return opts


def _plan(card: ModelCard, available: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(provider, variant name, file, precision computed) for each combination to bench."""
    variants = {v.name: v for v in card.variants}
    files = {v.name: v.file for v in card.variants} or {"fp32": card.encoder}
    rows: list[tuple[str, str, str, str]] = []
    if TRT in available:
        rows.append((TRT, "fp32", card.encoder, "fp16" if card.runtime.trt_fp16 else "fp32"))
    if CUDA in available:
        rows.append((CUDA, "fp32", card.encoder, "fp32"))
        for name, v in variants.items():
            if v.precision == "fp16":
                rows.append((CUDA, name, files[name], "fp16"))
    if CPU in available:
        rows.append((CPU, "fp32", card.encoder, "fp32"))
        for name, v in variants.items():
            if v.precision == "int8":
                rows.append((CPU, name, files[name], "int8"))
    return rows


def _session(
    path: Path, provider: str, card: ModelCard, cache: Path, threads: int
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers: list[Any]
    if provider == TRT:
        providers = [(TRT, trt_provider_options(card, cache)), CUDA]
    elif provider == CUDA:
        providers = [(CUDA, {"device_id": 0})]
    else:
        providers = [CPU]
    session = ort.InferenceSession(str(path), options, providers=providers)
    used = session.get_providers()[0]
    if used != provider:
        raise InferenceError(
            f"{path.name}: ONNX Runtime fell back from {provider} to {used}; check the CUDA/"
            "TensorRT libraries (ORT logs say which one failed to load)."
        )
    return session


def _embed(session: ort.InferenceSession, card: ModelCard, x: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        out.append(session.run([card.outputs.embedding.name], {card.input.name: chunk})[0])
    return np.concatenate(out)


def _tiles_per_s(
    session: ort.InferenceSession, card: ModelCard, x: np.ndarray, batch: int, iters: int
) -> float:
    reps = -(-batch // len(x))
    xb = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    feed = {card.input.name: xb}
    names = [card.outputs.embedding.name]
    for _ in range(_WARMUP):
        session.run(names, feed)
    t0 = time.perf_counter()
    for _ in range(iters):
        session.run(names, feed)
    return batch * iters / (time.perf_counter() - t0)


def run_bench(
    package_dir: Path,
    *,
    slides: Sequence[Path] = (),
    patches: Sequence[Path] = (),
    batches: Sequence[int] = (1, 8, 32),
    engine_cache: Path = Path(".trt-cache"),
    iters: int = 20,
    threads: int = 2,
    out: Any = None,
) -> list[BenchRow]:
    """Bench every provider x variant of ``package_dir``; print a table; return the rows.

    Raises:
        XmagError: the package does not load, no tile could be read, or a provider fell back.
    """
    stream = out or sys.stdout
    package: ModelPackage = load_package(package_dir)
    card = package.card
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}; providers here: {', '.join(available)}", file=stream)
    for gpu in (TRT, CUDA):
        if gpu not in available:
            print(
                f"{gpu}: unavailable in this onnxruntime (install the [gpu] extra, "
                "onnxruntime-gpu, on a machine with CUDA and TensorRT)",
                file=stream,
            )
    tiles: ParityTiles = collect_parity_tiles(
        slides, tile_px=card.input.tile_px, target_mpp=card.input.target_mpp, patches=patches
    )
    x = Preprocessor.from_spec(card.input)(tiles.pixels)
    reference_session = _session(package.encoder_path, CPU, card, engine_cache, threads)
    reference = _embed(reference_session, card, x, 8)
    print(f"parity tiles: {len(tiles)} (reference: fp32 graph on CPU)", file=stream)
    rows: list[BenchRow] = []
    for provider, variant, file, precision in _plan(card, available):
        t0 = time.perf_counter()
        session = _session(package.root / file, provider, card, engine_cache, threads)
        # TensorRT builds (or loads from the cache) its engine at the first run.
        emb = _embed(session, card, x, min(card.runtime.batch.opt, len(x)))
        build_s = time.perf_counter() - t0
        cos = float(cosine_rows(emb, reference).min())
        # Centred on the reference mean: a constant output passes the plain cosine, not this.
        centred = float(centred_cosine_rows(emb, reference, reference.mean(0)).min())
        ok = cos >= PARITY_MIN[precision] and centred >= CENTRED_THRESHOLDS[precision]
        print(
            f"{provider:<28} {variant:<5} ({precision}) session+first run {build_s:7.1f} s  "
            f"min cosine {cos:.6f}, centred {centred:.4f} "
            f"{'ok' if ok else 'BELOW ' + str(PARITY_MIN[precision])}",
            file=stream,
        )
        for b in batches:
            if provider == TRT and not card.runtime.batch.min <= b <= card.runtime.batch.max:
                print(f"  batch {b:>4}: outside the TensorRT profile, skipped", file=stream)
                continue
            rate = _tiles_per_s(session, card, x, b, iters)
            rows.append(BenchRow(provider, variant, b, rate, cos, ok, build_s))
            print(f"  batch {b:>4}: {rate:9.1f} tiles/s", file=stream)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m model_export.trt_bench PACKAGE [--parity-slide ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--parity-slide", type=Path, action="append", default=[])
    parser.add_argument("--parity-patches", type=Path, action="append", default=[])
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--engine-cache", type=Path, default=Path(".trt-cache"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        rows = run_bench(
            args.package,
            slides=args.parity_slide,
            patches=args.parity_patches,
            batches=args.batch or [1, 8, 32],
            engine_cache=args.engine_cache,
            iters=args.iters,
            threads=args.threads,
        )
    except XmagError as exc:
        print(f"error {exc}", file=sys.stderr)
        return 1
    failed = sorted({f"{r.provider}/{r.variant}" for r in rows if not r.parity_ok})
    if failed:
        print(f"parity below threshold on: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
