"""Write paired 20x/5x crops to disk for large runs (the folder-of-crops mode reads them back).

Layout: ``OUT/hi/<id>.png`` (20x field), ``OUT/lo/<id>.png`` (5x view), ``OUT/manifest.jsonl``
(one JSON line per crop: id, slide, level0_xy, view, paths) and ``OUT/extract.json`` (settings,
and the slides skipped with their error).

Unusable slides (the core's typed errors: unknown mpp, no tissue, unreadable) are skipped, each
reported through ``on_skip``, with ``on_error="skip"`` (the default); ``on_error="stop"`` raises
``SlidesFailedError`` at the first one. Slides are opened before anything is written, so a stop
leaves the folder as it was; a crop is listed in the manifest only once both images are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from training.config import DataConfig
from training.data import (
    MANIFEST_NAME,
    FieldGeometry,
    SlideFields,
    SlideFieldSampler,
    TissueFn,
)
from training.errors import SlidesFailedError
from xmag.errors import XmagError

__all__ = ["extract_crops"]


def extract_crops(
    cfg: DataConfig,
    out: Path,
    n_fields: int,
    *,
    geometry: FieldGeometry | None = None,
    seed: int = 0,
    show_progress: bool = True,
    tissue_fn: TissueFn | None = None,
    on_error: str = "skip",
    on_skip: Callable[[str, XmagError], None] | None = None,
) -> Path:
    """Draw ``n_fields`` tissue fields from ``cfg.slides`` and write them under ``out``.

    Returns the manifest path. Appends to an existing folder (ids continue), so an interrupted
    extraction can be resumed by asking for the remaining count.

    Args:
        on_error: ``skip`` an unusable slide (reported to ``on_skip`` and in extract.json) or
            ``stop`` at the first.

    Raises:
        SlidesFailedError: ``on_error="stop"`` and a slide failed, or no slide is usable.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    geometry = geometry or FieldGeometry()
    out = Path(out)
    skipped: dict[str, str] = {}

    def fail(slide: str, exc: XmagError) -> None:
        if on_error == "stop":
            raise SlidesFailedError(
                f"{slide}: [{exc.code}] {exc.message} (stopped: --on-error stop; nothing was "
                "written for this run; --on-error skip leaves such slides out).",
                slide=slide,
                cause=exc.code,
            ) from exc
        skipped[slide] = f"[{exc.code}] {exc.message}"
        if on_skip is not None:
            on_skip(slide, exc)

    opened = []
    for entry in cfg.slides:  # open every slide before writing anything
        try:
            opened.append(
                SlideFields(
                    entry,
                    geometry,
                    student_view=cfg.student_view,
                    min_tissue=cfg.min_tissue,
                    allow_upsample=cfg.allow_upsample,
                    **({} if tissue_fn is None else {"tissue_fn": tissue_fn}),
                )
            )
        except XmagError as exc:
            try:
                fail(str(entry.path), exc)
            except SlidesFailedError:
                for s in opened:
                    s.close()
                raise
    if not opened:
        raise SlidesFailedError(
            f"none of the {len(cfg.slides)} slides is usable ({skipped}); fix them or give others.",
            skipped=skipped,
        )
    sampler = SlideFieldSampler(opened)
    (out / "hi").mkdir(parents=True, exist_ok=True)
    (out / "lo").mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    start = len(manifest.read_text().splitlines()) if manifest.is_file() else 0

    def write_settings() -> None:
        settings = {
            "data": cfg.model_dump(mode="json"),
            "geometry": geometry.__dict__,
            "seed": seed,
            "skipped": skipped,
        }
        (out / "extract.json").write_text(json.dumps(settings, indent=2))

    write_settings()
    rng = np.random.default_rng([seed, start])
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with (
            Progress(*columns, disable=not show_progress) as bar,
            manifest.open("a") as fh,
        ):
            task = bar.add_task("extracting fields", total=n_fields)
            for i in range(start, start + n_fields):
                pair = None
                while pair is None:
                    slide = sampler.slides[rng.integers(len(sampler.slides))]
                    try:
                        pair = slide.read(slide.random_xy(rng))
                    except XmagError as exc:  # a broken region: this slide is dropped
                        fail(str(slide.entry.path), exc)
                        sampler.slides.remove(slide)
                        slide.close()
                        write_settings()
                        if not sampler.slides:
                            raise SlidesFailedError(
                                f"every slide failed while reading ({skipped}).", skipped=skipped
                            ) from exc
                cid = f"{i:07d}"
                Image.fromarray(pair.hi).save(out / "hi" / f"{cid}.png")
                Image.fromarray(pair.lo).save(out / "lo" / f"{cid}.png")
                rec = {
                    "id": cid,
                    "slide": pair.slide,
                    "level0_xy": list(pair.level0_xy),
                    "view": pair.student_view,
                    "hi": f"hi/{cid}.png",
                    "lo": f"lo/{cid}.png",
                }
                fh.write(json.dumps(rec) + "\n")
                bar.advance(task)
    finally:
        sampler.close()
    return manifest
