"""Survival losses: Cox partial likelihood with tied times (Efron or Breslow), and the binary
horizon target (recurrence within 5 years; patients censored before the horizon are left out)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .config import Ties

__all__ = ["cox_loss", "horizon_targets"]


def cox_loss(risk: Tensor, time: Tensor, event: Tensor, ties: Ties | str = Ties.EFRON) -> Tensor:
    """Negative Cox partial log-likelihood per event (0 when the batch has no event).

    Args:
        risk: (N,) log-hazard ratios.
        time: (N,) follow-up times (any unit).
        event: (N,) 1 for an event, 0 for censoring.
        ties: ``efron`` (the default of lifelines and R's coxph) or ``breslow``.

    Tied event times: Breslow uses the full risk set for every tied event; Efron removes, for the
    l-th of d tied events (l = 0..d-1), l/d of the tied events' total hazard from the risk set.
    Built on N x N masks (fine for batches of hundreds of slides).
    """
    ties = Ties(ties)
    r = risk.reshape(-1)
    t = time.reshape(-1).to(r.dtype)
    e = event.reshape(-1).to(torch.bool)
    n_events = e.sum()
    shift = r.detach().max()
    hz = torch.exp(r - shift)
    at_risk = (t.unsqueeze(0) >= t.unsqueeze(1)).to(r.dtype)  # [i, j]: j still at risk at t_i
    risk_sum = at_risk @ hz  # (N,)
    if ties is Ties.EFRON:
        tied = ((t.unsqueeze(0) == t.unsqueeze(1)) & e.unsqueeze(0) & e.unsqueeze(1)).to(r.dtype)
        d = tied.sum(1).clamp(min=1.0)
        before = torch.tril(torch.ones_like(tied), diagonal=-1)
        rank = (tied * before).sum(1)  # l: how many tied events come before i (index order)
        risk_sum = risk_sum - rank / d * (tied @ hz)
    terms = (r - shift - torch.log(risk_sum)) * e.to(r.dtype)
    return -terms.sum() / n_events.clamp(min=1).to(r.dtype)


def horizon_targets(
    time: np.ndarray, event: np.ndarray, horizon: float
) -> tuple[np.ndarray, np.ndarray]:
    """(target, weight) float32 for "recurrence within ``horizon``": 1 if an event came by the
    horizon, 0 if followed past it, weight 0 (unknown) if censored before it."""
    t, e = np.asarray(time, np.float64), np.asarray(event).astype(bool)
    target = (e & (t <= horizon)).astype(np.float32)
    weight = ((t > horizon) | (e & (t <= horizon))).astype(np.float32)
    return target, weight
