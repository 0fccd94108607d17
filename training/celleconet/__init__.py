"""CellEcoNet: a slide read as a language of cells (arXiv 2508.16742), for recurrence risk.

Cells are words (``vocab``), each cell with its neighbours a phrase (``phrases``), square regions
sentences (``sentences``); a small transformer with distance-aware attention learns what a word
means in its context by masked-word prediction, then pools regions into a slide risk
(``model``, ``train``). ``cv`` compares it with baselines (``methods``) on patient folds with
survival statistics from lifelines and scikit-survival (``metrics``); ``planted`` builds cohorts
of real nuclei where the cause of risk is known. Design and reasons: docs/celleconet.md.

Names are imported lazily so ``python -m training --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "METHODS",
    "CellEcoNet",
    "CelleconetConfig",
    "Codebook",
    "build_planted_cohort",
    "build_sentences",
    "cox_loss",
    "cross_validate",
    "fit_codebook",
    "load_cohort",
    "neighbour_graph",
    "write_report",
]

_WHERE = {
    "METHODS": "methods",
    "CellEcoNet": "model",
    "CelleconetConfig": "config",
    "Codebook": "vocab",
    "build_planted_cohort": "planted",
    "build_sentences": "sentences",
    "cox_loss": "losses",
    "cross_validate": "cv",
    "fit_codebook": "vocab",
    "load_cohort": "cv",
    "neighbour_graph": "phrases",
    "write_report": "cv",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
