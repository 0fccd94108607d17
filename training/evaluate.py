"""Evaluation: linear probe and kNN on tile embeddings, teacher-student agreement, reports.

Agreement is measured on held-out fields: the cosine between the student's projected CLS and the
mean teacher tile embedding (what the global loss optimises), the cosine of each pooled patch
token's projection with its 20x tile, and linear CKA between student CLS and teacher mean (which
needs no projection head, so it also compares students trained with different heads).

Every agreement comes with the predict-the-mean baseline (each field scored against the mean
teacher embedding of the *other* fields, which a constant student can reach) and the spread of
the student's embeddings (``training.spread``): a student whose CLS is (nearly) the same vector
for every field is flagged ``collapsed``, whatever its cosines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.augment import cut_tiles, to_float
from training.data import FieldPair, pairs_to_arrays
from training.losses import DistillLoss, linear_cka, pool_patch_tokens
from training.models import student_tokens
from training.normalise import preprocess_tiles
from training.spread import embedding_spread
from training.teachers import Teacher
from xmag.preprocess import Preprocessor

__all__ = [
    "field_agreement",
    "knn_accuracy",
    "linear_probe",
    "write_report",
]


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (
        torch.as_tensor((train - mu) / sd, dtype=torch.float32),
        torch.as_tensor((test - mu) / sd, dtype=torch.float32),
    )


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    weight_decay: float = 1e-3,
    steps: int = 300,
) -> dict[str, float]:
    """Multinomial logistic regression (L-BFGS, standardised features): accuracy and balanced
    accuracy on the test set."""
    xtr, xte = _standardise(np.asarray(train_x), np.asarray(test_x))
    ytr = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    n_classes = int(max(ytr.max().item(), int(np.max(test_y)))) + 1
    lin = nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = lin(xte).argmax(1).numpy()
    return _accuracies(np.asarray(test_y), pred)


def knn_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20
) -> dict[str, float]:
    """Cosine kNN with similarity-weighted votes (exp(sim / 0.07)), as in DINO's evaluation."""
    a = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    b = F.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    ytr = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    n_classes = int(max(ytr.max().item(), int(np.max(test_y)))) + 1
    sims = b @ a.T
    k = min(k, a.shape[0])
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(b.shape[0], n_classes).scatter_add_(1, ytr[idx], torch.exp(top / 0.07))
    return _accuracies(np.asarray(test_y), votes.argmax(1).numpy())


def _accuracies(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    per_class = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(per_class))}


@torch.no_grad()
def field_agreement(
    student: nn.Module,
    heads: DistillLoss,
    teacher: Teacher,
    pairs: Sequence[FieldPair],
    *,
    preprocessor: Preprocessor,
    batch_size: int = 8,
    reference: torch.Tensor | None = None,
    local_reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Teacher-student agreement on (held-out) fields, unaugmented.

    The 5x views go through ``preprocessor`` (the core's, from the student config), as served.

    ``reference`` (Dt,), e.g. the mean teacher field embedding of the training fields, adds
    ``constant_baseline_cosine``: how well predicting that one vector for every field would score;
    ``local_reference`` (Dt,) does the same for every 20x tile (``constant_baseline_local_cosine``).

    Returns:
        ``global_cosine`` (mean, std, min over fields), ``local_cosine`` (mean over fields and
        the grid*grid positions), ``cka_cls_vs_teacher_mean`` and ``cka_local`` (linear CKA),
        ``n_fields``, ``predict_the_mean_baseline`` (leave-one-field-out mean teacher embedding
        as the prediction: global and local cosine), ``student_spread`` and ``teacher_spread``
        (``training.spread.embedding_spread`` of the CLS and of the teacher field means).
    """
    student.eval()
    heads.eval()
    g_cos, l_cos, cls_all, tmean_all, loc_all, tloc_all = [], [], [], [], [], []
    for i in range(0, len(pairs), batch_size):
        hi_np, lo_np = pairs_to_arrays(pairs[i : i + batch_size])
        tiles = cut_tiles(to_float(hi_np), heads.grid)
        t = teacher(tiles.flatten(0, 1)).view(tiles.shape[0], tiles.shape[1], -1)
        cls, patches = student_tokens(student, preprocess_tiles(preprocessor, lo_np))
        local = pool_patch_tokens(patches, heads.grid)
        g_cos.append(F.cosine_similarity(heads.global_head(cls), t.mean(1), dim=-1))
        l_cos.append(F.cosine_similarity(heads.local_head(local), t, dim=-1).flatten())
        cls_all.append(cls)
        tmean_all.append(t.mean(1))
        loc_all.append(local.flatten(0, 1))
        tloc_all.append(t.flatten(0, 1))
    g = torch.cat(g_cos)
    extra = {}
    if reference is not None:
        base = F.cosine_similarity(torch.cat(tmean_all), reference.view(1, -1), dim=-1)
        extra["constant_baseline_cosine"] = {"mean": float(base.mean())}
    if local_reference is not None:
        tiles_t = torch.cat(tloc_all)
        base = F.cosine_similarity(tiles_t, local_reference.view(1, -1), dim=-1)
        extra["constant_baseline_local_cosine"] = {"mean": float(base.mean())}
    tmean = torch.cat(tmean_all).double()
    tloc = torch.cat(tloc_all).double()
    baseline: dict[str, Any] = {}
    if len(tmean) > 1:  # leave-one-out: the mean of the other fields, never the field itself
        loo = (tmean.sum(0, keepdim=True) - tmean) / (len(tmean) - 1)
        baseline["global_cosine"] = float(F.cosine_similarity(tmean, loo, dim=-1).mean())
        per_field = tloc.view(len(tmean), -1, tloc.shape[-1])
        k = per_field.shape[1]
        loo_local = (per_field.sum((0, 1), keepdim=True) - per_field.sum(1, keepdim=True)) / (
            (len(tmean) - 1) * k
        )
        baseline["local_cosine"] = float(
            F.cosine_similarity(per_field, loo_local.expand_as(per_field), dim=-1).mean()
        )
    cls_np = torch.cat(cls_all).double().numpy()
    return {
        **extra,
        "n_fields": len(pairs),
        "predict_the_mean_baseline": baseline,
        "student_spread": embedding_spread(cls_np),
        "teacher_spread": embedding_spread(tmean.numpy()),
        "global_cosine": {"mean": float(g.mean()), "std": float(g.std()), "min": float(g.min())},
        "local_cosine": {"mean": float(torch.cat(l_cos).mean())},
        "cka_cls_vs_teacher_mean": linear_cka(torch.cat(cls_all), torch.cat(tmean_all)),
        "cka_local": linear_cka(torch.cat(loc_all), torch.cat(tloc_all)),
    }


def write_report(report: dict[str, Any], out_dir: Path, *, title: str) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` (a nested bullet list of the same numbers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    lines = [f"# {title}", ""]
    _md(report, lines, 0)
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray | Tensor):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _md(obj: Any, lines: list[str], depth: int) -> None:
    pad = "  " * depth
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v and not _is_flat_numbers(v):
                lines.append(f"{pad}- **{k}**:")
                _md(v, lines, depth + 1)
            else:
                lines.append(f"{pad}- **{k}**: {_fmt(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict):
                lines.append(f"{pad}-")
                _md(v, lines, depth + 1)
            else:
                lines.append(f"{pad}- {_fmt(v)}")


def _is_flat_numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int | float) for x in v) and len(v) <= 12


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)
