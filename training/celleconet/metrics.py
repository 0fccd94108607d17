"""Survival statistics from lifelines and scikit-survival (none written here), and plots.

* C-index: ``lifelines.utils.concordance_index`` (Harrell's; higher risk = earlier event).
* Time-dependent AUC at the horizon: ``sksurv.metrics.cumulative_dynamic_auc`` (cumulative
  cases / dynamic controls, inverse-probability-of-censoring weights estimated on the reference
  set).
* High vs low risk: ``lifelines.CoxPHFitter`` on the group indicator (hazard ratio, 95% CI, Wald
  p) and ``lifelines.statistics.logrank_test``; Kaplan-Meier curves from
  ``lifelines.KaplanMeierFitter``.

Warnings raised by the libraries are recorded in the result (``warnings``), not hidden.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "concordance",
    "group_survival",
    "plot_kaplan_meier",
    "survival_metrics",
    "time_dependent_auc",
]


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of ``risk`` (higher = earlier recurrence)."""
    from lifelines.utils import concordance_index

    return float(concordance_index(np.asarray(time), -np.asarray(risk), np.asarray(event)))


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, np.float64))


def time_dependent_auc(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    horizon: float,
    ref_time: np.ndarray | None = None,
    ref_event: np.ndarray | None = None,
) -> tuple[float | None, str | None]:
    """(AUC at ``horizon`` or None, the reason when None). The censoring distribution is
    estimated on the reference set (the evaluated set itself by default)."""
    from sksurv.metrics import cumulative_dynamic_auc

    ref = _surv(time if ref_time is None else ref_time, event if ref_event is None else ref_event)
    try:
        auc, _ = cumulative_dynamic_auc(ref, _surv(time, event), np.asarray(risk), [horizon])
    except ValueError as exc:  # no case or no control at the horizon, or horizon past follow-up
        return None, str(exc)
    return float(np.asarray(auc).reshape(-1)[0]), None


def group_survival(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """Hazard ratio of ``high`` vs the rest (Cox, 95% CI, Wald p) and the log-rank p."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError
    from lifelines.statistics import logrank_test

    t, e, h = np.asarray(time, float), np.asarray(event).astype(int), np.asarray(high).astype(bool)
    out: dict[str, Any] = {
        "n_high": int(h.sum()),
        "n_low": int((~h).sum()),
        "events_high": int(e[h].sum()),
        "events_low": int(e[~h].sum()),
        "hr": None,
        "hr_ci95": None,
        "hr_p": None,
        "logrank_p": None,
        "warnings": [],
    }
    if h.sum() < 2 or (~h).sum() < 2 or e.sum() == 0:
        out["warnings"].append("a group has fewer than 2 patients or there is no event")
        return out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lr = logrank_test(t[h], t[~h], e[h], e[~h])
        out["logrank_p"] = float(lr.p_value)
        if out["events_high"] == 0 or out["events_low"] == 0:
            # the Cox estimate runs off to 0 or infinity: no HR rather than a huge one
            out["warnings"].append("a group has no event: the hazard ratio is not estimable")
        else:
            try:
                df = pd.DataFrame({"time": t, "event": e, "high": h.astype(float)})
                cph = CoxPHFitter().fit(df, duration_col="time", event_col="event")
                s = cph.summary.loc["high"]
                out["hr"] = float(s["exp(coef)"])
                lo, hi = float(s["exp(coef) lower 95%"]), float(s["exp(coef) upper 95%"])
                out["hr_ci95"] = [lo, hi]
                out["hr_p"] = float(s["p"])
            except ConvergenceError as exc:
                out["warnings"].append(f"Cox fit did not converge: {exc}")
    out["warnings"] += sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return out


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    high: np.ndarray,
    horizon: float,
) -> dict[str, Any]:
    """C-index, AUC at the horizon and the high/low comparison for one set of patients."""
    auc, why = time_dependent_auc(time, event, risk, horizon)
    return {
        "n": len(time),
        "events": int(np.sum(event)),
        "c_index": concordance(time, event, risk),
        "td_auc": auc,
        "td_auc_note": why,
        **group_survival(time, event, high),
    }


def plot_kaplan_meier(
    time: np.ndarray,
    event: np.ndarray,
    high: np.ndarray,
    path: Path,
    title: str,
    horizon: float | None = None,
) -> Path:
    """Kaplan-Meier curves (with 95% bands) of the high and low risk groups as a PNG."""
    from lifelines import KaplanMeierFitter
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    t, e, h = np.asarray(time, float), np.asarray(event).astype(int), np.asarray(high).astype(bool)
    for grp, label, colour in ((~h, "low risk", "tab:blue"), (h, "high risk", "tab:red")):
        if grp.sum() == 0:
            continue
        kmf = KaplanMeierFitter(label=f"{label} (n={int(grp.sum())})")
        kmf.fit(t[grp], e[grp])
        kmf.plot_survival_function(ax=ax, color=colour, ci_show=True)
    if horizon is not None:
        ax.axvline(horizon, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("years")
    ax.set_ylabel("recurrence-free")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
