"""GPU benchmark (a script, not a test): one table, under 8 minutes on a GPU machine.

    python benchmarks/bench_gpu.py [--quick]          # from the repository root (make bench-gpu)

On the XMAG encoder's shape, a ViT-B/14 at 224 px (768-d CLS; random weights, written as ONNX with
onnx helpers, no torch), packaged with a card like an export's, it prints:

    encoder     tiles/s by batch size for TensorRT fp16, CUDA fp16, CUDA fp32 (and CPU fp32),
                each session built by ``xmag.engine.Engine`` (``apply_card_hints`` +
                ``ModelSession``: the engine serving builds, TensorRT cache and profile included),
                fed what serving feeds it (uint8 tiles on GPUs), with a parity gate: the min
                cosine of its embeddings of real tiles to CPU fp32 (fp32 >= 0.9999, fp16 >= 0.999)
    read        tiles/s of the core's parallel reads (``iter_tile_batches``) with N threads, and
                the decode path used (``region`` or ``jpeg-dct-1/n``, as result.json records it)
    end to end  slides/min of ``Engine.embed_slide`` on generated 40x and 20x slides
                (``tests.synthetic.make_large_slide``, cached in .bench/gpu), with where the
                time goes (the result's stage timings) and the peak GPU memory (nvidia-smi)

On a machine without a GPU build of onnxruntime (or without a GPU) it runs the CPU rows at small
sizes and prints which GPU rows were skipped and why. Exit status 1 when a parity gate fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# A script of the repository: its test fixtures (tests.synthetic) import from the root.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xmag.engine import Engine  # noqa: E402
from xmag.errors import XmagError  # noqa: E402
from xmag.package import (  # noqa: E402
    CARD_FILENAME,
    Architecture,
    EmbeddingOutput,
    FileEntry,
    InputSpec,
    ModelCard,
    OutputSpec,
    Variant,
    load_package,
    sha256_file,
)
from xmag.params import TilingParams  # noqa: E402
from xmag.plan import plan_slide  # noqa: E402
from xmag.readers import open_slide  # noqa: E402
from xmag.settings import EngineSettings, available_cpus  # noqa: E402
from xmag.tiles import iter_tile_batches, read_tile  # noqa: E402

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PARITY_MIN = {"fp32": 0.9999, "fp16": 0.999}
# ViT-B/14 (DINOv2 student of XMAG): 224 px -> 16 x 16 patches + CLS, 12 blocks of width 768.
TILE_PX, PATCH, DIM, DEPTH, HEADS, MLP = 224, 14, 768, 12, 12, 3072
TILE_MPP = 2.0  # 5x
WORK = ROOT / ".bench" / "gpu"


# -- the encoder ------------------------------------------------------------------------------
def vit_b14(seed: int = 0) -> onnx.ModelProto:
    """ViT-B/14 at 224 px as ONNX (opset 17): pixels [B, 3, 224, 224] -> embedding [B, 768]."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype("f4"), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def layer_norm(x: str, name: str) -> str:
        g = const(f"{name}.g", np.ones(DIM, "f4"))
        b = const(f"{name}.b", np.zeros(DIM, "f4"))
        return node("LayerNormalization", [x, g, b], f"{name}.out", axis=-1, epsilon=1e-6)

    def linear(x: str, name: str, d_in: int, d_out: int) -> str:
        y = node("MatMul", [x, w(f"{name}.w", (d_in, d_out))], f"{name}.mm")
        return node("Add", [y, const(f"{name}.b", np.zeros(d_out, "f4"))], f"{name}.out")

    n_patches = (TILE_PX // PATCH) ** 2
    x = node(
        "Conv",
        ["pixels", w("patch.w", (DIM, 3, PATCH, PATCH)), const("patch.b", np.zeros(DIM, "f4"))],
        "patch.conv",
        strides=[PATCH, PATCH],
    )
    x = node("Reshape", [x, const("shape.bdn", np.asarray([0, DIM, -1], "i8"))], "patch.flat")
    x = node("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
    batch = node("Shape", [x], "shape.x", start=0, end=1)
    cls_shape = node(
        "Concat", [batch, const("shape.1d", np.asarray([1, DIM], "i8"))], "shape.cls", axis=0
    )
    cls = node("Expand", [w("cls", (1, 1, DIM)), cls_shape], "cls.batch")
    x = node("Concat", [cls, x], "tokens", axis=1)
    x = node("Add", [x, w("pos", (1, n_patches + 1, DIM))], "tokens.pos")
    scale = const("attn.scale", np.asarray(1.0 / math.sqrt(DIM // HEADS), "f4"))
    for i in range(DEPTH):
        p = f"b{i}"
        h = layer_norm(x, f"{p}.ln1")
        qkv = linear(h, f"{p}.qkv", DIM, 3 * DIM)
        qkv = node(
            "Reshape",
            [qkv, const(f"{p}.s5", np.asarray([0, -1, 3, HEADS, DIM // HEADS], "i8"))],
            f"{p}.qkv5",
        )
        qkv = node("Transpose", [qkv], f"{p}.qkvT", perm=[2, 0, 3, 1, 4])
        q, k, v = (
            node("Gather", [qkv, const(f"{p}.i{j}", np.asarray(j, "i8"))], f"{p}.{n}", axis=0)
            for j, n in enumerate("qkv")
        )
        kt = node("Transpose", [k], f"{p}.kT", perm=[0, 1, 3, 2])
        att = node("Mul", [node("MatMul", [q, kt], f"{p}.qk"), scale], f"{p}.qks")
        att = node("Softmax", [att], f"{p}.att", axis=-1)
        o = node("MatMul", [att, v], f"{p}.av")
        o = node("Transpose", [o], f"{p}.avT", perm=[0, 2, 1, 3])
        o = node("Reshape", [o, const(f"{p}.s3", np.asarray([0, -1, DIM], "i8"))], f"{p}.o")
        o = linear(o, f"{p}.proj", DIM, DIM)
        o = node("Mul", [o, const(f"{p}.ls1", np.full(DIM, 0.1, "f4"))], f"{p}.ls1o")
        x = node("Add", [x, o], f"{p}.res1")
        h = linear(layer_norm(x, f"{p}.ln2"), f"{p}.fc1", DIM, MLP)
        erf = node(
            "Erf",
            [node("Mul", [h, const(f"{p}.r2", np.asarray(1 / math.sqrt(2), "f4"))], f"{p}.hs")],
            f"{p}.erf",
        )
        gelu = node(
            "Mul",
            [h, node("Add", [erf, const(f"{p}.one", np.asarray(1.0, "f4"))], f"{p}.erf1")],
            f"{p}.gelu0",
        )
        gelu = node("Mul", [gelu, const(f"{p}.half", np.asarray(0.5, "f4"))], f"{p}.gelu")
        h = linear(gelu, f"{p}.fc2", MLP, DIM)
        h = node("Mul", [h, const(f"{p}.ls2", np.full(DIM, 0.1, "f4"))], f"{p}.ls2o")
        x = node("Add", [x, h], f"{p}.res2")
    x = layer_norm(x, "norm")
    node("Gather", [x, const("cls.index", np.asarray(0, "i8"))], "embedding", axis=1)
    graph = helper.make_graph(
        nodes,
        "vit_b14_random",
        [
            helper.make_tensor_value_info(
                "pixels", TensorProto.FLOAT, ["batch", 3, TILE_PX, TILE_PX]
            )
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def vit_package(folder: Path, with_fp16: bool) -> Path:
    """A model package around ``vit_b14`` (and its fp16 variant for CUDA), made once."""
    card_path = folder / CARD_FILENAME
    if card_path.exists() and (not with_fp16 or (folder / "model.fp16.onnx").exists()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model = vit_b14()
    onnx.save(model, str(folder / "model.onnx"))
    files = ["model.onnx"]
    variants = []
    if with_fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(half, str(folder / "model.fp16.onnx"))
        files.append("model.fp16.onnx")
        variants = [
            Variant(name="fp32", file="model.onnx", precision="fp32", providers=[TRT, CUDA, CPU]),
            Variant(name="fp16", file="model.fp16.onnx", precision="fp16", providers=[CUDA]),
        ]
    card = ModelCard(
        name="vit-b14-random",
        version="0",
        trained=False,
        description="ViT-B/14 at 224 px with random weights: the XMAG student's shape, for speed",
        architecture=Architecture(tag="vit_base_patch14_dinov2", params_m=86.0),
        input=InputSpec(tile_px=TILE_PX, target_mpp=TILE_MPP),
        outputs=OutputSpec(embedding=EmbeddingOutput(dim=DIM)),
        files=[FileEntry(path=f, sha256=sha256_file(folder / f)) for f in files],
        variants=variants,
    )  # runtime: the schema's CPU-sized batch profile; GPUs get (1, 256, 512) from the engine
    card_path.write_text(card.model_dump_json(indent=2))
    return folder


# -- measuring --------------------------------------------------------------------------------
@dataclass
class GpuMemory:
    """Peak memory.used of the visible GPU, sampled by nvidia-smi every 0.2 s."""

    peak_mib: float = 0.0
    note: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.note = "n/a (no nvidia-smi)"
            yield
            return
        cmd = [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]

        def loop() -> None:
            while not self._stop.wait(0.2):
                with contextlib.suppress(Exception):
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                    self.peak_mib = max(self.peak_mib, float(out.split()[0]))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()


@dataclass
class Row:
    section: str
    what: str
    figures: str
    note: str = ""


def _rate(x: float) -> str:
    """3 significant figures below 100, thousands separators above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def _settings(config: str, threads: int, cache: Path) -> EngineSettings:
    """The serving settings for one row (only what the row fixes is set; the card does the rest)."""
    base = {"intra_op_threads": threads, "trt_cache_dir": cache}
    if config == "tensorrt fp16":
        return EngineSettings(providers=["tensorrt", "cuda"], trt_fp16=True, **base)
    if config == "cuda fp16":
        return EngineSettings(providers=["cuda"], variant="fp16", **base)
    if config == "cuda fp32":
        return EngineSettings(providers=["cuda"], variant=None, **base)
    return EngineSettings(providers=["cpu"], variant=None, **base)


def encoder_rows(
    package: Path,
    configs: list[str],
    batches: dict[str, list[int]],
    tiles: np.ndarray,
    reference: np.ndarray | None,
    threads: int,
    seconds: float,
) -> tuple[list[Row], bool]:
    rows: list[Row] = []
    ok = True
    for config in configs:
        t0 = time.perf_counter()
        try:
            engine = Engine(load_package(package), _settings(config, threads, WORK / "trt"))
        except XmagError as exc:
            rows.append(Row("encoder", config, "FAILED to build", str(exc)[:160]))
            ok = False
            continue
        build_s = time.perf_counter() - t0
        emb = engine.embed_tiles(tiles[: min(len(tiles), 16)])
        precision = "fp16" if "fp16" in config else "fp32"
        parity = "reference"
        if reference is not None and config != "cpu fp32":
            cos = _cosine_min(emb, reference[: len(emb)])
            passed = cos >= PARITY_MIN[precision]
            ok = ok and passed
            parity = f"min cos {cos:.5f} {'ok' if passed else 'FAIL'} (>= {PARITY_MIN[precision]})"
        speeds = []
        for b in batches[config]:
            x = engine.preprocess(np.resize(tiles, (b, *tiles.shape[1:])))
            feed = {engine.package.card.input.name: x}
            engine.encoder.run(feed)  # warm-up (cuDNN algorithm search, CUDA graphs...)
            n, t1 = 0, time.perf_counter()
            while True:
                engine.encoder.run(feed)
                n += b
                if time.perf_counter() - t1 >= seconds and n >= 2 * b:
                    break
            speeds.append(f"b{b} {_rate(n / (time.perf_counter() - t1))}")
        input_kind = "uint8" if engine.encoder.takes_uint8 else "float32"
        rows.append(
            Row(
                "encoder",
                f"{config} ({engine.provider}, {input_kind} in)",
                "  ".join(speeds) + " tiles/s",
                f"build {build_s:.1f}s; {parity}",
            )
        )
        del engine
    return rows, ok


def make_slide(layout: str, target_tiles: int, workers: int) -> Path:
    """A generated slide holding about ``target_tiles`` 5x tiles of tissue (cached)."""
    from tests.synthetic import LAYOUTS, make_large_slide

    fraction = 0.8
    tile_level0 = TILE_PX * TILE_MPP / LAYOUTS[layout].mpp
    side = max(1024, int(math.ceil(math.sqrt(target_tiles / fraction)) * tile_level0))
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"synthetic-{layout}-{side}.svs"
    if not path.exists():
        tmp = path.with_suffix(".tmp.svs")
        make_large_slide(
            tmp, layout=layout, width=side, height=side, tissue_fraction=fraction, workers=workers
        )
        tmp.rename(path)
    return path


def _tiling() -> TilingParams:
    """Tiling of the ViT package (224 px at 2.0 um/px), as its card asks."""
    return TilingParams(tile_px=TILE_PX, target_mpp=TILE_MPP)


def read_rows(slide: Path, threads: list[int], batch: int) -> list[Row]:
    figures = []
    with open_slide(slide) as reader:
        plan = plan_slide(reader, _tiling())
    indices = plan.grid.kept_indices()
    for n in threads:
        # A fresh reader per pass: the decoded-JPEG-tile cache must not carry over.
        with open_slide(slide) as reader:
            t0, count = time.perf_counter(), 0
            batches = iter_tile_batches(
                reader,
                plan.grid,
                plan.level,
                indices=indices,
                batch_size=batch,
                workers=n,
                max_pending=4,
            )
            for b in batches:
                count += b.pixels.shape[0]
            figures.append(f"{n} thr {_rate(count / (time.perf_counter() - t0))}")
    # The decode path the plan chose (``LevelChoice.decode``: "region" or "jpeg-dct-1/n").
    what = f"{slide.name} ({len(indices)} tiles, {plan.level.decode})"
    return [Row("read", what, "  ".join(figures) + " tiles/s")]


def end_to_end_rows(
    package: Path, config: str, slides: list[Path], threads: int, memory: GpuMemory
) -> list[Row]:
    rows = []
    engine = Engine(load_package(package), _settings(config, threads, WORK / "trt"))
    with memory.sampling():
        for slide in slides:
            with tempfile.TemporaryDirectory() as out:
                result = engine.embed_slide(slide, Path(out))
            total = result.duration_s
            stages = sorted(result.timings.items(), key=lambda kv: -kv[1])
            where = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages if v >= 0.01 * total)
            rows.append(
                Row(
                    "end to end",
                    f"{slide.name} on {engine.provider} (batch {engine.batch_size})",
                    f"{60 / total:.2f} slides/min, {_rate(result.tiles.kept / total)} tiles/s, "
                    f"{result.tiles.kept} tiles in {total:.1f}s",
                    f"time: {where}",
                )
            )
    return rows


def print_table(rows: list[Row], header: list[str]) -> None:
    print()
    for line in header:
        print(line)
    widths = [max(len(getattr(r, a)) for r in rows) for a in ("section", "what", "figures")]
    widths = [min(w, 64) for w in widths]
    for r in rows:
        print(
            f"{r.section:<{widths[0]}}  {r.what:<{widths[1]}}  {r.figures:<{widths[2]}}  {r.note}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer batch sizes")
    parser.add_argument("--seconds", type=float, default=None, help="timing per batch size")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    offered = ort.get_available_providers()
    has_trt, has_cuda = TRT in offered, CUDA in offered
    gpu_note = ""
    if has_cuda or has_trt:
        if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
            has_trt = has_cuda = False
            gpu_note = f"onnxruntime {ort.__version__} offers CUDA/TensorRT but no GPU is visible"
    else:
        gpu_note = (
            f"onnxruntime {ort.__version__} offers {offered}: no TensorRT or CUDA provider "
            "(a CPU build; `make install-gpu` on a GPU machine)"
        )
    on_gpu = has_cuda or has_trt
    threads = available_cpus()
    quick = args.quick
    seconds = args.seconds or (1.0 if quick else 3.0)
    package = vit_package(WORK / "vit-b14", with_fp16=has_cuda)

    from tests.synthetic import DEFAULT_TISSUE_SOURCE

    with open_slide(DEFAULT_TISSUE_SOURCE) as reader:  # real tiles for parity and speed
        plan = plan_slide(reader, _tiling())
        tiles = np.stack(
            [read_tile(reader, plan.grid, plan.level, int(i)) for i in plan.grid.kept_indices()]
        )[:16]

    configs: list[str] = []
    skipped: list[str] = []
    for config, available in (
        ("tensorrt fp16", has_trt),
        ("cuda fp16", has_cuda),
        ("cuda fp32", has_cuda),
    ):
        (configs if available else skipped).append(config)
    configs.append("cpu fp32")
    gpu_batches = [64, 256] if quick else [32, 64, 128, 256, 512]
    cpu_batches = [1, 4] if (quick or on_gpu) else [1, 4, 16]
    batches = {c: (cpu_batches if c.startswith("cpu") else gpu_batches) for c in configs}
    reference = None
    if on_gpu:
        ref_engine = Engine(load_package(package), _settings("cpu fp32", threads, WORK / "trt"))
        reference = ref_engine.embed_tiles(tiles)
        del ref_engine

    rows, parity_ok = encoder_rows(package, configs, batches, tiles, reference, threads, seconds)

    target = (300 if quick else 3000) if on_gpu else (24 if quick else 60)
    gen_t0 = time.perf_counter()
    slides = [make_slide(layout, target, max(2, threads)) for layout in ("40x", "20x")]
    gen_s = time.perf_counter() - gen_t0
    reader_threads = [1, 2] if quick else [1, 2, 4, 8]
    if not on_gpu:
        reader_threads = [n for n in reader_threads if n <= max(2, threads)]
    for slide in slides:
        rows += read_rows(slide, reader_threads, 64)

    memory = GpuMemory()
    for config in configs:  # the fastest configuration that builds
        try:
            rows += end_to_end_rows(package, config, slides, threads, memory)
            break
        except XmagError as exc:
            rows.append(Row("end to end", config, "FAILED", str(exc)[:160]))
    rows.append(
        Row(
            "gpu memory",
            "peak memory.used, GPU 0" if on_gpu else "-",
            f"{memory.peak_mib:,.0f} MiB" if memory.peak_mib else (memory.note or "n/a (no GPU)"),
        )
    )
    for config in skipped:
        rows.append(Row("skipped", config, "not run", "see above"))

    header = [
        f"bench_gpu{' --quick' if args.quick else ''}: ViT-B/14 224 px random weights, "
        f"onnxruntime {ort.__version__} ({', '.join(offered)}), {threads} CPUs, "
        f"slides generated in {gen_s:.0f}s, total {time.perf_counter() - started:.0f}s",
    ]
    if gpu_note:
        header.append(f"GPU rows skipped: {gpu_note}")
    print_table(rows, header)
    print(json.dumps({"parity_ok": parity_ok}))
    return 0 if parity_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
