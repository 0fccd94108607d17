"""Cross-magnification losses: global alignment and local spatial token mapping.

Frames: a 20x field is cut into ``grid x grid`` teacher tiles in row-major order (tile index
``r * grid + c`` covers rows ``r`` and columns ``c`` of the field). The student's ``P x P`` patch
tokens (row-major over its 5x image of the same field) are average-pooled in ``P/grid`` blocks to
``grid x grid`` tokens in the same row-major order: pooled token ``k`` sees tile ``k``'s area.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import ProjectionHead

__all__ = [
    "DistillLoss",
    "cosine_agreement",
    "linear_cka",
    "negative_cosine",
    "pool_patch_tokens",
]


def pool_patch_tokens(patch_tokens: Tensor, grid: int) -> Tensor:
    """Average-pool (B, P*P, D) row-major patch tokens into (B, grid*grid, D) row-major tokens.

    Raises:
        ValueError: the token count is not a square whose side is a multiple of ``grid``.
    """
    b, n, d = patch_tokens.shape
    side = round(n**0.5)
    if side * side != n or side % grid:
        raise ValueError(f"{n} patch tokens do not form a square grid divisible by {grid}")
    x = patch_tokens.transpose(1, 2).reshape(b, d, side, side)
    pooled = F.adaptive_avg_pool2d(x, grid)  # exact block means since side % grid == 0
    return pooled.flatten(2).transpose(1, 2)


def negative_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean over all leading positions of -cos(a, b) along the last axis (range [-1, 1])."""
    return -F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


class DistillLoss(nn.Module):
    """Global + local distillation heads and loss.

    ``global_head`` maps the student CLS to the teacher space and is compared with the mean of
    the field's tile embeddings; ``local_head`` maps each pooled patch token and is compared with
    the embedding of the 20x tile at the same position.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        grid: int = 4,
        hidden: int | None = None,
        global_weight: float = 1.0,
        local_weight: float = 0.5,
    ):
        super().__init__()
        hidden = hidden or teacher_dim
        self.grid = grid
        self.global_weight, self.local_weight = global_weight, local_weight
        self.global_head = ProjectionHead(student_dim, hidden, teacher_dim)
        self.local_head = ProjectionHead(student_dim, hidden, teacher_dim)

    def forward(
        self, cls: Tensor, patch_tokens: Tensor, teacher_tiles: Tensor
    ) -> dict[str, Tensor]:
        """Losses for a batch.

        Args:
            cls: (B, Ds) student CLS tokens.
            patch_tokens: (B, P*P, Ds) student patch tokens, row-major.
            teacher_tiles: (B, grid*grid, Dt) teacher embeddings of the field's tiles, row-major.

        Returns:
            ``{"loss", "global", "local"}`` scalars; ``loss`` is the weighted sum.
        """
        g = negative_cosine(self.global_head(cls), teacher_tiles.mean(1))
        local_tokens = pool_patch_tokens(patch_tokens, self.grid)
        loc = negative_cosine(self.local_head(local_tokens), teacher_tiles)
        total = self.global_weight * g + self.local_weight * loc
        return {"loss": total, "global": g.detach(), "local": loc.detach()}


def cosine_agreement(student_proj: Tensor, teacher: Tensor) -> Tensor:
    """Per-row cosine similarity (N,) between projected student and teacher embeddings."""
    return F.cosine_similarity(student_proj.float(), teacher.float(), dim=-1)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment of (N, Dx) and (N, Dy) representations, in [0, 1]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    hsic = (x.T @ y).pow(2).sum()
    denom = torch.sqrt((x.T @ x).pow(2).sum() * (y.T @ y).pow(2).sum())
    return float(hsic / denom) if denom > 0 else 0.0
