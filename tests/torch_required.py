"""How torch-side tests get torch: skipped where the [train] extra is absent, required in CI.

Use at the top of a test module::

    from tests.torch_required import require_torch

    torch = require_torch()

With ``XMAG_REQUIRE_TRAIN=1`` (CI sets it) a missing torch is a failure, not a skip, so the
training and export tests cannot vanish silently.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["REQUIRE_ENV", "require_torch"]

REQUIRE_ENV = "XMAG_REQUIRE_TRAIN"


def require_torch() -> ModuleType:
    """Return the ``torch`` module; skip the calling module when it is absent, unless required.

    Raises:
        ImportError: torch is missing and ``XMAG_REQUIRE_TRAIN=1``.
    """
    if os.environ.get(REQUIRE_ENV, "").strip() == "1":
        try:
            return importlib.import_module("torch")
        except ImportError as exc:
            raise ImportError(
                f"{REQUIRE_ENV}=1 but torch is not installed; install the extra: "
                "pip install -e '.[train]'"
            ) from exc
    return pytest.importorskip("torch")
