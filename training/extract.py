"""Write paired 20x/5x crops to disk for large runs (the folder-of-crops mode reads them back).

Layout: ``OUT/hi/<id>.png`` (20x field), ``OUT/lo/<id>.png`` (5x view), ``OUT/manifest.jsonl``
(one JSON line per crop: id, slide, level0_xy, view, paths) and ``OUT/extract.json`` (settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from training.config import DataConfig
from training.data import MANIFEST_NAME, FieldGeometry, SlideFieldSampler, TissueFn

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
) -> Path:
    """Draw ``n_fields`` tissue fields from ``cfg.slides`` and write them under ``out``.

    Returns the manifest path. Appends to an existing folder (ids continue), so an interrupted
    extraction can be resumed by asking for the remaining count.
    """
    geometry = geometry or FieldGeometry()
    out = Path(out)
    (out / "hi").mkdir(parents=True, exist_ok=True)
    (out / "lo").mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    start = len(manifest.read_text().splitlines()) if manifest.is_file() else 0
    (out / "extract.json").write_text(
        json.dumps(
            {"data": cfg.model_dump(mode="json"), "geometry": geometry.__dict__, "seed": seed},
            indent=2,
        )
    )
    extra = {} if tissue_fn is None else {"tissue_fn": tissue_fn}
    sampler = SlideFieldSampler.from_config(cfg, geometry, **extra)
    rng = np.random.default_rng([seed, start])
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with (
            Progress(*columns, disable=not show_progress) as bar,
            manifest.open("a") as fh,
        ):
            task = bar.add_task("extracting fields", total=n_fields)
            for i in range(start, start + n_fields):
                (pair,) = sampler.draw(1, rng)
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
