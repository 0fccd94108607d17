"""The cell table: one row per nucleus, the "words" a slide-as-language model reads.

Frames (see ``xmag.tiles`` for the slide frames):

* the table's *frame* is an image at ``mpp`` um/px whose top-left sits at ``origin_px`` in the
  slide's level-0 pixels (``(0, 0)`` for a plain image);
* ``contours_px`` are polygons in that frame's pixels, pixel centres at whole numbers (the
  centre of pixel row ``i``, column ``j`` is ``(x, y) = (j, i)``);
* ``xy_um`` are centroids in micrometres in the same frame: ``centroid_px * mpp``. The origin is
  *not* added, so a table of one region reads as an image of its own; ``CellTable.concat`` and
  ``to_geojson`` place regions on the slide given the slide's level-0 mpp.

Features are measurements of each nucleus named with their units (``FEATURE_NAMES``); a feature
that could not be measured (an imported cell without its image has no stain intensity) is NaN,
never a substitute value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xmag.errors import XmagUsageError

__all__ = [
    "CELL_TYPES",
    "CELL_TYPE_COLOURS",
    "FEATURE_NAMES",
    "GEOMETRY_FEATURES",
    "INTENSITY_FEATURES",
    "CellTable",
    "type_code",
]

#: Coarse cell types; a cell's code is the index into this tuple.
CELL_TYPES: tuple[str, ...] = ("unknown", "lymphocyte", "tumour", "stromal")
#: RGB colours of the types in QuPath exports (QuPath's defaults for Immune cells, Tumor, Stroma).
CELL_TYPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "unknown": (128, 128, 128),
    "lymphocyte": (160, 90, 160),
    "tumour": (200, 0, 0),
    "stromal": (150, 200, 150),
}

#: Measured from the nucleus outline alone (an imported contour is enough).
GEOMETRY_FEATURES: tuple[str, ...] = (
    "area_um2",
    "perimeter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "circularity",
    "orientation_deg",
)
#: Measured from the pixels inside the outline (need the image).
INTENSITY_FEATURES: tuple[str, ...] = (
    "haematoxylin_od_mean",
    "haematoxylin_od_std",
    "eosin_od_mean",
    "eosin_od_std",
    "texture_gradient_od_per_um",
    "texture_glcm_contrast",
    "texture_glcm_homogeneity",
)
#: Column names of ``CellTable.features`` (units in the names; OD is log10, unitless).
FEATURE_NAMES: tuple[str, ...] = GEOMETRY_FEATURES + INTENSITY_FEATURES


def type_code(name: str) -> int:
    """Code of a type name of ``CELL_TYPES``; raises ``XmagUsageError`` for another name."""
    try:
        return CELL_TYPES.index(name)
    except ValueError:
        raise XmagUsageError(f"unknown cell type {name!r}; expected one of {CELL_TYPES}") from None


@dataclass(frozen=True, kw_only=True, eq=False)
class CellTable:
    """Nuclei of one frame (an image, or a region of a slide read at ``mpp``).

    Construct with keywords; arrays are converted to the documented dtypes and checked.

    Attributes:
        xy_um: (N, 2) float32 centroids (x, y) in micrometres in the frame (``centroid_px * mpp``).
        features: (N, len(FEATURE_NAMES)) float32, NaN where not measured.
        types: (N,) int8 codes into ``CELL_TYPES``.
        contours_px: N polygons, each (K, 2) float32 (x, y) in the frame's pixels, not closed
            (the last vertex is not a repeat of the first).
        mpp: micrometres per pixel of the frame.
        source: who found the cells: ``"xmag-detector"``, ``"qupath"``, ``"hovernet"``,
            ``"cellvit"`` (or another tool's name).
        origin_px: the frame's top-left in the slide's level-0 pixels ((0, 0) for an image).
    """

    xy_um: np.ndarray
    features: np.ndarray
    types: np.ndarray
    contours_px: list[np.ndarray]
    mpp: float
    source: str
    origin_px: tuple[float, float] = (0.0, 0.0)
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (detector parameters, the imported file); not part of equality."""

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy_um, dtype=np.float32).reshape(-1, 2)
        n = xy.shape[0]
        feats = np.asarray(self.features, dtype=np.float32)
        if feats.size == 0:
            feats = feats.reshape(n, len(FEATURE_NAMES))
        raw_types = np.asarray(self.types).reshape(-1)
        if raw_types.size and (raw_types.min() < 0 or raw_types.max() >= len(CELL_TYPES)):
            raise XmagUsageError(f"type codes must lie in 0..{len(CELL_TYPES) - 1}")
        types = raw_types.astype(np.int8, copy=False)
        contours = [np.asarray(c, dtype=np.float32).reshape(-1, 2) for c in self.contours_px]
        if feats.shape != (n, len(FEATURE_NAMES)):
            raise XmagUsageError(
                f"features has shape {feats.shape}, expected ({n}, {len(FEATURE_NAMES)}) "
                "(one row per centroid, one column per FEATURE_NAMES)"
            )
        if types.shape != (n,) or len(contours) != n:
            raise XmagUsageError(
                f"{n} centroids but {types.shape[0]} types and {len(contours)} contours"
            )
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise XmagUsageError(f"mpp must be a positive number of um/px, got {self.mpp!r}")
        object.__setattr__(self, "xy_um", xy)
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "contours_px", contours)
        object.__setattr__(self, "mpp", float(self.mpp))
        origin = (float(self.origin_px[0]), float(self.origin_px[1]))
        object.__setattr__(self, "origin_px", origin)

    def __len__(self) -> int:
        return int(self.xy_um.shape[0])

    def __repr__(self) -> str:
        counts = np.bincount(self.types, minlength=len(CELL_TYPES))
        by_type = ", ".join(f"{t}={int(c)}" for t, c in zip(CELL_TYPES, counts, strict=True))
        return (
            f"CellTable({len(self)} cells, {by_type}, mpp={self.mpp:g}, "
            f"origin_px={self.origin_px}, source={self.source!r})"
        )

    @classmethod
    def empty(
        cls, mpp: float, source: str, origin_px: tuple[float, float] = (0.0, 0.0)
    ) -> CellTable:
        """A table without cells (a region with no nuclei)."""
        return cls(
            xy_um=np.zeros((0, 2), np.float32),
            features=np.zeros((0, len(FEATURE_NAMES)), np.float32),
            types=np.zeros(0, np.int8),
            contours_px=[],
            mpp=mpp,
            source=source,
            origin_px=origin_px,
        )

    @property
    def xy_px(self) -> np.ndarray:
        """(N, 2) float32 centroids in the frame's pixels."""
        return self.xy_um / np.float32(self.mpp)

    @property
    def type_names(self) -> list[str]:
        """Type name of each cell."""
        return [CELL_TYPES[int(t)] for t in self.types]

    def feature(self, name: str) -> np.ndarray:
        """(N,) float32 column ``name`` of ``FEATURE_NAMES``."""
        try:
            return self.features[:, FEATURE_NAMES.index(name)]
        except ValueError:
            raise XmagUsageError(f"unknown feature {name!r}; see FEATURE_NAMES") from None

    def subset(self, mask: np.ndarray | Sequence[int] | Sequence[bool]) -> CellTable:
        """The cells selected by a boolean mask (N,) or by indices, in that order."""
        sel = np.asarray(mask)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise XmagUsageError(f"mask has shape {sel.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(sel)
        else:
            idx = sel.astype(np.int64).reshape(-1)
        return CellTable(
            xy_um=self.xy_um[idx],
            features=self.features[idx],
            types=self.types[idx],
            contours_px=[self.contours_px[int(i)] for i in idx],
            mpp=self.mpp,
            source=self.source,
            origin_px=self.origin_px,
            meta=dict(self.meta),
        )

    def level0_scale(self, level0_mpp: float | None) -> float:
        """Level-0 pixels per frame pixel (1 when ``level0_mpp`` is None: the frame is level 0)."""
        if level0_mpp is None:
            return 1.0
        if not (math.isfinite(level0_mpp) and level0_mpp > 0):
            raise XmagUsageError(f"level0_mpp must be a positive number, got {level0_mpp!r}")
        return self.mpp / level0_mpp

    def to_level0_px(self, xy_px: np.ndarray, level0_mpp: float | None = None) -> np.ndarray:
        """Frame pixel coordinates (..., 2) -> the slide's level-0 pixels, float64.

        Pixel centres map to pixel centres: frame pixel ``p`` spans level-0 pixels
        ``[origin + p * s, origin + (p + 1) * s)``, so its centre is ``origin + (p + 0.5) * s -
        0.5`` with ``s = mpp / level0_mpp`` (the identity plus the origin when ``s`` is 1).
        """
        s = self.level0_scale(level0_mpp)
        o = np.asarray(self.origin_px, np.float64)
        return o + (np.asarray(xy_px, np.float64) + 0.5) * s - 0.5

    def level0_xy_px(self, level0_mpp: float | None = None) -> np.ndarray:
        """(N, 2) float64 centroids in the slide's level-0 pixels (``to_level0_px``)."""
        return self.to_level0_px(self.xy_px, level0_mpp)

    def level0_contours_px(self, level0_mpp: float | None = None) -> list[np.ndarray]:
        """Contours as (K, 2) float64 polygons in the slide's level-0 pixels."""
        return [self.to_level0_px(c, level0_mpp) for c in self.contours_px]

    def shifted(self, dx_px: float, dy_px: float) -> CellTable:
        """The same cells in a frame whose pixel (0, 0) is this frame's (-dx, -dy): adds
        ``(dx, dy)`` to every coordinate; origin, mpp and source unchanged."""
        d = np.array([dx_px, dy_px], np.float64)
        return CellTable(
            xy_um=self.xy_um.astype(np.float64) + d * self.mpp,
            features=self.features,
            types=self.types,
            contours_px=[(c.astype(np.float64) + d).astype(np.float32) for c in self.contours_px],
            mpp=self.mpp,
            source=self.source,
            origin_px=self.origin_px,
            meta=dict(self.meta),
        )

    @classmethod
    def concat(cls, tables: Sequence[CellTable], level0_mpp: float | None = None) -> CellTable:
        """One table of several (regions of one slide, or one image's parts).

        Tables must share ``mpp``. When their origins differ, each is moved into a common frame
        at the same mpp whose origin is level-0 (0, 0); that needs ``level0_mpp``, the slide's
        um/px at level 0. The source is kept when shared, else the sources joined by ``+``.
        """
        if not tables:
            raise XmagUsageError("concat needs at least one table (use CellTable.empty)")
        mpp = tables[0].mpp
        if any(not math.isclose(t.mpp, mpp, rel_tol=1e-6) for t in tables):
            raise XmagUsageError(
                f"tables have different mpp {sorted({t.mpp for t in tables})}; measure them at "
                "one mpp before joining"
            )
        origins = {t.origin_px for t in tables}
        origin: tuple[float, float] = tables[0].origin_px
        shifts = [np.zeros(2, np.float64) for _ in tables]
        if len(origins) > 1:
            if level0_mpp is None:
                raise XmagUsageError(
                    "tables come from regions with different origins; pass level0_mpp (the "
                    "slide's um/px at level 0) to place them in one frame"
                )
            origin = (0.0, 0.0)
            shifts = [np.asarray(t.origin_px, np.float64) * level0_mpp / mpp for t in tables]
        sources = list(dict.fromkeys(t.source for t in tables))
        contours = [
            (c.astype(np.float64) + sh).astype(np.float32)
            for t, sh in zip(tables, shifts, strict=True)
            for c in t.contours_px
        ]
        return cls(
            xy_um=np.concatenate(
                [
                    t.xy_um.astype(np.float64) + sh * mpp
                    for t, sh in zip(tables, shifts, strict=True)
                ]
            ),
            features=np.concatenate([t.features for t in tables]),
            types=np.concatenate([t.types for t in tables]),
            contours_px=contours,
            mpp=mpp,
            source="+".join(sources),
            origin_px=origin,
        )

    def to_geojson(
        self,
        level0_mpp: float | None = None,
        *,
        object_type: str = "detection",
    ) -> dict[str, Any]:
        """A QuPath GeoJSON FeatureCollection of the nuclei (see ``xmag.cells.qupath``).

        Args:
            level0_mpp: the slide's um/px at level 0; None when the frame is level 0 (an image).
            object_type: ``"detection"`` or ``"cell"`` (QuPath's objectType).
        """
        from xmag.cells.qupath import to_qupath_geojson

        return to_qupath_geojson(self, level0_mpp=level0_mpp, object_type=object_type)
