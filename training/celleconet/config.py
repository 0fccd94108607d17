"""CellEcoNet run settings as data (pydantic, frozen). Units are in the names.

Each part of the pipeline reads only its own section, so a part can be replaced with its settings:
``VocabConfig`` (cells -> words), ``SentenceConfig`` (regions and neighbour phrases),
``ContextModelConfig`` (the transformer), ``TrainConfig`` (pretraining, survival fitting and CV).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_HORIZON_YEARS",
    "CelleconetConfig",
    "ContextModelConfig",
    "SentenceConfig",
    "Ties",
    "TrainConfig",
    "VocabConfig",
]

#: The binary head predicts recurrence within this many years (the paper's endpoint).
DEFAULT_HORIZON_YEARS = 5.0


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Ties(StrEnum):
    EFRON = "efron"
    BRESLOW = "breslow"


class VocabConfig(_Cfg):
    """The codebook: k-means over standardised cell features (per cell type by default)."""

    #: Words in all (``by_type`` False) or per cell type (``by_type`` True).
    n_words: int = Field(4, ge=1, le=4096)
    #: Fit one k-means per cell type: a word is (type, morphology cluster). Types carry most of
    #: what a nucleus is; clusters refine them (a small and a large tumour nucleus).
    by_type: bool = True
    #: Feature columns (names of ``xmag.cells.table.FEATURE_NAMES``); None = all but
    #: ``orientation_deg`` (an angle on the slide, not a property of the cell).
    features: tuple[str, ...] | None = None
    #: Cells drawn (at most) for the k-means fit; the codebook is fitted on a sample.
    max_fit_cells: int = Field(20_000, ge=100)
    seed: int = 0


class SentenceConfig(_Cfg):
    """How a slide becomes sentences (square regions) of at most ``max_cells`` words."""

    region_um: float = Field(100.0, gt=0)
    max_cells: int = Field(64, ge=4)
    min_cells: int = Field(8, ge=1)
    max_regions: int = Field(16, ge=1)
    #: Phrase: each cell's k nearest neighbours inside its region, no further than radius_um.
    k_neighbours: int = Field(6, ge=1)
    radius_um: float = Field(30.0, gt=0)
    seed: int = 0


class ContextModelConfig(_Cfg):
    dim: int = Field(32, ge=4)
    heads: int = Field(2, ge=1)
    #: One layer: with phrases in the tokens it found both planted signals; two gave better
    #: masked-word accuracy (0.24 vs 0.20 on one fold) at twice the CPU time.
    layers: int = Field(1, ge=1)
    #: Fourier features of xy_um: n_frequencies random directions with wavelengths spread
    #: log-uniformly over [min_wavelength_um, max_wavelength_um].
    n_frequencies: int = Field(16, ge=1)
    min_wavelength_um: float = Field(8.0, gt=0)
    max_wavelength_um: float = Field(200.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    #: Attention bias -slope_h * distance_um / distance_scale_um per head (slopes are learnt).
    distance_scale_um: float = Field(20.0, gt=0)
    n_types: int = Field(4, ge=1)


class TrainConfig(_Cfg):
    pretrain_steps: int = Field(100, ge=0)
    pretrain_batch_regions: int = Field(64, ge=1)
    mask_fraction: float = Field(0.2, gt=0, lt=1)
    pretrain_lr: float = Field(2e-3, gt=0)
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_slides: int = Field(32, ge=2)
    #: Regions drawn at random per slide for each survival step (None: all); both an
    #: augmentation (the slide label must hold for any subset) and a 2x saving on CPU.
    regions_per_step: int | None = Field(4, ge=1)
    #: Weight of the binary (recurrence within horizon) loss next to the Cox loss.
    binary_weight: float = Field(0.5, ge=0)
    #: Weight of masked-word prediction kept as a regulariser while fitting survival.
    mlm_weight: float = Field(0.1, ge=0)
    horizon_years: float = Field(DEFAULT_HORIZON_YEARS, gt=0)
    ties: Ties = Ties.EFRON
    #: Rotate each region's cell positions at random while fitting (tissue has no "up").
    rotate: bool = True
    folds: int = Field(5, ge=2)
    seed: int = 0


class CelleconetConfig(_Cfg):
    vocab: VocabConfig = VocabConfig()
    sentences: SentenceConfig = SentenceConfig()
    model: ContextModelConfig = ContextModelConfig()
    train: TrainConfig = TrainConfig()
