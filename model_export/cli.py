"""``python -m model_export``: export students to model packages, import XMAG, bench TensorRT.

    python -m model_export export CHECKPOINT --out DIR --name NAME --parity-slide SLIDE...
    python -m model_export import-xmag XMAG.pt --out DIR --parity-slide SLIDE...
    python -m model_export trt-bench DIR --torch-from CHECKPOINT --parity-slide SLIDE...
    python -m model_export demo --slides-dir tests/data/slides --out runs/demo --package DIR

Exit codes: 0 success, 1 a typed error (printed as ``[CODE] message`` with the reason), 2 usage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from model_export.errors import ExportError
from xmag.errors import XmagError
from xmag.params import SlideOptions

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = ["app", "main"]

app = typer.Typer(
    name="model_export",
    help="Export PyTorch students and heads to ONNX model packages with parity reports.",
    no_args_is_help=True,
    add_completion=False,
)

_ParitySlides = Annotated[
    list[Path],
    typer.Option(
        "--parity-slide",
        help="slide read for parity tiles (repeat); slides the core refuses are reported, skipped",
    ),
]
_Thresholds = Annotated[
    list[str],
    typer.Option(help="stricter minimum cosine for a variant, e.g. int8=0.99 (repeat)"),
]
_ParityPatches = Annotated[
    list[Path],
    typer.Option("--parity-patches", help="tile images or folders of them (repeat)"),
]


@dataclass(frozen=True)
class _ExportOptions:
    """Options shared by ``export`` and ``import-xmag``."""

    out: Path
    name: str
    version: str
    description: str
    trained: bool
    variants: str
    int8_mode: str
    parity_slide: list[Path]
    parity_patches: list[Path]
    tiles_per_slide: int
    slide_options: SlideOptions  # how parity slides are read (the core's one options model)
    patch_tokens: bool
    batch_min: int
    batch_opt: int
    batch_max: int
    trt_workspace_mb: int
    opset: int
    head: list[Path]
    overwrite: bool
    threshold: list[str]
    license_: str
    intended_use: str

    @classmethod
    def from_cli(cls, values: dict[str, Any]) -> _ExportOptions:
        """From a command's parameters; ``default_mpp`` goes into ``slide_options``."""
        values = dict(values)
        slide_options = SlideOptions(default_mpp=values.pop("default_mpp"))
        return cls(slide_options=slide_options, **values)


def _run_export(source_kind: str, checkpoint: Path, opts: _ExportOptions, *, ema: bool) -> None:
    from model_export.export import export_package, from_training, from_xmag_release
    from model_export.parity_tiles import collect_parity_tiles
    from model_export.quantize import Int8Mode
    from xmag.package import BatchProfile

    try:
        limits = _thresholds(opts.threshold)  # a bad option fails before minutes of work
        if source_kind == "training":
            source = from_training(checkpoint, ema=ema, extra_heads=opts.head)
        else:
            source = from_xmag_release(checkpoint, extra_heads=opts.head)
        tiles = collect_parity_tiles(
            opts.parity_slide,
            tile_px=source.tile_px,
            target_mpp=source.target_mpp,
            patches=opts.parity_patches,
            tiles_per_slide=opts.tiles_per_slide,
            options=opts.slide_options,
        )
        typer.echo(f"parity tiles: {len(tiles)} from {len(tiles.bags)} source(s)", err=True)
        for skipped, why in tiles.skipped.items():
            typer.echo(f"  skipped {skipped}: {why}", err=True)
        result = export_package(
            source,
            opts.out,
            tiles,
            name=opts.name,
            version=opts.version,
            trained=opts.trained,
            description=opts.description,
            variants=[v.strip() for v in opts.variants.split(",") if v.strip()],
            with_patch_tokens=opts.patch_tokens,
            int8_mode=Int8Mode(opts.int8_mode),
            opset=opts.opset,
            card_extra={
                "batch": BatchProfile(min=opts.batch_min, opt=opts.batch_opt, max=opts.batch_max),
                "trt_workspace_mb": opts.trt_workspace_mb,
                "license": opts.license_,
                "intended_use": opts.intended_use,
            },
            thresholds=limits,
            overwrite=opts.overwrite,
            log=lambda line: typer.echo(line, err=True),
        )
    except XmagError as exc:
        _fail(exc)
    except ValueError as exc:  # a bad option value (batch profile order, int8 mode...)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(str(result.package.root))


def _thresholds(items: list[str]) -> dict[str, float]:
    """``["int8=0.99"]`` -> ``{"int8": 0.99}``; only stricter than the defaults.

    Raises:
        ValueError: not ``NAME=VALUE``, an unknown variant, or a looser minimum than the default.
    """
    from model_export.parity import THRESHOLDS

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in THRESHOLDS:
            raise ValueError(
                f"--threshold {item!r}: use NAME=VALUE with NAME in {list(THRESHOLDS)}"
            )
        limit = float(value)
        if limit < THRESHOLDS[name]:
            raise ValueError(
                f"--threshold {item!r} is looser than the required minimum {THRESHOLDS[name]}; "
                "thresholds can only be tightened."
            )
        out[name] = limit
    return out


def _fail(exc: XmagError) -> None:
    reason = f" ({exc.reason})" if isinstance(exc, ExportError) else ""
    typer.echo(f"error [{exc.code}]{reason} {exc.message}", err=True)
    raise typer.Exit(1) from exc


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="xmag training checkpoint (.pt)")],
    out: Annotated[Path, typer.Option(help="package folder to create")],
    name: Annotated[str, typer.Option(help="package name for the card")],
    parity_slide: _ParitySlides,
    version: Annotated[str, typer.Option(help="package version")] = "0.1.0",
    description: Annotated[str, typer.Option()] = "Tile encoder exported from an xmag checkpoint.",
    trained: Annotated[bool, typer.Option("--trained/--untrained")] = True,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="export the EMA student")] = True,
    variants: Annotated[str, typer.Option(help="comma-separated subset")] = "fp32,fp16,int8",
    int8_mode: Annotated[str, typer.Option(help="dynamic or static")] = "dynamic",
    parity_patches: _ParityPatches = [],  # noqa: B006 - typer reads the default, never mutates
    tiles_per_slide: Annotated[int, typer.Option(min=1)] = 16,
    default_mpp: Annotated[float | None, typer.Option(help="um/px for slides without")] = None,
    patch_tokens: Annotated[bool, typer.Option("--patch-tokens/--no-patch-tokens")] = True,
    batch_min: Annotated[int, typer.Option(min=1)] = 1,
    batch_opt: Annotated[int, typer.Option(min=1)] = 32,
    batch_max: Annotated[int, typer.Option(min=1)] = 64,
    trt_workspace_mb: Annotated[int, typer.Option(min=1)] = 4096,
    opset: Annotated[int, typer.Option(min=17, max=18)] = 18,
    head: Annotated[list[Path], typer.Option(help="extra slide-head file (repeat)")] = [],  # noqa: B006
    license_: Annotated[str, typer.Option("--license")] = "",
    intended_use: Annotated[str, typer.Option()] = "",
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    threshold: _Thresholds = [],  # noqa: B006
) -> None:
    """Export the student of a training checkpoint (EMA weights) and its slide heads."""
    opts = {k: v for k, v in locals().items() if k not in ("checkpoint", "ema")}
    _run_export("training", checkpoint, _ExportOptions.from_cli(opts), ema=ema)


@app.command("import-xmag")
def import_xmag_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="the XMAG release file (state_dict, model.*)")],
    out: Annotated[Path, typer.Option(help="package folder to create")],
    parity_slide: _ParitySlides,
    name: Annotated[str, typer.Option()] = "xmag-vitb14-5x",
    version: Annotated[str, typer.Option()] = "1.0.0",
    description: Annotated[str, typer.Option()] = (
        "XMAG 5x student (DINOv2 ViT-B/14, 224 px at 2.0 um/px), 768-d normalised CLS."
    ),
    variants: Annotated[str, typer.Option(help="comma-separated subset")] = "fp32,fp16,int8",
    int8_mode: Annotated[str, typer.Option(help="dynamic or static")] = "dynamic",
    parity_patches: _ParityPatches = [],  # noqa: B006
    tiles_per_slide: Annotated[int, typer.Option(min=1)] = 16,
    default_mpp: Annotated[float | None, typer.Option()] = None,
    patch_tokens: Annotated[bool, typer.Option("--patch-tokens/--no-patch-tokens")] = True,
    batch_min: Annotated[int, typer.Option(min=1)] = 1,
    batch_opt: Annotated[int, typer.Option(min=1)] = 32,
    batch_max: Annotated[int, typer.Option(min=1)] = 64,
    trt_workspace_mb: Annotated[int, typer.Option(min=1)] = 4096,
    opset: Annotated[int, typer.Option(min=17, max=18)] = 18,
    head: Annotated[list[Path], typer.Option(help="slide-head file (repeat)")] = [],  # noqa: B006
    license_: Annotated[str, typer.Option("--license")] = "",
    intended_use: Annotated[str, typer.Option()] = "",
    overwrite: Annotated[bool, typer.Option()] = False,
    threshold: _Thresholds = [],  # noqa: B006
) -> None:
    """Import the official XMAG checkpoint (DINOv2 layout) and export it as a package."""
    opts = {k: v for k, v in locals().items() if k != "checkpoint"}
    _run_export("xmag", checkpoint, _ExportOptions.from_cli({**opts, "trained": True}), ema=True)


@app.command("trt-bench")
def trt_bench_cmd(
    package: Annotated[Path, typer.Argument(help="model package folder")],
    parity_slide: _ParitySlides = [],  # noqa: B006
    parity_patches: _ParityPatches = [],  # noqa: B006
    batch: Annotated[list[int], typer.Option(help="batch sizes to time (repeat)")] = [1, 8, 32],  # noqa: B006
    engine_cache: Annotated[Path, typer.Option(help="TensorRT engine/timing cache")] = Path(
        ".trt-cache"
    ),
    iters: Annotated[int, typer.Option(min=1)] = 20,
    threads: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """Build the TensorRT engine, check parity per provider, print tiles/s per batch size."""
    from model_export.trt_bench import run_bench

    try:
        rows = run_bench(
            package,
            slides=parity_slide,
            patches=parity_patches,
            batches=batch,
            engine_cache=engine_cache,
            iters=iters,
            threads=threads,
        )
    except XmagError as exc:
        _fail(exc)
    if any(not r.parity_ok for r in rows):
        typer.echo("error: parity below threshold on at least one provider", err=True)
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    slides_dir: Annotated[
        Path, typer.Option(help="folder of the demo slides (the repository's test slides)")
    ],
    out: Annotated[Path, typer.Option(help="run folder: checkpoint, report")] = Path("runs/demo"),
    package: Annotated[
        Path | None, typer.Option(help="model package folder to export to (replaces a demo)")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="distillation steps")] = 250,
    seed: int = 0,
) -> None:
    """Build the demo student and modality head offline from the real slides; export a package."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from model_export.demo import DemoConfig, run_demo

    if not slides_dir.is_dir():
        typer.echo(
            f"error: --slides-dir {slides_dir} is not a folder (relative paths start at "
            f"{Path.cwd()}); pass the folder of the test slides.",
            err=True,
        )
        raise typer.Exit(2)
    cfg = DemoConfig(out=out, package=package, steps=steps, slides_dir=slides_dir, seed=seed)
    console = Console(stderr=True)
    bar = Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, TaskID] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    try:
        with bar:
            report = run_demo(cfg, progress)
    except XmagError as exc:
        _fail(exc)
    lc, ho = report["loss_curve"], report["heldout_agreement_after"]
    mh = report["modality_head"]
    console.print(
        f"loss {lc['first_10pct_mean']:.4f} -> {lc['last_10pct_mean']:.4f}; held-out global "
        f"cosine {ho['global_cosine']['mean']:.4f} (predict-the-mean baseline "
        f"{ho['constant_baseline_cosine']['mean']:.4f}); modality accuracy (leave-one-slide-out) "
        f"{mh['correct']}/{mh['n_slides']}; report {out / 'report.md'}"
    )
    if "package" in report:
        console.print(f"package {report['package']['path']}: {report['package']['parity']}")


def main() -> None:
    """Entry point of ``python -m model_export``."""
    app(prog_name=f"{Path(sys.executable).name} -m model_export")
