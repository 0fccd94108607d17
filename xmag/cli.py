"""The ``xmag`` command line: ``embed`` and ``inspect``, plus plugin commands.

    xmag embed SLIDE... --model DIR --out DIR [--json] [--mpp] [--default-mpp] [--batch-size]
                        [--tissue-threshold] [--no-cache] [--cache-dir]
    xmag inspect SLIDE [--json] [--model DIR] [--mpp] [--default-mpp] [--tissue-threshold]

``--json`` prints one document on stdout whose JSON Schema is published in docs/
(``embed.schema.json``, ``inspect.schema.json``, with ``result.schema.json`` for each result);
progress, warnings and errors go to stderr. Exit codes: 0 every slide succeeded, 1 at least one
slide failed (each with its typed error), 2 bad usage or a model package that does not load.
``embed`` keeps ``XMAG_SLIDES_IN_FLIGHT`` slides in flight (``xmag.inflight``; default 2): the
next slides are opened, hashed and planned while the model runs the
current one.

Other packages add commands through the ``xmag.commands`` entry point group: each entry point is
a ``register(app: typer.Typer) -> None`` (the service registers ``serve`` and ``worker``).
"""

from __future__ import annotations

import dataclasses
import glob
import shutil
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from xmag.errors import SlideNotFoundError, XmagError
from xmag.inflight import SlidesInFlightSettings, map_in_flight
from xmag.outputs._atomic import atomic_write
from xmag.params import SlideOptions
from xmag.results import (
    EmbedOutcome,
    EmbedReport,
    ErrorInfo,
    InspectReport,
    SlideResult,
    describe_plan,
)

if TYPE_CHECKING:
    from xmag.engine import Engine
    from xmag.store import ResultStore

__all__ = ["MODEL_DIR_ENV", "build_app", "default_cache_dir", "load_plugins", "main"]

MODEL_DIR_ENV = "XMAG_MODEL_DIR"
PLUGIN_GROUP = "xmag.commands"
EXIT_SLIDE_FAILED = 1
EXIT_USAGE = 2
_GLOB_CHARS = set("*?[")


def default_cache_dir() -> Path:
    """Where ``embed`` caches results unless told otherwise (``~/.cache/xmag/results``)."""
    return Path.home() / ".cache" / "xmag" / "results"


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _error_info(exc: XmagError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, message=exc.message, fields=_jsonable(exc.fields))


def _jsonable(fields: dict[str, object]) -> dict[str, object]:
    import json

    return json.loads(json.dumps(fields, default=str))


def expand_slides(patterns: list[str]) -> list[tuple[str, Path | None]]:
    """(argument, path) per slide: globs expanded in sorted order; a glob matching nothing gives
    (pattern, None) so it is reported as a failure, not silently dropped."""
    out: list[tuple[str, Path | None]] = []
    for arg in patterns:
        if _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            out.extend((m, Path(m)) for m in matches)
            if not matches:
                out.append((arg, None))
        else:
            out.append((arg, Path(arg)))
    return out


def _out_dir(root: Path, slide: Path, used: set[str]) -> Path:
    """``root/<slide name without suffix>``, suffixed -2, -3... when two slides share a name."""
    base = slide.name.split(".")[0] or slide.name
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    used.add(name)
    return root / name


def _option_help(name: str) -> str:
    """The option's description from ``SlideOptions`` (the one options model)."""
    return SlideOptions.model_fields[name].description or name


MppOpt = Annotated[
    float | None, typer.Option("--mpp", help=_option_help("mpp_override"), show_default=False)
]
DefaultMppOpt = Annotated[
    float | None,
    typer.Option("--default-mpp", help=_option_help("default_mpp"), show_default=False),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option("--tissue-threshold", help=_option_help("tissue_threshold"), show_default=False),
]
DetectorOpt = Annotated[
    str | None,
    typer.Option(
        "--tissue-detector",
        help=_option_help("tissue_detector"),
        show_default=False,
    ),
]
DecodeOpt = Annotated[
    str | None,
    typer.Option("--decode", help=_option_help("decode"), show_default=False),
]
_FLAGS = {"mpp_override": "--mpp", "default_mpp": "--default-mpp"}


def slide_options(
    mpp: float | None,
    default_mpp: float | None,
    tissue_threshold: float | None,
    tissue_detector: str | None = None,
    decode: str | None = None,
) -> SlideOptions:
    """``SlideOptions`` from the CLI flags; its bounds are the API's (one model for both).

    Raises:
        typer.BadParameter: a value outside the model's bounds (exit code 2).
    """
    try:
        return SlideOptions(
            mpp_override=mpp,
            default_mpp=default_mpp,
            tissue_threshold=tissue_threshold,
            tissue_detector=tissue_detector,
            decode=decode,  # the model checks the choice
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        raise typer.BadParameter(f"{flag}: {first['msg']}") from exc


def embed(
    slides: Annotated[list[str], typer.Argument(help="Slide files, DICOM folders, or globs.")],
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            envvar=MODEL_DIR_ENV,
            help="Model package folder (model.json + ONNX), e.g. a checkout's models/demo.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Results root: one sub-folder per slide.")
    ] = Path("xmag-out"),
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the EmbedReport JSON on stdout.")
    ] = False,
    mpp: MppOpt = None,
    default_mpp: DefaultMppOpt = None,
    tissue_threshold: ThresholdOpt = None,
    tissue_detector: DetectorOpt = None,
    decode: DecodeOpt = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Tiles per model call.")
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Compute into --out only: no result store look-up."),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Result store folder (XMAG_CACHE_DIR; ~/.cache/xmag/results)."
        ),
    ] = None,
) -> None:
    """Embed slides: result.json, features.h5, heatmap.png and tiles.geojson per slide.

    Results are kept in a content-addressed store (--cache-dir): a slide whose bytes, model and
    options were embedded before is answered from it without being opened.
    """
    from xmag.engine import Engine
    from xmag.settings import EngineSettings
    from xmag.store import ResultStore

    err = _stderr()
    options = slide_options(mpp, default_mpp, tissue_threshold, tissue_detector, decode)
    overrides: dict[str, object] = {}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    settings = EngineSettings(**overrides)  # type: ignore[arg-type]
    store = None
    if not no_cache:
        store = ResultStore(cache_dir or settings.cache_dir or default_cache_dir())
    try:
        engine = Engine.from_dir(model, settings)
    except XmagError as exc:
        err.print(f"[red]error[/red] loading model {model}: {exc}")
        raise typer.Exit(EXIT_USAGE) from exc
    card = engine.package.card
    if not card.trained:
        err.print(
            f"[yellow]warning[/yellow]: model {card.name} {card.version} is untrained "
            "(model.json says trained=false): its embeddings and predictions mean nothing."
        )
    outcomes = _embed_all(
        engine,
        store,
        expand_slides(slides),
        out,
        options,
        err,
        json_out,
        slides_in_flight=SlidesInFlightSettings().slides_in_flight,
    )
    if json_out:
        report = EmbedReport(model=f"{card.name}@{card.version}", outcomes=outcomes)
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    failed = sum(not o.ok for o in outcomes)
    if failed:
        err.print(f"[red]{failed} of {len(outcomes)} slides failed[/red]")
        raise typer.Exit(EXIT_SLIDE_FAILED)


def _embed_all(
    engine: Engine,
    store: ResultStore | None,
    slides: list[tuple[str, Path | None]],
    out: Path,
    options: SlideOptions,
    err: Console,
    quiet: bool,
    slides_in_flight: int = 1,
) -> list[EmbedOutcome]:
    """Each slide's outcome, in argument order; ``slides_in_flight`` of them at once
    (``xmag.inflight``: the next slides are opened, hashed and planned while the model runs)."""
    used: set[str] = set()
    stop = threading.Event()  # Ctrl-C: the slides in flight stop between batches
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles  {task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bar:

        def one(item: tuple[str, Path | None, Path | None]) -> EmbedOutcome:
            arg, path, out_dir = item
            if path is None or out_dir is None:
                exc: XmagError = SlideNotFoundError(f"no file matches {arg!r}.", path=arg)
                err.print(f"[red]✗[/red] {arg}: {exc}")
                return EmbedOutcome(slide=arg, ok=False, error=_error_info(exc))
            task = bar.add_task(path.name, total=None, rate="-")
            clock: dict[str, float] = {}

            def progress(done: int, total: int) -> None:
                # tiles/s from the first progress call: the plan before it reads no tile
                t0 = clock.setdefault("t0", time.perf_counter())
                rate = f"{done / (time.perf_counter() - t0):.1f}/s" if done else "-"
                bar.update(task, completed=done, total=total, rate=rate)

            try:
                if store is None:
                    result = engine.embed_slide(
                        path, out_dir, options=options, progress=progress, should_cancel=stop.is_set
                    )
                else:
                    result = _embed_stored(
                        engine, store, path, out_dir, options, progress, stop.is_set
                    )
            except XmagError as exc:
                bar.update(task, description=f"[red]✗ {path.name}")
                err.print(f"[red]✗[/red] {arg}: {exc}")
                return EmbedOutcome(slide=arg, ok=False, error=_error_info(exc))
            hit = " (cache hit)" if result.cache_hit else ""
            if not quiet:
                top = ", ".join(f"{p.name}={p.top_label}" for p in result.predictions)
                err.print(
                    f"[green]✓[/green] {arg} -> {out_dir}: {result.tiles.kept} tiles on "
                    f"{result.provider}, {result.duration_s:.2f} s{hit}"
                    + (f"; {top}" if top else "")
                )
            return EmbedOutcome(slide=arg, ok=True, out_dir=str(out_dir), result=result)

        # Output folders are named up front, in argument order, whatever order slides finish in.
        items = [
            (arg, path, _out_dir(out, path, used) if path is not None else None)
            for arg, path in slides
        ]
        # The engine's settings decide how much nicer the slide threads run (XMAG_READER_NICE).
        return map_in_flight(
            one, items, slides_in_flight, stop=stop, nice=engine.settings.reader_nice
        )


def _embed_stored(
    engine: Engine,
    store: ResultStore,
    path: Path,
    out_dir: Path,
    options: SlideOptions,
    progress: Callable[[int, int], None],
    should_cancel: Callable[[], bool] | None = None,
) -> SlideResult:
    """Look the slide's result up in ``store`` (computing it on a miss) and copy it to
    ``out_dir``; the copy's result.json says whether this call computed it."""
    from xmag.digest import DigestCache
    from xmag.store import ARTIFACTS, lookup_or_embed

    if not path.exists():
        raise SlideNotFoundError(f"{path} does not exist.", path=str(path))
    digest = DigestCache(store.root / ".digests").digest(path)
    stored = lookup_or_embed(
        engine, store, path, digest, options=options, progress=progress, should_cancel=should_cancel
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        src = stored.folder / name
        if name != "result.json" and src.is_file():
            with atomic_write(out_dir / name) as tmp:
                shutil.copyfile(src, tmp)
    slide = dataclasses.replace(stored.result.slide, path=str(path), name=path.name)
    result = stored.result.model_copy(
        update={"cache_hit": stored.hit, "slide": slide, "duration_s": stored.seconds}
    )
    with atomic_write(out_dir / "result.json") as tmp:  # last: the folder is complete
        tmp.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    return result


def inspect_cmd(
    slide: Annotated[Path, typer.Argument(help="A slide file or DICOM folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the InspectReport JSON.")] = False,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Take tile size and target mpp from this package."),
    ] = None,
    mpp: MppOpt = None,
    default_mpp: DefaultMppOpt = None,
    tissue_threshold: ThresholdOpt = None,
    tissue_detector: DetectorOpt = None,
    decode: DecodeOpt = None,
) -> None:
    """Show what the core sees in a slide (no model is run)."""
    options = slide_options(mpp, default_mpp, tissue_threshold, tissue_detector, decode)
    report = inspect_slide(slide, model=model, options=options)
    if json_out:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        _print_inspect(report)
    if not report.ok:
        raise typer.Exit(EXIT_SLIDE_FAILED)


def inspect_slide(
    slide: Path, *, model: Path | None = None, options: SlideOptions | None = None
) -> InspectReport:
    """Open, resolve mpp, find tissue and tile ``slide``; a typed error becomes ``error``."""
    from xmag.package import load_package
    from xmag.params import TilingParams
    from xmag.plan import plan_slide
    from xmag.readers import open_slide

    options = options or SlideOptions()
    report = InspectReport(path=str(slide), ok=False)
    try:
        params = (
            load_package(model).card.tiling_params(options)
            if model is not None
            else TilingParams(**options.model_dump(exclude_none=True))
        )
        report.params = params
        with open_slide(slide) as reader:
            report.reader, report.vendor, report.format = reader.name, reader.vendor, reader.format
            report.dimensions = reader.dimensions
            report.levels = list(reader.levels)
            plan = plan_slide(reader, params)
        for key, value in describe_plan(plan).items():
            setattr(report, key, value)
        report.ok = True
    except XmagError as exc:
        report.error = _error_info(exc)
    return report


def _print_inspect(r: InspectReport) -> None:
    out = Console(highlight=False)
    out.print(f"[bold]{r.path}[/bold]")
    if r.reader:
        out.print(f"  reader {r.reader}, vendor {r.vendor}, format {r.format}, {r.dimensions} px")
        for lv in r.levels:
            out.print(f"  level {lv.index}: {lv.width} x {lv.height}, downsample {lv.downsample:g}")
    if r.mpp:
        out.print(f"  mpp {r.mpp.mpp:.4g} um/px from {r.mpp.source} ({r.mpp.detail})")
    if r.level:
        out.print(
            f"  reads level {r.level.level} ({r.level.level_mpp:.4g} um/px), resample x"
            f"{r.level.resample_factor:.3g} to {r.level.target_mpp:g} um/px"
        )
    if r.tissue and r.tiles:
        out.print(f"  tissue {r.tissue.area_mm2:.2f} mm2 ({r.tissue.method})")
        out.print(f"  tiles kept {r.tiles.kept} of {r.tiles.total} ({r.tiles.tile_px} px)")
    if r.qc:
        warnings = "; ".join(r.qc.warnings) or "none"
        out.print(f"  modality guess {r.qc.modality}; warnings: {warnings}")
    if r.error:
        _stderr().print(f"[red]✗[/red] [{r.error.code}] {r.error.message}")


def build_app() -> typer.Typer:
    """The core app (``embed``, ``inspect``) without plugins."""
    app = typer.Typer(
        name="xmag",
        help="Whole-slide images at 5x through distilled tile encoders.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.command("embed")(embed)
    app.command("inspect")(inspect_cmd)
    from xmag.cells.cli import cells_cmd  # nuclei as QuPath GeoJSON (xmag.cells)

    app.command("cells")(cells_cmd)
    return app


def load_plugins(app: typer.Typer, group: str = PLUGIN_GROUP) -> list[str]:
    """Call every ``register(app)`` of the entry point group; returns the names loaded.

    A plugin whose package is not installed (the core without the service) is skipped quietly;
    any other failure while loading one is reported on stderr and the others still load.
    """
    loaded = []
    for ep in entry_points(group=group):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and ep.value.split(":")[0].startswith(exc.name):
                continue  # the plugin's own package is absent: nothing to offer
            _stderr().print(f"[yellow]warning[/yellow]: plugin {ep.name!r} not loaded: {exc}")
            continue
        except ImportError as exc:
            _stderr().print(f"[yellow]warning[/yellow]: plugin {ep.name!r} not loaded: {exc}")
            continue
        register(app)
        loaded.append(ep.name)
    return loaded


def main() -> None:
    """Console entry point: the core app plus plugin commands."""
    app = build_app()
    load_plugins(app)  # before the check: plugins register the XMAG_ variables they read
    _check_environment()
    app()


def _check_environment() -> None:
    """Warn about unknown XMAG_ variables; exit 2 on them under XMAG_STRICT_SETTINGS=1."""
    from xmag.settings import check_environment

    try:
        check_environment(warn=lambda m: _stderr().print(f"[yellow]warning[/yellow]: {m}"))
    except XmagError as exc:
        _stderr().print(f"[red]error[/red]: {exc}")
        raise SystemExit(EXIT_USAGE) from exc
