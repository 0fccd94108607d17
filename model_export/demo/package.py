"""The demo's last step: its checkpoint exported into a model package through ``export_package``.

Parity tiles are the configured slides' served tiles (``collect_parity_tiles``); the package gets
the training report under ``training/``. Only an earlier demo build is ever replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_export.demo.config import DEMO_DESCRIPTION, DEMO_PACKAGE_NAME, DemoConfig, Progress
from model_export.errors import ExportError
from model_export.export import export_package, from_training
from model_export.parity_tiles import collect_parity_tiles
from xmag.package import CARD_FILENAME

__all__ = ["export_demo"]

_INTENDED_USE = (
    "Demonstration and testing of xmag-serve only. Not for diagnosis, research conclusions or "
    "any clinical use."
)
_LICENSE = (
    "Demonstration weights trained on public test slides; see tests/data/slides/PROVENANCE.md "
    "for the slides' terms."
)


def _check_destination(package: Path) -> None:
    """Refuse a folder holding anything but an earlier demo build.

    Raises:
        ExportError: ``package`` holds another package or files that are not a package.
    """
    if (package / CARD_FILENAME).is_file():
        existing = json.loads((package / CARD_FILENAME).read_text()).get("name")
        if existing != DEMO_PACKAGE_NAME:  # replace our own earlier build, nothing else
            raise ExportError(
                f"{package} holds the package {existing!r}, not a demo build; choose another "
                "--package folder.",
                reason="exists",
                path=package,
            )
    elif package.exists() and any(package.iterdir()):
        raise ExportError(
            f"{package} exists and is not a model package; choose another --package folder.",
            reason="exists",
            path=package,
        )


def export_demo(cfg: DemoConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Export ``out/checkpoint.pt`` into ``cfg.package``; a summary for the report.

    Raises:
        ExportError: ``cfg.package`` is not a demo build or empty; the export failed.
        ParityError: a variant falls short of PyTorch on the slides' tiles.
    """
    if cfg.package is None:
        raise ExportError("no --package folder given to export the demo to.", reason="package")
    package = Path(cfg.package)
    _check_destination(package)
    if progress is not None:
        progress("export", 0, 1)
    source = from_training(out / "checkpoint.pt")
    tiles = collect_parity_tiles(
        [cfg.slides_dir / n for n in cfg.slides],
        tile_px=source.tile_px,
        target_mpp=source.target_mpp,
        tiles_per_slide=cfg.parity_tiles_per_slide,
    )
    lines: list[str] = []
    result = export_package(
        source,
        package,
        tiles,
        name=DEMO_PACKAGE_NAME,
        version="0.1.0",
        trained=True,
        description=DEMO_DESCRIPTION,
        variants=list(cfg.variants),
        card_extra={"intended_use": _INTENDED_USE, "license": _LICENSE},
        overwrite=True,
        extra_files={
            "training/report.json": out / "report.json",
            "training/report.md": out / "report.md",
            "training/loss_curve.png": out / "loss_curve.png",
        },
        log=lines.append,
    )
    if progress is not None:
        progress("export", 1, 1)
    return {
        "path": str(result.package.root),
        "parity": next((line for line in lines if line.startswith("parity on")), ""),
        "parity_tiles": len(tiles),
        "parity_skipped": dict(tiles.skipped),
        "export_seconds": {k: round(v, 1) for k, v in result.timings_s.items()},
    }
