"""``xmag cells``: detect the nuclei of an image or a slide region and write QuPath GeoJSON.

    xmag cells IMAGE_OR_SLIDE [--mpp UM_PER_PX] [--region x,y,w,h] [--target-mpp 0.5]
               [--object-type detection|cell] --out cells.geojson

* A slide (any format ``xmag.readers.open_slide`` reads) is read at the level nearest
  ``--target-mpp`` (0.5 um/px) and resampled as tiles are (``xmag.cells.regions``); its mpp
  comes from the file unless ``--mpp`` overrides it. ``--region`` is in level-0 pixels; without
  it the whole slide is read, chunk by chunk.
* A plain image (PNG, JPEG, BMP... that ``open_slide`` does not take as a slide) is read as is,
  at its own resolution: it has no mpp of its own, so ``--mpp`` is required. ``--region`` crops.

Coordinates in the GeoJSON are level-0 pixels of the slide (pixels of the image), as QuPath
expects. A summary goes to stderr. Exit codes: 0 done, 1 the input failed (its typed error is
printed with its code), 2 bad usage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
import typer
from rich.console import Console

from xmag.cells.regions import DEFAULT_CELL_MPP, detect_image, detect_slide_region
from xmag.cells.table import CELL_TYPES, CellTable
from xmag.errors import (
    InvalidMppError,
    SlideNotFoundError,
    UnknownMppError,
    UnsupportedFormatError,
    XmagError,
)
from xmag.outputs._atomic import atomic_write

__all__ = ["cells_cmd", "parse_region"]

EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2


def parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x,y,w,h"`` (level-0 pixels, whole numbers, w and h > 0) -> a tuple; None stays None.

    Raises:
        typer.BadParameter: another shape of text.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(
            f"--region takes x,y,w,h in level-0 pixels (four whole numbers), got {text!r}"
        ) from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise typer.BadParameter(f"--region {text!r}: x and y must be >= 0, width and height > 0")
    return x, y, w, h


def _read_plain_image(path: Path) -> np.ndarray | None:
    """RGB of a plain image file, or None when OpenCV cannot decode it."""
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if bgr is None else np.ascontiguousarray(bgr[..., ::-1])


def _from_image(
    path: Path, rgb: np.ndarray, mpp: float | None, region: tuple[int, int, int, int] | None
) -> CellTable:
    if mpp is None:
        raise UnknownMppError(
            f"{path} is a plain image and states no microns per pixel; pass --mpp (e.g. 0.25 "
            "for a 40x scan, 0.5 for 20x).",
            path=path,
        )
    if region is None:
        return detect_image(rgb, mpp)
    x, y, w, h = region
    height, width = rgb.shape[:2]
    if x >= width or y >= height:
        raise typer.BadParameter(f"--region starts outside the image ({width} x {height} px)")
    crop = rgb[y : min(y + h, height), x : min(x + w, width)]
    return detect_image(np.ascontiguousarray(crop), mpp, origin_px=(float(x), float(y)))


def _detect(
    path: Path,
    mpp: float | None,
    region: tuple[int, int, int, int] | None,
    target_mpp: float,
    err: Console,
) -> tuple[CellTable, float]:
    """Cells of the input and the level-0 mpp of their GeoJSON coordinates."""
    from xmag.mpp import resolve_mpp
    from xmag.readers import open_slide

    if not path.exists():
        raise SlideNotFoundError(f"{path} does not exist; check the path.", path=path)
    try:
        reader = open_slide(path)
    except UnsupportedFormatError:
        rgb = _read_plain_image(path)
        if rgb is None:
            raise  # neither a slide nor an image: the reader registry's refusal says why
        table = _from_image(path, rgb, mpp, region)
        err.print(f"{path.name}: plain image {rgb.shape[1]} x {rgb.shape[0]} px at {mpp} um/px")
        return table, table.mpp
    with reader:
        width0, height0 = reader.dimensions
        if region is not None and (region[0] >= width0 or region[1] >= height0):
            raise typer.BadParameter(
                f"--region {region} starts outside the slide's level 0 ({width0} x {height0} px)"
            )
        info = resolve_mpp(reader, override=mpp)
        table, level = detect_slide_region(reader, info.mpp, region, target_mpp=target_mpp)
        err.print(
            f"{path.name}: level-0 {info.mpp:.4g} um/px ({info.source.value}); read level "
            f"{level.level} at {level.level_mpp:.4g} um/px, resampled x{level.resample_factor:.3g} "
            f"to {target_mpp} um/px"
        )
        for warning in info.warnings:
            err.print(f"[yellow]warning[/yellow]: {warning}")
        return table, info.mpp


def cells_cmd(
    image_or_slide: Annotated[Path, typer.Argument(help="A slide, or a plain RGB image.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="GeoJSON file to write (QuPath detections).")
    ],
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp",
            help="Level-0 um/px: required for a plain image, overrides a slide's metadata.",
            show_default=False,
        ),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region", help="x,y,w,h in level-0 pixels (default: everything).", show_default=False
        ),
    ] = None,
    target_mpp: Annotated[
        float,
        typer.Option("--target-mpp", min=0.1, max=4.0, help="um/px a slide is read at."),
    ] = DEFAULT_CELL_MPP,
    object_type: Annotated[
        str,
        typer.Option("--object-type", help="QuPath objectType: detection or cell."),
    ] = "detection",
) -> None:
    """Detect nuclei (CPU, no learned weights) and write them as QuPath GeoJSON."""
    err = Console(stderr=True, highlight=False)
    box = parse_region(region)
    if object_type not in ("detection", "cell"):
        raise typer.BadParameter(f"--object-type must be detection or cell, got {object_type!r}")
    if mpp is not None and not mpp > 0:
        exc = InvalidMppError(
            f"--mpp {mpp} is not a positive number of um/px", path=image_or_slide, value=str(mpp)
        )
        err.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(EXIT_USAGE)
    t0 = time.perf_counter()
    try:
        table, level0_mpp = _detect(image_or_slide, mpp, box, target_mpp, err)
    except XmagError as exc:
        err.print(f"[red]✗[/red] {image_or_slide}: {exc}")
        raise typer.Exit(EXIT_INPUT_FAILED) from exc
    seconds = time.perf_counter() - t0
    doc = table.to_geojson(level0_mpp, object_type=object_type)
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(doc), encoding="utf-8")
    counts = np.bincount(table.types, minlength=len(CELL_TYPES))
    by_type = ", ".join(f"{name} {int(n)}" for name, n in zip(CELL_TYPES, counts, strict=True))
    err.print(
        f"[green]✓[/green] {len(table)} nuclei ({by_type}) in {seconds:.2f} s "
        f"({len(table) / max(seconds, 1e-9):.0f} cells/s) -> {out}"
    )
