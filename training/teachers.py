"""Frozen 20x teachers: a timm model from a local weights file (UNI2-h by default), or the
deterministic handcrafted teacher of the demo (stain separation and texture statistics).

Both take 20x tiles as (N, 3, t, t) float RGB in [0, 1] (not normalised: each teacher applies its
own normalisation) and return (N, D) embeddings.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import TeacherConfig, TeacherKind
from training.models import load_weights_into, read_state_dict
from training.normalise import Normalise
from xmag.errors import ModelPackageError
from xmag.preprocess import Preprocessor

__all__ = [
    "UNI2H_ARCH",
    "HandcraftedTeacher",
    "Teacher",
    "TimmTeacher",
    "build_teacher",
    "uni2h_timm_kwargs",
]

UNI2H_ARCH = "vit_giant_patch14_224"
# Ruifrok & Johnston optical densities of haematoxylin, eosin and DAB (rows, RGB order).
_HED_FROM_RGB_ROWS = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_PERCENTILES = (0.1, 0.5, 0.9)
_VARIANCE_SCALES_PX = (4, 8, 16)  # block sizes of the local-variance statistics, 20x px
_QUANTILE_STRIDE = 4


def uni2h_timm_kwargs() -> dict[str, Any]:
    """timm settings that build UNI2-h: ViT-giant/14, 24 blocks of width 1536, 24 heads, SwiGLU
    MLP, layer scale, 8 register tokens, no position embedding on prefix tokens; 1536-d output."""
    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }


class Teacher(nn.Module):
    """A frozen tile encoder: ``forward(tiles [N, 3, t, t] in [0, 1]) -> [N, embed_dim]``."""

    embed_dim: int

    def freeze(self) -> Teacher:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never leaves eval mode (no dropout, frozen norms), whatever its parent does.
        return super().train(False)


class TimmTeacher(Teacher):
    """Any timm model loaded from a local weights file, frozen, ImageNet-normalised input."""

    def __init__(self, model: nn.Module, preprocessor: Preprocessor | None = None):
        super().__init__()
        self.model = model
        self.embed_dim = int(model.num_features)
        # The core's ImageNet statistics unless the teacher was trained with others.
        self.normalise = Normalise(preprocessor or Preprocessor())
        self.freeze()

    @torch.no_grad()
    def forward(self, tiles: Tensor) -> Tensor:
        return self.model(self.normalise(tiles)).float()


def build_timm_teacher_model(
    cfg: TeacherConfig, *, device: str | torch.device = "cpu"
) -> nn.Module:
    """The teacher's timm module with random weights (``device="meta"`` allocates nothing)."""
    if cfg.arch.lower() in ("uni2-h", "uni2h", "uni2_h"):
        arch, kwargs = UNI2H_ARCH, {**uni2h_timm_kwargs(), **cfg.timm_kwargs}
    else:
        arch, kwargs = cfg.arch, {"num_classes": 0, **cfg.timm_kwargs}
    with torch.device(device):
        return timm.create_model(arch, pretrained=False, **kwargs)


class HandcraftedTeacher(Teacher):
    """Deterministic 20x features: colour-deconvolution optical densities and texture statistics.

    Per tile: haematoxylin, eosin and DAB densities (mean, std, 10/50/90th percentiles), gradient
    energy of grey level and haematoxylin, and local variance in 4, 8 and 16 px blocks on both;
    the 23 statistics are standardised with statistics fitted once on training tiles (``fit``), then
    concatenated with ``tanh`` of a fixed seeded random projection of them. Nothing is learned
    by gradient and nothing is downloaded.
    """

    n_stats = 3 * (2 + len(_PERCENTILES)) + 2 * (1 + len(_VARIANCE_SCALES_PX))

    def __init__(self, projection_dim: int = 64, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(self.n_stats, projection_dim, generator=gen) / self.n_stats**0.5
        rows = torch.tensor(_HED_FROM_RGB_ROWS)
        rows = rows / rows.norm(dim=1, keepdim=True)
        self.register_buffer("hed_from_od", torch.linalg.inv(rows))  # od @ this -> densities
        self.register_buffer("projection", proj)
        self.register_buffer("stat_mean", torch.zeros(self.n_stats))
        self.register_buffer("stat_std", torch.ones(self.n_stats))
        self.embed_dim = self.n_stats + projection_dim
        self.freeze()

    @torch.no_grad()
    def statistics(self, tiles: Tensor) -> Tensor:
        """(N, n_stats) raw statistics of (N, 3, t, t) RGB tiles in [0, 1]."""
        x = tiles.float().clamp(0, 1)
        od = -torch.log((x * 255.0 + 1.0) / 256.0)  # optical density per RGB channel
        hed = torch.einsum("nchw,cs->nshw", od, self.hed_from_od)
        flat = hed.flatten(2)
        # Percentiles on a fixed 1-in-16 pixel lattice: sorting every pixel costs 10x as much.
        sub = hed[:, :, ::_QUANTILE_STRIDE, ::_QUANTILE_STRIDE].flatten(2)
        q = torch.quantile(sub, torch.tensor(_PERCENTILES, device=x.device), dim=2)  # (3q, N, 3)
        stain = [flat.mean(2), flat.std(2), *q.unbind(0)]
        grey = x.mean(1, keepdim=True)
        haem = hed[:, :1]
        texture = [self._texture(grey), self._texture(haem)]
        return torch.cat([*stain, *texture], dim=1)

    @staticmethod
    def _texture(img: Tensor) -> Tensor:
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=img.device) / 8
        k = torch.stack([kx, kx.T]).unsqueeze(1)
        grad = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), k)
        feats = [torch.log1p(1e3 * grad.pow(2).sum(1).mean((1, 2))).unsqueeze(1)]
        # Variance inside non-overlapping s x s blocks: texture at s px (2 um at s=4, 20x).
        for s in _VARIANCE_SCALES_PX:
            mean = F.avg_pool2d(img, s, stride=s, ceil_mode=True)
            mean_sq = F.avg_pool2d(img * img, s, stride=s, ceil_mode=True)
            var = (mean_sq - mean * mean).clamp_min(0)
            feats.append(torch.log1p(1e3 * var.mean((1, 2, 3))).unsqueeze(1))
        return torch.cat(feats, dim=1)

    @torch.no_grad()
    def fit(self, tiles: Tensor) -> HandcraftedTeacher:
        """Set the standardisation from representative 20x tiles (N >= 2)."""
        stats = self.statistics(tiles)
        self.stat_mean.copy_(stats.mean(0))
        self.stat_std.copy_(stats.std(0).clamp_min(1e-4))
        return self

    @torch.no_grad()
    def forward(self, tiles: Tensor) -> Tensor:
        z = (self.statistics(tiles) - self.stat_mean) / self.stat_std
        return torch.cat([z, torch.tanh(z @ self.projection)], dim=1)


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """The frozen teacher a config describes.

    Raises:
        ModelPackageError: a timm teacher without a weights file, or weights that do not fit.
    """
    if cfg.kind is TeacherKind.HANDCRAFTED:
        return HandcraftedTeacher(cfg.projection_dim, cfg.seed)
    if cfg.weights is None:
        raise ModelPackageError(
            f"teacher {cfg.arch!r} needs a local weights file (teacher.weights); nothing is "
            "downloaded. For UNI2-h give the path of its pytorch_model.bin."
        )
    state_dict = read_state_dict(cfg.weights)  # fail on a bad file before building a giant
    model = build_timm_teacher_model(cfg)
    load_weights_into(model, state_dict, source=cfg.weights)
    return TimmTeacher(model)
