"""Slides as cell tables on disk, and the labels CSV.

Layout: one folder per slide (``<cells_dir>/<slide>/``) holding one or more ``*.npz`` files,
each the fields of one ``xmag.cells.table.CellTable`` (a region or the whole slide). Contours are
stored ragged (``contour_points`` (P, 2) and ``contour_offsets`` (N+1,)). A slide's files are
joined with ``CellTable.concat``; regions with different origins need ``level0_mpp`` stored in
the file.

Labels CSV: ``patient,slide,time,event`` (time in years; event 1 = recurrence, 0 = censored);
any further column is a subgroup (stage, sex, site...).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmag.cells.table import CellTable

__all__ = [
    "LABEL_COLUMNS",
    "LabelRow",
    "load_cell_table",
    "load_slide_cells",
    "read_labels",
    "save_cell_table",
]

LABEL_COLUMNS = ("patient", "slide", "time", "event")


def save_cell_table(table: CellTable, path: Path, *, level0_mpp: float | None = None) -> Path:
    """Write ``table`` as an npz of its fields (``level0_mpp`` kept for joining regions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(c) for c in table.contours_px], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    points = (
        np.concatenate(table.contours_px).astype(np.float32)
        if table.contours_px
        else np.zeros((0, 2), np.float32)
    )
    np.savez_compressed(
        path,
        xy_um=table.xy_um,
        features=table.features,
        types=table.types,
        contour_points=points,
        contour_offsets=offsets,
        mpp=np.float64(table.mpp),
        source=np.str_(table.source),
        origin_px=np.asarray(table.origin_px, np.float64),
        level0_mpp=np.float64(np.nan if level0_mpp is None else level0_mpp),
    )
    return path


def load_cell_table(path: Path) -> tuple[CellTable, float | None]:
    """(table, level0_mpp or None) from a file written by ``save_cell_table``."""
    with np.load(Path(path), allow_pickle=False) as z:
        off = z["contour_offsets"]
        pts = z["contour_points"]
        table = CellTable(
            xy_um=z["xy_um"],
            features=z["features"],
            types=z["types"],
            contours_px=[pts[off[i] : off[i + 1]] for i in range(len(off) - 1)],
            mpp=float(z["mpp"]),
            source=str(z["source"]),
            origin_px=(float(z["origin_px"][0]), float(z["origin_px"][1])),
        )
        l0 = float(z["level0_mpp"])
    return table, (None if np.isnan(l0) else l0)


def load_slide_cells(folder: Path) -> CellTable:
    """All cells of one slide: the ``*.npz`` files of ``folder`` joined in name order.

    Raises:
        FileNotFoundError: the folder holds no npz file.
    """
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise FileNotFoundError(
            f"no cell files (*.npz) in {folder}; write them with "
            "training.celleconet.io.save_cell_table"
        )
    loaded = [load_cell_table(f) for f in files]
    if len(loaded) == 1:
        return loaded[0][0]
    l0 = next((m for _, m in loaded if m is not None), None)
    return CellTable.concat([t for t, _ in loaded], level0_mpp=l0)


@dataclass(frozen=True)
class LabelRow:
    patient: str
    slide: str
    time: float  # years from resection to recurrence or censoring
    event: int  # 1 recurrence, 0 censored
    subgroups: dict[str, str] = field(default_factory=dict)


def read_labels(path: Path) -> list[LabelRow]:
    """Rows of a labels CSV ``patient,slide,time,event[,subgroup...]`` in file order.

    Raises:
        ValueError: a column is missing, a time is not positive, or an event is not 0/1.
    """
    rows: list[LabelRow] = []
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in LABEL_COLUMNS if c not in cols]
        if missing:
            raise ValueError(
                f"{path} lacks the columns {missing} (needs {LABEL_COLUMNS}, got {cols})"
            )
        extra = [c for c in cols if c not in LABEL_COLUMNS]
        for i, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            time, event = float(row["time"]), row["event"]
            if not time > 0:
                raise ValueError(f"{path} line {i}: time must be > 0 years, got {row['time']!r}")
            if event not in ("0", "1"):
                raise ValueError(f"{path} line {i}: event must be 0 or 1, got {event!r}")
            rows.append(
                LabelRow(row["patient"], row["slide"], time, int(event), {c: row[c] for c in extra})
            )
    if len({r.slide for r in rows}) != len(rows):
        raise ValueError(f"{path}: a slide is listed twice")
    return rows
