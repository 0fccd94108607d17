"""Paired fields of view for distillation: a 20x field for the teacher and the same field at 5x.

A field is ``grid * tile_px`` teacher pixels a side at the teacher's mpp (896 px at 0.5 um/px =
448 um) and ``img_size`` student pixels at the student's mpp (224 px at 2.0 um/px). Fields are
drawn from tissue (the core's ``detect_tissue`` mask) on slides whose mpp the core resolves.
Both views are read with the core's ``read_tile_at`` (level choice, origin rounding and resampling
of the served tiles), so a field whose corner is a grid cell's sees exactly the served 5x tile.
Sources share one protocol, ``draw(n, rng) -> list[FieldPair]``: ``SlideFieldSampler`` reads
slides, ``CropFolder`` reads crops written by ``training.extract``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from training.config import DataConfig, SlideEntry, StudentView
from xmag.errors import NoTissueError, SlideError
from xmag.level import LEVEL_MATCH_TOLERANCE, choose_decode, choose_level
from xmag.mpp import resolve_mpp
from xmag.params import TilingParams
from xmag.readers import SlideReader, open_slide
from xmag.tiles import read_tile_at
from xmag.tissue import TissueMask

__all__ = [
    "MANIFEST_NAME",
    "CropFolder",
    "FieldGeometry",
    "FieldPair",
    "FieldSource",
    "SlideFieldSampler",
    "SlideFields",
    "TissueFn",
    "pairs_to_arrays",
]

MANIFEST_NAME = "manifest.jsonl"
_CANDIDATE_STEPS_PER_FIELD = 4  # lattice of candidate field corners: 4 per field side


@dataclass(frozen=True)
class FieldGeometry:
    """Sizes of one training field.

    Attributes:
        hi_px: side of the 20x field in teacher pixels (grid * teacher tile_px, e.g. 896).
        hi_mpp: um/px of the teacher view (0.5).
        lo_px: side of the 5x view in student pixels (224).
        lo_mpp: um/px of the student view (2.0).
    """

    hi_px: int = 896
    hi_mpp: float = 0.5
    lo_px: int = 224
    lo_mpp: float = 2.0

    @property
    def field_um(self) -> float:
        return self.hi_px * self.hi_mpp

    def __post_init__(self) -> None:
        lo_um = self.lo_px * self.lo_mpp
        if abs(lo_um - self.field_um) > 1e-6 * self.field_um:
            raise ValueError(
                f"5x view covers {lo_um} um but the 20x field covers {self.field_um} um; "
                "they must be the same field"
            )


@dataclass(frozen=True)
class FieldPair:
    """One field: ``hi`` (hi_px, hi_px, 3) uint8 RGB at 20x and ``lo`` (lo_px, lo_px, 3) at 5x.

    ``level0_xy`` is the field's top-left in the slide's level-0 frame (-1, -1 when unknown).
    """

    hi: np.ndarray
    lo: np.ndarray
    slide: str
    level0_xy: tuple[int, int]
    student_view: str


class FieldSource(Protocol):
    def draw(self, n: int, rng: np.random.Generator) -> list[FieldPair]: ...


TissueFn = Callable[[SlideReader], TissueMask]


def _default_tissue(reader: SlideReader) -> TissueMask:
    from xmag.tissue import detect_tissue

    return detect_tissue(reader)


class SlideFields:
    """Field reading and tissue-candidate positions for one slide (keeps the reader open).

    Raises:
        SlideError: the slide's level-0 mpp is coarser than the teacher's and upsampling is not
            allowed (a 20x view would be invented), or the slide is smaller than one field.
        NoTissueError: no field position has enough tissue.
        (and every error of ``open_slide`` / ``resolve_mpp``: UNKNOWN_MPP etc.)
    """

    def __init__(
        self,
        entry: SlideEntry,
        geometry: FieldGeometry,
        *,
        student_view: StudentView = StudentView.PYRAMID,
        min_tissue: float = 0.5,
        allow_upsample: bool = False,
        tissue_fn: TissueFn = _default_tissue,
    ):
        self.entry, self.geometry, self.student_view = entry, geometry, student_view
        self.reader = open_slide(entry.path)
        mpp = resolve_mpp(self.reader, override=entry.mpp_override, default=entry.default_mpp)
        self.mpp = mpp.mpp
        if self.mpp > geometry.hi_mpp * (1 + LEVEL_MATCH_TOLERANCE) and not allow_upsample:
            self.reader.close()
            raise SlideError(
                f"{entry.path} is scanned at {self.mpp:.3g} um/px, coarser than the teacher's "
                f"{geometry.hi_mpp} um/px, so its 20x view would be upsampled; leave it out of "
                "distillation or set data.allow_upsample.",
                path=entry.path,
                mpp=self.mpp,
            )
        self.level0_side = geometry.field_um / self.mpp
        # The levels the service reads at each mpp: the views are tiles of those reads. The 5x
        # view is decoded the way the service decodes its tiles by default (``TilingParams.decode``:
        # a JPEG level at a reduced DCT scale where it qualifies), so it stays the served tile; the
        # teacher's 20x view is the exact reference read.
        self.hi_level = choose_level(self.reader, self.mpp, geometry.hi_mpp)
        self.lo_level = choose_decode(
            self.reader,
            choose_level(self.reader, self.mpp, geometry.lo_mpp),
            geometry.lo_px,
            TilingParams().decode,
        )
        w0, h0 = self.reader.dimensions
        if min(w0, h0) < self.level0_side:
            # A field hanging off the slide would train on padding, not tissue.
            self.reader.close()
            raise SlideError(
                f"{entry.path} is {w0 * self.mpp:.0f} x {h0 * self.mpp:.0f} um, smaller than one "
                f"{geometry.field_um:.0f}-um field; leave it out of distillation.",
                path=entry.path,
                mpp=self.mpp,
            )
        self.candidates = self._candidates(tissue_fn(self.reader), min_tissue)
        if len(self.candidates) == 0:
            self.reader.close()
            raise NoTissueError(
                f"{entry.path} has no {geometry.field_um:.0f}-um field with at least "
                f"{min_tissue:.0%} tissue; lower data.min_tissue or leave the slide out.",
                path=entry.path,
            )

    def _candidates(self, tissue: TissueMask, min_tissue: float) -> np.ndarray:
        """(K, 2) int64 level-0 top-left corners of fields whose tissue fraction passes."""
        mask = tissue.mask.astype(np.float64)
        side = self.level0_side / tissue.downsample  # field side in mask pixels
        step = max(1.0, side / _CANDIDATE_STEPS_PER_FIELD)
        w0, h0 = self.reader.dimensions
        integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        xs = np.arange(0.0, max(w0 - self.level0_side, 0) / tissue.downsample + 1e-9, step)
        ys = np.arange(0.0, max(h0 - self.level0_side, 0) / tissue.downsample + 1e-9, step)
        gx, gy = np.meshgrid(xs, ys)
        x0 = np.clip(np.round(gx).astype(int), 0, mask.shape[1])
        y0 = np.clip(np.round(gy).astype(int), 0, mask.shape[0])
        x1 = np.clip(np.round(gx + side).astype(int), 0, mask.shape[1])
        y1 = np.clip(np.round(gy + side).astype(int), 0, mask.shape[0])
        covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        frac = covered / max(side * side, 1e-9)
        keep = frac >= min_tissue
        corners = np.stack([gx[keep], gy[keep]], axis=1) * tissue.downsample
        return np.round(corners).astype(np.int64)

    def read(self, level0_xy: tuple[int, int]) -> FieldPair:
        """The field whose top-left is ``level0_xy`` (level-0 px) at 20x and at 5x.

        Each view is the core's ``read_tile_at`` of one square at its mpp: the 5x view equals the
        tile the service reads at 2.0 um/px for a grid cell starting at ``level0_xy``.
        """
        g = self.geometry
        hi = read_tile_at(self.reader, self.hi_level, level0_xy, g.hi_px)
        if self.student_view is StudentView.RESIZE:
            lo = cv2.resize(hi, (g.lo_px, g.lo_px), interpolation=cv2.INTER_AREA)
        else:
            lo = read_tile_at(self.reader, self.lo_level, level0_xy, g.lo_px)
        return FieldPair(hi, lo, str(self.entry.path), level0_xy, self.student_view.value)

    def random_xy(self, rng: np.random.Generator) -> tuple[int, int]:
        """A tissue field corner, jittered within the candidate lattice step, kept on the slide."""
        cx, cy = self.candidates[rng.integers(len(self.candidates))]
        jitter = self.level0_side / _CANDIDATE_STEPS_PER_FIELD
        w0, h0 = self.reader.dimensions
        x = int(np.clip(cx + rng.uniform(-jitter, jitter) / 2, 0, max(w0 - self.level0_side, 0)))
        y = int(np.clip(cy + rng.uniform(-jitter, jitter) / 2, 0, max(h0 - self.level0_side, 0)))
        return x, y

    def close(self) -> None:
        self.reader.close()


class SlideFieldSampler:
    """Draws tissue fields from a list of slides (uniform over slides, then over positions)."""

    def __init__(self, slides: Sequence[SlideFields]):
        if not slides:
            raise ValueError("SlideFieldSampler needs at least one slide")
        self.slides = list(slides)

    @classmethod
    def from_config(
        cls, cfg: DataConfig, geometry: FieldGeometry, *, tissue_fn: TissueFn = _default_tissue
    ) -> SlideFieldSampler:
        return cls(
            [
                SlideFields(
                    e,
                    geometry,
                    student_view=cfg.student_view,
                    min_tissue=cfg.min_tissue,
                    allow_upsample=cfg.allow_upsample,
                    tissue_fn=tissue_fn,
                )
                for e in cfg.slides
            ]
        )

    def draw(self, n: int, rng: np.random.Generator) -> list[FieldPair]:
        out = []
        for _ in range(n):
            s = self.slides[rng.integers(len(self.slides))]
            out.append(s.read(s.random_xy(rng)))
        return out

    def close(self) -> None:
        for s in self.slides:
            s.close()


class CropFolder:
    """Paired crops on disk: ``hi/<id>.png``, ``lo/<id>.png`` and ``manifest.jsonl``.

    Also holds crops in memory (``CropFolder.from_pairs``) so tests and the demo draw from a fixed
    set exactly as training from a folder does.
    """

    def __init__(self, pairs: Sequence[FieldPair]):
        if not pairs:
            raise ValueError("CropFolder needs at least one crop")
        self.pairs = list(pairs)

    @classmethod
    def from_pairs(cls, pairs: Sequence[FieldPair]) -> CropFolder:
        return cls(pairs)

    @classmethod
    def load(cls, root: Path) -> CropFolder:
        """Read every crop listed in ``root/manifest.jsonl``.

        Raises:
            FileNotFoundError: the manifest or a listed image is missing.
        """
        manifest = Path(root) / MANIFEST_NAME
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found; write crops with `python -m training extract`"
            )
        pairs = []
        for line in manifest.read_text().splitlines():
            rec = json.loads(line)
            hi = np.asarray(Image.open(Path(root) / rec["hi"]).convert("RGB"))
            lo = np.asarray(Image.open(Path(root) / rec["lo"]).convert("RGB"))
            xy = tuple(rec.get("level0_xy", (-1, -1)))
            pairs.append(FieldPair(hi, lo, rec["slide"], (int(xy[0]), int(xy[1])), rec["view"]))
        return cls(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def draw(self, n: int, rng: np.random.Generator) -> list[FieldPair]:
        idx = rng.integers(len(self.pairs), size=n)
        return [self.pairs[i] for i in idx]

    def split(self, holdout: float, seed: int) -> tuple[CropFolder, CropFolder]:
        """(train, held-out) by crop; held-out gets ``max(1, round(holdout * n))`` crops."""
        order = np.random.default_rng(seed).permutation(len(self.pairs))
        n_out = max(1, round(holdout * len(self.pairs)))
        held = [self.pairs[i] for i in order[:n_out]]
        train = [self.pairs[i] for i in order[n_out:]]
        return CropFolder(train), CropFolder(held)


def pairs_to_arrays(pairs: Sequence[FieldPair]) -> tuple[np.ndarray, np.ndarray]:
    """Stack fields into (B, hi_px, hi_px, 3) and (B, lo_px, lo_px, 3) uint8 arrays."""
    return np.stack([p.hi for p in pairs]), np.stack([p.lo for p in pairs])
