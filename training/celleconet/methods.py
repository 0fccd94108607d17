"""Methods compared on the same folds, in a registry (``METHODS``; duplicates refused).

Each method is ``fit_predict(data, train, test, cfg) -> MethodOutput``: it fits on the slides
``train`` (indices) and returns log-risks for the training and the test slides. Everything fitted
from data (codebook, standardiser, network) sees the training slides only.

* ``celleconet``: the contextual model (``model.py``), masked-word pretraining then survival.
* ``bag_of_cells``: word and type frequencies per slide (no positions, no neighbours), a
  ridge-penalised linear Cox model: what a slide "says" without grammar.
* ``abmil_region_means``: gated attention MIL (``training.models.GatedAttentionMIL``) over each
  region's mean standardised cell features. A stand-in for ABMIL on 5x tile embeddings, which
  this cohort has no pixels for: it sees each region's average nucleus, not how cells are placed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xmag.cells.table import CELL_TYPES

from .config import CelleconetConfig
from .losses import cox_loss, horizon_targets
from .model import CellEcoNet
from .sentences import SlideSentences, stack_slides
from .train import fit_survival, mlm_accuracy, predict, pretrain_mlm
from .vocab import Codebook, fit_codebook

__all__ = ["METHODS", "MethodOutput", "SlideData", "register_method"]


@dataclass(frozen=True)
class SlideData:
    """What the methods read: each slide's sentences and raw per-cell arrays, plus labels."""

    names: list[str]
    sentences: list[SlideSentences]
    features: list[np.ndarray]  # (N_i, len(FEATURE_NAMES)) per slide
    types: list[np.ndarray]  # (N_i,) int8 per slide
    time: np.ndarray  # (S,) years
    event: np.ndarray  # (S,) 0/1
    #: codebooks fitted per training set, shared by the methods of a fold (not data)
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def with_labels(self, time: np.ndarray, event: np.ndarray) -> SlideData:
        return SlideData(self.names, self.sentences, self.features, self.types, time, event)


@dataclass
class MethodOutput:
    risk_train: np.ndarray
    risk_test: np.ndarray
    prob_test: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)


FitPredict = Callable[[SlideData, np.ndarray, np.ndarray, CelleconetConfig], MethodOutput]
METHODS: dict[str, FitPredict] = {}


def register_method(name: str) -> Callable[[FitPredict], FitPredict]:
    def deco(fn: FitPredict) -> FitPredict:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = fn
        return fn

    return deco


def _codebook(data: SlideData, train: np.ndarray, cfg: CelleconetConfig) -> Codebook:
    key = (np.asarray(train).tobytes(), cfg.vocab.model_dump_json())
    if key not in data.cache:
        data.cache[key] = fit_codebook(
            [data.features[i] for i in train], cfg.vocab, [data.types[i] for i in train]
        )
    return data.cache[key]


@register_method("celleconet")
def fit_predict_celleconet(
    data: SlideData, train: np.ndarray, test: np.ndarray, cfg: CelleconetConfig
) -> MethodOutput:
    codebook = _codebook(data, train, cfg)
    words = [codebook.assign(f, t) for f, t in zip(data.features, data.types, strict=True)]
    arrays = stack_slides(data.sentences, words)
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model = CellEcoNet(codebook.n_words, cfg.model, seed=cfg.train.seed)
    pre = pretrain_mlm(model, arrays, train, cfg.train, gen)
    train_words = np.concatenate([words[i] for i in train])
    mlm = mlm_accuracy(model, arrays, test, cfg.train.mask_fraction, cfg.train.seed, train_words)
    fit = fit_survival(model, arrays, train, data.time[train], data.event[train], cfg.train, gen)
    p_train, p_test = predict(model, arrays, train), predict(model, arrays, test)
    return MethodOutput(
        p_train["risk"],
        p_test["risk"],
        p_test["probability"],
        {"pretrain": pre, "heldout_masked_words": mlm, "fit": fit, "model": model},
    )


def _bag_vectors(data: SlideData, codebook: Codebook) -> np.ndarray:
    rows = []
    for f, t in zip(data.features, data.types, strict=True):
        w = np.bincount(codebook.assign(f, t), minlength=codebook.n_words) / max(len(f), 1)
        ty = np.bincount(t.astype(np.int64), minlength=len(CELL_TYPES)) / max(len(t), 1)
        rows.append(np.concatenate([w, ty, [np.log1p(len(f))]]))
    return np.asarray(rows, np.float64)


@register_method("bag_of_cells")
def fit_predict_bag_of_cells(
    data: SlideData, train: np.ndarray, test: np.ndarray, cfg: CelleconetConfig
) -> MethodOutput:
    codebook = _codebook(data, train, cfg)
    x = _bag_vectors(data, codebook)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = torch.as_tensor((x - mu) / sd, dtype=torch.float32)
    target, weight = horizon_targets(data.time, data.event, cfg.train.horizon_years)
    beta = torch.zeros(z.shape[1], 2, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    tt = torch.as_tensor(train)
    time = torch.as_tensor(data.time[train], dtype=torch.float32)
    event = torch.as_tensor(data.event[train], dtype=torch.float32)
    y, w = torch.as_tensor(target[train]), torch.as_tensor(weight[train])
    opt = torch.optim.LBFGS([beta, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    ridge = 0.05

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = z[tt] @ beta
        loss = cox_loss(out[:, 0], time, event, cfg.train.ties) + ridge * beta.pow(2).sum()
        if w.sum() > 0:
            bce = F.binary_cross_entropy_with_logits(out[:, 1] + bias, y, weight=w, reduction="sum")
            loss = loss + cfg.train.binary_weight * bce / w.sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        out = z @ beta
        prob = torch.sigmoid(out[:, 1] + bias).numpy()
    risk = out[:, 0].numpy()
    return MethodOutput(risk[train], risk[test], prob[test], {"n_inputs": int(z.shape[1])})


def _abmil_logits(mil: Any, bags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``GatedAttentionMIL.forward_logits`` for a padded batch (B, R, F) with a mask (B, R)."""
    h = mil.embed(bags)
    scores = mil.attn_w(torch.tanh(mil.attn_v(h)) * torch.sigmoid(mil.attn_u(h))).squeeze(-1)
    attention = torch.softmax(scores.masked_fill(~mask, -1e4), dim=1)
    return mil.classifier((attention.unsqueeze(-1) * h).sum(1))


@register_method("abmil_region_means")
def fit_predict_abmil(
    data: SlideData, train: np.ndarray, test: np.ndarray, cfg: CelleconetConfig
) -> MethodOutput:
    from training.models import GatedAttentionMIL

    codebook = _codebook(data, train, cfg)
    r_max = max(s.n_regions for s in data.sentences)
    n_feat = len(codebook.feature_names)
    x = np.zeros((len(data.names), r_max, n_feat), np.float32)
    mask = np.zeros((len(data.names), r_max), bool)
    for i, (s, f) in enumerate(zip(data.sentences, data.features, strict=True)):
        z = s.gather(codebook.standardise(f))  # (R, M, F)
        n = s.cell_mask.sum(1, keepdims=True).clip(min=1)
        x[i, : s.n_regions] = z.sum(1) / n
        mask[i, : s.n_regions] = True
    bags, bag_mask = torch.as_tensor(x), torch.as_tensor(mask)
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    mil = GatedAttentionMIL(n_feat, hidden=cfg.model.dim, n_classes=2, dropout=0.1)
    target, weight = horizon_targets(data.time, data.event, cfg.train.horizon_years)
    time = torch.as_tensor(data.time, dtype=torch.float32)
    event = torch.as_tensor(data.event, dtype=torch.float32)
    y, w = torch.as_tensor(target), torch.as_tensor(weight)
    n_batches = max(1, round(len(train) / cfg.train.batch_slides))
    opt = torch.optim.AdamW(mil.parameters(), lr=cfg.train.lr * 3, weight_decay=1e-2)
    mil.train()
    for _ in range(cfg.train.epochs):
        perm = train[torch.randperm(len(train), generator=gen).numpy()]
        for part in np.array_split(perm, n_batches):
            logits = _abmil_logits(mil, bags[part], bag_mask[part])
            loss = cox_loss(logits[:, 0], time[part], event[part], cfg.train.ties)
            if w[part].sum() > 0:
                bce = F.binary_cross_entropy_with_logits(
                    logits[:, 1], y[part], weight=w[part], reduction="sum"
                )
                loss = loss + cfg.train.binary_weight * bce / w[part].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    mil.eval()
    with torch.no_grad():
        scores = _abmil_logits(mil, bags, bag_mask).numpy()
    prob = 1 / (1 + np.exp(-scores[:, 1]))
    return MethodOutput(scores[train, 0], scores[test, 0], prob[test], {})
