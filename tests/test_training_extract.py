"""extract skips an unusable slide with a typed line each (or stops, by choice, writing nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.torch_required import require_torch

require_torch()

from tests.training_helpers import CMU1, SLIDES  # noqa: E402
from training.config import DataConfig, SlideEntry  # noqa: E402
from training.errors import SlidesFailedError  # noqa: E402
from training.extract import extract_crops  # noqa: E402

TOO_SMALL = SLIDES / "OS-1-detail.ome.tif"  # 250 um wide: no 448-um field fits


def _cfg() -> DataConfig:
    return DataConfig(slides=(SlideEntry(path=TOO_SMALL), SlideEntry(path=CMU1)))


def test_an_unusable_slide_is_skipped_reported_and_recorded(tmp_path: Path) -> None:
    reported = []
    manifest = extract_crops(
        _cfg(),
        tmp_path / "crops",
        2,
        show_progress=False,
        on_skip=lambda slide, exc: reported.append((slide, exc.code)),
    )
    assert reported == [(str(TOO_SMALL), "SLIDE_ERROR")]
    assert len(manifest.read_text().splitlines()) == 2
    settings = json.loads((tmp_path / "crops" / "extract.json").read_text())
    assert list(settings["skipped"]) == [str(TOO_SMALL)]
    assert settings["skipped"][str(TOO_SMALL)].startswith("[SLIDE_ERROR]")


def test_on_error_stop_raises_a_typed_error_before_writing_anything(tmp_path: Path) -> None:
    with pytest.raises(SlidesFailedError, match=r"OS-1-detail.*\[SLIDE_ERROR\]") as info:
        extract_crops(_cfg(), tmp_path / "crops", 2, show_progress=False, on_error="stop")
    assert info.value.code == "SLIDES_FAILED"
    assert not (tmp_path / "crops").exists()
