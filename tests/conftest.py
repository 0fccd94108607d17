"""Shared fixtures: the real slides copied from ../shared/slides (see their PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"
SLIDES_DIR = DATA_DIR / "slides"
PATCHES_DIR = DATA_DIR / "patches"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return SLIDES_DIR


@pytest.fixture(scope="session")
def patches_dir() -> Path:
    return PATCHES_DIR
