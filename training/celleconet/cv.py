"""Cross-validation by patient on a cohort of slides-as-cell-tables, and its report.

Folds: patients (not slides) are dealt to k folds, stratified by whether they recurred, so no
patient has slides on both sides. Every method in ``METHODS`` is fitted on the same folds.

Pooling out-of-fold predictions: each fold's model has its own risk scale, so test risks are
standardised by the mean and sd of that model's risks on its own *training* slides, and a test
patient is "high risk" when above the median training risk of that fold (no test information
is used to set either). A patient's risk is the mean over their slides. Statistics: see
``metrics.py`` (lifelines / scikit-survival).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import CelleconetConfig
from .io import LabelRow, load_slide_cells, read_labels
from .methods import METHODS, SlideData
from .metrics import concordance, plot_kaplan_meier, survival_metrics
from .sentences import build_sentences

__all__ = [
    "Cohort",
    "CvResult",
    "cross_validate",
    "load_cohort",
    "patient_folds",
    "write_report",
]


@dataclass(frozen=True)
class Cohort:
    rows: list[LabelRow]
    data: SlideData

    @property
    def patients(self) -> list[str]:
        return [r.patient for r in self.rows]


def load_cohort(cells_dir: Path, labels_csv: Path, cfg: CelleconetConfig) -> Cohort:
    """Slides of the labels CSV read from ``cells_dir/<slide>/`` and cut into sentences."""
    rows = read_labels(labels_csv)
    by_patient: dict[str, tuple[float, int]] = {}
    for r in rows:
        if by_patient.setdefault(r.patient, (r.time, r.event)) != (r.time, r.event):
            raise ValueError(f"patient {r.patient!r} has slides with different time/event")
    tables = [load_slide_cells(Path(cells_dir) / r.slide) for r in rows]
    sentences = []
    for r, t in zip(rows, tables, strict=True):
        try:
            sentences.append(build_sentences(t, cfg.sentences))
        except ValueError as exc:
            raise ValueError(f"slide {r.slide!r}: {exc}") from exc
    data = SlideData(
        names=[r.slide for r in rows],
        sentences=sentences,
        features=[t.features for t in tables],
        types=[t.types for t in tables],
        time=np.array([r.time for r in rows], np.float64),
        event=np.array([r.event for r in rows], np.int64),
    )
    return Cohort(rows, data)


def patient_folds(
    patients: Sequence[str], event: np.ndarray, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) slide indices per fold; patients stratified by event, dealt round-robin.

    Raises:
        ValueError: fewer patients than folds.
    """
    names = sorted(set(patients))
    if len(names) < k:
        raise ValueError(f"{len(names)} patients cannot fill {k} folds")
    ev = {p: 0 for p in names}
    for p, e in zip(patients, event, strict=True):
        ev[p] = max(ev[p], int(e))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for stratum in (0, 1):
        members = [p for p in names if ev[p] == stratum]
        for j, i in enumerate(rng.permutation(len(members))):
            fold_of[members[i]] = (j + offset) % k
        offset += len(members)
    f = np.array([fold_of[p] for p in patients])
    idx = np.arange(len(patients))
    return [(idx[f != i], idx[f == i]) for i in range(k)]


@dataclass
class CvResult:
    methods: dict[str, dict[str, Any]]
    config: dict[str, Any]
    shuffled_labels: bool
    folds: int
    patient_predictions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folds": self.folds,
            "shuffled_labels": self.shuffled_labels,
            "config": self.config,
            "methods": self.methods,
        }


def _shuffle_patients(cohort: Cohort, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels permuted among patients (a patient's slides keep one label)."""
    names = sorted(set(cohort.patients))
    lab = {r.patient: (r.time, r.event) for r in cohort.rows}
    perm = np.random.default_rng([seed, 7]).permutation(len(names))
    new = {names[i]: lab[names[j]] for i, j in enumerate(perm)}
    t = np.array([new[p][0] for p in cohort.patients], np.float64)
    e = np.array([new[p][1] for p in cohort.patients], np.int64)
    return t, e


def cross_validate(
    cohort: Cohort,
    cfg: CelleconetConfig,
    methods: Sequence[str] = tuple(METHODS),
    *,
    shuffle_labels: bool = False,
) -> CvResult:
    """k-fold CV by patient of each method; pooled and per-fold statistics (see module doc)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    data = cohort.data
    if shuffle_labels:
        t, e = _shuffle_patients(cohort, cfg.train.seed)
        data = data.with_labels(t, e)
    folds = patient_folds(cohort.patients, data.event, cfg.train.folds, cfg.train.seed)
    patients = np.array(cohort.patients)
    horizon = cfg.train.horizon_years
    result = CvResult({}, cfg.model_dump(mode="json"), shuffle_labels, cfg.train.folds)
    for name in methods:
        z = np.zeros(len(patients))
        cut = np.zeros(len(patients))
        prob = np.full(len(patients), np.nan)
        fold_c, extras = [], []
        for f, (train, test) in enumerate(folds):
            out = METHODS[name](data, train, test, cfg)
            mu, sd = out.risk_train.mean(), out.risk_train.std() + 1e-8
            z[test] = (out.risk_test - mu) / sd
            cut[test] = (np.median(out.risk_train) - mu) / sd
            if out.prob_test is not None:
                prob[test] = out.prob_test
            pt, te, tr = _per_patient(patients[test], data.time[test], data.event[test], z[test])
            fold_c.append(concordance(te, tr, pt) if tr.sum() > 0 else float("nan"))
            extras.append({k: v for k, v in out.extras.items() if k != "model"} | {"fold": f})
        risk, time, event = _per_patient(patients, data.time, data.event, z)
        high, _, _ = _per_patient(patients, data.time, data.event, (z > cut).astype(float))
        p5, _, _ = _per_patient(patients, data.time, data.event, prob)
        pooled = survival_metrics(time, event, risk, high > 0.5, horizon)
        result.methods[name] = {
            "fold_c_index": fold_c,
            "mean_fold_c_index": float(np.nanmean(fold_c)),
            "pooled": pooled,
            "subgroups": _subgroups(cohort, data, z, cut, horizon),
            "fold_details": extras,
        }
        result.patient_predictions[name] = {
            "patient": sorted(set(patients)),
            "risk": risk.tolist(),
            "high": (high > 0.5).tolist(),
            "prob_horizon": p5.tolist(),
            "time": time.tolist(),
            "event": event.tolist(),
        }
    return result


def _per_patient(
    patients: np.ndarray, time: np.ndarray, event: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean value, time, event) per patient, patients in sorted order."""
    names = sorted(set(patients))
    pos = {p: i for i, p in enumerate(names)}
    ix = np.array([pos[p] for p in patients])
    n = np.bincount(ix, minlength=len(names))
    v = np.bincount(ix, weights=value, minlength=len(names)) / n
    t = np.zeros(len(names))
    e = np.zeros(len(names), np.int64)
    t[ix], e[ix] = time, event
    return v, t, e


def _subgroups(
    cohort: Cohort, data: SlideData, z: np.ndarray, cut: np.ndarray, horizon: float
) -> dict[str, dict[str, Any]]:
    cols = sorted({c for r in cohort.rows for c in r.subgroups})
    table: dict[str, dict[str, Any]] = {}
    patients = np.array(cohort.patients)
    for col in cols:
        values = np.array([r.subgroups.get(col, "") for r in cohort.rows])
        for v in sorted(set(values)):
            sel = values == v
            risk, time, event = _per_patient(patients[sel], data.time[sel], data.event[sel], z[sel])
            high, _, _ = _per_patient(
                patients[sel], data.time[sel], data.event[sel], (z[sel] > cut[sel]).astype(float)
            )
            key = f"{col}={v}"
            if len(time) < 5 or event.sum() == 0:
                table[key] = {"n": len(time), "events": int(event.sum()), "note": "too few"}
                continue
            table[key] = survival_metrics(time, event, risk, high > 0.5, horizon)
    return table


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def write_report(result: CvResult, out: Path, title: str, horizon: float) -> Path:
    """``report.json``, ``report.md``, ``km_<method>.png`` and ``predictions.json`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    (out / "predictions.json").write_text(json.dumps(result.patient_predictions, indent=1))
    lines = [
        f"# {title}",
        "",
        f"{result.folds}-fold cross-validation by patient"
        + (" on SHUFFLED labels (a null check)" if result.shuffled_labels else "")
        + f"; horizon {horizon:g} years. Pooled = out-of-fold risks standardised per fold.",
        "",
        "| method | C-index (pooled) | C-index (fold mean) | AUC@horizon | HR high/low [95% CI]"
        " | log-rank p |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result.methods.items():
        p = m["pooled"]
        ci = p["hr_ci95"]
        hr = f"{_fmt(p['hr'], '.2f')} [{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}]" if ci else "n/a"
        lines.append(
            f"| {name} | {_fmt(p['c_index'])} | {_fmt(m['mean_fold_c_index'])} "
            f"| {_fmt(p['td_auc'])} | {hr} | {_fmt(p['logrank_p'], '.2g')} |"
        )
    lines += [
        "",
        "Methods: `celleconet` = the contextual model (masked-word pretraining, then Cox + 5-year"
        " head); `bag_of_cells` = word and type frequencies per slide, no positions (ridge Cox);"
        " `abmil_region_means` = gated attention MIL over each region's mean cell features, a"
        " stand-in for ABMIL on 5x tile embeddings (these inputs are cell tables, no pixels).",
        "",
        "## Kaplan-Meier curves (out-of-fold high vs low risk)",
        "",
    ]
    for name in result.methods:
        pred = result.patient_predictions[name]
        png = plot_kaplan_meier(
            np.array(pred["time"]),
            np.array(pred["event"]),
            np.array(pred["high"]),
            out / f"km_{name}.png",
            f"{name}: out-of-fold high vs low risk",
            horizon,
        )
        lines.append(f"![{name}]({png.name})")
    for name, m in result.methods.items():
        if not m["subgroups"]:
            continue
        lines += ["", f"## Subgroups: {name}", "", "| subgroup | n | events | C-index | HR |"]
        lines.append("|---|---|---|---|---|")
        for key, s in m["subgroups"].items():
            lines.append(
                f"| {key} | {s['n']} | {s['events']} | {_fmt(s.get('c_index'))} "
                f"| {_fmt(s.get('hr'), '.2f')} |"
            )
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
