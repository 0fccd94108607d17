"""Fitting: masked-word pretraining, survival fitting (Cox + horizon head), prediction.

Pretraining hides ``mask_fraction`` of a region's cells (their word and type become ``[MASK]``,
position kept) and predicts each hidden cell's word from the rest of the region: no labels. The
survival fit then trains the whole model on Cox partial likelihood (risk sets within a minibatch
of slides) plus a weighted binary loss for recurrence within the horizon, keeping a small
masked-word loss as a regulariser (the hidden cells double as word dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from .losses import cox_loss, horizon_targets
from .model import CellEcoNet

__all__ = [
    "MODEL_INPUTS",
    "fit_survival",
    "mlm_accuracy",
    "predict",
    "pretrain_mlm",
    "to_tensors",
]

#: Names of ``CellEcoNet.forward``'s inputs, in order (as ``stack_slides`` names its arrays).
MODEL_INPUTS = (
    "words",
    "types",
    "xy_um",
    "nbr_index",
    "nbr_mask",
    "cell_mask",
    "region_mask",
)


def to_tensors(arrays: dict[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, Tensor]:
    """Model inputs as tensors (rows ``index`` of the batch axis when given)."""
    sel = slice(None) if index is None else np.asarray(index)
    return {k: torch.as_tensor(arrays[k][sel]) for k in MODEL_INPUTS}


def _rotate(xy: Tensor, gen: torch.Generator) -> Tensor:
    """Rotate each region (all axes but the last two are regions) by its own random angle."""
    theta = torch.rand(xy.shape[:-2], generator=gen) * 2 * math.pi
    c, s = theta.cos()[..., None], theta.sin()[..., None]
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def _schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of steps, then cosine decay to 0."""
    warm = max(1, total // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _sample_regions(x: dict[str, Tensor], k: int, gen: torch.Generator) -> dict[str, Tensor]:
    """k regions per slide, drawn among its valid ones (padding only where a slide has fewer)."""
    b, r = x["region_mask"].shape
    if k >= r:
        return x
    score = torch.rand((b, r), generator=gen) + x["region_mask"].to(torch.float32)
    pick = score.topk(k, dim=1).indices  # valid regions score above 1, padding below
    out = {}
    for key, v in x.items():
        idx = pick.reshape(b, k, *([1] * (v.dim() - 2))).expand(b, k, *v.shape[2:])
        out[key] = torch.gather(v, 1, idx)
    return out


def _hide(cell_mask: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    return (torch.rand(cell_mask.shape, generator=gen) < fraction) & cell_mask


@dataclass
class _Regions:
    """All valid regions of some slides, flattened to (N, M) for the region encoder."""

    t: dict[str, Tensor]

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], slides: np.ndarray) -> _Regions:
        keep = arrays["region_mask"][slides]
        return cls({k: torch.as_tensor(arrays[k][slides][keep]) for k in MODEL_INPUTS[:-1]})

    def __len__(self) -> int:
        return int(self.t["words"].shape[0])


def pretrain_mlm(
    model: CellEcoNet,
    arrays: dict[str, np.ndarray],
    slides: np.ndarray,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> dict[str, float]:
    """Masked-word pretraining on the regions of ``slides``; returns the last steps' loss."""
    reg = _Regions.of(arrays, slides)
    if cfg.pretrain_steps == 0 or len(reg) == 0:
        return {"steps": 0}
    params = list(model.encoder.parameters()) + list(model.mlm.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.pretrain_steps)
    model.train()
    losses = []
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(reg), (min(cfg.pretrain_batch_regions, len(reg)),), generator=gen)
        b = {k: v[idx] for k, v in reg.t.items()}
        hide = _hide(b["cell_mask"], cfg.mask_fraction, gen)
        xy = _rotate(b["xy_um"], gen) if cfg.rotate else b["xy_um"]
        h = model.encoder(
            b["words"], b["types"], xy, b["nbr_index"], b["nbr_mask"], b["cell_mask"], hide
        )
        loss = F.cross_entropy(model.mlm(h[hide]), b["words"][hide])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"steps": cfg.pretrain_steps, "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def mlm_accuracy(
    model: CellEcoNet,
    arrays: dict[str, np.ndarray],
    slides: np.ndarray,
    fraction: float,
    seed: int,
    train_words: np.ndarray,
) -> dict[str, float]:
    """Held-out masked-word accuracy of the model and of guessing the most frequent training
    word (the context-free baseline); cross-entropy vs the training unigram entropy."""
    reg = _Regions.of(arrays, slides)
    gen = torch.Generator().manual_seed(seed)
    b = reg.t
    hide = _hide(b["cell_mask"], fraction, gen)
    model.eval()
    h = model.encoder(
        b["words"], b["types"], b["xy_um"], b["nbr_index"], b["nbr_mask"], b["cell_mask"], hide
    )
    logits = model.mlm(h[hide])
    target = b["words"][hide]
    freq = np.bincount(train_words, minlength=logits.shape[1]).astype(np.float64) + 1.0
    freq /= freq.sum()
    t = target.numpy()
    return {
        "hidden_cells": int(hide.sum()),
        "accuracy": float((logits.argmax(1) == target).float().mean()),
        "unigram_accuracy": float(np.mean(t == freq.argmax())),
        "cross_entropy": float(F.cross_entropy(logits, target)),
        "unigram_cross_entropy": float(-np.mean(np.log(freq[t]))),
    }


def fit_survival(
    model: CellEcoNet,
    arrays: dict[str, np.ndarray],
    slides: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Fit ``model`` on ``slides`` (indices into ``arrays``) with their ``time`` and ``event``."""
    target, weight = horizon_targets(time, event, cfg.horizon_years)
    t_time = torch.as_tensor(np.asarray(time, np.float32))
    t_event = torch.as_tensor(np.asarray(event, np.float32))
    t_target, t_weight = torch.as_tensor(target), torch.as_tensor(weight)
    n = len(slides)
    n_batches = max(1, round(n / cfg.batch_slides))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.epochs * n_batches)
    model.train()
    history = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        for part in np.array_split(perm, n_batches):
            x = to_tensors(arrays, slides[part])
            if cfg.regions_per_step is not None:
                x = _sample_regions(x, cfg.regions_per_step, gen)
            if cfg.rotate:
                x["xy_um"] = _rotate(x["xy_um"], gen)
            hide = _hide(x["cell_mask"], cfg.mask_fraction / 2, gen)
            out = model.forward_train(**x, hide=hide)
            loss = cox_loss(out["risk"], t_time[part], t_event[part], cfg.ties)
            w = t_weight[part]
            if cfg.binary_weight > 0 and w.sum() > 0:
                bce = F.binary_cross_entropy_with_logits(
                    out["logit"], t_target[part], weight=w, reduction="sum"
                )
                loss = loss + cfg.binary_weight * bce / w.sum()
            if cfg.mlm_weight > 0 and hide.any():
                mlm = F.cross_entropy(out["mlm_logits"][hide], x["words"][hide])
                loss = loss + cfg.mlm_weight * mlm
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append(loss.item())
    return {"epochs": cfg.epochs, "final_loss": float(np.mean(history[-n_batches:]))}


@torch.no_grad()
def predict(
    model: CellEcoNet, arrays: dict[str, np.ndarray], slides: np.ndarray, batch: int = 32
) -> dict[str, np.ndarray]:
    """``risk``, ``probability`` (B,), ``region_attention`` (B, R), ``cell_attention`` (B, R, M)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {
        "risk": [],
        "probability": [],
        "region_attention": [],
        "cell_attention": [],
    }
    for i in range(0, len(slides), batch):
        outs = model(*to_tensors(arrays, slides[i : i + batch]).values())
        for key, val in zip(parts, outs, strict=True):
            parts[key].append(val.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
