"""Shared fixtures: the real slides copied from ../shared/slides (see their PROVENANCE.md), and
the untrained placeholder model package built once per session (read-only: copy it to change it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model_export.default_package import build_default_package

DATA_DIR = Path(__file__).parent / "data"
SLIDES_DIR = DATA_DIR / "slides"
PATCHES_DIR = DATA_DIR / "patches"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return SLIDES_DIR


@pytest.fixture(scope="session")
def patches_dir() -> Path:
    return PATCHES_DIR


@pytest.fixture(scope="session")
def default_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "default"
    build_default_package(out)
    return out
