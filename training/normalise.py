"""The core's preprocessing on the torch side: the student sees what the engine feeds the graph.

Plain uint8 tiles (fine-tuning bags, evaluation fields) go through the core's
``xmag.preprocess.Preprocessor`` itself (``preprocess_tiles``); augmented views, which exist only
as float tensors in [0, 1], are normalised by ``Normalise``, built from the same Preprocessor's
mean, std and channel order. ``tests/test_training_data.py`` checks that the two agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from xmag.preprocess import Preprocessor

__all__ = ["Normalise", "preprocess_tiles"]


class Normalise(nn.Module):
    """(B, 3, H, W) float RGB in [0, 1] -> the model input ``preprocessor`` would give."""

    def __init__(self, preprocessor: Preprocessor):
        super().__init__()
        self.preprocessor = preprocessor
        # Model channel c reads RGB channel channels[c], as the core's lookup does.
        self.channels = [2, 1, 0] if preprocessor.channel_order == "BGR" else [0, 1, 2]
        self.register_buffer(
            "mean", torch.tensor(preprocessor.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(preprocessor.std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, images: Tensor) -> Tensor:
        return (images[:, self.channels] - self.mean) / self.std


def preprocess_tiles(
    preprocessor: Preprocessor, pixels: np.ndarray, device: torch.device | str = "cpu"
) -> Tensor:
    """uint8 RGB (n, h, w, 3) -> float32 (n, 3, h, w) on ``device``, by the core's preprocessor.

    Raises:
        XmagUsageError: not a uint8 (n, h, w, 3) array.
    """
    return torch.from_numpy(preprocessor(np.ascontiguousarray(pixels))).float().to(device)
