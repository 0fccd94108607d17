"""The demonstration package committed in models/demo (what `make serve` runs) stays loadable and
does what its card says: it tells the stain of the real slides it was built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmag.engine import Engine, SlideOptions
from xmag.package import load_package

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"


def test_the_shipped_demo_package_loads_with_valid_checksums_and_says_it_is_a_demonstration() -> (
    None
):
    package = load_package(DEMO_DIR)
    card = package.card
    assert card.trained is True
    assert "NOT A DIAGNOSTIC MODEL" in card.description
    assert {head.name for head in card.heads} == {"modality"}


@pytest.mark.parametrize(
    ("slide", "options", "expected"),
    [
        ("CMU-1-Small-Region.svs", SlideOptions(), "he"),
        ("test3-DAPI-2-387.ndpi", SlideOptions(), "fluorescence"),
        ("OS-2-ndpi.ome.tif", SlideOptions(), "ihc"),
    ],
)
def test_the_shipped_demo_model_predicts_the_stain_of_its_real_slides(
    slides_dir: Path, tmp_path: Path, slide: str, options: SlideOptions, expected: str
) -> None:
    engine = Engine.from_dir(DEMO_DIR)
    result = engine.embed_slide(slides_dir / slide, tmp_path / "out", options=options)
    (modality,) = [p for p in result.predictions if p.name == "modality"]
    assert modality.top_label == expected
    assert result.model.trained is True


CELLECONET_DIR = DEMO_DIR.parent / "celleconet-demo"


def test_the_shipped_celleconet_demo_serves_a_recurrence_risk_with_its_cells(
    slides_dir: Path, tmp_path: Path
) -> None:
    """models/celleconet-demo (`make serve MODEL_DIR=models/celleconet-demo`): the 5x pass, then
    the cascade reads the chosen regions at 0.5 um/px, finds the cells and reads them."""
    package = load_package(CELLECONET_DIR)
    assert "NOT A DIAGNOSTIC MODEL" in package.card.description
    assert "recurrence_risk" in package.card.tasks
    engine = Engine.from_dir(CELLECONET_DIR)
    out = tmp_path / "out"
    result = engine.embed_slide(slides_dir / "CMU-1-Small-Region.svs", out)
    assert result.cascade is not None and result.cascade.regions
    assert result.cascade.cells > 0 and result.cascade.risk is not None
    assert any(p.name == "recurrence_risk" for p in result.predictions)
    assert (out / "cells.geojson").stat().st_size > 0
