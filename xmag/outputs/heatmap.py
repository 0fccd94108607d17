"""heatmap.png: the slide thumbnail with per-tile values as a colour overlay.

The picture has three parts: a header naming what is coloured, the thumbnail with each kept tile
filled by its value's colour (viridis, blended so the tissue stays visible) and the tissue mask's
outline, and a colour bar on the right with its minimum and maximum.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from xmag.outputs._atomic import atomic_write

__all__ = ["MIN_SIDE_PX", "render_heatmap", "write_heatmap"]

MIN_SIDE_PX = 512  # thumbnails smaller than this are enlarged so tiles and labels stay legible
MAX_SIDE_PX = 1024  # larger ones are reduced: 5x tiles stay tens of pixels, the PNG stays small
OVERLAY_ALPHA = 0.5
OUTLINE_RGB = (0, 200, 255)  # cyan: visible on tissue, background and viridis alike
_HEADER_PX = 28
_BAR_PANEL_PX = 90
_BAR_W_PX = 20
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.45


def _colormap(unit: np.ndarray) -> np.ndarray:
    """(..., ) values in [0, 1] -> (..., 3) uint8 RGB viridis."""
    idx = np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(idx.reshape(-1, 1), cv2.COLORMAP_VIRIDIS).reshape(*idx.shape, 3)
    return bgr[..., ::-1].copy()


def render_heatmap(
    thumbnail: np.ndarray,
    downsample: float,
    tissue_mask: np.ndarray,
    coords: np.ndarray,
    level0_tile_px: float,
    values: np.ndarray,
    label: str,
) -> np.ndarray:
    """Draw the heatmap; returns (h, w, 3) uint8 RGB.

    Args:
        thumbnail: (h, w, 3) uint8 RGB image of the whole slide.
        downsample: level-0 pixels per thumbnail pixel.
        tissue_mask: (h, w) bool mask over the same image (outlined); other sizes are resized.
        coords: (N, 2) tile top-left (x, y) in level-0 pixels.
        level0_tile_px: tile side in level-0 pixels.
        values: (N,) value per tile (any range: the colour bar states min and max).
        label: what the values are, printed above the image and used as the colour bar's title.
    """
    h, w = thumbnail.shape[:2]
    scale = min(max(1.0, MIN_SIDE_PX / max(h, w)), MAX_SIDE_PX / max(h, w))
    if scale != 1.0:
        w, h = round(w * scale), round(h * scale)
        shrink = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        thumbnail = cv2.resize(thumbnail, (w, h), interpolation=shrink)
    ds = downsample / scale  # level-0 pixels per output pixel
    vals = np.asarray(values, dtype=np.float64)
    vmin, vmax = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    span = vmax - vmin
    unit = (vals - vmin) / span if span > 0 else np.full_like(vals, 0.5)
    colours = _colormap(unit)
    cover = np.zeros((h, w), dtype=bool)
    paint = np.zeros((h, w, 3), dtype=np.uint8)
    side = max(1, round(level0_tile_px / ds))
    for (x, y), rgb in zip(np.asarray(coords, dtype=np.float64), colours, strict=True):
        x0, y0 = max(0, round(x / ds)), max(0, round(y / ds))
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        paint[y0:y1, x0:x1] = rgb
        cover[y0:y1, x0:x1] = True
    blended = cv2.addWeighted(thumbnail, 1 - OVERLAY_ALPHA, paint, OVERLAY_ALPHA, 0.0)
    image = np.ascontiguousarray(thumbnail).copy()
    np.copyto(image, blended, where=cover[..., None])
    mask = cv2.resize(tissue_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, OUTLINE_RGB, thickness=max(1, round(max(h, w) / 600)))
    return _frame(image, label, vmin, vmax)


def _frame(image: np.ndarray, label: str, vmin: float, vmax: float) -> np.ndarray:
    """Add the header (label) and the colour bar panel around ``image``."""
    h, w = image.shape[:2]
    bar_h = max(64, h - 40)
    out = np.full((_HEADER_PX + max(h, bar_h + 40), w + _BAR_PANEL_PX, 3), 255, dtype=np.uint8)
    out[_HEADER_PX : _HEADER_PX + h, :w] = image
    _text(out, label, (6, 19), _FONT_SCALE + 0.1)
    top = _HEADER_PX + 20
    gradient = _colormap(np.linspace(1.0, 0.0, bar_h))  # top = max
    x0 = w + 10
    out[top : top + bar_h, x0 : x0 + _BAR_W_PX] = gradient[:, None, :]
    cv2.rectangle(out, (x0, top), (x0 + _BAR_W_PX, top + bar_h), (0, 0, 0), 1)
    tx = x0 + _BAR_W_PX + 4
    _text(out, f"{vmax:.3g}", (tx, top + 10))
    _text(out, f"{vmin:.3g}", (tx, top + bar_h))
    return out


def _text(
    image: np.ndarray, text: str, origin: tuple[int, int], scale: float = _FONT_SCALE
) -> None:
    cv2.putText(image, text, origin, _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def write_heatmap(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG atomically."""
    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
            tmp, format="PNG", compress_level=4
        )
    return Path(path)
