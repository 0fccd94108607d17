"""Paired augmentation: the same flips and colour jitter on a field's 20x and 5x images.

Flips act on the whole 20x field before it is cut into tiles, so a horizontal flip moves tile
(r, c) to (r, grid-1-c) and mirrors its content, exactly as it moves the student's patch tokens:
the spatial correspondence holds by construction (tested in tests/test_training_losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.config import AugmentConfig

__all__ = [
    "AugmentParams",
    "apply_params",
    "cut_tiles",
    "paired_augment",
    "sample_params",
    "to_float",
]

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample parameters, each a (B,) tensor: flips (bool) and jitter factors."""

    hflip: Tensor
    vflip: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # fraction of a full turn


def to_float(images: np.ndarray | Tensor) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def cut_tiles(field: Tensor, grid: int) -> Tensor:
    """(B, 3, F, F) field -> (B, grid*grid, 3, F/grid, F/grid) tiles in row-major order."""
    b, c, h, w = field.shape
    t = h // grid
    if h != w or t * grid != h:
        raise ValueError(f"field of {h}x{w} px does not cut into {grid}x{grid} square tiles")
    x = field.reshape(b, c, grid, t, grid, t).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, grid * grid, c, t, t)


def sample_params(n: int, cfg: AugmentConfig, gen: torch.Generator) -> AugmentParams:
    """Draw parameters for ``n`` samples from ``gen`` (deterministic given its state)."""

    def factor(strength: float) -> Tensor:
        return 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * strength

    return AugmentParams(
        hflip=torch.rand(n, generator=gen) < cfg.hflip,
        vflip=torch.rand(n, generator=gen) < cfg.vflip,
        brightness=factor(cfg.brightness),
        contrast=factor(cfg.contrast),
        saturation=factor(cfg.saturation),
        hue=(torch.rand(n, generator=gen) * 2 - 1) * cfg.hue,
    )


def apply_params(images: Tensor, p: AugmentParams, *, contrast_ref: Tensor | None = None) -> Tensor:
    """Apply flips and colour jitter to (B, 3, H, W) images in [0, 1].

    ``contrast_ref`` (B,) is the grey level contrast is taken about; pass the same one for the
    20x and 5x views so both get the same colour transform (default: this image's mean grey).
    """
    x = images
    x = torch.where(p.hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(p.vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    x = x * p.brightness.view(-1, 1, 1, 1)
    grey = _grey(x)
    ref = contrast_ref * p.brightness if contrast_ref is not None else grey.mean((1, 2, 3))
    x = ref.view(-1, 1, 1, 1) + (x - ref.view(-1, 1, 1, 1)) * p.contrast.view(-1, 1, 1, 1)
    grey = _grey(x)
    x = grey + (x - grey) * p.saturation.view(-1, 1, 1, 1)
    x = _rotate_hue(x, p.hue)
    return x.clamp(0.0, 1.0)


def paired_augment(
    hi: Tensor, lo: Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One augmented view of (B, 3, F, F) 20x fields and (B, 3, S, S) 5x views, same params."""
    p = sample_params(hi.shape[0], cfg, gen)
    ref = _grey(lo).mean((1, 2, 3))
    return apply_params(hi, p, contrast_ref=ref), apply_params(lo, p, contrast_ref=ref)


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    m = _RGB_TO_YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", m, x)
    theta = (turns * 2 * torch.pi).to(x.dtype).view(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), yiq)
