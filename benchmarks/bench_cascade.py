"""Cascade benchmark (a script, not a test): the cell-level pass against the 5x pass it follows.

On a generated 40x slide (``tests.synthetic.make_large_slide``, 50,000 x 37,500 px at 0.25 um/px
by default, written once to /tmp/cascade-bench), with a cascade package (``--package``; by
default the untrained placeholder plus a torch-free stand-in cell model with the real I/O
contract, from tests/cascade_helpers.py), it times:

* the 5x pass: plan (thumbnail, tissue, grid), every kept tile read, encoded, the heads run;
* the cascade: K regions of size_um picked from the 5x pass, read at 0.5 um/px from the nearest
  level, nuclei detected and measured, words, sentences and the context model (ONNX), without
  writing files (``--write`` adds cells.geojson and cascade_heatmap.png);

and prints wall seconds of each, their ratio, pixels read at 20x against the whole slide at 20x,
and cells/s (cells found / cascade wall seconds; and per CPU-second of detection).

    python benchmarks/bench_cascade.py [--k 32] [--package DIR] [--slide PATH] [--repeats 1]

Both passes use the same engine settings (threads from EngineSettings); run it on a quiet
machine for absolute figures: the ratio is what it is for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SLIDE = Path("/tmp/cascade-bench/large-40x.svs")


def _default_package(k: int) -> Path:
    from model_export.default_package import build_default_package
    from tests.cascade_helpers import add_cascade
    from xmag.package import CascadeSpec

    root = Path(tempfile.mkdtemp(prefix="bench-cascade-"))
    build_default_package(root / "base")
    return add_cascade(root / "base", root / "cascade", CascadeSpec(k=k))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--k", type=int, default=32, help="regions (only with the default package)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="also write the cascade's files")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    from xmag.cascade import Cascade
    from xmag.engine import Engine
    from xmag.package import load_package
    from xmag.readers import open_slide

    if not args.slide.exists():
        from tests.synthetic import make_large_slide

        print(f"generating {args.slide} (once) ...", flush=True)
        args.slide.parent.mkdir(parents=True, exist_ok=True)
        make_large_slide(args.slide, layout="40x", width=50_000, height=37_500, seed=0)
    package = load_package(args.package or _default_package(args.k))
    engine = Engine(package)
    cascade = Cascade(package, engine.settings)
    spec = cascade.spec
    rows = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        prepared = engine.prepare_slide(args.slide)
        with prepared:
            run = engine.run_pipeline(prepared.reader, prepared.plan)
            heads = engine.run_heads(run.embeddings)
            t_5x = time.perf_counter() - t0 - prepared.stages.seconds.get("hash", 0.0)
        with open_slide(args.slide) as reader:
            t1 = time.perf_counter()
            out = cascade.run_on_reader(
                reader,
                prepared.plan,
                run.level0_xy,
                run.grid_index,
                heads,
                Path(tempfile.mkdtemp()) if args.write else None,
            )
            t_c = time.perf_counter() - t1
        plan = prepared.plan
        w, h = plan.slide.dimensions
        frac = len(out.result.regions) * spec.size_um**2 / (w * h * plan.mpp.mpp**2)
        row = {
            "repeat": rep,
            "slide": str(args.slide),
            "dimensions": [w, h],
            "level0_mpp": plan.mpp.mpp,
            "tiles_5x": int(run.embeddings.shape[0]),
            "five_x_s": round(t_5x, 3),
            "cascade_s": round(t_c, 3),
            "ratio": round(t_c / t_5x, 3),
            "regions": len(out.result.regions),
            "k": spec.k,
            "size_um": spec.size_um,
            "read_level": out.result.level.level,
            "read_mpp": out.result.read_mpp,
            "area_read_at_20x_fraction": round(frac, 5),
            "cells": out.result.cells,
            "sentences": out.result.sentences,
            "cells_per_s": round(out.result.cells / t_c, 1),
            "cells_per_detect_cpu_s": round(
                out.result.cells / max(out.result.timings["detect"], 1e-9), 1
            ),
            "cascade_timings": out.result.timings,
            "workers": cascade.workers,
            "package": package.card.name,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
