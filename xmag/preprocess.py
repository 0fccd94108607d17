"""The one preprocessing of model input: uint8 RGB tiles -> normalised NCHW tensors.

Serving (``xmag.engine``), parity checks (``model_export``), fine-tuning and distillation
(``training``) all turn tiles into model input through ``Preprocessor``, built from a package
card's ``InputSpec`` (or the same mean/std/dtype a training config declares), so train/serve skew
in normalisation cannot creep in::

    x[c] = (pixels[..., src[c]] / 255 - mean[c]) / std[c]      src = RGB or BGR order

The arithmetic is done once per channel and uint8 value in float64 and rounded once to the model's
dtype (a 3 x 256 lookup table): a gather per pixel instead of four float passes over the batch,
tile by tile so each gather stays in cache (about 0.25 ms of CPU per 224 px tile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from xmag.errors import XmagUsageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessor"]

#: ImageNet channel statistics (RGB, in [0, 1]): the XMAG student's and most encoders' input.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessor:
    """uint8 RGB (n, h, w, 3) -> model input (n, 3, h, w).

    Attributes:
        mean, std: per-channel statistics of the model's channels, in [0, 1] units.
        channel_order: "RGB", or "BGR" for models that read channels reversed.
        dtype: "float32" or "float16".
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["float32", "float16"] = "float32"
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.std):
            raise XmagUsageError(f"std must be positive per channel, got {self.std}")
        levels = np.arange(256, dtype=np.float64)[None, :] / 255.0
        mean = np.asarray(self.mean, dtype=np.float64)[:, None]
        std = np.asarray(self.std, dtype=np.float64)[:, None]
        object.__setattr__(self, "_lut", ((levels - mean) / std).astype(self.np_dtype))

    @classmethod
    def from_spec(cls, spec: object) -> Preprocessor:
        """From anything with ``mean``, ``std``, ``channel_order`` and ``dtype`` (a card's
        ``InputSpec``)."""
        return cls(
            mean=_triple(getattr(spec, "mean")),  # noqa: B009 - duck-typed spec
            std=_triple(getattr(spec, "std")),  # noqa: B009
            channel_order=getattr(spec, "channel_order", "RGB"),
            dtype=getattr(spec, "dtype", "float32"),
        )

    @property
    def np_dtype(self) -> type[np.floating]:
        return np.float16 if self.dtype == "float16" else np.float32

    @property
    def _src(self) -> tuple[int, int, int]:
        """Model channel c reads RGB channel _src[c]."""
        return (2, 1, 0) if self.channel_order == "BGR" else (0, 1, 2)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB (n, h, w, 3) -> (n, 3, h, w) in the model's dtype.

        Raises:
            XmagUsageError: not a uint8 (n, h, w, 3) array.
        """
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise XmagUsageError(
                f"expected (n, h, w, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}"
            )
        n, h, w, _ = pixels.shape
        out = np.empty((n, 3, h, w), dtype=self.np_dtype)
        # One tile plane at a time: source and destination of each gather stay in the CPU's
        # cache (measured 0.25 vs 0.40 ms of CPU per 224 px tile for a whole-batch gather).
        for i in range(n):
            tile = pixels[i]
            for c, src in enumerate(self._src):
                np.take(self._lut[c], tile[..., src], out=out[i, c])
        return out


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
