"""A planted cohort built from real nuclei: risk driven by composition or by arrangement only.

No recurrence cohort can be reached from here, so the model is checked on slides where we know
what drives risk. The nuclei are real: every cell is a nucleus of the CoNSeP crops (HoVer-Net
paper, Apache-2.0; this repository keeps six crops with the tests) measured with
``xmag.cells.measure.measure_nuclei`` on the image and its annotated instance map, typed by the
pathologists' labels (inflammatory -> lymphocyte, epithelial -> tumour, spindle -> stromal;
"other" and nuclei cut by the crop border are left out). Only their placement is designed.

Each slide is a 4 x 2 grid of 100 um regions. Every region has the same 56 positions (a tumour
nest: 40 positions in a disc of radius 30 um; a margin: 16 positions on a ring at about 42 um),
with the positions themselves drawn at random per region.

* ``composition``: per region, cell-type counts drawn from proportions that follow the slide's
  factor f (more lymphocytes, fewer tumour cells as f grows); types are placed at random.
* ``arrangement``: every region has exactly 24 tumour, 16 lymphocyte and 16 stromal cells. In an
  *infiltrated* region the nest holds the 24 tumour cells and the 16 lymphocytes mixed, the
  margin the stroma; in a *separated* region the nest holds tumour and stroma, the lymphocytes
  wait in the margin. f is the fraction of infiltrated regions. Word counts per slide, type
  counts per region and the positions' distribution are the same whatever f is.

Hazard: log-hazard ratio ``beta * (0.5 - f)`` (immune cells near tumour: lower risk), exponential
times with a 5-year median at f = 0.5, uniform censoring between 2 and 12 years.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmag.cells.table import CellTable, type_code

from .io import save_cell_table

__all__ = [
    "CONSEP_MPP",
    "SIGNALS",
    "NucleusPool",
    "build_planted_cohort",
    "load_consep_pool",
]

CONSEP_MPP = 0.25  # um/px (40x)
SIGNALS = ("composition", "arrangement")
_CONSEP_TO_TYPE = {2: "lymphocyte", 3: "tumour", 4: "stromal"}  # 1 = other: left out
REGION_UM = 100.0
GRID = (4, 2)
NEST_RADIUS_UM, RING_RADIUS_UM = 30.0, 42.0
N_NEST, N_RING = 40, 16
MIN_SPACING_UM = 6.0


@dataclass(frozen=True)
class NucleusPool:
    """Measured real nuclei by type: features and contours centred on their centroid (px)."""

    features: dict[int, np.ndarray]  # type code -> (n, F)
    contours: dict[int, list[np.ndarray]]  # type code -> n (K, 2) px, centred
    sources: list[str]

    def counts(self) -> dict[str, int]:
        from xmag.cells.table import CELL_TYPES

        return {CELL_TYPES[k]: len(v) for k, v in self.features.items()}


def load_consep_pool(folder: Path) -> NucleusPool:
    """Measure every whole annotated nucleus of the CoNSeP crops in ``folder``.

    Each crop is ``<name>.jpg``, ``<name>_inst.npy`` (or the same map as a 16-bit
    ``<name>_inst.png``) and ``<name>_centroids.csv`` (inst_id, type, touches_border).

    Raises:
        FileNotFoundError: the folder holds no crop, or a crop's files are unreadable.
    """
    import cv2

    from xmag.cells.measure import measure_nuclei

    folder = Path(folder)
    stems = sorted(p.name.removesuffix("_centroids.csv") for p in folder.glob("*_centroids.csv"))
    if not stems:
        raise FileNotFoundError(
            f"no CoNSeP crops (*_centroids.csv with image and instances) in {folder}"
        )
    feats: dict[int, list[np.ndarray]] = {type_code(t): [] for t in _CONSEP_TO_TYPE.values()}
    conts: dict[int, list[np.ndarray]] = {k: [] for k in feats}
    for stem in stems:
        bgr = cv2.imread(str(folder / f"{stem}.jpg"), cv2.IMREAD_COLOR)
        npy, png = folder / f"{stem}_inst.npy", folder / f"{stem}_inst.png"
        labels = np.load(npy) if npy.is_file() else cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        if bgr is None or labels is None:
            raise FileNotFoundError(f"cannot read {stem}.jpg and {stem}_inst.npy/.png in {folder}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        table = measure_nuclei(rgb, labels.astype(np.int32), CONSEP_MPP)
        truth = {}
        with (folder / f"{stem}_centroids.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                truth[int(row["inst_id"])] = (int(row["type"]), int(row["touches_border"]))
        for i, lid in enumerate(table.meta["label_ids"]):
            consep_type, border = truth[int(lid)]
            if border or consep_type not in _CONSEP_TO_TYPE:
                continue
            code = type_code(_CONSEP_TO_TYPE[consep_type])
            feats[code].append(table.features[i])
            conts[code].append(table.contours_px[i] - table.xy_px[i])
    return NucleusPool(
        {k: np.asarray(v, np.float32) for k, v in feats.items()},
        conts,
        stems,
    )


def _positions(n: int, r_min: float, r_max: float, rng: np.random.Generator) -> np.ndarray:
    """n points uniform in the annulus r_min..r_max (um), at least MIN_SPACING_UM apart
    (rejection sampling; relaxes the spacing if the annulus is too crowded)."""
    pts: list[np.ndarray] = []
    spacing = MIN_SPACING_UM
    tries = 0
    while len(pts) < n:
        r = np.sqrt(rng.uniform(r_min**2, r_max**2))
        a = rng.uniform(0, 2 * np.pi)
        p = np.array([r * np.cos(a), r * np.sin(a)])
        if all(np.hypot(*(p - q)) >= spacing for q in pts):
            pts.append(p)
        tries += 1
        if tries > 200 * n:
            spacing *= 0.9
            tries = 0
    return np.asarray(pts)


def _region_types(signal: str, f: float, infiltrated: bool, rng: np.random.Generator):
    """(nest types (N_NEST,), ring types (N_RING,)) as type codes."""
    t, ly, st = type_code("tumour"), type_code("lymphocyte"), type_code("stromal")
    if signal == "arrangement":
        nest = np.array([t] * 24 + ([ly] if infiltrated else [st]) * 16)
        ring = np.array(([st] if infiltrated else [ly]) * 16)
        return rng.permutation(nest), ring
    p_l = 0.08 + 0.40 * f
    p_t = (1 - p_l) * 0.6
    allt = rng.choice([ly, t, st], size=N_NEST + N_RING, p=[p_l, p_t, 1 - p_l - p_t])
    return allt[:N_NEST], allt[N_NEST:]


def build_planted_slide(
    pool: NucleusPool, signal: str, f: float, rng: np.random.Generator
) -> CellTable:
    """One slide (GRID regions) whose risk factor is ``f`` in [0, 1] (see module doc)."""
    n_regions = GRID[0] * GRID[1]
    n_inf = round(f * n_regions)
    infiltrated = rng.permutation([True] * n_inf + [False] * (n_regions - n_inf))
    xy, feats, types, contours = [], [], [], []
    for r in range(n_regions):
        centre = (np.array([r % GRID[0], r // GRID[0]]) + 0.5) * REGION_UM
        nest_t, ring_t = _region_types(signal, f, bool(infiltrated[r]), rng)
        pos = np.concatenate(
            [
                _positions(N_NEST, 0.0, NEST_RADIUS_UM, rng),
                _positions(N_RING, RING_RADIUS_UM - 4, RING_RADIUS_UM + 4, rng),
            ]
        )
        for p, code in zip(pos, np.concatenate([nest_t, ring_t]), strict=True):
            j = int(rng.integers(len(pool.features[code])))
            xy.append(centre + p)
            feats.append(pool.features[code][j])
            types.append(code)
            contours.append(pool.contours[code][j] + (centre + p) / CONSEP_MPP)
    return CellTable(
        xy_um=np.asarray(xy),
        features=np.asarray(feats),
        types=np.asarray(types),
        contours_px=contours,
        mpp=CONSEP_MPP,
        source="planted-consep",
        meta={"f": f, "signal": signal},
    )


def build_planted_cohort(
    out: Path,
    signal: str,
    n_slides: int = 80,
    *,
    beta: float = 8.0,
    seed: int = 0,
    pool: NucleusPool,
) -> Path:
    """Write ``out/cells/<slide>/cells.npz``, ``out/labels.csv`` and ``out/truth.csv``.

    Labels carry two subgroup columns unrelated to risk (``stage``, ``sex``) to exercise the
    subgroup table. Returns the labels CSV path.

    Raises:
        ValueError: an unknown signal.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    rng = np.random.default_rng([seed, SIGNALS.index(signal)])
    out = Path(out)
    n_regions = GRID[0] * GRID[1]
    if signal == "arrangement":
        f_all = rng.integers(0, n_regions + 1, n_slides) / n_regions
    else:
        f_all = rng.uniform(0, 1, n_slides)
    log_hr = beta * (0.5 - f_all)
    base = np.log(2) / 5.0  # 5-year median at log_hr = 0
    t_event = rng.exponential(1.0 / (base * np.exp(log_hr)))
    t_cens = rng.uniform(2.0, 12.0, n_slides)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    labels = out / "labels.csv"
    out.mkdir(parents=True, exist_ok=True)
    with labels.open("w", newline="") as fh, (out / "truth.csv").open("w", newline="") as th:
        lw, tw = csv.writer(fh), csv.writer(th)
        lw.writerow(["patient", "slide", "time", "event", "stage", "sex"])
        tw.writerow(["slide", "f", "log_hazard_ratio"])
        for i in range(n_slides):
            slide = f"S{i:03d}"
            table = build_planted_slide(pool, signal, float(f_all[i]), rng)
            save_cell_table(table, out / "cells" / slide / "cells.npz")
            stage = "I" if rng.random() < 0.5 else "II"
            sex = "F" if rng.random() < 0.5 else "M"
            lw.writerow([f"P{i:03d}", slide, f"{time[i]:.4f}", event[i], stage, sex])
            tw.writerow([slide, f"{f_all[i]:.4f}", f"{log_hr[i]:.4f}"])
    return labels
