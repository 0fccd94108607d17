"""The demo build end to end on two real slides with a handful of steps: the path of
``make demo-model`` (``python -m model_export demo``: fields from the core's tissue detection,
teacher bank, distillation, modality head, export) gives a package that loads and that the engine
runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.torch_required import require_torch

require_torch()

from model_export.demo import DEMO_PACKAGE_NAME, DemoConfig, export_demo, run_demo  # noqa: E402
from xmag.engine import Engine  # noqa: E402
from xmag.package import load_package  # noqa: E402
from xmag.results import SlideResult  # noqa: E402
from xmag.settings import EngineSettings  # noqa: E402

SLIDES = Path(__file__).parent / "data" / "slides"
HE, FLUO = "CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(
        slides_dir=SLIDES,
        slides=(HE, FLUO),
        out=root / "run",
        package=root / "pkg",
        steps=3,
        batch_size=4,
        fields_per_slide=3,
        heldout_per_slide=2,
        views=1,
        depth=1,
        mil_epochs=2,
        variants=("fp32",),
        parity_tiles_per_slide=2,
    )
    return run_demo(cfg), root


def test_the_demo_report_has_the_loss_curve_the_heldout_cosine_and_the_stain_accuracy(
    demo: tuple[dict, Path],
) -> None:
    report, root = demo
    assert len(report["loss_curve"]["loss"]) == 3
    held = report["heldout_agreement_after"]
    assert held["n_fields"] >= 2
    assert -1.0 <= held["global_cosine"]["mean"] <= 1.0
    assert "constant_baseline_cosine" in held
    assert report["modality_head"]["n_slides"] == 2
    assert set(report["modality_head"]["per_slide"]) == {HE, FLUO}
    assert (root / "run" / "loss_curve.png").stat().st_size > 0
    assert json.loads((root / "run" / "report.json").read_text())["not_diagnostic"] is True


def test_the_demo_package_loads_says_it_is_a_trained_demonstration_and_carries_its_report(
    demo: tuple[dict, Path],
) -> None:
    _, root = demo
    package = load_package(root / "pkg")
    card = package.card
    assert card.name == DEMO_PACKAGE_NAME and card.trained is True
    assert "NOT A DIAGNOSTIC MODEL" in card.description
    assert [h.name for h in card.heads] == ["modality"]
    assert card.heads[0].labels == ["fluorescence", "he", "ihc"]
    assert "training/report.json" in card.checksums()


def test_the_engine_runs_the_demo_package_and_predicts_a_stain(
    demo: tuple[dict, Path], tmp_path: Path
) -> None:
    _, root = demo
    settings = EngineSettings(providers=["cpu"], batch_size=4, reader_workers=2)
    engine = Engine.from_dir(root / "pkg", settings)
    result = engine.embed_slide(SLIDES / HE, tmp_path / "out")
    assert isinstance(result, SlideResult)
    (pred,) = [p for p in result.predictions if p.name == "modality"]
    assert pred.level == "slide" and pred.top_label in ("fluorescence", "he", "ihc")
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "out" / "features.h5").is_file()


def test_a_second_build_replaces_only_a_demo_package(demo: tuple[dict, Path]) -> None:
    from model_export.errors import ExportError

    _, root = demo
    other = root / "not-a-package"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cfg = DemoConfig(slides_dir=SLIDES, slides=(HE,), out=root / "run", package=other)
    with pytest.raises(ExportError, match="not a model package"):
        export_demo(cfg, root / "run", None)
    assert (other / "notes.txt").read_text() == "mine"


def test_the_demo_config_needs_the_slides_folder_and_the_training_cli_points_to_the_move() -> None:
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from training.cli import app

    with pytest.raises(ValidationError, match="slides_dir"):
        DemoConfig(out=Path("run"))
    result = CliRunner().invoke(app, ["demo", "--steps", "3"])
    assert result.exit_code == 2
    assert "python -m model_export demo" in result.output
